"""Every C kernel against the NumPy reference, on every kernel table this CPU runs (the scalar
"generic" twin included), over sizes that include 1 and non-multiples of the SIMD width."""
import numpy as np
import pytest

from llama2c import _engine as E
from llama2c import reference as ref
from llama2c.weights import QTensor, quantize_q8

SIMD = E.available_simd()
# fp32 kernels differ from the reference only by summation order
RTOL_F32 = 1e-5
ATOL_F32 = 1e-5

SIZES = [(1, 1), (1, 7), (3, 16), (5, 17), (8, 64), (13, 100), (33, 288), (70, 576), (9, 1000)]


def rand(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def test_generic_and_best_tables_present():
    assert "generic" in SIMD
    info = E.kernel_info()
    assert info["simd"] in SIMD and info["n_threads"] >= 1


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("T", [1, 2, 5, 8])
@pytest.mark.parametrize("d,n", SIZES)
def test_matmul_f32(simd, T, d, n, rng):
    x, w = rand(rng, T, n), rand(rng, d, n)
    out = np.full((T, d), np.nan, dtype=np.float32)
    E.matmul(out, x, w, simd=simd, n_threads=2)
    np.testing.assert_allclose(out, ref.matmul(x, w), rtol=RTOL_F32, atol=ATOL_F32 * np.sqrt(n))


@pytest.mark.parametrize("simd", SIMD)
def test_matmul_f32_large_threaded(simd, rng):
    x, w = rand(rng, 67, 1536), rand(rng, 301, 1536)
    out = np.empty((67, 301), dtype=np.float32)
    E.matmul(out, x, w, simd=simd, n_threads=2)
    np.testing.assert_allclose(out, x @ w.T, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("gs", [4, 16, 32, 64, 128])
@pytest.mark.parametrize("T", [1, 3])
def test_quantize_q8_matches_reference(simd, gs, T, rng):
    n = gs * 5
    x = rand(rng, T, n, scale=3.0)
    x[0, :gs] = 0.0                      # an all-zero group: scale 0, values 0
    xq = np.empty((T, n), np.int8)
    xs = np.empty((T, n // gs), np.float32)
    E.quantize_q8(xq, xs, x, gs, simd=simd)
    rq, rs = ref.quantize_q8(x, gs)
    np.testing.assert_array_equal(xq, rq)
    np.testing.assert_array_equal(xs, rs)
    assert xs[0, 0] == 0 and not xq[0, :gs].any()
    # dequantization error is at most half a step
    err = np.abs(xq.reshape(T, -1, gs) * xs[:, :, None] - x.reshape(T, -1, gs))
    assert (err <= xs[:, :, None] / 2 * (1 + 1e-6) + 1e-12).all()


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("gs", [4, 32, 64, 128])
@pytest.mark.parametrize("T", [1, 2, 7])
@pytest.mark.parametrize("d", [1, 5, 64, 131])
def test_matmul_q8(simd, gs, T, d, rng):
    n = gs * 3 if gs >= 32 else gs * 25
    x, w = rand(rng, T, n), rand(rng, d, n)
    wt = quantize_q8(w, gs)
    xq, xs = ref.quantize_q8(x, gs)
    out = np.empty((T, d), np.float32)
    E.matmul_q8(out, xq, xs, wt.q, wt.s, gs, simd=simd, n_threads=2)
    np.testing.assert_allclose(out, ref.matmul_q8(xq, xs, wt), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("gs", [32, 64, 256])
def test_matmul_q8_integer_sums_exact(simd, gs, rng):
    """With unit scales and one group per row the output is the int32 dot itself."""
    T, d, n = 3, 17, gs
    xq = rng.integers(-127, 128, (T, n)).astype(np.int8)
    wq = rng.integers(-127, 128, (d, n)).astype(np.int8)
    xq[0] = 127
    wq[0] = -127                         # the extreme product sums
    out = np.empty((T, d), np.float32)
    E.matmul_q8(out, xq, np.ones((T, 1), np.float32), wq, np.ones((d, 1), np.float32), gs,
                simd=simd)
    exact = xq.astype(np.int64) @ wq.astype(np.int64).T
    np.testing.assert_array_equal(out, exact.astype(np.float32))


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("T,n", [(1, 1), (1, 15), (2, 64), (3, 288), (4, 1000)])
def test_rmsnorm(simd, T, n, rng):
    x, w = rand(rng, T, n), rand(rng, n)
    out = np.empty_like(x)
    E.rmsnorm(out, x, w, 1e-5, simd=simd, n_threads=2)
    np.testing.assert_allclose(out, ref.rmsnorm(x, w, 1e-5), rtol=RTOL_F32, atol=ATOL_F32)


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("n", [1, 2, 17, 512, 49152])
def test_softmax(simd, n, rng):
    x = rand(rng, n, scale=5.0)
    expected = ref.softmax(x)
    E.softmax(x, simd=simd)
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-7)
    assert abs(x.sum() - 1) < 1e-4


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("theta,factor", [(10000.0, 1.0), (100000.0, 1.0), (500000.0, 4.0)])
@pytest.mark.parametrize("T,n_heads,hs", [(1, 1, 2), (3, 4, 16), (5, 9, 64), (2, 3, 6)])
def test_rope(simd, theta, factor, T, n_heads, hs, rng):
    seq = 2000
    cos_t, sin_t = E.rope_tables(seq, hs, theta, factor)
    pos = rng.integers(0, seq, T).astype(np.int64)
    x = rand(rng, T, n_heads * hs)
    expected = ref.rope(x, pos, theta, hs, factor)
    E.rope(x, pos, cos_t, sin_t, n_heads, hs, simd=simd, n_threads=2)
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("n", [1, 7, 1536, 100_000])
def test_swiglu_and_add(simd, n, rng):
    h1, h3 = rand(rng, n, scale=4.0), rand(rng, n)
    expected = ref.swiglu(h1, h3)
    E.swiglu(h1, h3, simd=simd, n_threads=2)
    np.testing.assert_allclose(h1, expected, rtol=1e-5, atol=1e-6)
    y = rand(rng, n)
    x0 = h1.copy()
    E.add(h1, y, simd=simd, n_threads=2)
    np.testing.assert_array_equal(h1, x0 + y)


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("T,pos0", [(1, 0), (1, 37), (4, 0), (6, 11)])
@pytest.mark.parametrize("n_heads,n_kv,hs", [(4, 4, 16), (9, 3, 64), (8, 1, 8), (6, 2, 6)])
def test_attention(simd, T, pos0, n_heads, n_kv, hs, rng):
    P = pos0 + T
    q = rand(rng, T, n_heads * hs)
    kc, vc = rand(rng, P + 3, n_kv * hs), rand(rng, P + 3, n_kv * hs)
    out = np.empty_like(q)
    E.attention(out, q, kc, vc, pos0, n_heads, n_kv, simd=simd, n_threads=2)
    np.testing.assert_allclose(out, ref.attention(q, kc, vc, pos0, n_heads, n_kv),
                               rtol=1e-4, atol=1e-5)


def test_simd_paths_agree_on_a_model_sized_matmul(rng):
    """The SIMD tables and the scalar twin give the same answer to summation-order rounding."""
    x, w = rand(rng, 1, 576), rand(rng, 1536, 576)
    outs = {}
    for simd in SIMD:
        outs[simd] = np.empty((1, 1536), np.float32)
        E.matmul(outs[simd], x, w, simd=simd)
    for simd in SIMD:
        np.testing.assert_allclose(outs[simd], outs["generic"], rtol=1e-4, atol=1e-4)


# ---- argument checking: clear errors, no copies ------------------------------------------------

def test_matmul_rejects_bad_arguments(rng):
    x, w = rand(rng, 2, 8), rand(rng, 4, 8)
    with pytest.raises(ValueError, match="out"):
        E.matmul(np.empty((2, 5), np.float32), x, w)
    with pytest.raises(ValueError, match="w"):
        E.matmul(np.empty((2, 4), np.float32), x, rand(rng, 4, 9))
    with pytest.raises(ValueError):          # float64: refused, never silently converted
        E.matmul(np.empty((2, 4), np.float32), x.astype(np.float64), w)
    with pytest.raises(ValueError):          # non-contiguous
        E.matmul(np.empty((2, 4), np.float32), rand(rng, 2, 16)[:, ::2], w)
    with pytest.raises(ValueError, match="n_threads"):
        E.matmul(np.empty((2, 4), np.float32), x, w, n_threads=0)
    with pytest.raises(ValueError, match="SIMD"):
        E.matmul(np.empty((2, 4), np.float32), x, w, simd="sse9")


def test_quantized_kernels_reject_bad_group_size(rng):
    x = rand(rng, 1, 48)
    with pytest.raises(ValueError, match="group size"):
        E.quantize_q8(np.empty((1, 48), np.int8), np.empty((1, 1), np.float32), x, 0)
    with pytest.raises(ValueError, match="group size"):
        E.quantize_q8(np.empty((1, 48), np.int8), np.empty((1, 1), np.float32), x, 32)


def test_kernels_accept_read_only_inputs(rng):
    """Weights come as read-only memory maps: const memoryviews take them without a copy."""
    x, w = rand(rng, 1, 32), rand(rng, 3, 32)
    w.setflags(write=False)
    out = np.empty((1, 3), np.float32)
    E.matmul(out, x, w)
    np.testing.assert_allclose(out, x @ w.T, rtol=1e-5, atol=1e-6)


# ---- two-plane (15-bit) activations and weight offsets ------------------------------------------

def two_plane(rng, T, n, gs, simd):
    x = rand(rng, T, n, scale=3.0)
    x[0, :gs] = 0.0
    hi, lo = np.empty((T, n), np.int8), np.empty((T, n), np.int8)
    xs = np.empty((T, n // gs), np.float32)
    sh, sl = np.empty((T, n // gs), np.int32), np.empty((T, n // gs), np.int32)
    E.quantize_q8(hi, xs, x, gs, simd=simd, xsum=sh, xl=lo, xsum_lo=sl)
    return x, hi, lo, xs, sh, sl


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("gs", [4, 32, 64, 256])
def test_quantize_two_planes(simd, gs, rng):
    T, n = 3, gs * 3
    x, hi, lo, xs, sh, sl = two_plane(rng, T, n, gs, simd)
    v = 128 * hi.astype(np.int32) + lo
    assert np.abs(hi).max() <= 127 and np.abs(lo).max() <= 64
    np.testing.assert_array_equal(sh, hi.reshape(T, -1, gs).sum(-1))
    np.testing.assert_array_equal(sl, lo.reshape(T, -1, gs).sum(-1))
    # v = rint(x / s) with s = max|x| / 16256: error at most half a (128x finer) step
    np.testing.assert_allclose(xs, np.abs(x.reshape(T, -1, gs)).max(-1) / np.float32(16256), rtol=1e-7)
    err = np.abs(v.reshape(T, -1, gs) * xs[:, :, None] - x.reshape(T, -1, gs))
    assert (err <= xs[:, :, None] / 2 * (1 + 1e-5) + 1e-12).all()
    if simd != "generic":       # every table quantizes identically
        ref = two_plane(np.random.default_rng(1234), T, n, gs, "generic")
        got = two_plane(np.random.default_rng(1234), T, n, gs, simd)
        for a, b in zip(ref[1:], got[1:]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("gs", [4, 32, 64])
@pytest.mark.parametrize("T", [1, 3, 9])
@pytest.mark.parametrize("planes", [1, 2])
@pytest.mark.parametrize("offsets", [False, True])
def test_matmul_q8_planes_and_offsets(simd, gs, T, planes, offsets, rng):
    d, n = 37, gs * (3 if gs >= 32 else 20)
    wq = rng.integers(-127, 128, (d, n)).astype(np.int8)
    ws = (rng.random((d, n // gs)) / 100).astype(np.float32)
    wm = (rng.standard_normal((d, n // gs)) / 100).astype(np.float32) if offsets else None
    if planes == 2:
        _, hi, lo, xs, _, _ = two_plane(rng, T, n, gs, simd)
        v = 128 * hi.astype(np.int64) + lo
    else:
        hi, xs = ref.quantize_q8(rand(rng, T, n), gs)
        lo, v = None, hi.astype(np.int64)
    out = np.empty((T, d), np.float32)
    E.matmul_q8(out, hi, xs, wq, ws, gs, simd=simd, n_threads=2, xl=lo, wm=wm)
    # float64 oracle of the same formula: per group exact integer dot, scales, offsets
    vg = v.reshape(T, -1, gs)
    idot = np.einsum("tgk,dgk->tdg", vg, wq.astype(np.int64).reshape(d, -1, gs))
    want = (idot * ws[None].astype(np.float64) * xs[:, None, :]).sum(-1)
    if offsets:
        want += (wm[None] * xs[:, None, :] * vg.sum(-1)[:, None, :]).sum(-1)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("simd", SIMD)
def test_two_plane_integer_sums_exact(simd, rng):
    """Unit scales, one group: the output is the exact integer dot of v = 128 hi + lo."""
    T, d, gs = 9, 17, 256
    hi = rng.integers(-127, 128, (T, gs)).astype(np.int8)
    lo = rng.integers(-64, 65, (T, gs)).astype(np.int8)
    hi[0], lo[0] = 127, 64
    wq = rng.integers(-127, 128, (d, gs)).astype(np.int8)
    wq[0] = 127
    out = np.empty((T, d), np.float32)
    E.matmul_q8(out, hi, np.ones((T, 1), np.float32), wq, np.ones((d, 1), np.float32), gs,
                simd=simd, xl=lo)
    exact = (128 * hi.astype(np.int64) + lo) @ wq.astype(np.int64).T
    np.testing.assert_array_equal(out.astype(np.float64), exact.astype(np.float32).astype(np.float64))
