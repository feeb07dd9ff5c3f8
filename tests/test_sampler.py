"""The C sampler chain (csrc/sampler.c) against a NumPy twin of its documented rules
(csrc/llama2c.h): every step alone and chained, on fixed logits with seeded draws; the
log-probabilities against NumPy's log-softmax."""
import math

import numpy as np
import pytest

from llama2c import _engine as E

MASK = (1 << 64) - 1


# ---- the NumPy twin ----------------------------------------------------------------------------

def xorshift_f32(state: int):
    """llama2.c's xorshift64* -> (float32 in [0, 1), new state)."""
    state ^= state >> 12
    state ^= (state << 25) & MASK
    state ^= state >> 27
    u32 = ((state * 0x2545F4914F6CDD1D) & MASK) >> 32
    return np.float32(u32 >> 8) / np.float32(16777216.0), state


def expf(x):
    """float32 exp, rounded from float64 (the C sampler's exp agrees to within 2 ulp); 0 below
    -87.3 and for NaN, as the C sampler documents."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        return np.where(x >= np.float32(-87.3), np.exp(x.astype(np.float64)), 0).astype(np.float32)


def draw(order, p, total, coin):
    """First of `order` whose cumulative mass (float64, in order) exceeds coin * total."""
    r = np.float64(coin) * total
    cdf = np.cumsum(p[order].astype(np.float64))
    j = int(np.searchsorted(cdf, r, side="right"))
    return int(order[min(j, len(order) - 1)])


class TwinSampler:
    """Sampler's chain in NumPy, rule by rule (float32 where C uses float)."""

    def __init__(self, V, temperature=1.0, top_p=1.0, top_k=0, seed=0, min_p=0.0,
                 repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                 penalty_last_n=0, logit_bias=None):
        self.V = V
        f = np.float32
        self.T, self.top_p, self.min_p = f(temperature), f(top_p), f(min_p)
        self.top_k = top_k if top_k < V else 0
        self.rep, self.pres, self.freq = f(repetition_penalty), f(presence_penalty), f(frequency_penalty)
        self.last_n = penalty_last_n
        self.bias = dict(logit_bias or {})
        self.state = seed or 0x9E3779B97F4A7C15
        self.window = []

    def accept(self, t):
        self.window.append(t)

    def adjusted(self, logits):
        l = logits.astype(np.float32).copy()
        for i, b in self.bias.items():
            l[i] = l[i] + np.float32(b)
        on = self.last_n > 0 and (self.rep != 1 or self.pres != 0 or self.freq != 0)
        if on:
            window = self.window[-self.last_n:]
            for t in dict.fromkeys(window):
                c = window.count(t)
                if self.rep != 1:
                    l[t] = l[t] / self.rep if l[t] > 0 else l[t] * self.rep
                l[t] = l[t] - (np.float32(c) * self.freq + self.pres)
        return l

    def sample(self, logits):
        l = self.adjusted(logits)
        if self.T == 0:
            return int(np.argmax(l))
        coin, self.state = xorshift_f32(self.state)
        inv_t = np.float32(1) / self.T
        use_p, use_min = self.top_p < 1, self.min_p > 0
        if self.top_k:
            order = np.lexsort((np.arange(self.V), -l))[:self.top_k]   # l desc, id asc
            p = np.zeros(self.V, np.float32)
            p[order] = expf((l[order] - l[order[0]]) * inv_t)
            z = np.cumsum(p[order].astype(np.float64))[-1]
        else:
            p = expf((l - l.max()) * inv_t)
            z = np.cumsum(p.astype(np.float64))[-1]
            if not (use_p or use_min):
                return draw(np.arange(self.V), p, z, coin)
            order = np.lexsort((np.arange(self.V), -p))
        kept, mass = [], 0.0
        limit = np.float64(self.top_p) * z if use_p else math.inf
        for t in order:
            if kept and p[t] < self.min_p:
                break
            kept.append(t)
            mass += np.float64(p[t])
            if mass >= limit:
                break
        return draw(np.array(kept), p, mass, coin)


# ---- fixtures ----------------------------------------------------------------------------------

def fixed_logits(V, seed):
    rng = np.random.default_rng(seed)
    return (3.0 * rng.standard_normal(V)).astype(np.float32)


CHAIN_CASES = {
    "plain": dict(),
    "temperature": dict(temperature=0.7),
    "hot": dict(temperature=2.5),
    "top_k": dict(top_k=40),
    "top_k_1": dict(top_k=1),
    "top_p": dict(top_p=0.9),
    "top_p_0": dict(top_p=0.0),
    "min_p": dict(min_p=0.05),
    "min_p_tiny": dict(min_p=1e-12, temperature=1.5),      # histogram's shared lowest bucket
    "top_p_near_1": dict(top_p=0.99999, temperature=3.0),
    "bias": dict(logit_bias={3: 5.0, 7: -math.inf, 11: -2.5}),
    "repetition": dict(repetition_penalty=1.3, penalty_last_n=32),
    "presence": dict(presence_penalty=1.5, penalty_last_n=32),
    "frequency": dict(frequency_penalty=0.8, penalty_last_n=32),
    "chained": dict(temperature=0.8, top_k=50, top_p=0.95, min_p=0.02, repetition_penalty=1.1,
                    presence_penalty=0.3, frequency_penalty=0.2, penalty_last_n=16,
                    logit_bias={5: 3.0, 9: -1.0}),
    "chained_no_k": dict(temperature=1.2, top_p=0.8, min_p=0.01, repetition_penalty=0.9,
                         frequency_penalty=-0.5, penalty_last_n=8, logit_bias={1: 2.0}),
    "greedy_with_penalties": dict(temperature=0.0, repetition_penalty=2.0, presence_penalty=1.0,
                                  penalty_last_n=4, logit_bias={0: 1.0}),
}


@pytest.mark.parametrize("V", [257, 49152])
@pytest.mark.parametrize("case", sorted(CHAIN_CASES))
def test_sampler_matches_numpy_twin(case, V):
    """Seeded draws, each token accepted into the penalty window and the logits changing per
    step: the C chain and the NumPy twin pick the same ids."""
    kw = CHAIN_CASES[case]
    steps = 60 if V > 1000 else 200
    c = E.Sampler(V, kw.get("temperature", 1.0), kw.get("top_p", 1.0), kw.get("top_k", 0), 1234,
                  **{k: v for k, v in kw.items() if k not in ("temperature", "top_p", "top_k")})
    twin = TwinSampler(V, seed=1234, **kw)
    context = np.random.default_rng(9).integers(0, 20, 12).astype(np.int32)   # "the prompt"
    c.accept_many(context)
    for t in context:
        twin.accept(int(t))
    got, want = [], []
    base = fixed_logits(V, 1)
    for step in range(steps):
        # few distinct hot tokens so that penalties keep changing the outcome
        logits = base.copy()
        logits[:20] += np.float32(4.0 + 0.1 * (step % 7))
        a, b = c.sample(logits), twin.sample(logits)
        got.append(a)
        want.append(b)
        c.accept(a)
        twin.accept(b)
    assert got == want
    if kw.get("temperature", 1.0) > 0 and kw.get("top_k") != 1 and kw.get("top_p") != 0.0:
        assert len(set(got)) > 1      # the draws are really random


@pytest.mark.parametrize("V", [1001, 49152])
@pytest.mark.parametrize("case", ["plain", "temperature", "top_p", "min_p", "min_p_tiny",
                                  "top_p_near_1", "chained_no_k"])
def test_every_kernel_table_draws_the_same_tokens(case, V):
    """The passes over the vocabulary (max, exp, sums, the top-p / min-p candidates) run on
    the kernel table's registers (csrc/sample_ops.c) and compute the same bits on every
    table, so the draws and the probabilities they come from are identical."""
    kw = CHAIN_CASES[case]
    rest = {k: v for k, v in kw.items() if k not in ("temperature", "top_p", "top_k")}
    logits = [fixed_logits(V, seed) for seed in range(6)]
    logits[1][::7] = np.nan                          # NaN counts as -inf
    logits[2][:3] = np.float32(80.0)                 # ties at the top
    draws = {}
    for simd in E.available_simd():
        s = E.Sampler(V, kw.get("temperature", 1.0), kw.get("top_p", 1.0), 0, 99, simd=simd,
                      **rest)
        assert s.simd == simd
        draws[simd] = [s.sample(logits[i % len(logits)]) for i in range(120)]
    first = next(iter(draws.values()))
    assert all(d == first for d in draws.values()), {k: d[:10] for k, d in draws.items()}
    assert len(set(first)) > 1


def test_sampler_kernel_table_argument():
    s = E.Sampler(10, 1.0)
    assert s.simd in E.available_simd()
    assert E.Sampler(10, 1.0, simd="generic").simd == "generic"
    with pytest.raises(ValueError):
        E.Sampler(10, 1.0, simd="sse9")


def test_penalty_rules_on_known_values():
    """llama.cpp's / HF's penalty arithmetic, by hand: divide positive logits, multiply
    negative ones; subtract count * frequency + presence."""
    V = 6
    logits = np.array([2.0, -2.0, 1.0, 0.5, 0.0, -1.0], np.float32)
    s = E.Sampler(V, 0.0, repetition_penalty=2.0, frequency_penalty=0.25, presence_penalty=0.5,
                  penalty_last_n=3)
    s.accept_many(np.array([5, 0, 1, 1], np.int32))   # window of 3: [0, 1, 1]; 5 has left
    # 0: 2/2 - (0.25 + 0.5) = 0.25;  1: -2*2 - (0.5 + 0.5) = -5;  2 stays 1.0 -> argmax 2
    assert s.sample(logits) == 2
    twin = TwinSampler(V, temperature=0, repetition_penalty=2.0, frequency_penalty=0.25,
                       presence_penalty=0.5, penalty_last_n=3)
    for t in (5, 0, 1, 1):
        twin.accept(t)
    np.testing.assert_array_equal(twin.adjusted(logits), [0.25, -5.0, 1.0, 0.5, 0.0, -1.0])
    assert s.window_len == 3


def test_greedy_ties_and_bias_ban():
    logits = np.array([1.0, 3.0, 3.0, 0.0], np.float32)
    assert E.Sampler(4, 0.0).sample(logits) == 1                       # first of equal maxima
    banned = E.Sampler(4, 0.0, logit_bias={1: -math.inf})
    assert banned.sample(logits) == 2
    sampled = E.Sampler(4, 1.0, seed=3, logit_bias={1: -math.inf, 2: -math.inf})
    assert {sampled.sample(logits) for _ in range(300)} == {0, 3}


def test_distribution_of_each_truncation():
    """Empirical frequencies follow the renormalized kept mass."""
    probs = np.array([0.4, 0.3, 0.1, 0.1, 0.05, 0.05], np.float64)
    logits = np.log(probs).astype(np.float32)
    n = 20000

    def freq(s):
        return np.bincount([s.sample(logits) for _ in range(n)], minlength=6) / n

    np.testing.assert_allclose(freq(E.Sampler(6, 1.0, seed=5)), probs, atol=0.015)
    # min_p 0.3 of the top (0.4): keeps p >= 0.12 -> {0, 1}
    np.testing.assert_allclose(freq(E.Sampler(6, 1.0, seed=5, min_p=0.3))[:2], [4 / 7, 3 / 7], atol=0.015)
    # top_p 0.75: 0.4 + 0.3 < 0.75 <= 0.8 -> {0, 1, 2}
    np.testing.assert_allclose(freq(E.Sampler(6, 1.0, 0.75, seed=5))[:3], [0.5, 0.375, 0.125], atol=0.015)
    # temperature 0.5 squares the probabilities
    sq = probs ** 2 / (probs ** 2).sum()
    np.testing.assert_allclose(freq(E.Sampler(6, 0.5, seed=5)), sq, atol=0.015)


def test_sample_accept_is_sample_then_accept():
    logits = fixed_logits(300, 5)
    kw = dict(repetition_penalty=1.5, penalty_last_n=8)
    a, b = E.Sampler(300, 1.0, seed=9, **kw), E.Sampler(300, 1.0, seed=9, **kw)
    got = [a.sample_accept(logits) for _ in range(40)]
    want = []
    for _ in range(40):
        want.append(b.sample(logits))
        b.accept(want[-1])
    assert got == want and a.window_len == 8


def test_rng_state_continues_the_stream():
    logits = fixed_logits(300, 2)
    a = E.Sampler(300, 1.0, seed=77)
    first = [a.sample(logits) for _ in range(10)]
    state = a.rng_state
    rest = [a.sample(logits) for _ in range(10)]
    b = E.Sampler(300, 1.0, seed=1)
    b.rng_state = state
    assert [b.sample(logits) for _ in range(10)] == rest
    c = E.Sampler(300, 1.0, seed=77)
    assert [c.sample(logits) for _ in range(10)] == first
    draws, _ = E.random_f32(77, 3)
    s = 77
    for d in draws:
        want, s = xorshift_f32(s)
        assert d == want


def test_nan_logits_and_tiny_temperature_fall_back_to_argmax():
    logits = fixed_logits(100, 3)
    best = int(np.argmax(logits))
    assert E.Sampler(100, 1e-40, seed=1).sample(logits) == best
    bad = logits.copy()
    bad[5] = np.nan
    assert 0 <= E.Sampler(100, 1.0, seed=1).sample(bad) < 100


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=math.nan), "temperature"),
    (dict(top_p=1.5), "top_p"), (dict(min_p=-0.1), "min_p"), (dict(min_p=math.nan), "min_p"),
    (dict(top_k=-2), "top_k"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=math.inf), "presence_penalty"),
    (dict(frequency_penalty=math.nan), "frequency_penalty"),
    (dict(penalty_last_n=-1), "penalty_last_n"),
    (dict(logit_bias={10: 1.0}), "logit_bias"), (dict(logit_bias={1: math.nan}), "logit_bias"),
    (dict(logit_bias={1: math.inf}), "logit_bias"),
])
def test_bad_sampler_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        E.Sampler(10, **kwargs)


def test_accept_rejects_bad_tokens():
    s = E.Sampler(10, penalty_last_n=4, repetition_penalty=1.2)
    with pytest.raises(ValueError):
        s.accept(10)
    with pytest.raises(ValueError):
        s.accept_many(np.array([1, -1], np.int32))
    with pytest.raises(ValueError, match="logits"):
        s.sample(np.zeros(9, np.float32))


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def test_logprobs_match_log_softmax():
    rng = np.random.default_rng(4)
    logits = (4 * rng.standard_normal((5, 1000))).astype(np.float32)
    logits[2, 17] = logits[2, 18] = logits[2].max() + 1      # a tie at the top
    tokens = np.array([3, -1, 17, 999, 0], np.int32)
    lp, ids, tlp = E.logprobs(logits, tokens, 5)
    ref = log_softmax(logits)
    np.testing.assert_allclose(lp[[0, 2, 3, 4]], ref[[0, 2, 3, 4], tokens[[0, 2, 3, 4]]], atol=1e-5)
    assert np.isnan(lp[1])
    for r in range(5):
        want = np.lexsort((np.arange(1000), -ref[r]))[:5]
        assert ids[r].tolist() == want.tolist()
        np.testing.assert_allclose(tlp[r], ref[r, want], atol=1e-5)
    assert ids[2, :2].tolist() == [17, 18]
    lp0, ids0, _ = E.logprobs(logits, tokens, 0)
    assert ids0.shape == (5, 0)
    np.testing.assert_array_equal(lp0, lp)
