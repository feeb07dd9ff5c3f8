# model.pxi: part of llama2c._engine (included by _engine.pyx; one file per concern so that the
# kernels, weights, model/session and sampler bindings change independently).
cdef class Engine:
    """The C model: config + weight pointers into the caller's arrays (kept alive here)."""
    cdef l2c_model m
    cdef l2c_layer *layers
    cdef list _keep
    cdef object _rope
    cdef readonly object config

    def __cinit__(self):
        self.layers = NULL

    def __init__(self, config, dict weights, simd=None, max_positions=None, int act_bits=16):
        """max_positions: positions to prepare RoPE tables for (default config.seq_len, at most
        config.max_context); no session of this engine can hold more. act_bits: activations of
        the int8 matmuls, 8 or 16 (two int8 planes: 128x finer, twice the integer work)."""
        cdef int64_t i
        self.config = config
        if max_positions is None:
            max_positions = config.seq_len
        if not 0 < max_positions <= config.max_context:
            raise ValueError(f"max_positions must be in [1, {config.max_context}], got {max_positions}")
        self._keep = []
        c = config
        self.m.cfg.dim = c.dim
        self.m.cfg.hidden_dim = c.hidden_dim
        self.m.cfg.n_layers = c.n_layers
        self.m.cfg.n_heads = c.n_heads
        self.m.cfg.n_kv_heads = c.n_kv_heads
        self.m.cfg.head_size = c.head_size
        self.m.cfg.vocab_size = c.vocab_size
        self.m.cfg.seq_len = max_positions
        self.m.cfg.norm_eps = c.norm_eps
        if act_bits not in (8, 16):
            raise ValueError(f"act_bits must be 8 or 16, got {act_bits}")
        self.m.cfg.act_bits = act_bits
        cdef int64_t d = c.dim, h = c.hidden_dim, qd = c.n_heads * c.head_size
        cdef int64_t kvd = c.n_kv_heads * c.head_size
        self.layers = <l2c_layer *>calloc(c.n_layers, sizeof(l2c_layer))
        if self.layers == NULL:
            raise MemoryError("Engine: cannot allocate the layer table")
        keep = self._keep

        def get(name):
            try:
                return weights[name]
            except KeyError:
                raise ValueError(f"missing tensor {name!r}") from None

        for i in range(c.n_layers):
            p = f"layers.{i}."
            self.layers[i].rms_att = _vector(get(p + "attention_norm"), d, p + "attention_norm", keep)
            self.layers[i].rms_ffn = _vector(get(p + "ffn_norm"), d, p + "ffn_norm", keep)
            _fill_matrix(&self.layers[i].wq, get(p + "wq"), (qd, d), p + "wq", keep)
            _fill_matrix(&self.layers[i].wk, get(p + "wk"), (kvd, d), p + "wk", keep)
            _fill_matrix(&self.layers[i].wv, get(p + "wv"), (kvd, d), p + "wv", keep)
            _fill_matrix(&self.layers[i].wo, get(p + "wo"), (d, qd), p + "wo", keep)
            _fill_matrix(&self.layers[i].w1, get(p + "w1"), (h, d), p + "w1", keep)
            _fill_matrix(&self.layers[i].w2, get(p + "w2"), (d, h), p + "w2", keep)
            _fill_matrix(&self.layers[i].w3, get(p + "w3"), (h, d), p + "w3", keep)
        self.m.layers = self.layers
        self.m.rms_final = _vector(get("norm"), d, "norm", keep)
        if c.shared_classifier:  # packed once: the embedding rows are looked up in the classifier
            _fill_matrix(&self.m.wcls, get("tok_embeddings"), (c.vocab_size, d), "tok_embeddings", keep)
            self.m.tok_embeddings = self.m.wcls
        else:
            _fill_matrix(&self.m.wcls, get("output"), (c.vocab_size, d), "output", keep)
            _fill_matrix(&self.m.tok_embeddings, get("tok_embeddings"), (c.vocab_size, d),
                         "tok_embeddings", keep, packed=False)
        cos_t, sin_t = rope_tables(max_positions, c.head_size,
                                   freqs=c.rope_frequencies(max_positions))
        self._rope = (cos_t, sin_t)
        cdef float[:, ::1] cv = cos_t, sv = sin_t
        self.m.rope_cos = &cv[0, 0]
        self.m.rope_sin = &sv[0, 0]
        self.m.k = _table(simd)
        _check(l2c_model_check(&self.m), "model")

    def __dealloc__(self):
        free(self.layers)
        self.layers = NULL

    @property
    def act_bits(self):
        """8 or 16: the activations of the int8 matmuls."""
        return self.m.cfg.act_bits

    @property
    def simd(self):
        """Name of the kernel table this model runs."""
        return self.m.k.name.decode()

    def set_simd(self, simd):
        """Switch this model's kernel table (None: the default)."""
        self.m.k = _table(simd)
        return self.simd


cdef class Session:
    """Per-conversation state of one Engine: activations and the KV cache. Not shared between
    threads (each thread uses its own session; the engine's weights are read-only)."""
    cdef l2c_state s
    cdef readonly Engine engine
    cdef bint busy
    cdef readonly int64_t context
    cdef readonly int64_t n_tokens      # positions whose keys/values the cache holds
    cdef volatile int32_t cancel_flag   # set by request_cancel(), checked between chunks

    def __init__(self, Engine engine, int64_t context=0, int64_t max_batch=64, int n_threads=1):
        self.engine = engine
        if context <= 0:
            context = engine.m.cfg.seq_len
        if context > engine.m.cfg.seq_len:
            raise ValueError(f"context {context} exceeds the model's {engine.m.cfg.seq_len} positions")
        self.context = context
        _check(l2c_state_init(&self.s, &engine.m, max_batch, context, _nt(n_threads)), "session")

    def __dealloc__(self):
        l2c_state_free(&self.s)

    @property
    def n_threads(self):
        return self.s.n_threads

    @n_threads.setter
    def n_threads(self, int n):
        self.s.n_threads = _nt(n)

    cdef int _enter(self) except -1:
        if self.busy:
            raise RuntimeError("this session is already running in another thread")
        self.busy = True
        return 0

    # ---- the stable API (generation, chat, server): tokens are appended at n_tokens ----------

    def request_cancel(self):
        """Ask a running eval() (in another thread) to stop at the next chunk boundary; it then
        raises GenerationCancelled. The flag is cleared when the next eval() starts."""
        self.cancel_flag = 1

    def truncate(self, int64_t n):
        """Keep the first n positions of the cache (0 <= n <= n_tokens), forget the rest."""
        if not 0 <= n <= self.n_tokens:
            raise ValueError(f"truncate: n must be in [0, {self.n_tokens}], got {n}")
        self.n_tokens = n

    def eval(self, const int32_t[::1] tokens, logits="last", float[:, ::1] out=None):
        """Run tokens (n,) at positions n_tokens.., appending their keys and values to the cache.

        logits: "last" returns the last token's logits (vocab,) (a new array); "all" returns
        (n, vocab) logits of every token (into `out` when given); "none" returns None.
        The prompt runs in chunks of max_batch tokens with the GIL released; between chunks a
        request_cancel() from another thread stops it with GenerationCancelled (the positions
        already run stay in the cache: n_tokens tells how many)."""
        from llama2c.errors import GenerationCancelled
        cdef int64_t n = tokens.shape[0], V = self.engine.m.cfg.vocab_size
        cdef int64_t done = 0, T, chunk = self.s.max_batch, pos
        cdef float *la = NULL
        cdef int rc = L2C_OK
        if logits not in ("last", "all", "none"):
            raise ValueError(f"logits must be 'last', 'all' or 'none', got {logits!r}")
        if n == 0:
            raise ValueError("eval: no tokens")
        if self.n_tokens + n > self.context:
            raise ContextLengthError(f"{n} tokens after {self.n_tokens} cached do not fit the "
                                     f"context of {self.context}")
        if logits == "all":
            if out is None:
                out = np.empty((n, V), dtype=np.float32)
            elif out.shape[0] != n or out.shape[1] != V:
                raise _shape_error("out", (out.shape[0], out.shape[1]), (n, V))
        self._enter()
        self.cancel_flag = 0
        try:
            while done < n:
                if self.cancel_flag:
                    raise GenerationCancelled(f"cancelled after {done} of {n} tokens")
                T = min(chunk, n - done)
                pos = self.n_tokens
                la = &out[done, 0] if logits == "all" else NULL
                with nogil:
                    rc = l2c_forward(&self.engine.m, &self.s, &tokens[done], T, pos, la)
                _check(rc, "eval")
                self.n_tokens += T
                done += T
        finally:
            self.busy = False
        if logits == "all":
            return np.asarray(out)
        if logits == "last":
            return self.last_logits()
        return None

    def export_kv(self):
        """The cache's contents for positions 0..n_tokens-1 as bytes (import_kv restores them
        into a session of the same engine). The format is private to this build."""
        cdef int64_t n = self.n_tokens, kvd = self.s.kv_dim, L = self.s.n_layers, l
        out = np.empty((2, L, n, kvd), dtype=np.float32)
        cdef float[:, :, :, ::1] o = out
        if n:
            for l in range(L):
                memcpy(&o[0, l, 0, 0], self.s.key_cache + l * self.s.seq_len * kvd, n * kvd * sizeof(float))
                memcpy(&o[1, l, 0, 0], self.s.value_cache + l * self.s.seq_len * kvd, n * kvd * sizeof(float))
        return out.tobytes()

    def import_kv(self, bytes data, int64_t n_tokens, last_logits=None):
        """Restore what export_kv returned for n_tokens positions (and, optionally, the logits
        of the last position) into this session, replacing its contents."""
        cdef int64_t kvd = self.s.kv_dim, L = self.s.n_layers, l
        if not 0 <= n_tokens <= self.context:
            raise ContextLengthError(f"a state of {n_tokens} positions does not fit the context of {self.context}")
        if len(data) != 2 * L * n_tokens * kvd * 4:
            raise ValueError(f"import_kv: {len(data)} bytes do not hold {n_tokens} positions of this model")
        arr = np.frombuffer(data, dtype=np.float32).reshape(2, L, n_tokens, kvd)
        cdef const float[:, :, :, ::1] a = arr
        cdef const float[::1] lv
        if n_tokens:
            for l in range(L):
                memcpy(self.s.key_cache + l * self.s.seq_len * kvd, &a[0, l, 0, 0], n_tokens * kvd * sizeof(float))
                memcpy(self.s.value_cache + l * self.s.seq_len * kvd, &a[1, l, 0, 0], n_tokens * kvd * sizeof(float))
        if last_logits is not None:
            lv = np.ascontiguousarray(last_logits, dtype=np.float32)
            if lv.shape[0] != self.engine.m.cfg.vocab_size:
                raise _shape_error("last_logits", (lv.shape[0],), (self.engine.m.cfg.vocab_size,))
            memcpy(self.s.logits, &lv[0], lv.shape[0] * sizeof(float))
        self.n_tokens = n_tokens

    # ---- the earlier API (positions given by the caller) -------------------------------------

    def forward(self, const int32_t[::1] tokens, int64_t pos0, float[:, ::1] logits_all=None):
        """Run tokens (n,) at positions pos0..; returns the last token's logits (a copy).
        If logits_all (n, vocab) is given it receives every row's logits."""
        cdef int64_t n = tokens.shape[0], V = self.engine.m.cfg.vocab_size
        cdef float *la = NULL
        cdef int rc
        if n == 0:
            raise ValueError("forward: no tokens")
        if pos0 < 0 or pos0 + n > self.context:
            raise ContextLengthError(
                f"{n} tokens at position {pos0} do not fit the context of {self.context}")
        if logits_all is not None:
            if logits_all.shape[0] != n or logits_all.shape[1] != V:
                raise _shape_error("logits_all", (logits_all.shape[0], logits_all.shape[1]), (n, V))
            la = &logits_all[0, 0]
        self._enter()
        try:
            with nogil:
                rc = l2c_forward(&self.engine.m, &self.s, &tokens[0], n, pos0, la)
        finally:
            self.busy = False
        _check(rc, "forward")
        return self.last_logits()

    def last_logits(self):
        """Copy of the logits (vocab,) of the last token run."""
        out = np.empty(self.engine.m.cfg.vocab_size, dtype=np.float32)
        cdef float[::1] o = out
        memcpy(&o[0], self.s.logits, self.engine.m.cfg.vocab_size * sizeof(float))
        return out

    def generate(self, const int32_t[::1] prompt, int64_t pos0, int64_t max_new, Sampler sampler,
                 const int32_t[::1] stop=None):
        """Prefill prompt at pos0, then sample up to max_new tokens (each fed back except the
        last), stopping after a stop id. Returns the generated ids (int32 array)."""
        cdef int64_t n_prompt = prompt.shape[0], n_out = 0, n_stop = 0
        cdef const int32_t *pp = NULL
        cdef const int32_t *sp = NULL
        cdef int rc
        if max_new < 0:
            raise ValueError(f"max_new must be >= 0, got {max_new}")
        if sampler.sp.vocab_size != self.engine.m.cfg.vocab_size:
            raise ValueError("sampler vocab size differs from the model's")
        if pos0 < 0 or pos0 + n_prompt > self.context:
            raise ContextLengthError(
                f"a prompt of {n_prompt} tokens at position {pos0} does not fit the context of {self.context}")
        if n_prompt == 0 and pos0 == 0:
            raise ValueError("generate: an empty prompt at position 0 has no logits to sample from")
        out = np.zeros(max(max_new, 1), dtype=np.int32)
        cdef int32_t[::1] o = out
        if n_prompt:
            pp = &prompt[0]
        if stop is not None and stop.shape[0]:
            sp = &stop[0]
            n_stop = stop.shape[0]
        self._enter()
        try:
            with nogil:
                rc = l2c_generate(&self.engine.m, &self.s, &sampler.sp, pp, n_prompt, pos0, &o[0],
                                  max_new, sp, n_stop, &n_out)
        finally:
            self.busy = False
        _check(rc, "generate")
        return out[:n_out]
