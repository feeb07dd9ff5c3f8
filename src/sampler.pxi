# sampler.pxi: part of llama2c._engine (included by _engine.pyx; one file per concern so that the
# kernels, weights, model/session and sampler bindings change independently).
from libc.math cimport isnan, isfinite


cdef class Sampler:
    """The next-token sampler chain of csrc/llama2c.h, in its documented order: logit bias,
    repetition / presence / frequency penalties over the last penalty_last_n accepted tokens,
    temperature (0 = greedy), top-k, top-p, min-p, then a draw from a seeded xorshift64* RNG.

    Positional arguments keep the earlier (vocab_size, temperature, top_p, top_k, seed) form.
    The penalty window holds what accept()/accept_many() pushed: the caller pushes the context
    (prompt included) and then each token it keeps. simd: the kernel table of its passes over
    the vocabulary (None: the default table; every table draws the same tokens)."""
    cdef l2c_sampler sp

    def __init__(self, int64_t vocab_size, double temperature=1.0, double top_p=1.0,
                 int64_t top_k=0, uint64_t seed=0, *, double min_p=0.0,
                 double repetition_penalty=1.0, double presence_penalty=0.0,
                 double frequency_penalty=0.0, int64_t penalty_last_n=0, logit_bias=None,
                 simd=None):
        cdef l2c_sampler_params p
        if vocab_size <= 0 or vocab_size > 2**31 - 1:
            raise ValueError(f"vocab_size must be in [1, 2**31), got {vocab_size}")
        if not (isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        if not 0 <= top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1], got {top_p}")
        if not 0 <= min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {min_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        if not (isfinite(repetition_penalty) and repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {repetition_penalty}")
        if not isfinite(presence_penalty):
            raise ValueError(f"presence_penalty must be finite, got {presence_penalty}")
        if not isfinite(frequency_penalty):
            raise ValueError(f"frequency_penalty must be finite, got {frequency_penalty}")
        if penalty_last_n < 0:
            raise ValueError(f"penalty_last_n must be >= 0, got {penalty_last_n}")
        p.temperature = <float>temperature
        p.top_p = <float>top_p
        p.min_p = <float>min_p
        p.top_k = top_k
        p.repetition_penalty = <float>repetition_penalty
        p.presence_penalty = <float>presence_penalty
        p.frequency_penalty = <float>frequency_penalty
        p.penalty_last_n = penalty_last_n
        l2c_sampler_free(&self.sp)          # __init__ called again: start over
        _check(l2c_sampler_init(&self.sp, vocab_size, &p, seed), "sampler")
        l2c_sampler_set_kernels(&self.sp, _table(simd))
        if logit_bias:
            self._set_bias(logit_bias)

    def __dealloc__(self):
        l2c_sampler_free(&self.sp)

    cdef _set_bias(self, dict bias):
        ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        vals = np.fromiter(bias.values(), dtype=np.float64, count=len(bias))
        if ids.size and (ids.min() < 0 or ids.max() >= self.sp.vocab_size):
            raise ValueError(f"logit_bias: token ids must be in [0, {self.sp.vocab_size})")
        if np.isnan(vals).any() or (vals == np.inf).any():
            raise ValueError("logit_bias: biases must be finite (or -inf to ban a token)")
        cdef const int32_t[::1] i32 = ids.astype(np.int32)
        cdef const float[::1] f32 = vals.astype(np.float32)
        _check(l2c_sampler_set_bias(&self.sp, &i32[0], &f32[0], i32.shape[0]), "logit_bias")

    @property
    def vocab_size(self):
        return self.sp.vocab_size

    @property
    def temperature(self):
        return self.sp.p.temperature

    @property
    def rng_state(self):
        """The RNG's state (an int); assign a saved value to continue a stream of draws."""
        return self.sp.rng_state

    @rng_state.setter
    def rng_state(self, uint64_t state):
        if state == 0:
            raise ValueError("rng_state must be nonzero (xorshift's state)")
        self.sp.rng_state = state

    @property
    def simd(self):
        """The kernel table of the passes over the vocabulary."""
        return self.sp.k.name.decode()

    @property
    def window_len(self):
        """Tokens in the penalty window (0 without penalties)."""
        return self.sp.window_len

    def sample(self, const float[::1] logits):
        """Draw one token id from logits (vocab_size,) through the chain; logits are not changed
        and the token is not accepted (call accept())."""
        if logits.shape[0] != self.sp.vocab_size:
            raise _shape_error("logits", (logits.shape[0],), (self.sp.vocab_size,))
        cdef int32_t tok
        with nogil:
            tok = l2c_sample(&self.sp, &logits[0])
        return tok

    def sample_accept(self, const float[::1] logits):
        """sample() then accept() the token, in one call (the generation loop's)."""
        if logits.shape[0] != self.sp.vocab_size:
            raise _shape_error("logits", (logits.shape[0],), (self.sp.vocab_size,))
        cdef int32_t tok
        with nogil:
            tok = l2c_sample(&self.sp, &logits[0])
            l2c_sampler_accept(&self.sp, tok)
        return tok

    def accept(self, int32_t token):
        """Push a token into the penalty window (the oldest leaves a full window)."""
        _check(l2c_sampler_accept(&self.sp, token), "accept")

    def accept_many(self, const int32_t[::1] tokens):
        """accept() each of tokens (int32 (n,)) in order: e.g. the context before sampling."""
        cdef int64_t i, n = tokens.shape[0]
        cdef int rc = L2C_OK
        with nogil:
            for i in range(n):
                rc = l2c_sampler_accept(&self.sp, tokens[i])
                if rc != L2C_OK:
                    break
        _check(rc, "accept_many")

    def reset_window(self):
        """Empty the penalty window."""
        l2c_sampler_reset_window(&self.sp)


def seed_state(uint64_t seed):
    """The RNG state a sampler seeded with `seed` starts from (Sampler.rng_state)."""
    return l2c_seed_state(seed)


def random_f32(uint64_t state, int64_t n):
    """(draws float32 (n,), the state after them): l2c_random_f32 from `state` (0 = as seed 0)."""
    out = np.empty(n, dtype=np.float32)
    cdef float[::1] o = out
    cdef uint64_t st = l2c_seed_state(state)
    cdef int64_t i
    for i in range(n):
        o[i] = l2c_random_f32(&st)
    return out, st


def logprobs(const float[:, ::1] logits, const int32_t[::1] tokens, int64_t k=0):
    """Log-softmax of each row of logits (n, vocab): (token_lp float32 (n,), top_ids int32 (n, k),
    top_lp float32 (n, k)). tokens (n,) picks the logprob each row reports (-1: none, NaN);
    top_* hold the k most likely tokens of the row, in descending order."""
    cdef int64_t n = logits.shape[0], V = logits.shape[1], r
    if tokens.shape[0] != n:
        raise _shape_error("tokens", (tokens.shape[0],), (n,))
    if not 0 <= k <= V:
        raise ValueError(f"k must be in [0, {V}], got {k}")
    if V == 0:
        raise ValueError("logits has no columns")
    lp = np.full(n, np.nan, dtype=np.float32)
    ids = np.empty((n, k), dtype=np.int32)
    tlp = np.empty((n, k), dtype=np.float32)
    scratch = np.empty(max(k, 1), dtype=np.int32)
    work = np.empty(V, dtype=np.float32)
    cdef float[::1] wv = work
    cdef float[::1] lpv = lp
    cdef int32_t[:, ::1] idv = ids
    cdef float[:, ::1] tlv = tlp
    cdef int32_t[::1] sv = scratch
    cdef int rc = L2C_OK
    for r in range(n):
        if not -1 <= tokens[r] < V:
            raise ValueError(f"tokens[{r}] = {tokens[r]} is outside [-1, {V})")
    if n == 0:
        return lp, ids, tlp
    with nogil:
        for r in range(n):
            rc = l2c_logprobs(&lpv[r], &idv[r, 0] if k else NULL, &tlv[r, 0] if k else NULL,
                              &logits[r, 0], V, tokens[r], k, &wv[0], &sv[0])
            if rc != L2C_OK:
                break
    _check(rc, "logprobs")
    return lp, ids, tlp
