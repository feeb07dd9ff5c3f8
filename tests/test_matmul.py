"""The matrix kernels of every weight type (fp32 panels, int8 and 4-bit blocks) on every kernel
table this CPU runs (the scalar "generic" twin included): against the NumPy reference on odd
shapes, bitwise invariance (a row's output does not depend on T, its place in a tile or the
thread count), packing round trips, IEEE-half scales, the activation quantizer, the 4-bit
reference quantizer, and bad arguments."""
import numpy as np
import pytest

from llama2c import _engine as E
from llama2c import reference as ref
from llama2c.weights import QTensor, quantize_q4, quantize_q8, quantize_weights

SIMD = E.available_simd()
TYPES = ["f32", "q8", "q4"]
ACT_BITS = [8, 16]

# Error budgets. fp32: the kernels and NumPy/BLAS differ only in summation order, so the error
# is a few float32 roundings of the partial sums (bounded by sqrt(n) * |x||w| steps).
F32_RTOL = 1e-5
F32_ATOL_PER_SQRT_N = 2e-6
# int8 / 4-bit, same quantized activations as the reference: the integer group sums are exact
# in both, the float group terms are rounded in a different order (the kernels: one FMA of
# isum * (s * xs) per group; the reference: (isum * s) * xs), a few ulps of |out|.
QUANT_RTOL = 2e-6
QUANT_ATOL_OF_MAX = 1e-6
# the 4-bit reference quantizer: at most half a step (plus float rounding) from the input
Q4_ROUND_SLACK = 1.0001
# a whole model on quantized weights vs the NumPy reference model, relative to max |logit|:
# 16-bit activations; 8-bit activations, where one code rounding the other way (each kernel
# table sums rmsnorm and attention in its own order) moves the logits by about a step
MODEL_A16_REL = 1e-3
MODEL_A8_REL = 3e-2

T_VALUES = [1, 2, 3, 5, 8, 17, 64, 65]


@pytest.fixture
def rng():
    return np.random.default_rng(20240917)


def rand(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def random_qtensor(rng, rows, cols, gs, bits, offsets, f16=False):
    """A QTensor with integer codes over the whole range (extremes included), random scales
    (exact halves when f16) and optional offsets."""
    if bits == 8:
        q = rng.integers(-127, 128, (rows, cols)).astype(np.int8)
        q[0, :gs] = 127
        if rows > 1:
            q[1, :gs] = -127
    else:
        q = rng.integers(0, 16, (rows, cols)).astype(np.uint8)
        q[0, :gs] = 15
    s = (rng.random((rows, cols // gs)) / 50 + 1e-4).astype(np.float32)
    m = (rng.standard_normal((rows, cols // gs)) / 20).astype(np.float32) if offsets else None
    if f16:
        s = s.astype(np.float16).astype(np.float32)
        m = None if m is None else m.astype(np.float16).astype(np.float32)
    return QTensor(q, s, gs, m, bits=bits)


def make_weight(rng, kind, rows, cols, gs=32, offsets=False, f16=False):
    if kind == "f32":
        return rand(rng, rows, cols)
    return random_qtensor(rng, rows, cols, gs, 8 if kind == "q8" else 4, offsets, f16)


def reference_matmul(x, w, act_bits, simd="generic"):
    """NumPy reference of the engine's matmul of x (T, n) by w; the quantized path uses the
    engine's own activation quantization (checked against the reference separately)."""
    if not isinstance(w, QTensor):
        return ref.matmul(x, w)
    a = E.quantize(x, w.group_size, act_bits, simd=simd)
    return ref.matmul_q8(a.hi, a.s, w, a.lo)


def check_close(out, want, kind, n):
    if kind == "f32":
        np.testing.assert_allclose(out, want, rtol=F32_RTOL, atol=F32_ATOL_PER_SQRT_N * np.sqrt(n))
    else:
        np.testing.assert_allclose(out, want, rtol=QUANT_RTOL,
                                   atol=QUANT_ATOL_OF_MAX * max(np.abs(want).max(), 1e-30))


# ---- against the reference, every type x table, odd shapes ----------------------------------------

@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("T", T_VALUES)
@pytest.mark.parametrize("rows", [1, 17, 45, 131])
def test_matmul_matches_reference(simd, kind, T, rows, rng):
    gs, cols = 32, 96
    w = make_weight(rng, kind, rows, cols, gs, offsets=(rows % 2 == 1))
    x = rand(rng, T, cols)
    P = E.PackedMatrix(w)
    for act_bits in ACT_BITS if kind != "f32" else [16]:
        out = P.matmul(x, act_bits=act_bits, simd=simd, n_threads=2)
        check_close(out, reference_matmul(x, w, act_bits, simd), kind, cols)


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("kind", ["q8", "q4"])
@pytest.mark.parametrize("gs", [8, 16, 32, 64, 256])
@pytest.mark.parametrize("offsets", [False, True])
def test_quantized_group_sizes(simd, kind, gs, offsets, rng):
    """Every group size the formats allow (16 and 32 both occur in K-quant files), with and
    without offsets, odd T and rows."""
    rows, cols, T = 37, gs * 3, 7
    w = make_weight(rng, kind, rows, cols, gs, offsets)
    x = rand(rng, T, cols, scale=3.0)
    x[0, :gs] = 0.0                       # an all-zero group: scale 0
    P = E.PackedMatrix(w)
    for act_bits in ACT_BITS:
        out = P.matmul(x, act_bits=act_bits, simd=simd, n_threads=2)
        check_close(out, reference_matmul(x, w, act_bits, simd), kind, cols)


@pytest.mark.parametrize("simd", SIMD)
def test_q8_group_of_4(simd, rng):
    w = make_weight(rng, "q8", 19, 12, 4, offsets=True)
    x = rand(rng, 5, 12)
    out = E.PackedMatrix(w).matmul(x, simd=simd)
    check_close(out, reference_matmul(x, w, 16, simd), "q8", 12)


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("kind", ["q8", "q4"])
@pytest.mark.parametrize("two_planes", [False, True])
def test_integer_sums_are_exact(simd, kind, two_planes, rng):
    """Unit scales, one group of 256 (the longest), extreme codes: the output is the exact
    integer dot product, rounded once to float32."""
    T, rows, gs = 9, 21, 256
    lim = 15 if kind == "q4" else 127
    q = rng.integers(0 if kind == "q4" else -127, lim + 1, (rows, gs))
    q[0] = lim
    q[1] = 0 if kind == "q4" else -lim
    q = q.astype(np.uint8 if kind == "q4" else np.int8)
    hi = rng.integers(-127, 128, (T, gs)).astype(np.int8)
    hi[0] = 127
    hi[1] = -127
    lo = rng.integers(-64, 65, (T, gs)).astype(np.int8) if two_planes else None
    if two_planes:
        lo[0] = 64
    w = QTensor(q, np.ones((rows, 1), np.float32), gs, bits=4 if kind == "q4" else 8)
    a = E.QAct.from_codes(hi, np.ones((T, 1), np.float32), gs, lo)
    out = E.PackedMatrix(w).matmul_q(a, simd=simd)
    v = hi.astype(np.int64) if lo is None else 128 * hi.astype(np.int64) + lo
    exact = v @ q.astype(np.int64).T
    assert np.abs(exact).max() < 2 ** 31
    np.testing.assert_array_equal(out, exact.astype(np.float32))


@pytest.mark.parametrize("simd", SIMD)
def test_simd_tables_agree_with_the_scalar_twin(simd, rng):
    x = rand(rng, 5, 576)
    for kind in TYPES:
        w = make_weight(rng, kind, 300, 576, 32, offsets=True)
        P = E.PackedMatrix(w)
        got = P.matmul(x, simd=simd)
        want = P.matmul(x, simd="generic")
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ---- the invariant: bitwise identical rows whatever T, tile or threads ----------------------------

@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("kind,act_bits", [(k, a) for k in TYPES for a in ACT_BITS
                                           if not (k == "f32" and a == 8)])  # fp32: no quantization
def test_rows_are_bitwise_independent_of_batch_and_threads(simd, kind, act_bits, rng):
    """out[t] of a (T, rows) matmul equals, bitwise, the same row computed alone (T = 1, the
    decode path), inside other batches (other tile positions) and with other thread counts."""
    T, rows, cols = 23, 301, 256        # rows: 19 blocks, the last one partial
    P = E.PackedMatrix(make_weight(rng, kind, rows, cols, 32, offsets=True))
    x = rand(rng, T, cols)
    full = P.matmul(x, act_bits=act_bits, simd=simd, n_threads=1)
    for nth in (2, 3):
        np.testing.assert_array_equal(P.matmul(x, act_bits=act_bits, simd=simd, n_threads=nth), full)
    for t in range(T):
        one = P.matmul(x[t:t + 1], act_bits=act_bits, simd=simd, n_threads=2)
        np.testing.assert_array_equal(one[0], full[t], err_msg=f"row {t} alone")
    for a, b in [(0, 2), (3, 7), (5, 16), (1, 23), (10, 14)]:
        part = P.matmul(x[a:b], act_bits=act_bits, simd=simd, n_threads=2)
        np.testing.assert_array_equal(part, full[a:b], err_msg=f"rows {a}:{b}")


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("kind", TYPES)
def test_large_matmul_threads_agree(simd, kind, rng):
    """A prefill-sized product (several tiles per thread) gives the same bits with 1 and 2
    threads and matches the reference."""
    x = rand(rng, 67, 576)
    w = make_weight(rng, kind, 1537, 576, 32, offsets=(kind == "q4"))
    P = E.PackedMatrix(w)
    one = P.matmul(x, simd=simd, n_threads=1)
    np.testing.assert_array_equal(P.matmul(x, simd=simd, n_threads=2), one)
    check_close(one, reference_matmul(x, w, 16, simd), kind, 576)


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("kinds", [("q4", "q8", "q4"), ("f32", "q8"), ("q8", "q8", "q8"), ("q4",)])
@pytest.mark.parametrize("rows", [(576, 192, 192), (40, 17, 200), (8, 3, 1)])
@pytest.mark.parametrize("T", [1, 3, 7])
def test_one_call_on_several_matrices_equals_separate_calls(simd, kinds, rows, T, rng):
    """matmul_many (the model's q/k/v and w1/w3: one parallel region whose threads split the
    blocks of all the matrices, by bytes or multiply-adds, across their boundaries) gives each
    matrix the bits of its own call, with mixed types and group sizes, for 1 to 3 threads."""
    mats = [E.PackedMatrix(make_weight(rng, k, r, 96, 32 if i % 2 == 0 else 16, offsets=True))
            for i, (k, r) in enumerate(zip(kinds, rows))]
    x = rand(rng, T, 96)
    alone = [P.matmul(x, simd=simd, n_threads=1) for P in mats]
    for nth in (1, 2, 3):
        outs = E.matmul_many(mats, x, simd=simd, n_threads=nth)
        assert len(outs) == len(mats)
        for i, (o, a) in enumerate(zip(outs, alone)):
            np.testing.assert_array_equal(o, a, err_msg=f"matrix {i} ({kinds[i]}), {nth} threads")


# ---- packing, lookups, IEEE-half scales -----------------------------------------------------------

@pytest.mark.parametrize("kind,offsets,f16", [  # fp32 has no scales: neither offsets nor f16 scales
    (k, o, h) for k in TYPES for o in (False, True) for h in (False, True)
    if not (k == "f32" and (o or h))])
@pytest.mark.parametrize("rows", [1, 16, 33])
def test_lookup_rows_equal_dequantized_rows(kind, rows, offsets, f16, rng):
    w = make_weight(rng, kind, rows, 64, 16, offsets, f16)
    P = E.PackedMatrix(w)
    assert P.kind == kind + "p" and P.shape == (rows, 64)
    dense = w if kind == "f32" else w.dequantize()
    np.testing.assert_array_equal(P.rows(range(rows)), dense)
    if kind != "f32":
        assert P.scales_f16 == f16


@pytest.mark.parametrize("kind", ["f32", "q8"])
def test_unpacked_matrices_serve_lookups_in_place(kind, rng):
    w = make_weight(rng, kind, 20, 64, 16, offsets=True)
    P = E.PackedMatrix(w, packed=False)
    assert P.kind == kind
    dense = w if kind == "f32" else w.dequantize()
    np.testing.assert_array_equal(P.rows([0, 7, 19]), dense[[0, 7, 19]])
    with pytest.raises(ValueError, match="lookups only"):
        P.matmul(rand(rng, 1, 64))


def test_half_scales_chosen_only_when_exact(rng):
    w = random_qtensor(rng, 40, 64, 32, 8, offsets=True, f16=True)
    assert E.PackedMatrix(w).scales_f16
    w.s[3, 1] = np.float32(0.1)          # not a half
    assert not E.PackedMatrix(w).scales_f16
    w = random_qtensor(rng, 40, 64, 32, 4, offsets=True, f16=True)
    w.m[0, 0] = np.float32(1e-9)         # below the smallest half subnormal
    assert not E.PackedMatrix(w).scales_f16
    w.m[0, 0] = np.float32(2.0 ** -24)   # the smallest half subnormal: exact
    assert E.PackedMatrix(w).scales_f16
    w.s[0, 0] = np.float32(65504.0)      # the largest half
    assert E.PackedMatrix(w).scales_f16
    w.s[0, 0] = np.float32(65520.0)
    assert not E.PackedMatrix(w).scales_f16


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("bits", [8, 4])
def test_half_and_float_scales_give_the_same_bits(simd, bits, rng):
    """The same (half-exact) scales stored as halves or as floats: identical outputs."""
    w = random_qtensor(rng, 50, 128, 32, bits, offsets=True, f16=True)
    x = rand(rng, 6, 128)
    as_half = E.PackedMatrix(w)
    w.s[-1, -1] = np.float32(0.1)       # forces float storage...
    as_float = E.PackedMatrix(w)
    assert as_half.scales_f16 and not as_float.scales_f16
    a, b = as_half.matmul(x, simd=simd), as_float.matmul(x, simd=simd)
    np.testing.assert_array_equal(a[:, :-1], b[:, :-1])   # ...of every row but the changed one


def test_packed_sizes(rng):
    """Bytes per weight: 4 (fp32), 1 (int8), 1/2 (4-bit), plus 2 or 4 per group scale (and
    offset); rows padded to whole blocks of 16."""
    rows, cols, gs = 40, 256, 32
    padded, groups = 48 * cols, 48 * cols // gs
    for kind, per_weight in [("f32", 4), ("q8", 1), ("q4", 0.5)]:
        for f16, offsets in [(False, False), (True, True)]:
            if kind == "f32" and (f16 or offsets):
                continue
            P = E.PackedMatrix(make_weight(rng, kind, rows, cols, gs, offsets, f16))
            scale_bytes = 0 if kind == "f32" else groups * (2 if f16 else 4) * (2 if offsets else 1)
            assert P.nbytes == padded * per_weight + scale_bytes


# ---- the activation quantizer ---------------------------------------------------------------------

@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("gs", [4, 16, 32, 64, 128])
@pytest.mark.parametrize("T", [1, 3])
def test_quantize_8bit_matches_reference(simd, gs, T, rng):
    n = gs * 5
    x = rand(rng, T, n, scale=3.0)
    x[0, :gs] = 0.0                       # an all-zero group: scale 0, values 0
    a = E.quantize(x, gs, act_bits=8, simd=simd)
    rq, rs = ref.quantize_q8(x, gs)
    np.testing.assert_array_equal(a.hi, rq)
    np.testing.assert_array_equal(a.s, rs)
    np.testing.assert_array_equal(a.sum_hi, rq.reshape(T, -1, gs).sum(-1))
    np.testing.assert_array_equal(a.v16, rq)
    assert a.lo is None and a.s[0, 0] == 0 and not a.hi[0, :gs].any()


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("gs", [4, 32, 64, 256])
def test_quantize_two_planes_matches_reference(simd, gs, rng):
    T, n = 3, gs * 3
    x = rand(rng, T, n, scale=3.0)
    x[0, :gs] = 0.0
    a = E.quantize(x, gs, act_bits=16, simd=simd)
    xh, xl, xs = ref.quantize_q8(x, gs, bits=16)
    np.testing.assert_array_equal(a.hi, xh)
    np.testing.assert_array_equal(a.lo, xl)
    np.testing.assert_array_equal(a.s, xs)
    np.testing.assert_array_equal(a.sum_hi, xh.reshape(T, -1, gs).sum(-1))
    np.testing.assert_array_equal(a.sum_lo, xl.reshape(T, -1, gs).sum(-1))
    np.testing.assert_array_equal(a.v16, 128 * xh.astype(np.int16) + xl)


# ---- the 4-bit reference quantizer and the engine on 4-bit weights -------------------------------

def test_quantize_q4_reference(rng):
    w = rand(rng, 9, 96, scale=2.0)
    w[0, :32] = 0.75                      # a constant group: scale 0, exact
    w[1, 32:64] = np.linspace(-1, 1, 32)
    t = quantize_q4(w, 32)
    assert t.bits == 4 and t.q.dtype == np.uint8 and t.q.max() <= 15
    assert t.s[0, 0] == 0 and (t.q[0, :32] == 0).all() and t.m[0, 0] == np.float32(0.75)
    g = w.reshape(9, 3, 32)
    # min and (max - min) / 15, rounded to halves (as ggml's Q4_1 stores them)
    np.testing.assert_array_equal(t.m, g.min(-1).astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(
        t.s, ((g.max(-1) - g.min(-1)) / np.float32(15)).astype(np.float16).astype(np.float32))
    # at most half a step from the input, plus what the halves' rounding moved
    half_err = 2.0 ** -11 * (np.abs(g.min(-1)) + 15 * t.s)
    err = np.abs(t.dequantize().reshape(9, 3, 32) - g)
    assert (err <= (t.s / 2 * Q4_ROUND_SLACK + half_err)[:, :, None] + 1e-6).all()
    assert (t.q.reshape(9, 3, 32).max(-1)[t.s > 0] >= 14).all()
    # exact through the engine (lookups equal the dequantized matrix), scales kept as halves
    P = E.PackedMatrix(t)
    assert P.scales_f16
    np.testing.assert_array_equal(P.rows(range(9)), t.dequantize())


def test_quantize_q4_keeps_float_scales_beyond_halves(rng):
    w = rand(rng, 2, 32)
    w[0, 0] = 1e6                          # (max - min) / 15 is beyond the largest half
    t = quantize_q4(w, 32)
    assert t.s[0, 0] == np.float32((w[0].max() - w[0].min()) / np.float32(15))
    assert not E.PackedMatrix(t).scales_f16


def test_quantize_q4_rejects_bad_group_size(rng):
    with pytest.raises(ValueError, match="multiple of 8"):
        quantize_q4(rand(rng, 2, 24), 12)
    with pytest.raises(ValueError, match="does not divide"):
        quantize_q4(rand(rng, 2, 24), 16)


def test_engine_runs_4bit_weights_like_the_reference():
    from llama2c import Config, Model
    from llama2c.reference import ReferenceModel
    from llama2c.testing import make_random_model
    for shared in (True, False):
        cfg = Config(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2,
                     vocab_size=67, seq_len=32, shared_classifier=shared)
        fp = make_random_model(cfg, 3)
        w = quantize_weights(cfg, fp, group_size=32, bits=4)
        big = {"tok_embeddings", "output"}          # kept at 8 bits by default
        assert all(t.bits == (8 if k in big else 4) for k, t in w.items() if isinstance(t, QTensor))
        for k in big & set(w):                      # the engine runs 4-bit ones too
            w[k] = quantize_q4(fp[k], 32, k)
        tokens = [1, 5, 9, 2, 60, 33]
        for act_bits in ACT_BITS:
            got = Model(cfg, w, n_threads=2, act_bits=act_bits).logits(tokens)
            want = ReferenceModel(cfg, w, act_bits=act_bits).logits(tokens)
            rel = MODEL_A16_REL if act_bits == 16 else MODEL_A8_REL
            assert np.abs(got - want).max() <= rel * np.abs(want).max()


# ---- the peak probe ---------------------------------------------------------------------------

@pytest.mark.parametrize("simd", SIMD)
def test_peak_probe(simd):
    for kind in ("fp32", "int8"):
        g = E.peak_gops(kind, simd=simd, n_threads=1, seconds=0.01)
        assert np.isfinite(g) and g > 0.1
    with pytest.raises(ValueError, match="kind"):
        E.peak_gops("fp64")


# ---- bad arguments ----------------------------------------------------------------------------

def test_bad_weights_raise_value_error(rng):
    q = rng.integers(0, 16, (16, 32)).astype(np.uint8)
    s = np.ones((16, 1), np.float32)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        bad = q.copy()
        bad[3, 5] = 16
        E.PackedMatrix(QTensor(bad, s, 32, bits=4))
    with pytest.raises(ValueError, match="multiple of 8"):
        E.PackedMatrix(QTensor(q, np.ones((16, 8), np.float32), 4, bits=4))
    with pytest.raises(ValueError, match="multiple of 4"):
        E.PackedMatrix(QTensor(q.astype(np.int8), np.ones((16, 16), np.float32), 2))
    with pytest.raises(ValueError, match="at most 256"):
        E.PackedMatrix(QTensor(np.zeros((2, 512), np.int8), np.ones((2, 1), np.float32), 512))
    with pytest.raises(ValueError, match="int8"):
        E.PackedMatrix(QTensor(q, s, 32))                   # uint8 values for bits=8
    with pytest.raises(ValueError, match="bits"):
        E.PackedMatrix(QTensor(q, s, 32, bits=5))
    with pytest.raises(ValueError, match="scales"):
        E.PackedMatrix(QTensor(q, np.ones((16, 2), np.float32), 32, bits=4))
    with pytest.raises(ValueError, match="scales"):
        E.PackedMatrix(QTensor(q, s.astype(np.float64), 32, bits=4))
    with pytest.raises(ValueError, match="offsets"):
        E.PackedMatrix(QTensor(q, s, 32, np.ones((16, 2), np.float32), bits=4))
    with pytest.raises(ValueError, match="float32"):
        E.PackedMatrix(rand(rng, 4, 8).astype(np.float64))
    with pytest.raises(ValueError, match="float32"):
        E.PackedMatrix(rand(rng, 4, 16)[:, ::2])            # not contiguous
    with pytest.raises(ValueError, match="2-D"):
        E.PackedMatrix(rand(rng, 8))


def test_bad_matmul_arguments_raise_value_error(rng):
    P = E.PackedMatrix(quantize_q8(rand(rng, 20, 64), 32))
    with pytest.raises(ValueError, match="columns"):
        P.matmul(rand(rng, 2, 32))
    with pytest.raises(ValueError, match="out"):
        P.matmul(rand(rng, 2, 64), out=np.empty((2, 19), np.float32))
    with pytest.raises(ValueError):
        P.matmul(rand(rng, 2, 64).astype(np.float64))
    with pytest.raises(ValueError, match="groups of 16"):
        P.matmul_q(E.quantize(rand(rng, 2, 64), 16))
    with pytest.raises(ValueError, match="act_bits"):
        P.matmul(rand(rng, 2, 64), act_bits=4)
    with pytest.raises(ValueError, match="n_threads"):
        P.matmul(rand(rng, 2, 64), n_threads=0)
    with pytest.raises(ValueError, match="SIMD"):
        P.matmul(rand(rng, 2, 64), simd="sse9")
    with pytest.raises(ValueError, match="group size"):
        E.quantize(rand(rng, 1, 48), 32)
    with pytest.raises(IndexError):
        P.row(20)


def test_engine_mixes_types_and_group_sizes_per_matrix():
    """One model with fp32, int8 and 4-bit matrices and group sizes 16, 32 and 64 (as a K-quant
    file mixes them): the readers of one input get it quantized once per group size."""
    from llama2c import Config, Model
    from llama2c.reference import ReferenceModel
    from llama2c.testing import make_random_model
    cfg = Config(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=53,
                 seq_len=32, shared_classifier=False)
    w = make_random_model(cfg, 7)
    plan = {"wq": (8, 16), "wk": (4, 32), "wv": None, "wo": (4, 64), "w1": (8, 32),
            "w3": (4, 16), "w2": (8, 64)}
    for name in list(w):
        key = name.split(".")[-1]
        if key in plan and plan[key] is not None:
            bits, gs = plan[key]
            w[name] = (quantize_q8 if bits == 8 else quantize_q4)(w[name], gs)
    w["tok_embeddings"] = quantize_q4(w["tok_embeddings"], 32)   # lookups from a packed 4-bit
    w["output"] = quantize_q8(w["output"], 16)
    tokens = [3, 7, 11, 50, 2, 9, 30]
    for act_bits in ACT_BITS:
        want = ReferenceModel(cfg, w, act_bits=act_bits).logits(tokens)
        for simd in SIMD:
            got = Model(cfg, w, n_threads=2, simd=simd, act_bits=act_bits).logits(tokens)
            rel = MODEL_A16_REL if act_bits == 16 else MODEL_A8_REL
            assert np.abs(got - want).max() <= rel * np.abs(want).max(), (simd, act_bits)


def test_quantize_weights_keeps_or_widens_stored_groups(rng):
    from llama2c import Config
    from llama2c.testing import make_random_model
    cfg = Config(dim=64, hidden_dim=96, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=40,
                 seq_len=16)
    w = make_random_model(cfg, 1)
    w4 = quantize_weights(cfg, w, 32, bits=4)
    as8 = quantize_weights(cfg, w4, 32, bits=8)       # 4-bit groups of 32 widened exactly
    for name, t in as8.items():
        if isinstance(t, QTensor):
            assert t.bits == 8 and t.q.dtype == np.int8
            np.testing.assert_array_equal(t.dequantize(), w4[name].dequantize())
    assert quantize_weights(cfg, w4, 32, bits=4)["layers.0.wq"] is w4["layers.0.wq"]
    again = quantize_weights(cfg, as8, 32, bits=4)    # 8-bit ones are requantized to 4 bits
    assert again["layers.0.wq"].bits == 4
    with pytest.raises(ValueError, match="bits"):
        quantize_weights(cfg, w, 32, bits=5)
