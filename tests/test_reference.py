"""The NumPy oracle: golden greedy decoding against llama2.c, and each kernel against the math."""
import json
import warnings

import numpy as np
import pytest

from llama2c.config import Config
from llama2c.errors import ContextLengthError
from llama2c.reference import (ReferenceModel, attention, matmul, matmul_q8, quantize_q8, rmsnorm, rope,
                               softmax, swiglu)
from llama2c.testing import make_random_model
from llama2c.weights import QTensor, quantize_q8 as quantize_matrix, quantize_weights

BATCH_VS_STEP_RTOL = 1e-5      # batched prefill vs one token at a time, relative to max |logit|
# int8: gemm and gemv round differently in the last bit, and an activation that lands near a
# rounding boundary of its int8 quantization can then move by one step; so a looser budget.
BATCH_VS_STEP_RTOL_INT8 = 1e-2
INT8_VS_DEQUANT_RTOL = 1e-5    # int8 matmul vs float matmul of the dequantized operands


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def tiny(shared_dir):
    return ReferenceModel.load(shared_dir / "models" / "tiny260K.bin")


GQA_UNSHARED = Config(dim=64, hidden_dim=96, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=50,
                      seq_len=32, shared_classifier=False)
MHA_SHARED = Config(dim=48, hidden_dim=128, n_layers=3, n_heads=6, n_kv_heads=6, vocab_size=64, seq_len=24)


# ---------------------------------------------------------------------------------------------
# (a) the outside truth: llama2.c run.c greedy decoding of tiny260K

def test_tiny260k_greedy_matches_llama2c(tiny, shared_dir):
    golden = json.loads((shared_dir / "golden" / "tiny260K_greedy.json").read_text())["greedy_ids"]
    assert len(golden) == 200
    # run.c generate(): token = BOS at pos 0; each step forwards (token, pos), picks next by
    # argmax and feeds it back, for pos in 0..steps-1: 200 steps -> 200 generated ids
    assert tiny.generate([1], 200) == golden
    tiny.reset()
    token, out = 1, []
    for pos in range(200):
        token = int(np.argmax(tiny.forward(token, pos)))
        out.append(token)
    assert out == golden


def test_load_reads_llama2c_checkpoint(tiny):
    c = tiny.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size) == (64, 5, 8, 4, 512)
    assert tiny.weights["tok_embeddings"].dtype == np.float32


# ---------------------------------------------------------------------------------------------
# (b) batched logits == step-by-step forward

def _batch_vs_step(model, ids, rtol=BATCH_VS_STEP_RTOL):
    batched = model.logits(ids)
    model.reset()
    stepped = np.stack([model.forward(t, p) for p, t in enumerate(ids)])
    assert batched.dtype == np.float32 and batched.shape == (len(ids), model.config.vocab_size)
    assert _rel(batched, stepped) <= rtol


def test_logits_equal_forward_tiny260k(tiny):
    _batch_vs_step(tiny, [1, 461, 401, 378, 455, 13, 431, 299, 283, 264, 452, 288, 430, 417])


@pytest.mark.parametrize("cfg", [GQA_UNSHARED, MHA_SHARED], ids=["gqa-unshared", "mha-shared"])
@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_logits_equal_forward_random(cfg, int8):
    w = make_random_model(cfg, seed=3)
    if int8:
        w = quantize_weights(cfg, w, 16)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 19).tolist()
    _batch_vs_step(ReferenceModel(cfg, w), ids, BATCH_VS_STEP_RTOL_INT8 if int8 else BATCH_VS_STEP_RTOL)


def test_logits_uses_a_fresh_cache(tiny):
    tiny.reset()
    a = tiny.forward(1, 0)
    b = tiny.forward(461, 1)
    tiny.logits([5, 6, 7, 8])              # must not touch the object's cache
    np.testing.assert_array_equal(tiny.forward(461, 1), b)
    np.testing.assert_array_equal(tiny.logits([1])[0], a)


def test_int8_model_stays_close_to_fp32(shared_dir):
    fp32 = ReferenceModel.load(shared_dir / "models" / "tiny260K.bin")
    with pytest.warns(UserWarning, match="using 4"):       # hidden_dim 172 = 4 * 43
        int8 = ReferenceModel.load(shared_dir / "models" / "tiny260K.bin", dtype="int8")
    assert isinstance(int8.weights["layers.0.w1"], QTensor)
    ids = [1, 461, 401, 378, 455, 13]
    assert _rel(int8.logits(ids), fp32.logits(ids)) < 0.05


def test_generate_checks_context_and_samples_reproducibly():
    cfg = MHA_SHARED
    m = ReferenceModel(cfg, make_random_model(cfg, 4))
    with pytest.raises(ContextLengthError):
        m.generate([1, 2, 3], cfg.seq_len - 1)
    assert len(m.generate([1, 2, 3], cfg.seq_len - 2)) == cfg.seq_len - 2
    a = m.generate([1], 10, temperature=1.0, seed=5)
    assert a == m.generate([1], 10, temperature=1.0, seed=5)
    with pytest.raises(ContextLengthError):
        m.forward(1, cfg.seq_len)
    with pytest.raises(ValueError, match="token ids"):
        m.forward(cfg.vocab_size, 0)


# ---------------------------------------------------------------------------------------------
# (c) the int8 path

def test_quantize_q8_activations():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    x[1, 16:32] = 0                                       # an all-zero group: scale 0, q 0
    xq, xs = quantize_q8(x, 16)
    assert xq.dtype == np.int8 and xs.dtype == np.float32 and xs.shape == (3, 4)
    np.testing.assert_array_equal(xs, np.abs(x.reshape(3, 4, 16)).max(-1) / np.float32(127))
    assert xs[1, 1] == 0 and not xq[1, 16:32].any()
    assert np.abs(xq).max() == 127
    err = np.abs(xq.reshape(3, 4, 16) * xs[..., None] - x.reshape(3, 4, 16))
    assert (err <= xs[..., None] / 2 * (1 + 1e-6)).all()
    q1, s1 = quantize_q8(x[2], 16)                        # 1-D input: one row
    np.testing.assert_array_equal(q1, xq[2])
    np.testing.assert_array_equal(s1, xs[2])


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("gs", [8, 32])
def test_matmul_int8_equals_dequantized_float(T, gs):
    rng = np.random.default_rng(T * gs)
    x = rng.standard_normal((T, 96)).astype(np.float32)
    w = quantize_matrix(rng.standard_normal((40, 96)).astype(np.float32), gs)
    xq, xs = quantize_q8(x, gs)
    x_deq = (xq.reshape(T, -1, gs) * xs[..., None]).reshape(T, 96)
    want = x_deq.astype(np.float64) @ w.dequantize().astype(np.float64).T
    got = matmul(x, w)
    assert got.dtype == np.float32 and got.shape == (T, 40)
    assert _rel(got, want) <= INT8_VS_DEQUANT_RTOL
    np.testing.assert_array_equal(matmul(x[0], w), got[0])     # 1-D x: same numbers


@pytest.mark.parametrize("gs", [16, 256, 2048])   # 2048: past float32's exact range, float64 path
def test_int8_dot_products_are_exact(gs):
    rng = np.random.default_rng(gs)
    n = 2 * gs
    xq = rng.integers(-127, 128, (3, n)).astype(np.int8)
    xq[0, :gs] = 127                                           # extreme groups: 127 * 127 * gs
    wq = rng.integers(-127, 128, (7, n)).astype(np.int8)
    wq[:, :gs] = 127
    ones_x = np.ones((3, n // gs), np.float32)
    ones_w = np.ones((7, n // gs), np.float32)
    want = xq.astype(np.int64) @ wq.astype(np.int64).T
    # per group: with unit scales on one group and zero on the other, out is that group's int dot
    for g in range(n // gs):
        sx = np.zeros_like(ones_x)
        sx[:, g] = 1
        cols = slice(g * gs, (g + 1) * gs)
        got = matmul_q8(xq, sx, QTensor(wq, ones_w, gs))
        np.testing.assert_array_equal(got.astype(np.int64), xq[:, cols].astype(np.int64) @ wq[:, cols].astype(np.int64).T)
    if 127 * 127 * n < 2 ** 24:                                  # the float32 sum over groups is exact too
        np.testing.assert_array_equal(matmul_q8(xq, ones_x, QTensor(wq, ones_w, gs)).astype(np.int64), want)


def test_matmul_float_shapes():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((10, 12)).astype(np.float32)
    x = rng.standard_normal((4, 12)).astype(np.float32)
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    assert _rel(matmul(x, w), want) < 1e-6
    assert _rel(matmul(x[:1], w), want[:1]) < 1e-6 and matmul(x[:1], w).shape == (1, 10)
    assert _rel(matmul(x[2], w), want[2]) < 1e-6 and matmul(x[2], w).shape == (10,)


# ---------------------------------------------------------------------------------------------
# (d) RoPE against complex numbers

@pytest.mark.parametrize("theta, factor", [(10000.0, 1.0), (500000.0, 4.0)])
def test_rope_matches_complex_rotation(theta, factor):
    rng = np.random.default_rng(3)
    n_heads, hs, T = 3, 16, 6
    x = rng.standard_normal((T, n_heads * hs)).astype(np.float32)
    pos = np.array([0, 1, 2, 7, 100, 4095])
    got = rope(x, pos, theta, hs, factor)
    # PyTorch (llama): torch.view_as_complex(x.reshape(..., -1, 2)) * freqs_cis
    z = x.astype(np.float64).reshape(T, n_heads, hs // 2, 2)
    z = z[..., 0] + 1j * z[..., 1]
    freqs = 1.0 / theta ** (np.arange(0, hs, 2) / hs)
    z = z * np.exp(1j * (pos / factor)[:, None, None] * freqs[None, None, :])
    want = np.stack([z.real, z.imag], axis=-1).reshape(T, n_heads * hs)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(x).max())
    np.testing.assert_array_equal(rope(x[4], 100, theta, hs, factor), got[4])   # 1-D, int pos
    np.testing.assert_array_equal(rope(x, 0, theta, hs, factor), x)           # pos 0: identity


# ---------------------------------------------------------------------------------------------
# (e) attention against run.c's per-head loop

def _attention_loop(q, k_cache, v_cache, pos, n_heads, n_kv_heads):
    """run.c's loop: for each query row and head, scores over 0..its position, softmax, sum of v."""
    T, hs = q.shape[0], q.shape[1] // n_heads
    kv_mul = n_heads // n_kv_heads
    out = np.zeros_like(q, dtype=np.float64)
    for t in range(T):
        for h in range(n_heads):
            qh = q[t, h * hs:(h + 1) * hs].astype(np.float64)
            kv = slice((h // kv_mul) * hs, (h // kv_mul + 1) * hs)
            scores = np.array([qh @ k_cache[p, kv] / np.sqrt(hs) for p in range(pos + t + 1)])
            att = np.exp(scores - scores.max())
            att /= att.sum()
            out[t, h * hs:(h + 1) * hs] = sum(a * v_cache[p, kv] for p, a in enumerate(att))
    return out


@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 4), (6, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("T, pos", [(1, 0), (1, 9), (5, 0), (4, 6)])
def test_attention_matches_per_head_loop(n_heads, n_kv_heads, T, pos):
    rng = np.random.default_rng(n_heads * 100 + T * 10 + pos)
    hs = 8
    q = rng.standard_normal((T, n_heads * hs)).astype(np.float32)
    k_cache = rng.standard_normal((20, n_kv_heads * hs)).astype(np.float32)
    v_cache = rng.standard_normal((20, n_kv_heads * hs)).astype(np.float32)
    k_cache[pos + T:] = np.nan                       # positions not yet written must be ignored
    v_cache[pos + T:] = np.nan
    got = attention(q, k_cache, v_cache, pos, n_heads, n_kv_heads)
    assert got.dtype == np.float32 and got.shape == q.shape
    np.testing.assert_allclose(got, _attention_loop(q, k_cache, v_cache, pos, n_heads, n_kv_heads),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the small kernels

def test_rmsnorm_softmax_swiglu():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 32)).astype(np.float32)
    w = rng.standard_normal(32).astype(np.float32)
    want = w * x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5)
    assert rmsnorm(x, w, 1e-5).dtype == np.float32
    np.testing.assert_allclose(rmsnorm(x, w, 1e-5), want, rtol=1e-5, atol=1e-6)

    big = np.array([1000.0, 1001.0, -np.inf], np.float32)       # no overflow, masked entry -> 0
    np.testing.assert_allclose(softmax(big), [1 / (1 + np.e), np.e / (1 + np.e), 0], rtol=1e-6)
    np.testing.assert_allclose(softmax(x).sum(-1), 1, rtol=1e-6)

    h1 = np.array([-200.0, -1.0, 0.0, 2.0], np.float32)
    h3 = np.array([2.0, 3.0, 4.0, 5.0], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = swiglu(h1, h3)
    np.testing.assert_allclose(got, h1 / (1 + np.exp(-h1.astype(np.float64))) * h3, rtol=1e-6, atol=1e-30)


# ---------------------------------------------------------------------------------------------
# (d) two-plane (15-bit) activations and weights with per-group offsets (GGUF Q4_1)

TWO_PLANE_VS_DEQUANT_RTOL = 1e-5   # two-plane int matmul vs float matmul of the dequantized operands


def _offset_qtensor(rng, rows, cols, gs):
    """A Q4_1-like QTensor: codes in [-8, 7], positive scales, offsets (mins + 8 * scale)."""
    q = rng.integers(-8, 8, (rows, cols)).astype(np.int8)
    s = (rng.uniform(0.5, 1.5, (rows, cols // gs)) / 8).astype(np.float32)
    m = rng.normal(0, 0.1, (rows, cols // gs)).astype(np.float32)
    return QTensor(q, s, gs, m)


def _two_plane_values(xh, xl):
    return 128 * xh.astype(np.int32) + xl.astype(np.int32)


def test_two_plane_quantize():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((3, 128)) * rng.uniform(0.01, 100, (3, 128))).astype(np.float32)
    x[1, 32:64] = 0                                       # an all-zero group: scale 0, codes 0
    x[2, 5] = 1e-30                                       # a tiny group member
    xh, xl, xs = quantize_q8(x, 32, bits=16)
    assert xh.dtype == np.int8 and xl.dtype == np.int8 and xs.dtype == np.float32
    assert xh.shape == xl.shape == (3, 128) and xs.shape == (3, 4)
    np.testing.assert_array_equal(xs, np.abs(x.reshape(3, 4, 32)).max(-1) / np.float32(16256))
    assert xh.min() >= -127 and xh.max() <= 127 and xl.min() >= -64 and xl.max() <= 64
    v = _two_plane_values(xh, xl)
    assert np.abs(v).max() == 16256                       # each group's max hits the top code
    # v is rint(x * (1/s)) in float32, and xh is v / 128 rounded half to even
    inv = np.divide(np.float32(1), xs, out=np.zeros_like(xs), where=xs != 0)
    want_v = np.rint(x.reshape(3, 4, 32) * inv[..., None]).astype(np.int32).reshape(3, 128)
    np.testing.assert_array_equal(v, want_v)
    np.testing.assert_array_equal(xh, np.rint(v / 128).astype(np.int8))
    assert xs[1, 1] == 0 and not xh[1, 32:64].any() and not xl[1, 32:64].any()
    err = np.abs(v.reshape(3, 4, 32) * xs[..., None].astype(np.float64) - x.reshape(3, 4, 32))
    assert (err <= xs[..., None] / 2 * (1 + 1e-5)).all()
    h1, l1, s1 = quantize_q8(x[2], 32, bits=16)           # 1-D input: one row
    np.testing.assert_array_equal(h1, xh[2])
    np.testing.assert_array_equal(l1, xl[2])
    np.testing.assert_array_equal(s1, xs[2])
    # half-way codes round to even: v = 64 -> (0, 64), v = 192 -> (2, -64)
    y = np.zeros(32, np.float32)
    y[:3] = [16256, 64, 192]
    h, l, s = quantize_q8(y, 32, bits=16)
    assert s[0] == 1 and h[:3].tolist() == [127, 0, 2] and l[:3].tolist() == [0, 64, -64]
    assert len(quantize_q8(x, 32)) == 2                   # bits=8: (q, s) as before
    with pytest.raises(ValueError):
        quantize_q8(x, 32, bits=12)


@pytest.mark.parametrize("offsets", [False, True])
@pytest.mark.parametrize("T", [1, 4])
def test_matmul_two_plane_equals_dequantized_float(T, offsets):
    gs, n = 32, 256
    rng = np.random.default_rng(T + 10 * offsets)
    x = rng.standard_normal((T, n)).astype(np.float32)
    if offsets:
        w = _offset_qtensor(rng, 40, n, gs)
    else:
        w = quantize_matrix(rng.standard_normal((40, n)).astype(np.float32), gs)
    w64 = w.dequantize().astype(np.float64)
    xh, xl, xs = quantize_q8(x, gs, bits=16)
    x_deq = (_two_plane_values(xh, xl).reshape(T, -1, gs) * xs[..., None].astype(np.float64)).reshape(T, n)
    got = matmul_q8(xh, xs, w, xl)
    assert got.dtype == np.float32 and got.shape == (T, 40)
    assert _rel(got, x_deq @ w64.T) <= TWO_PLANE_VS_DEQUANT_RTOL
    np.testing.assert_array_equal(matmul(x, w, act_bits=16), got)
    np.testing.assert_array_equal(matmul(x[0], w, act_bits=16), got[0])    # 1-D x: same numbers
    # against the exact float product with the unquantized x, two-plane is far closer than int8
    exact = x.astype(np.float64) @ w64.T
    err16 = _rel(got, exact)
    err8 = _rel(matmul(x, w, act_bits=8), exact)
    assert err16 < 1e-4 and err16 < err8 / 50, (err16, err8)
    with pytest.raises(ValueError):
        matmul(x, w, act_bits=4)


@pytest.mark.parametrize("bits", [8, 16])
def test_offset_term_is_exact(bits):
    """With power-of-two scales and offsets on a coarse grid every float32 operation is exact,
    so matmul_q8 must equal the dequantize() path bit for bit."""
    # Every term is a multiple of 2**-18 and |out| <= 32, so float32 (24 bits) holds every partial
    # sum exactly: |v| <= 2048 (both planes still used), s in {2**-4, 2**-3}, m on a 1/16 grid in
    # [-1, 1], xs = 2**-14 (per group ival * s * xs <= 4 and m * xs * sum(v) <= 4).
    gs, n, T, d = 32, 128, 3, 24
    rng = np.random.default_rng(bits)
    q = rng.integers(-8, 8, (d, n)).astype(np.int8)
    s = (2.0 ** rng.integers(-4, -2, (d, n // gs))).astype(np.float32)
    m = (rng.integers(-16, 17, (d, n // gs)) / 16).astype(np.float32)
    w = QTensor(q, s, gs, m)
    vmax = 127 if bits == 8 else 2048
    v = rng.integers(-vmax, vmax + 1, (T, n))
    v[0, :gs] = vmax                                      # an extreme group
    xs = np.full((T, n // gs), 2.0 ** -14, np.float32)
    x_deq = (v.reshape(T, -1, gs) * xs[..., None].astype(np.float64)).reshape(T, n)
    want = x_deq @ w.dequantize().astype(np.float64).T
    if bits == 8:
        xq, xl = v.astype(np.int8), None
    else:
        xq = np.rint(v / 128).astype(np.int8)
        xl = (v - 128 * xq.astype(np.int64)).astype(np.int8)
    got = matmul_q8(xq, xs, w, xl)
    np.testing.assert_array_equal(got.astype(np.float64), want)
    # and the offsets contribute exactly sum_g m * xs * sum(v over g)
    plain = matmul_q8(xq, xs, QTensor(q, s, gs), xl)
    vsum = v.reshape(T, -1, gs).sum(-1)
    np.testing.assert_array_equal((got - plain).astype(np.float64), (vsum * xs) @ m.T.astype(np.float64))


def test_offset_weights_dequantize_validate_and_keep():
    cfg = GQA_UNSHARED
    rng = np.random.default_rng(3)
    weights = quantize_weights(cfg, make_random_model(cfg, 3), 32)
    wq = _offset_qtensor(rng, *weights["layers.0.wq"].shape, 32)
    weights["layers.0.wq"] = wq
    want = (wq.q.reshape(64, 2, 32) * wq.s[..., None] + wq.m[..., None]).reshape(64, 64)
    np.testing.assert_array_equal(wq.dequantize(), want)
    np.testing.assert_array_equal(wq.dequantize_rows([5, 0]), want[[5, 0]])
    kept = quantize_weights(cfg, weights, 32)
    assert kept["layers.0.wq"] is wq                      # same group size: kept, offsets too
    requant = quantize_weights(cfg, weights, 16)["layers.0.wq"]
    assert requant.m is None and _rel(requant.dequantize(), want) < 0.01
    ReferenceModel(cfg, weights)                          # validates
    from llama2c.errors import ModelFormatError
    for bad in (wq.m[:, :1], wq.m.astype(np.float64), np.where(wq.m > 0, np.nan, wq.m).astype(np.float32)):
        weights["layers.0.wq"] = QTensor(wq.q, wq.s, 32, bad)
        with pytest.raises(ModelFormatError, match="offset"):
            ReferenceModel(cfg, weights)


@pytest.mark.parametrize("act_bits", [8, 16])
def test_act_bits_model(act_bits):
    cfg = GQA_UNSHARED
    rng = np.random.default_rng(4)
    weights = quantize_weights(cfg, make_random_model(cfg, 4), 32)
    weights["output"] = _offset_qtensor(rng, cfg.vocab_size, cfg.dim, 32)
    weights["tok_embeddings"] = _offset_qtensor(rng, cfg.vocab_size, cfg.dim, 32)
    m = ReferenceModel(cfg, weights, act_bits=act_bits)
    assert m.act_bits == act_bits
    ids = [3, 1, 4, 1, 5]
    batch = m.logits(ids)
    step = np.stack([m.forward(t, p) for p, t in enumerate(ids)])
    assert _rel(step, batch) <= BATCH_VS_STEP_RTOL_INT8
    fp32 = ReferenceModel(cfg, {k: (v.dequantize() if isinstance(v, QTensor) else v) for k, v in weights.items()})
    assert _rel(batch, fp32.logits(ids)) < (0.05 if act_bits == 8 else 1e-3)
    with pytest.raises(ValueError, match="act_bits"):
        ReferenceModel(cfg, weights, act_bits=12)


def test_smollm2_two_plane_logits_match_fp32(shared_dir):
    """Exact Q8_0/Q4_1 weights (GGUF blocks mapped to QTensors) with two-plane activations:
    the last position's logits stay within 0.05 of the fp32 reference's."""
    from llama2c.loaders.gguf import load_gguf
    path = shared_dir / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    ids = [504, 3575, 282, 4649, 314]
    cfg, w8, _ = load_gguf(path, dtype="int8")
    assert w8["layers.0.wq"].m is not None                # Q4_1: offsets kept, no requantization
    want = ReferenceModel(cfg, {k: (v.dequantize() if isinstance(v, QTensor) else v)
                                for k, v in w8.items()}).logits(ids)[-1]
    got = ReferenceModel(cfg, w8, act_bits=16).logits(ids)[-1]
    assert float(np.abs(got - want).max()) < 0.05
    assert int(np.argmax(got)) == int(np.argmax(want))
