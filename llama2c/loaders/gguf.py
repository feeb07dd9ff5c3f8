"""GGUF model files: a bounds-checked reader, numpy dequantization, and the llama loader.

GGUF (llama.cpp's format, versions 2 and 3, little-endian) is laid out as

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x (string key, u32 value type, value)
    n_tensors x (string name, u32 n_dims, n_dims x u64 ne, u32 ggml type, u64 offset)
    padding to `general.alignment` (default 32) | tensor data

where a string is a u64 byte length followed by UTF-8 bytes and `ne` lists dimensions
innermost first (numpy shape = reversed ne). The file is memory-mapped once, read-only;
tensor data are views into that map, never copies. Every read is bounds-checked first, and
every problem with the file raises ModelFormatError naming the file and the field.

`load_gguf` maps a `general.architecture = llama` file onto llama2c's Config and weights
convention (see llama2c/weights.py). GGUF stores Q and K rows already in the interleaved-pair
RoPE layout (llama.cpp's converter permutes Hugging Face weights), so no permutation is needed.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import Config
from ..errors import ModelFormatError
from ..weights import QTensor, quantize_q8, validate_weights

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_ARRAY_NESTING = 4

# ggml type number -> (name, elements per block, bytes per block), as in ggml.h / gguf-py.
# Numbers missing here (4, 5, 31-33, 36-38) were removed from ggml and are rejected as unknown.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}

# Element dtypes of the unquantized ggml types; BF16 is exposed as its raw uint16 bits.
_PLAIN_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8",
                 "I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}

# Block layouts of the quantized types we dequantize (ggml-common.h block_q8_0 etc.).
_BLOCK_DTYPES = {
    "Q8_0": np.dtype([("d", "<f2"), ("qs", "i1", (32,))]),
    "Q4_0": np.dtype([("d", "<f2"), ("qs", "u1", (16,))]),
    "Q4_1": np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))]),
}

# Metadata value types: code -> (name, numpy dtype of a scalar, or None for string/array).
_STRING, _ARRAY = 8, 9
_VALUE_TYPES = {
    0: ("UINT8", "<u1"), 1: ("INT8", "<i1"), 2: ("UINT16", "<u2"), 3: ("INT16", "<i2"),
    4: ("UINT32", "<u4"), 5: ("INT32", "<i4"), 6: ("FLOAT32", "<f4"), 7: ("BOOL", "<u1"),
    _STRING: ("STRING", None), _ARRAY: ("ARRAY", None),
    10: ("UINT64", "<u8"), 11: ("INT64", "<i8"), 12: ("FLOAT64", "<f8"),
}
_BOOL = 7
# Smallest encoded size of one value of each type, to reject absurd counts before looping.
_MIN_VALUE_SIZE = {code: (np.dtype(dt).itemsize if dt else (8 if code == _STRING else 12))
                   for code, (_, dt) in _VALUE_TYPES.items()}

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_MIN_KV_SIZE = 8 + 4 + 1          # empty key, type, smallest value
_MIN_TENSOR_INFO_SIZE = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset


@dataclass
class GGUFTensor:
    name: str
    ggml_type: int
    type_name: str
    shape: tuple          # numpy row-major order (reversed GGUF ne)
    offset: int           # absolute byte offset of the data in the file
    data: np.ndarray      # typed view (plain types) or uint8 view of shape (*shape[:-1], row_bytes)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


@dataclass
class GGUFFile:
    path: str
    version: int
    metadata: dict
    tensors: dict
    alignment: int
    data_offset: int      # absolute offset of the tensor data section


class _Reader:
    """Sequential little-endian reader over the mapped file that checks bounds before each read."""

    def __init__(self, path: str, buf: memoryview):
        self.path = path
        self.buf = buf
        self.size = len(buf)
        self.pos = 0

    def error(self, message: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: {message}")

    def take(self, n: int, field: str) -> int:
        """Reserve n bytes for `field`; return their start offset."""
        if self.pos + n > self.size:
            raise self.error(f"truncated file: {field} needs {n} bytes at offset {self.pos}, "
                             f"but the file is {self.size} bytes")
        start = self.pos
        self.pos += n
        return start

    def remaining(self) -> int:
        return self.size - self.pos

    def u32(self, field: str) -> int:
        return _U32.unpack_from(self.buf, self.take(4, field))[0]

    def u64(self, field: str) -> int:
        return _U64.unpack_from(self.buf, self.take(8, field))[0]

    def string(self, field: str, strict: bool = True) -> str:
        """A u64-length-prefixed UTF-8 string. Keys and names must be valid UTF-8; string values
        (strict=False) keep invalid bytes as surrogate escapes, recoverable with
        s.encode('utf-8', 'surrogateescape'), since some vocabularies hold partial UTF-8."""
        n = self.u64(f"length of {field}")
        if n > self.remaining():
            raise self.error(f"{field}: string length {n} runs past the end of the file "
                             f"({self.remaining()} bytes left at offset {self.pos})")
        start = self.take(n, field)
        try:
            return str(self.buf[start:start + n], "utf-8", "strict" if strict else "surrogateescape")
        except UnicodeDecodeError as e:
            raise self.error(f"{field}: invalid UTF-8 ({e.reason} at byte {e.start})") from None

    def value(self, vtype: int, field: str, depth: int = 0):
        """One metadata value of type code `vtype`, as a plain Python value."""
        if vtype not in _VALUE_TYPES:
            raise self.error(f"{field}: unknown metadata value type {vtype}")
        if vtype == _STRING:
            return self.string(field, strict=False)
        if vtype == _ARRAY:
            return self.array(field, depth)
        dtype = np.dtype(_VALUE_TYPES[vtype][1])
        start = self.take(dtype.itemsize, field)
        v = np.frombuffer(self.buf, dtype, 1, start)[0].item()
        return bool(v) if vtype == _BOOL else v

    def array(self, field: str, depth: int) -> list:
        if depth >= MAX_ARRAY_NESTING:
            raise self.error(f"{field}: arrays nested more than {MAX_ARRAY_NESTING} deep")
        etype = self.u32(f"element type of {field}")
        if etype not in _VALUE_TYPES:
            raise self.error(f"{field}: unknown metadata array element type {etype}")
        n = self.u64(f"length of {field}")
        if n * _MIN_VALUE_SIZE[etype] > self.remaining():
            raise self.error(f"{field}: array length {n} of {_VALUE_TYPES[etype][0]} cannot fit in "
                             f"the {self.remaining()} bytes left in the file")
        if etype == _STRING:
            return [self.string(f"{field}[{i}]", strict=False) for i in range(n)]
        if etype == _ARRAY:
            return [self.array(f"{field}[{i}]", depth + 1) for i in range(n)]
        dtype = np.dtype(_VALUE_TYPES[etype][1])
        values = np.frombuffer(self.buf, dtype, n, self.take(n * dtype.itemsize, field))
        return (values != 0).tolist() if etype == _BOOL else values.tolist()


def _read_header(r: _Reader) -> tuple:
    """Magic, version and the two counts; returns (version, n_tensors, n_kv)."""
    start = r.take(4, "magic")
    magic = bytes(r.buf[start:start + 4])
    if magic != GGUF_MAGIC:
        raise r.error(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    version = r.u32("version")
    if version == 1:
        raise r.error("GGUF version 1 is not supported (it predates 64-bit counts); "
                      "re-convert the model with a current llama.cpp")
    if version not in SUPPORTED_VERSIONS and int.from_bytes(version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
        raise r.error("big-endian GGUF files are not supported")
    if version not in SUPPORTED_VERSIONS:
        raise r.error(f"unsupported GGUF version {version} (supported: {SUPPORTED_VERSIONS})")
    n_tensors = r.u64("tensor count")
    n_kv = r.u64("metadata key/value count")
    if n_kv * _MIN_KV_SIZE > r.remaining():
        raise r.error(f"metadata key/value count {n_kv} cannot fit in a {r.size}-byte file")
    if n_tensors * _MIN_TENSOR_INFO_SIZE > r.remaining():
        raise r.error(f"tensor count {n_tensors} cannot fit in a {r.size}-byte file")
    return version, n_tensors, n_kv


def _read_metadata(r: _Reader, n_kv: int) -> dict:
    metadata = {}
    for i in range(n_kv):
        key = r.string(f"metadata key #{i}")
        if key in metadata:
            raise r.error(f"duplicate metadata key {key!r}")
        vtype = r.u32(f"value type of metadata {key!r}")
        metadata[key] = r.value(vtype, f"metadata {key!r}")
    return metadata


def _read_tensor_info(r: _Reader, index: int) -> tuple:
    """One tensor info record; returns (name, ggml_type, shape, relative offset)."""
    name = r.string(f"name of tensor #{index}")
    n_dims = r.u32(f"n_dims of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise r.error(f"tensor {name!r}: n_dims {n_dims} is outside 1..{MAX_DIMS}")
    ne = [r.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims)]
    if any(n <= 0 for n in ne):
        raise r.error(f"tensor {name!r}: dimensions {ne} must all be positive")
    ggml_type = r.u32(f"type of tensor {name!r}")
    if ggml_type not in GGML_TYPES:
        raise r.error(f"tensor {name!r}: unknown ggml type {ggml_type}")
    offset = r.u64(f"data offset of tensor {name!r}")
    return name, ggml_type, tuple(reversed(ne)), offset


def _alignment(path: str, metadata: dict) -> int:
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0
            or alignment & (alignment - 1)):
        raise ModelFormatError(f"{path}: general.alignment must be a positive power of two, got {alignment!r}")
    return alignment


def _tensor_view(path: str, raw: np.ndarray, name: str, ggml_type: int, shape: tuple,
                 start: int) -> np.ndarray:
    """Bounds-check one tensor's data and return a view of it into the mapped file."""
    type_name, block, type_size = GGML_TYPES[ggml_type]
    if shape[-1] % block:
        raise ModelFormatError(f"{path}: tensor {name!r}: row length {shape[-1]} is not a multiple "
                               f"of the {type_name} block size {block}")
    row_bytes = shape[-1] // block * type_size
    nbytes = math.prod(shape[:-1]) * row_bytes
    if start + nbytes > raw.size:
        raise ModelFormatError(f"{path}: tensor {name!r}: data [{start}, {start + nbytes}) lies "
                               f"outside the {raw.size}-byte file")
    data = raw[start:start + nbytes]
    if type_name in _PLAIN_DTYPES:
        return data.view(_PLAIN_DTYPES[type_name]).reshape(shape)
    return data.reshape(*shape[:-1], row_bytes)


def read_gguf(path) -> GGUFFile:
    """Parse a GGUF v2/v3 file: metadata as plain Python values, tensors as memory-mapped views."""
    path = str(path)
    try:
        size = Path(path).stat().st_size
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot open model file ({e.strerror})") from None
    if size < 4 + 4 + 8 + 8:
        raise ModelFormatError(f"{path}: truncated file: {size} bytes is shorter than a GGUF header")
    try:
        raw = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path}: cannot map model file ({e})") from None
    r = _Reader(path, memoryview(raw))
    version, n_tensors, n_kv = _read_header(r)
    metadata = _read_metadata(r, n_kv)
    infos = [_read_tensor_info(r, i) for i in range(n_tensors)]
    alignment = _alignment(path, metadata)
    data_offset = -(-r.pos // alignment) * alignment  # the data section starts aligned
    tensors = {}
    for name, ggml_type, shape, offset in infos:
        if name in tensors:
            raise ModelFormatError(f"{path}: duplicate tensor name {name!r}")
        if offset % alignment:
            raise ModelFormatError(f"{path}: tensor {name!r}: data offset {offset} is not a "
                                   f"multiple of the alignment {alignment}")
        start = data_offset + offset
        data = _tensor_view(path, raw, name, ggml_type, shape, start)
        tensors[name] = GGUFTensor(name, ggml_type, GGML_TYPES[ggml_type][0], shape, start, data)
    return GGUFFile(path, version, metadata, tensors, alignment, data_offset)


# ----------------------------------------------------------------------------- dequantization

def _blocks(t: GGUFTensor) -> np.ndarray:
    """The tensor's data as a 1-D array of structured blocks (a view, no copy)."""
    return t.data.reshape(-1).view(_BLOCK_DTYPES[t.type_name])


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) packed bytes -> (n, 32) 4-bit values: low nibbles are elements 0..15, high 16..31."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32: they are the top half of a float32."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def dequantize(t: GGUFTensor) -> np.ndarray:
    """float32 array of t.shape. F32 data are returned as the read-only view itself."""
    kind = t.type_name
    if kind == "F32":
        return t.data
    if kind == "F16":
        return t.data.astype(np.float32)
    if kind == "BF16":
        return bf16_to_f32(t.data)
    if kind not in _BLOCK_DTYPES:
        raise ModelFormatError(f"tensor {t.name!r}: ggml type {kind} is not supported "
                               f"(supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)")
    b = _blocks(t)
    d = b["d"].astype(np.float32)[:, None]
    if kind == "Q8_0":
        x = b["qs"].astype(np.float32) * d
    elif kind == "Q4_0":
        x = (_nibbles(b["qs"]).astype(np.int8) - np.int8(8)).astype(np.float32) * d
    else:  # Q4_1
        x = _nibbles(b["qs"]).astype(np.float32) * d + b["m"].astype(np.float32)[:, None]
    return x.reshape(t.shape)


def q8_0_to_qtensor(t: GGUFTensor) -> QTensor:
    """A 2-D Q8_0 tensor as an int8 QTensor with group size 32: same values, no requantization."""
    b = _blocks(t)
    rows, cols = t.shape
    q = np.ascontiguousarray(b["qs"]).reshape(rows, cols)
    s = b["d"].astype(np.float32).reshape(rows, cols // 32)
    return QTensor(q, s, 32)


def q4_to_qtensor(t: GGUFTensor) -> QTensor:
    """A 2-D Q4_0 or Q4_1 tensor as an int8 QTensor with group size 32, values kept exactly.

    Q4_0 (x = (nibble - 8) * d): q = nibble - 8, s = d, no offsets.
    Q4_1 (x = nibble * d + m):   q = nibble - 8, s = d, offsets m + 8 * d (float32), so that
    q * s + offset = nibble * d + m (bit for bit whenever m + 8 * d is exact in float32, which
    it is unless the exponents of m and d lie more than ~13 binary orders apart).
    """
    b = _blocks(t)
    rows, cols = t.shape
    q = (_nibbles(b["qs"]).astype(np.int8) - np.int8(8)).reshape(rows, cols)
    d = b["d"].astype(np.float32)
    s = d.reshape(rows, cols // 32)
    if t.type_name == "Q4_0":
        return QTensor(q, s, 32)
    m = (b["m"].astype(np.float32) + np.float32(8.0) * d).astype(np.float32)
    return QTensor(q, s, 32, m.reshape(rows, cols // 32))


# ----------------------------------------------------------------------------- llama loader

_GLOBAL_TENSORS = {"tok_embeddings": "token_embd.weight", "norm": "output_norm.weight",
                   "output": "output.weight"}
_LAYER_TENSORS = {"attention_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
                  "wo": "attn_output", "ffn_norm": "ffn_norm", "w1": "ffn_gate", "w2": "ffn_down",
                  "w3": "ffn_up"}


def tensor_name_map(n_layers: int, shared_classifier: bool) -> dict:
    """llama2c weight name -> GGUF tensor name for every tensor a llama model needs."""
    names = {k: v for k, v in _GLOBAL_TENSORS.items() if k != "output" or not shared_classifier}
    for i in range(n_layers):
        for ours, theirs in _LAYER_TENSORS.items():
            names[f"layers.{i}.{ours}"] = f"blk.{i}.{theirs}.weight"
    return names


def _meta_int(gf: GGUFFile, key: str, default=None) -> int:
    v = gf.metadata.get(key, default)
    if v is None:
        raise ModelFormatError(f"{gf.path}: missing metadata {key!r}")
    if not isinstance(v, int) or isinstance(v, bool):
        raise ModelFormatError(f"{gf.path}: metadata {key!r} must be an integer, got {v!r}")
    return v


def _meta_float(gf: GGUFFile, key: str, default: float) -> float:
    v = gf.metadata.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ModelFormatError(f"{gf.path}: metadata {key!r} must be a number, got {v!r}")
    return float(v)


def _head_dim(gf: GGUFFile):
    """Per-head width from key_length / rope.dimension_count, or None for dim // n_heads."""
    key_length = gf.metadata.get("llama.attention.key_length")
    rope_dims = gf.metadata.get("llama.rope.dimension_count")
    if key_length is not None and rope_dims is not None and key_length != rope_dims:
        raise ModelFormatError(f"{gf.path}: partial rotary embeddings (llama.rope.dimension_count "
                               f"{rope_dims} != llama.attention.key_length {key_length}) are not supported")
    value_length = gf.metadata.get("llama.attention.value_length")
    if key_length is not None and value_length is not None and value_length != key_length:
        raise ModelFormatError(f"{gf.path}: llama.attention.value_length {value_length} differs from "
                               f"key_length {key_length}, which is not supported")
    if key_length is not None:
        return _meta_int(gf, "llama.attention.key_length")
    if rope_dims is not None:
        return _meta_int(gf, "llama.rope.dimension_count")
    return None


def _rope_scaling(gf: GGUFFile):
    """{'type': ..., 'factor': ...} from llama.rope.scaling.* (or the older scale_linear), or None."""
    kind = gf.metadata.get("llama.rope.scaling.type")
    if kind is None and "llama.rope.scale_linear" in gf.metadata:
        factor = _meta_float(gf, "llama.rope.scale_linear", 1.0)
        return None if factor == 1.0 else {"type": "linear", "factor": factor}
    if kind is None or kind == "none":
        return None
    if not isinstance(kind, str):
        raise ModelFormatError(f"{gf.path}: metadata 'llama.rope.scaling.type' must be a string, got {kind!r}")
    return {"type": kind, "factor": _meta_float(gf, "llama.rope.scaling.factor", 1.0)}


def _vocab_size(gf: GGUFFile) -> int:
    """Rows of the token embedding, cross-checked against the tokenizer and llama.vocab_size."""
    embd = gf.tensors.get("token_embd.weight")
    if embd is None or len(embd.shape) != 2:
        raise ModelFormatError(f"{gf.path}: missing 2-D tensor 'token_embd.weight'")
    vocab = embd.shape[0]
    tokens = gf.metadata.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) != vocab:
        raise ModelFormatError(f"{gf.path}: tokenizer.ggml.tokens has {len(tokens)} entries but "
                               f"token_embd.weight has {vocab} rows")
    declared = gf.metadata.get("llama.vocab_size")
    if declared is not None and declared != vocab:
        raise ModelFormatError(f"{gf.path}: llama.vocab_size {declared} differs from the "
                               f"{vocab} rows of token_embd.weight")
    return vocab


def gguf_config(gf: GGUFFile) -> Config:
    """Config of a llama-architecture GGUF file."""
    arch = gf.metadata.get("general.architecture")
    if arch != "llama":
        raise ModelFormatError(f"{gf.path}: general.architecture is {arch!r}; only 'llama' is supported")
    n_heads = _meta_int(gf, "llama.attention.head_count")
    try:
        return Config(
            dim=_meta_int(gf, "llama.embedding_length"),
            hidden_dim=_meta_int(gf, "llama.feed_forward_length"),
            n_layers=_meta_int(gf, "llama.block_count"),
            n_heads=n_heads,
            n_kv_heads=_meta_int(gf, "llama.attention.head_count_kv", n_heads),
            vocab_size=_vocab_size(gf),
            seq_len=_meta_int(gf, "llama.context_length"),
            rope_theta=_meta_float(gf, "llama.rope.freq_base", 10000.0),
            norm_eps=_meta_float(gf, "llama.attention.layer_norm_rms_epsilon", 1e-5),
            shared_classifier="output.weight" not in gf.tensors,
            rope_scaling=_rope_scaling(gf),
            head_dim=_head_dim(gf),
        )
    except ModelFormatError as e:
        if str(e).startswith(gf.path):
            raise
        raise ModelFormatError(f"{gf.path}: {e}") from None


def _check_tensor_names(gf: GGUFFile, names: dict) -> None:
    """Every needed tensor present, and no tensor the engine would silently ignore."""
    missing = [g for g in names.values() if g not in gf.tensors]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ModelFormatError(f"{gf.path}: missing {len(missing)} tensor(s): {shown}")
    unused = sorted(set(gf.tensors) - set(names.values()))
    if unused:
        shown = ", ".join(repr(u) for u in unused[:8]) + (" ..." if len(unused) > 8 else "")
        raise ModelFormatError(f"{gf.path}: tensors the llama architecture here does not support "
                               f"(e.g. biases, RoPE frequency factors): {shown}")


def _convert(t: GGUFTensor, int8: bool, group_size: int):
    """One tensor in the requested representation: norms (1-D) always float32."""
    if len(t.shape) == 1 or not int8:
        return dequantize(t)
    if group_size == 32:
        if t.type_name == "Q8_0":
            return q8_0_to_qtensor(t)
        if t.type_name in ("Q4_0", "Q4_1"):
            return q4_to_qtensor(t)
    return quantize_q8(dequantize(t), group_size, t.name)


def load_gguf(path, dtype=None, group_size: int = 32):
    """Load a llama GGUF file -> (Config, weights, metadata).

    dtype None or 'fp32': every tensor dequantized to float32 (F32 data stay memory-mapped views).
    dtype 'auto': 'int8' when the file stores quantized matrices, else 'fp32'.
    dtype 'int8': matrices as QTensor. With group_size 32 (the default) Q8_0, Q4_0 and Q4_1
    tensors map exactly: their QTensor's dequantize() equals the fp32 load (Q4_1 keeps its mins
    as per-group offsets QTensor.m); F32/F16/BF16 matrices are quantized with quantize_q8. With
    another group size every matrix is dequantized and requantized with quantize_q8 at
    `group_size`. Norms are always float32.
    metadata: 'format' ('gguf'), 'path', 'gguf_version', 'gguf_metadata' (every GGUF key, e.g.
    'tokenizer.ggml.tokens'), 'dtype' of the returned weights, 'group_size' (for int8 loads,
    and the group size to use when quantizing later), 'tensor_types' (llama2c name -> ggml
    type name) and, when the file has them, 'bos_token_id' / 'eos_token_id'.
    """
    if dtype not in (None, "fp32", "float32", "int8", "auto"):
        raise ValueError(f"dtype must be None, 'fp32', 'int8' or 'auto', got {dtype!r}")
    gf = read_gguf(path)
    if dtype == "auto":
        quantized = any(t.type_name not in ("F32", "F16", "BF16") for t in gf.tensors.values())
        dtype = "int8" if quantized else "fp32"
    cfg = gguf_config(gf)
    if cfg.n_layers * len(_LAYER_TENSORS) > len(gf.tensors):   # before naming every tensor
        raise ModelFormatError(f"{gf.path}: llama.block_count is {cfg.n_layers} but the file holds "
                               f"only {len(gf.tensors)} tensors")
    names = tensor_name_map(cfg.n_layers, cfg.shared_classifier)
    _check_tensor_names(gf, names)
    int8 = dtype == "int8"
    try:
        weights = {ours: _convert(gf.tensors[theirs], int8, group_size) for ours, theirs in names.items()}
    except ModelFormatError as e:
        raise ModelFormatError(f"{gf.path}: {e}") from None
    validate_weights(cfg, weights, source=gf.path)
    metadata = {"format": "gguf", "path": gf.path, "gguf_version": gf.version,
                "gguf_metadata": gf.metadata, "dtype": "int8" if int8 else "fp32",
                "group_size": group_size,
                "tensor_types": {ours: gf.tensors[theirs].type_name for ours, theirs in names.items()}}
    for key in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{key}" in gf.metadata:
            metadata[key] = gf.metadata[f"tokenizer.ggml.{key}"]
    return cfg, weights, metadata
