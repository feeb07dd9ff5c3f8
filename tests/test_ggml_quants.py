"""Every ggml block type against gguf-py (gguf.quants, the spec): dequantization bit for bit on
random blocks (every byte value in every position, extreme f16 scales: subnormal, zero, -0,
max, inf, nan), the exact QTensor mapping (its dequantize() equals gguf-py's values), and the
Q8_0 / Q4_1 reference quantizers of the writer."""
import numpy as np
import pytest

from llama2c.loaders import ggml_quants as gq
from llama2c.weights import QTensor
from l2c_files import BLOCK_TYPES, random_blocks

gguf = pytest.importorskip("gguf")
# gguf-py warns about inf * 0 on the non-finite scales; so would we, were it not silenced
pytestmark = pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning",
                                        "ignore:overflow:RuntimeWarning")

# f16 values for the d / dmin / m fields: ordinary, tiny and huge, subnormal, signed zeros,
# and the non-finite ones (dequantize reproduces gguf-py's inf/nan; the QTensor mapping of
# such blocks is rejected by validate_weights, so it is compared on finite scales only).
FINITE_SCALES = np.array([0.01, -0.01, 1.0, -2.5, 0.0, -0.0, 6.0e-8, -6.0e-8, 3.0e-5,
                          1.0e-3, 65504.0, -65504.0, 1234.5, 2.0 ** -24, 2.0 ** -14], np.float16)
NONFINITE_SCALES = np.array([np.inf, -np.inf, np.nan], np.float16)


def _gguf_type(type_name):
    return getattr(gguf.GGMLQuantizationType, type_name)


def _reference(type_name, raw: bytes, n_blocks: int) -> np.ndarray:
    size = gq.BLOCK_DTYPES[type_name].itemsize
    data = np.frombuffer(raw, np.uint8).reshape(n_blocks, size)
    return gguf.quants.dequantize(data, _gguf_type(type_name)).reshape(-1)


def _pattern_blocks(type_name: str) -> bytes:
    """256 blocks where byte j of block i is (i + 7 j) % 256: every byte value at every
    position (all nibble, 2-bit, high-bit and scale patterns), d/dmin/m then set to sane f16."""
    dt = gq.BLOCK_DTYPES[type_name]
    i = np.arange(256)[:, None]
    j = np.arange(dt.itemsize)[None, :]
    raw = ((i + 7 * j) % 256).astype(np.uint8).reshape(-1)
    b = raw.view(dt)
    for field in ("d", "dmin", "m"):
        if field in dt.names:
            b[field] = np.linspace(-2, 2, 256).astype(np.float16)
    return raw.tobytes()


def _cases(type_name):
    rng = np.random.default_rng(sum(map(ord, type_name)))
    yield "random", random_blocks(type_name, 300, rng), 300
    yield "patterns", _pattern_blocks(type_name), 256
    yield "extreme", random_blocks(type_name, 200, rng, scales=FINITE_SCALES), 200


@pytest.mark.parametrize("type_name", BLOCK_TYPES)
def test_dequantize_is_gguf_py_bit_for_bit(type_name):
    rng = np.random.default_rng(1)
    cases = list(_cases(type_name))
    cases.append(("nonfinite", random_blocks(type_name, 64, rng,
                                             scales=np.concatenate([NONFINITE_SCALES, FINITE_SCALES])), 64))
    for label, raw, n in cases:
        want = _reference(type_name, raw, n)
        got = gq.dequantize(type_name, np.frombuffer(raw, np.uint8))
        assert got.dtype == np.float32 and got.shape == want.shape, label
        # compare bit patterns: signed zeros, infinities and NaN payloads included
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=label)


# Types whose gguf-py formula is one product (or the same product-and-sum) as q * s + m:
# bit-identical. Q4_0 (d * (q - 8)) and Q3_K (dl * q) give the same values through an exact
# offset, but zeros may differ in sign (gguf-py -0.0, mapping +0.0); see ggml_quants.py.
SIGNED_ZERO_ONLY = {"Q4_0", "Q3_K"}


@pytest.mark.parametrize("type_name", BLOCK_TYPES)
def test_qtensor_mapping_is_exact(type_name):
    bits, gs = gq.EXACT_FORMAT[type_name]
    block = gq.BLOCK_SIZES[type_name]
    for label, raw, n in _cases(type_name):
        rows = 4
        shape = (rows, n * block // rows)
        t = gq.to_qtensor(type_name, np.frombuffer(raw, np.uint8), shape)
        assert isinstance(t, QTensor) and (t.bits, t.group_size) == (bits, gs)
        assert t.q.shape == shape and t.q.dtype == (np.int8 if bits == 8 else np.uint8)
        assert t.s.shape == t.s.shape == (rows, shape[1] // gs) and t.s.dtype == np.float32
        assert t.q.flags.c_contiguous and t.s.flags.c_contiguous
        if bits == 4:
            assert t.q.max() <= 15
        want = _reference(type_name, raw, n).reshape(shape)
        got = t.dequantize()
        np.testing.assert_array_equal(got, want, err_msg=label)          # equal values
        differ = got.view(np.uint32) != want.view(np.uint32)
        if type_name in SIGNED_ZERO_ONLY:
            assert (got[differ] == 0).all() and (want[differ] == 0).all(), label
        else:
            assert not differ.any(), (label, int(differ.sum()))


@pytest.mark.parametrize("type_name", BLOCK_TYPES)
def test_mapping_uses_every_code(type_name):
    """The pattern and random blocks reach every code value of the type (0..15 for 4-bit types, the full
    5/6-bit ranges for Q5/Q6, every 2-bit Q2_K and 3-bit Q3_K code)."""
    raw = _pattern_blocks(type_name) + random_blocks(type_name, 64, np.random.default_rng(2))
    n = len(raw) // gq.BLOCK_DTYPES[type_name].itemsize
    t = gq.to_qtensor(type_name, np.frombuffer(raw, np.uint8), (1, n * gq.BLOCK_SIZES[type_name]))
    expected = {"Q4_0": range(16), "Q4_1": range(16), "Q4_K": range(16), "Q2_K": range(4),
                "Q3_K": range(8), "Q5_0": range(-16, 16), "Q5_1": range(32), "Q5_K": range(32),
                "Q6_K": range(-32, 32), "Q8_0": range(-128, 128)}[type_name]
    assert set(np.unique(t.q).tolist()) == set(expected)


def test_k_quant_sub_block_scales_are_unpacked_exactly():
    """Q4_K: the 6-bit scales/mins packed in 12 bytes come out as gguf-py's get_scale_min; the
    QTensor's s and m are d * sc and -dmin * mn exactly."""
    rng = np.random.default_rng(5)
    raw = random_blocks("Q4_K", 50, rng)
    data = np.frombuffer(raw, np.uint8).reshape(50, 144)
    sc_ref, mn_ref = gguf.quants.Q4_K.get_scale_min(data[:, 4:16].copy())
    t = gq.to_qtensor("Q4_K", data, (50, 256))
    d = data[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = data[:, 2:4].copy().view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(t.s, d * sc_ref.astype(np.float32))
    np.testing.assert_array_equal(t.m, -(dmin * mn_ref.astype(np.float32)))


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_1"])
def test_reference_quantizers_match_gguf_py(type_name):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 128)).astype(np.float32) * 0.1
    w[0, :32] = 0.0                      # an all-zero group
    w[1, :32] = 1.5                      # a constant group (Q4_1: d = 0)
    w[2, 5] = 40.0                       # an outlier
    quantize, encode = {"Q8_0": (gq.quantize_q8_0, gq.encode_q8_0),
                        "Q4_1": (gq.quantize_q4_1, gq.encode_q4_1)}[type_name]
    t = quantize(w, "w")
    ref = gguf.quants.quantize(w, _gguf_type(type_name))
    assert encode(t) == ref.tobytes()
    # what the file holds loads back as the same QTensor (s and m are f16 values)
    back = gq.to_qtensor(type_name, np.frombuffer(encode(t), np.uint8), w.shape)
    np.testing.assert_array_equal(back.q, t.q)
    np.testing.assert_array_equal(back.s, t.s)
    if type_name == "Q4_1":
        np.testing.assert_array_equal(back.m, t.m)
    # half a step, plus what rounding d (and min) to f16 moves: < 2^-11 relative per term
    err = np.abs(t.dequantize() - w).reshape(8, 4, 32)
    slack = 2.0 ** -10 * (np.abs(w).reshape(8, 4, 32) + (0 if t.m is None else np.abs(t.m)[:, :, None]))
    assert (err <= t.s[:, :, None] * 0.5 + slack + 1e-7).all()


def test_representable_checks():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    q8, q4 = gq.quantize_q8_0(w), gq.quantize_q4_1(w)
    assert gq.q8_0_representable(q8) and not gq.q4_1_representable(q8)
    assert gq.q4_1_representable(q4) and not gq.q8_0_representable(q4)
    not_f16 = QTensor(q8.q, q8.s * np.float32(1.0001), 32)
    assert not gq.q8_0_representable(not_f16)
    assert not gq.q8_0_representable(QTensor(q8.q.reshape(4, 64), np.repeat(q8.s, 2, 1), 16))


@pytest.mark.parametrize("type_name", ["F16", "BF16"])
def test_half_types_every_bit_pattern(type_name):
    """All 65536 F16 / BF16 bit patterns (subnormals, infinities, NaN payloads) as gguf-py."""
    from llama2c.loaders.gguf import GGUFTensor, dequantize
    bits = np.arange(65536, dtype=np.uint16)
    data = bits.view(np.float16) if type_name == "F16" else bits
    t = GGUFTensor("x", {"F16": 1, "BF16": 30}[type_name], type_name, (65536,), 0, data)
    want = gguf.quants.dequantize(bits.view(np.uint8), _gguf_type(type_name)).reshape(-1)
    np.testing.assert_array_equal(dequantize(t).view(np.uint32), want.view(np.uint32))
