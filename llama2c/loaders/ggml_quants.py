"""ggml's weight blocks in NumPy: exact dequantization, exact mapping onto QTensor, and the
reference quantizers of the two block types the GGUF writer produces (Q8_0, Q4_1).

Block layouts are ggml-common.h's (`block_q4_0` ... `block_q6_K`), as structured NumPy dtypes
viewed over the memory-mapped file (no copy). Every function here works on whole tensors at
once (no per-block Python loop), so a 100 MB file converts in about a second.

Two ways to read a block tensor:

`dequantize(type_name, data)` returns float32 values bit for bit as gguf-py's
`gguf.quants.dequantize` does (the spec we test against): the same float32 operations in the
same order, so NaN/inf scales, f16 subnormals and signed zeros come out identically.

`to_qtensor(type_name, data, shape)` maps the blocks onto llama2c's QTensor without
re-rounding: w = q * s + m per group, q the block's integer codes, s and m float32 per group.

    type   QTensor  group  q                s                     m
    Q8_0   bits 8   32     qs (int8)        d                     -
    Q4_0   bits 4   32     nibble 0..15     d                     -8 d
    Q4_1   bits 4   32     nibble 0..15     d                     m
    Q5_0   bits 8   32     q5 - 16          d                     -
    Q5_1   bits 8   32     q5 0..31         d                     m
    Q2_K   bits 4   16     q2 0..3          d * sc (4-bit)        -dmin * mn (4-bit)
    Q3_K   bits 4   16     q3 + 4, 0..7     d * (sc6 - 32)        -4 s
    Q4_K   bits 4   32     q4 0..15         d * sc (6-bit)        -dmin * mn (6-bit)
    Q5_K   bits 8   32     q5 0..31         d * sc (6-bit)        -dmin * mn (6-bit)
    Q6_K   bits 8   16     q6 - 32          d * sc (int8)         -

Every s and m is an exact float32 (an f16 times an integer of at most 8 bits), and so is every
q * s (at most 19 significant bits), so QTensor.dequantize (q * s, then + m, in float32)
computes exactly gguf-py's values: for Q4_1, Q5_1, Q2_K, Q4_K, Q5_K the very same float32
operations (a - b is a + (-b)); for Q8_0, Q5_0, Q6_K one identical product; for Q4_0 and Q3_K,
whose gguf-py formula is d * (q - 8) (resp. dl * q), the product and the sum are both exact,
so the values are equal, but a zero may carry the other sign: gguf-py gives -0.0 where the
offset form gives +0.0 (e.g. Q4_0 nibble 8 with d < 0). -0.0 == +0.0 and x + (+-0) = x, so no
matmul result can differ. Scales that are not finite (corrupt blocks) are rejected later by
validate_weights; dequantize() reproduces them as gguf-py does.
"""
from __future__ import annotations

import numpy as np

from ..weights import QTensor

QK_K = 256

F16, I8, U8 = "<f2", "i1", "u1"

# ggml-common.h block structs, field by field (sizes: 18, 20, 22, 24, 34, 84, 110, 144, 176, 210).
BLOCK_DTYPES = {
    "Q4_0": np.dtype([("d", F16), ("qs", U8, 16)]),
    "Q4_1": np.dtype([("d", F16), ("m", F16), ("qs", U8, 16)]),
    "Q5_0": np.dtype([("d", F16), ("qh", "<u4"), ("qs", U8, 16)]),
    "Q5_1": np.dtype([("d", F16), ("m", F16), ("qh", "<u4"), ("qs", U8, 16)]),
    "Q8_0": np.dtype([("d", F16), ("qs", I8, 32)]),
    "Q2_K": np.dtype([("scales", U8, 16), ("qs", U8, 64), ("d", F16), ("dmin", F16)]),
    "Q3_K": np.dtype([("hmask", U8, 32), ("qs", U8, 64), ("scales", U8, 12), ("d", F16)]),
    "Q4_K": np.dtype([("d", F16), ("dmin", F16), ("scales", U8, 12), ("qs", U8, 128)]),
    "Q5_K": np.dtype([("d", F16), ("dmin", F16), ("scales", U8, 12), ("qh", U8, 32),
                      ("qs", U8, 128)]),
    "Q6_K": np.dtype([("ql", U8, 128), ("qh", U8, 64), ("scales", I8, 16), ("d", F16)]),
}
BLOCK_SIZES = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32,
               "Q2_K": QK_K, "Q3_K": QK_K, "Q4_K": QK_K, "Q5_K": QK_K, "Q6_K": QK_K}

# Plain element types; BF16 is read as its uint16 bit patterns.
PLAIN_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}

# Every weight type llama2c loads, and the (bits, group size) each maps to exactly.
SUPPORTED_TYPES = tuple(PLAIN_DTYPES) + tuple(BLOCK_DTYPES)
EXACT_FORMAT = {"Q8_0": (8, 32), "Q4_0": (4, 32), "Q4_1": (4, 32), "Q5_0": (8, 32),
                "Q5_1": (8, 32), "Q2_K": (4, 16), "Q3_K": (4, 16), "Q4_K": (4, 32),
                "Q5_K": (8, 32), "Q6_K": (8, 16)}

_F32 = np.float32


def blocks(type_name: str, data: np.ndarray) -> np.ndarray:
    """Raw bytes (any shape, C-contiguous, a whole number of blocks) -> 1-D structured blocks."""
    return data.reshape(-1).view(BLOCK_DTYPES[type_name])


def _f32(h: np.ndarray) -> np.ndarray:
    """An f16 field as float32 (n, 1), as gguf-py's d.view(np.float16).astype(np.float32)."""
    return h.astype(_F32).reshape(-1, 1)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32: they are the top half of a float32."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(_F32)


# ----------------------------------------------------------------------------- integer codes
# Each returns the block's codes in element order, (n_blocks, block_size) or grouped per
# sub-block, exactly as gguf-py's reshapes and shifts order them.

def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32): low nibbles are elements 0..15, high nibbles 16..31."""
    q = qs.reshape(-1, 1, 16) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)
    return (q & np.uint8(0x0F)).reshape(-1, 32)


def _q5_codes(b: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: (n, 32) uint8 codes 0..31 (4 low bits in qs, bit 4 in the u32 qh)."""
    qh = b["qh"].reshape(-1, 1) >> np.arange(32, dtype=np.uint32).reshape(1, 32)
    qh = (qh & np.uint32(1)).astype(np.uint8)
    return _nibbles(b["qs"]) | (qh << np.uint8(4))


def _q2k_codes(b: np.ndarray) -> np.ndarray:
    """Q2_K: (n, 16, 16) codes 0..3, one row per sub-block."""
    q = (b["qs"].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1))
    return (q & np.uint8(3)).reshape(-1, 16, 16)


def _q3k_scales(b: np.ndarray) -> np.ndarray:
    """Q3_K: the 16 6-bit sub-block scales (n, 16) uint8 0..63 (4 low bits in bytes 0..7,
    2 high bits in bytes 8..11)."""
    sc = b["scales"]
    lo = (sc[:, :8].reshape(-1, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(-1, 16)
    hi = (sc[:, 8:].reshape(-1, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)).reshape(-1, 16)
    return (lo & np.uint8(0x0F)) | ((hi & np.uint8(0x03)) << np.uint8(4))


def _q3k_codes(b: np.ndarray) -> np.ndarray:
    """Q3_K: (n, 16, 16) int8 codes -4..3 = 2 low bits - 4 * (1 - hmask bit)."""
    ql = b["qs"].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    qh = b["hmask"].reshape(-1, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
    ql = ql.reshape(-1, 16, 16) & np.uint8(3)
    qh = (qh.reshape(-1, 16, 16) & np.uint8(1)) ^ np.uint8(1)   # the offset applies when the bit is 0
    return ql.astype(np.int8) - (qh << np.uint8(2)).astype(np.int8)


def _k_scale_min(b: np.ndarray) -> tuple:
    """Q4_K/Q5_K: the 8 6-bit sub-block scales and mins, (n, 8) uint8 each (get_scale_min_k4)."""
    s = b["scales"].reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _q4k_codes(b: np.ndarray) -> np.ndarray:
    """Q4_K: (n, 8, 32) codes 0..15, one row per sub-block."""
    q = b["qs"].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(0x0F)).reshape(-1, 8, 32)


def _q5k_codes(b: np.ndarray) -> np.ndarray:
    """Q5_K: (n, 8, 32) codes 0..31."""
    qh = b["qh"].reshape(-1, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
    qh = (qh & np.uint8(1)).reshape(-1, 8, 32)
    return _q4k_codes(b) | (qh << np.uint8(4))


def _q6k_codes(b: np.ndarray) -> np.ndarray:
    """Q6_K: (n, 16, 16) int8 codes -32..31."""
    ql = b["ql"].reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & np.uint8(0x0F)).reshape(-1, 8, 32)
    qh = b["qh"].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    qh = (qh & np.uint8(0x03)).reshape(-1, 8, 32)
    return ((ql | (qh << np.uint8(4))).astype(np.int8) - np.int8(32)).reshape(-1, 16, 16)


# ----------------------------------------------------------------------------- dequantization

def dequantize(type_name: str, data: np.ndarray) -> np.ndarray:
    """Blocks -> float32 (n_blocks * block_size,), bit for bit gguf.quants.dequantize: each line
    below is gguf-py's expression for the type, same operands, same order."""
    with np.errstate(invalid="ignore", over="ignore"):   # corrupt scales: inf * 0 = nan, as gguf-py
        return _dequantize(type_name, blocks(type_name, data))


def _dequantize(type_name: str, b: np.ndarray) -> np.ndarray:
    if type_name == "Q8_0":
        return (b["qs"].astype(_F32) * _f32(b["d"])).reshape(-1)
    if type_name == "Q4_0":
        return (_f32(b["d"]) * (_nibbles(b["qs"]).astype(np.int8) - np.int8(8)).astype(_F32)).reshape(-1)
    if type_name == "Q4_1":
        return ((_f32(b["d"]) * _nibbles(b["qs"]).astype(_F32)) + _f32(b["m"])).reshape(-1)
    if type_name == "Q5_0":
        return (_f32(b["d"]) * (_q5_codes(b).astype(np.int8) - np.int8(16)).astype(_F32)).reshape(-1)
    if type_name == "Q5_1":
        return ((_f32(b["d"]) * _q5_codes(b).astype(_F32)) + _f32(b["m"])).reshape(-1)
    if type_name == "Q2_K":
        sc = b["scales"]
        dl = (_f32(b["d"]) * (sc & 0xF).astype(_F32)).reshape(-1, 16, 1)
        ml = (_f32(b["dmin"]) * (sc >> 4).astype(_F32)).reshape(-1, 16, 1)
        return (dl * _q2k_codes(b).astype(_F32) - ml).reshape(-1)
    if type_name == "Q3_K":
        scales = (_q3k_scales(b).astype(np.int8) - np.int8(32)).astype(_F32)
        dl = (_f32(b["d"]) * scales).reshape(-1, 16, 1)
        return (dl * _q3k_codes(b).astype(_F32)).reshape(-1)
    if type_name in ("Q4_K", "Q5_K"):
        sc, mn = _k_scale_min(b)
        d = (_f32(b["d"]) * sc.astype(_F32)).reshape(-1, 8, 1)
        dm = (_f32(b["dmin"]) * mn.astype(_F32)).reshape(-1, 8, 1)
        q = _q4k_codes(b) if type_name == "Q4_K" else _q5k_codes(b)
        return (d * q.astype(_F32) - dm).reshape(-1)
    if type_name == "Q6_K":
        d = (_f32(b["d"]) * b["scales"].astype(_F32)).reshape(-1, 16, 1)
        return (d * _q6k_codes(b).astype(_F32)).reshape(-1)
    raise KeyError(type_name)


# ----------------------------------------------------------------------------- exact QTensor

def to_qtensor(type_name: str, data: np.ndarray, shape: tuple) -> QTensor:
    """A 2-D block tensor (rows, cols) as the QTensor of the table in the module docstring:
    the same values as dequantize(), no requantization."""
    with np.errstate(invalid="ignore", over="ignore"):   # corrupt scales: validate_weights rejects them
        return _to_qtensor(type_name, blocks(type_name, data), shape)


def _to_qtensor(type_name: str, b: np.ndarray, shape: tuple) -> QTensor:
    rows, cols = shape
    bits, gs = EXACT_FORMAT[type_name]
    m = None
    if type_name == "Q8_0":
        q, s = b["qs"], _f32(b["d"])
    elif type_name == "Q4_0":
        q, s = _nibbles(b["qs"]), _f32(b["d"])
        m = _F32(-8.0) * s
    elif type_name == "Q4_1":
        q, s, m = _nibbles(b["qs"]), _f32(b["d"]), _f32(b["m"])
    elif type_name == "Q5_0":
        q, s = _q5_codes(b).astype(np.int8) - np.int8(16), _f32(b["d"])
    elif type_name == "Q5_1":
        q, s, m = _q5_codes(b).astype(np.int8), _f32(b["d"]), _f32(b["m"])
    elif type_name == "Q2_K":
        sc = b["scales"]
        q = _q2k_codes(b)
        s = _f32(b["d"]) * (sc & 0xF).astype(_F32)
        m = -(_f32(b["dmin"]) * (sc >> 4).astype(_F32))
    elif type_name == "Q3_K":
        q = (_q3k_codes(b) + np.int8(4)).astype(np.uint8)
        s = _f32(b["d"]) * (_q3k_scales(b).astype(np.int8) - np.int8(32)).astype(_F32)
        m = _F32(-4.0) * s
    elif type_name in ("Q4_K", "Q5_K"):
        sc, mn = _k_scale_min(b)
        s = _f32(b["d"]) * sc.astype(_F32)
        m = -(_f32(b["dmin"]) * mn.astype(_F32))
        q = _q4k_codes(b) if type_name == "Q4_K" else _q5k_codes(b).astype(np.int8)
    elif type_name == "Q6_K":
        q = _q6k_codes(b)
        s = _f32(b["d"]) * b["scales"].astype(_F32)
    else:
        raise KeyError(type_name)
    n_groups = cols // gs
    q = np.ascontiguousarray(q, dtype=np.int8 if bits == 8 else np.uint8).reshape(rows, cols)
    s = np.ascontiguousarray(np.broadcast_to(s, (len(b), BLOCK_SIZES[type_name] // gs)),
                             dtype=_F32).reshape(rows, n_groups)
    if m is not None:
        m = np.ascontiguousarray(np.broadcast_to(m, (len(b), BLOCK_SIZES[type_name] // gs)),
                                 dtype=_F32).reshape(rows, n_groups)
    return QTensor(q, s, gs, m, bits=bits)


# ----------------------------------------------------------------------------- quantizers

def _roundf(x: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero), as gguf-py's np_roundf."""
    a = np.abs(x)
    floored = np.floor(a)
    return np.sign(x) * (floored + np.floor(2 * (a - floored)))


def _groups(w: np.ndarray, group_size: int, name: str) -> np.ndarray:
    w = np.asarray(w, dtype=_F32)
    if w.ndim != 2 or w.shape[1] % group_size:
        raise ValueError(f"{name}: expected a 2-D matrix whose rows are a multiple of "
                         f"{group_size}, got shape {w.shape}")
    return w.reshape(-1, group_size)


def _check_f16(name: str, *arrays) -> None:
    for a in arrays:
        if not np.isfinite(a).all():
            raise ValueError(f"{name}: values too large (or not finite) for f16 block scales")


def quantize_q8_0(w: np.ndarray, name: str = "tensor", group_size: int = 32) -> QTensor:
    """ggml's quantize_row_q8_0_ref (bit-exact with gguf-py's Q8_0 quantizer): per group
    d = max|w| / 127, q = roundf(w / d); d stored as f16. Returns the QTensor a Q8_0 file holds
    (s = that f16 d, exactly), so writing it and loading it back gives the same QTensor."""
    g = _groups(w, group_size, name)
    d = np.abs(g).max(axis=1, keepdims=True) / _F32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, _F32(0), _F32(1) / d)
    q = _roundf(g * inv).astype(np.int8)
    s = d.astype(np.float16).astype(_F32)
    _check_f16(name, s)
    rows = w.shape[0]
    return QTensor(q.reshape(w.shape), s.reshape(rows, -1), group_size, bits=8)


def quantize_q4_1(w: np.ndarray, name: str = "tensor", group_size: int = 32) -> QTensor:
    """ggml's quantize_row_q4_1_ref (bit-exact with gguf-py's Q4_1 quantizer): per group
    d = (max - min) / 15, q = trunc((w - min) / d + 0.5) clipped to 0..15; d and min stored as
    f16. Returns the bits-4 QTensor (s = f16 d, m = f16 min) a Q4_1 file holds."""
    g = _groups(w, group_size, name)
    hi = g.max(axis=1, keepdims=True)
    lo = g.min(axis=1, keepdims=True)
    d = (hi - lo) / _F32(15)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, _F32(0), _F32(1) / d)
    q = np.trunc((g - lo) * inv + _F32(0.5)).astype(np.uint8).clip(0, 15)
    s = d.astype(np.float16).astype(_F32)
    m = lo.astype(np.float16).astype(_F32)
    _check_f16(name, s, m)
    rows = w.shape[0]
    return QTensor(q.reshape(w.shape), s.reshape(rows, -1), group_size, m.reshape(rows, -1), bits=4)


# ----------------------------------------------------------------------------- block encoders

def _f16_exact(a: np.ndarray) -> bool:
    """True if every float32 in a is an f16 value (so the f16 field stores it exactly)."""
    with np.errstate(over="ignore"):
        back = a.astype(np.float16).astype(_F32)
    return bool(np.array_equal(back.view(np.uint32), a.view(np.uint32)))


def q8_0_representable(t: QTensor) -> bool:
    """A QTensor a Q8_0 block stores exactly: group 32, no offset, int8 q, f16 scales."""
    return (t.group_size == 32 and t.m is None and t.bits == 8
            and _f16_exact(np.ascontiguousarray(t.s, dtype=_F32)))


def q4_1_representable(t: QTensor) -> bool:
    """A QTensor a Q4_1 block stores exactly: group 32, bits 4 (q 0..15), f16 scales and offsets
    (a missing offset is 0)."""
    return (t.group_size == 32 and t.bits == 4
            and _f16_exact(np.ascontiguousarray(t.s, dtype=_F32))
            and (t.m is None or _f16_exact(np.ascontiguousarray(t.m, dtype=_F32))))


def encode_q8_0(t: QTensor) -> bytes:
    """The Q8_0 blocks of a q8_0_representable QTensor."""
    b = np.empty(t.q.size // 32, BLOCK_DTYPES["Q8_0"])
    b["d"] = t.s.reshape(-1).astype(np.float16)
    b["qs"] = t.q.reshape(-1, 32)
    return b.tobytes()


def encode_q4_1(t: QTensor) -> bytes:
    """The Q4_1 blocks of a q4_1_representable QTensor."""
    q = t.q.reshape(-1, 32).astype(np.uint8)
    b = np.empty(len(q), BLOCK_DTYPES["Q4_1"])
    b["d"] = t.s.reshape(-1).astype(np.float16)
    b["m"] = 0 if t.m is None else t.m.reshape(-1).astype(np.float16)
    b["qs"] = q[:, :16] | (q[:, 16:] << np.uint8(4))
    return b.tobytes()
