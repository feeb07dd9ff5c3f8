"""The attention over the KV pool (csrc/attention.c) and the KV store, on every kernel table.

* Against the NumPy reference (llama2c.reference.attention on the keys/values the pool holds)
  at positions up to several thousand, GQA ratios 1, 3, 4 and 8 (and 12), head sizes 64, 48
  (an odd multiple of 16) and small odd ones, for fp32, fp16 and int8 caches, and caches whose
  keys and values have different types ("f16/q8", ...).
* The stored keys/values: fp16 bit for bit as NumPy rounds to half (every table, edge values
  included), int8 as llama2c.reference.kv_round, each half of a mixed cache in its own type.
* The row invariant (PLAN.md): a query row gives the same bits whether it is decoded alone
  (split over blocks), sits anywhere in a prefill tile, shares the call with other sequences,
  or runs with another thread count.
"""
import numpy as np
import pytest

from llama2c import _engine as E
from llama2c import reference as ref

SIMD = E.available_simd()
KV = ["f32", "f16", "q8", "f16/q8", "q8/f16", "f32/f16"]   # "K/V": keys, values of two types
# the rounded caches against exact keys/values, of the output scale (unit-variance data: fp16
# keeps 11 bits, int8 7 per row and head); a "K/V" cache: the looser of its two types
CACHE_BUDGET = {"f32": 2e-5, "f16": 2e-3, "q8": 3e-2}


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def case(seed, T, pos0, n_heads, n_kv, hs, key_scale=1.0):
    rng = np.random.default_rng(seed)
    q = rand(rng, T, n_heads * hs)
    k = rand(rng, pos0 + T, n_kv * hs) * np.float32(key_scale)
    v = rand(rng, pos0 + T, n_kv * hs)
    return q, k, v


# ---- against the reference ------------------------------------------------------------------

SHAPES = [  # (n_heads, n_kv_heads, head_size): GQA ratios 1, 3, 4, 8, 12
    (4, 4, 64), (9, 3, 64), (8, 2, 48), (16, 2, 64), (12, 1, 48)]
POSITIONS = [(1, 0), (1, 4095), (2, 3000), (5, 63), (37, 2000), (70, 0)]   # (T, pos0)


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "h%d-kv%d-hs%d" % s)
def test_attention_matches_reference(simd, kv, shape):
    n_heads, n_kv, hs = shape
    for i, (T, pos0) in enumerate(POSITIONS):
        # keys scaled up so that the softmax is peaked at some positions and flat at others
        q, k, v = case(i, T, pos0, n_heads, n_kv, hs, key_scale=2.0)
        (out,), (stored,), _ = E.attention_seqs([q], [k], [v], [pos0], n_heads, n_kv, simd=simd,
                                                kv_dtype=kv, n_threads=2)
        ks, vs = stored
        want = ref.attention(q, ks, vs, pos0, n_heads, n_kv)
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=2e-5, err_msg=f"T={T} pos0={pos0}")


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("shape", [(4, 4, 16), (9, 3, 6), (8, 1, 8), (6, 2, 40), (2, 1, 2)])
@pytest.mark.parametrize("kv", KV)
def test_attention_small_head_sizes(simd, kv, shape):
    """Head sizes that are not multiples of 16 go through padded float scratch."""
    n_heads, n_kv, hs = shape
    for T, pos0 in [(1, 0), (1, 130), (20, 50)]:
        q, k, v = case(T + pos0, T, pos0, n_heads, n_kv, hs)
        (out,), (stored,), _ = E.attention_seqs([q], [k], [v], [pos0], n_heads, n_kv, simd=simd,
                                                kv_dtype=kv, block_size=32)
        np.testing.assert_allclose(out, ref.attention(q, *stored, pos0, n_heads, n_kv),
                                   rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("kv", KV)
def test_cache_types_within_budget_of_fp32(kv):
    """The rounded caches against the exact keys/values, within CACHE_BUDGET."""
    q, k, v = case(7, 8, 1500, 9, 3, 64)
    (out,), _, _ = E.attention_seqs([q], [k], [v], [1500], 9, 3, kv_dtype=kv)
    want = ref.attention(q, k, v, 1500, 9, 3)
    budget = max(CACHE_BUDGET[t] for t in kv.split("/"))
    assert np.abs(out - want).max() <= budget * np.abs(want).max()


# ---- what the pool stores -------------------------------------------------------------------

EDGE = np.array([0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, -65520.0, 1e9, -1e9,
                 2.0 ** -14, 2.0 ** -24, 2.0 ** -25, 2.0 ** -25 * 1.0001, 3 * 2.0 ** -26,
                 2.0 ** -26, 1e-30, -1e-30, 6.1e-5, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11,
                 1 + 2.0 ** -11 + 2.0 ** -20, np.inf, -np.inf, 0.1, 1 / 3], dtype=np.float32)


@pytest.mark.parametrize("simd", SIMD)
def test_f16_store_is_ieee_round_to_nearest_even(simd):
    """Every table's fp16 store (F16C, AVX-512 or the software conversion) gives NumPy's half."""
    rng = np.random.default_rng(0)
    vals = np.concatenate([EDGE, rng.standard_normal(2000).astype(np.float32) *
                           np.float32(10.0) ** rng.integers(-9, 6, 2000).astype(np.float32)])
    hs = 16
    n = len(vals) // hs * hs
    k = vals[:n].reshape(-1, hs).astype(np.float32)
    v = k[::-1].copy()
    q = np.zeros((1, hs), np.float32)
    N = k.shape[0]
    with np.errstate(all="ignore"):
        _, (stored,), _ = E.attention_seqs([q], [k], [v], [N - 1], 1, 1, simd=simd, kv_dtype="f16")
        want_k = k.astype(np.float16).astype(np.float32)
        want_v = v.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(stored[0].view(np.uint32), want_k.view(np.uint32))
    np.testing.assert_array_equal(stored[1].view(np.uint32), want_v.view(np.uint32))


@pytest.mark.parametrize("simd", SIMD)
def test_q8_store_matches_reference_rounding(simd):
    q, k, v = case(3, 4, 200, 6, 2, 64)
    k[5, :64] = 0.0                      # an all-zero row of one head: scale 0, codes 0
    _, (stored,), _ = E.attention_seqs([q], [k], [v], [200], 6, 2, simd=simd, kv_dtype="q8")
    np.testing.assert_array_equal(stored[0], ref.kv_round(k, "q8", 64))
    np.testing.assert_array_equal(stored[1], ref.kv_round(v, "q8", 64))
    assert not stored[0][5, :64].any()


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("kv", ["f16/q8", "q8/f16", "f32/q8"])
def test_mixed_cache_stores_each_half_in_its_type(simd, kv):
    kt, vt = kv.split("/")
    q, k, v = case(4, 3, 150, 8, 2, 48)
    _, (stored,), _ = E.attention_seqs([q], [k], [v], [150], 8, 2, simd=simd, kv_dtype=kv)
    np.testing.assert_array_equal(stored[0], ref.kv_round(k, kt, 48))
    np.testing.assert_array_equal(stored[1], ref.kv_round(v, vt, 48))


# ---- the row invariant ----------------------------------------------------------------------

@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("shape", [(9, 3, 64), (8, 8, 48), (16, 2, 64)], ids=lambda s: "h%d-kv%d-hs%d" % s)
def test_row_result_independent_of_span_batch_and_threads(simd, kv, shape, block_size):
    n_heads, n_kv, hs = shape
    # sequence A: 40 rows at positions 100..139 (across block boundaries); B: one decode row
    # at position 300; C: 5 rows from position 0
    qa, ka, va = case(1, 40, 100, n_heads, n_kv, hs)
    qb, kb, vb = case(2, 1, 300, n_heads, n_kv, hs)
    qc, kc, vc = case(3, 5, 0, n_heads, n_kv, hs)

    def run(split=None, n_threads=1, batch=False, interleave=True):
        seqs = ([qa, qb, qc], [ka, kb, kc], [va, vb, vc], [100, 300, 0]) if batch else \
            ([qa], [ka], [va], [100])
        splits = None
        if split is not None:
            splits = [split] + ([[1], [5]] if batch else [])
        outs, _, _ = E.attention_seqs(*seqs, n_heads, n_kv, simd=simd, kv_dtype=kv,
                                      block_size=block_size, splits=splits, n_threads=n_threads,
                                      interleave=interleave, readback=False)
        return outs

    tile = run()[0]                                  # one span: prefill tiles of 16 rows
    decode = run(split=[1] * 40)[0]                  # every row alone: split over blocks
    mixed = run(split=[3, 17, 1, 19], n_threads=3)[0]   # tiles at other offsets, some decode rows
    batched = run(batch=True, n_threads=2, interleave=False)
    for got in (decode, mixed, batched[0]):
        np.testing.assert_array_equal(got, tile)
    alone_b = E.attention_seqs([qb], [kb], [vb], [300], n_heads, n_kv, simd=simd, kv_dtype=kv,
                               block_size=block_size, readback=False)[0][0]
    np.testing.assert_array_equal(batched[1], alone_b)
    np.testing.assert_allclose(tile, ref.attention(qa, *ref_kv(ka, va, kv, hs), 100, n_heads, n_kv),
                               rtol=1e-4, atol=2e-5)


def ref_kv(k, v, kv, hs):
    kt, _, vt = kv.partition("/")
    return ref.kv_round(k, kt, hs), ref.kv_round(v, vt or kt, hs)


def test_prefill_scratch_does_not_grow_with_the_context():
    """Prefill tiles use fixed scratch; only decode rows hold one partial per block."""
    prefill = [E.attention_ws_bytes([p], [64], 9, 3, 64, n_threads=2) for p in (0, 1000, 8000)]
    assert prefill[0] == prefill[1] == prefill[2]
    decode = [E.attention_ws_bytes([p], [1], 9, 3, 64, n_threads=2) for p in (0, 1000, 8000)]
    assert decode[0] < decode[1] < decode[2]


def test_attention_argument_errors():
    q, k, v = case(0, 2, 3, 4, 2, 16)
    for bad in ("bf16", "f16/bf16", "f16/q8/f32", "f16/"):
        with pytest.raises(ValueError, match="kv_dtype"):
            E.attention_seqs([q], [k], [v], [3], 4, 2, kv_dtype=bad)
    with pytest.raises(ValueError, match="block_size"):
        E.attention_seqs([q], [k], [v], [3], 4, 2, block_size=24)
    with pytest.raises(ValueError, match="ks\\[0\\]/vs\\[0\\]"):
        E.attention_seqs([q], [k[:-1]], [v], [3], 4, 2)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        E.attention_seqs([q], [k], [v], [3], 4, 3)
    with pytest.raises(ValueError, match="splits"):
        E.attention_seqs([q], [k], [v], [3], 4, 2, splits=[[1]])
