"""Every C kernel against the NumPy reference, on every kernel table this CPU runs (the scalar
"generic" twin included), over sizes that include 1 and non-multiples of the SIMD width.
The matrix kernels of every weight type (fp32 panels, int8, 4-bit) and the activation
quantizer have their own file: tests/test_matmul.py."""
import numpy as np
import pytest

from llama2c import _engine as E
from llama2c import reference as ref

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


def test_kernels_accept_read_only_inputs(rng):
    """Weights come as read-only memory maps: const memoryviews take them without a copy."""
    x, w = rand(rng, 1, 32), rand(rng, 3, 32)
    w.setflags(write=False)
    out = np.empty((1, 3), np.float32)
    E.matmul(out, x, w)
    np.testing.assert_allclose(out, x @ w.T, rtol=1e-5, atol=1e-6)
