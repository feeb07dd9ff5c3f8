"""GGUF model files: a bounds-checked reader, the loader, and a writer.

GGUF (llama.cpp's format, versions 2 and 3, little-endian) is laid out as

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x (string key, u32 value type, value)
    n_tensors x (string name, u32 n_dims, n_dims x u64 ne, u32 ggml type, u64 offset)
    padding to `general.alignment` (default 32) | tensor data

where a string is a u64 byte length followed by UTF-8 bytes and `ne` lists dimensions
innermost first (numpy shape = reversed ne). The file is memory-mapped once, read-only;
tensor data are views into that map, never copies. Every read is bounds-checked first, and
every problem with the file raises ModelFormatError naming the file and the field.

`load_gguf` maps a `general.architecture` = llama or qwen2 file onto llama2c's Config and
weights convention (see llama2c/weights.py); the block types are decoded by ggml_quants.py.
RoPE: llama.cpp's converter permutes a Llama's Q and K rows into the interleaved-pair layout
llama2c uses (llama.cpp LLAMA_ROPE_TYPE_NORM), so llama files need no permutation. qwen2
files keep Hugging Face's layout (each head's first half pairs with its second half, llama.cpp
LLAMA_ROPE_TYPE_NEOX); their Q/K weight rows and biases are permuted at load into interleaved
pairs (hf.permute_from_hf), after which the interleaved rotation computes the same q.k.

`write_gguf` writes a Config and weights dict as a GGUF v3 file with llama.cpp's tensor names
and metadata: F32 vectors, F32 / Q8_0 / Q4_1 matrices.
"""
from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import Config
from ..errors import ModelFormatError
from . import drop_pages
from ..weights import LazyWeights, QTensor, as_fp32, expected_shapes, validate_weights
from . import ggml_quants
from .dtypes import check_dtype, check_group_size_arg, convert_matrix, default_group_size, describe
from .ggml_quants import bf16_to_f32  # noqa: F401  (re-exported: the Hugging Face loader uses it)
from .hf import permute_from_hf, permute_to_hf

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
    mapping: mmap.mmap | None = None   # the read-only map every tensor view points into

    def release_pages(self) -> None:
        """Drop this process's resident pages of the file map (madvise MADV_DONTNEED; the
        data stay in the page cache): after the engine has packed the weights, only pages
        read again (an untied embedding used in place) come back. The map stays valid."""
        drop_pages(self.mapping)


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
        with open(path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path}: cannot map model file ({e})") from None
    raw = np.frombuffer(mapping, np.uint8)    # read-only; the views keep the map alive
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
    return GGUFFile(path, version, metadata, tensors, alignment, data_offset, mapping)


# ----------------------------------------------------------------------------- tensors

def check_supported(t: GGUFTensor, path: str) -> None:
    """Raise ModelFormatError naming the file, the tensor and its type unless llama2c reads it."""
    if t.type_name not in ggml_quants.SUPPORTED_TYPES:
        raise ModelFormatError(
            f"{path}: tensor {t.name!r} has ggml type {t.type_name}, which llama2c does not "
            f"support (supported: {', '.join(ggml_quants.SUPPORTED_TYPES)})")


def dequantize(t: GGUFTensor) -> np.ndarray:
    """float32 array of t.shape, bit for bit as gguf.quants.dequantize. F32 data are returned
    as the read-only view itself."""
    kind = t.type_name
    if kind == "F32":
        return t.data
    if kind == "F16":
        return t.data.astype(np.float32)
    if kind == "BF16":
        return bf16_to_f32(t.data)
    if kind not in ggml_quants.BLOCK_DTYPES:
        check_supported(t, "GGUF")
    return ggml_quants.dequantize(kind, t.data).reshape(t.shape)


def as_stored(t: GGUFTensor):
    """The tensor exactly as stored: float types as float32 (F32: the mapped view itself),
    2-D block types as their exact QTensor (ggml_quants.to_qtensor), 1-D block types float32."""
    if t.type_name in ggml_quants.BLOCK_DTYPES and len(t.shape) == 2:
        return ggml_quants.to_qtensor(t.type_name, t.data, t.shape)
    return dequantize(t)


def _permute_rows(t, perm: np.ndarray):
    """Rows of a float32 array or QTensor reordered: out[i] = t[perm[i]]."""
    if isinstance(t, QTensor):
        return QTensor(t.q[perm], t.s[perm], t.group_size, None if t.m is None else t.m[perm], t.bits)
    return np.ascontiguousarray(t[perm])


# ----------------------------------------------------------------------------- architectures

_GLOBAL_TENSORS = {"tok_embeddings": "token_embd.weight", "norm": "output_norm.weight",
                   "output": "output.weight"}
_LAYER_TENSORS = {"attention_norm": "attn_norm.weight", "wq": "attn_q.weight",
                  "wk": "attn_k.weight", "wv": "attn_v.weight", "wo": "attn_output.weight",
                  "ffn_norm": "ffn_norm.weight", "w1": "ffn_gate.weight", "w2": "ffn_down.weight",
                  "w3": "ffn_up.weight"}
_BIAS_TENSORS = {"bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias"}
ROPE_FREQS = "rope_freqs.weight"   # Llama 3.1+ RoPE frequency factors (one F32 vector)


@dataclass(frozen=True)
class _Arch:
    attention_bias: bool   # blk.N.attn_{q,k,v}.bias are part of the model
    neox_rope: bool        # Q/K rows stored in Hugging Face's rotate-half layout


# general.architecture -> how it differs from llama. Anything else is refused by name.
ARCHITECTURES = {"llama": _Arch(attention_bias=False, neox_rope=False),
                 "qwen2": _Arch(attention_bias=True, neox_rope=True)}


def tensor_name_map(n_layers: int, shared_classifier: bool, attention_bias: bool = False) -> dict:
    """llama2c weight name -> GGUF tensor name (llama.cpp's) for every tensor the model needs."""
    names = {k: v for k, v in _GLOBAL_TENSORS.items() if k != "output" or not shared_classifier}
    layer = dict(_LAYER_TENSORS, **(_BIAS_TENSORS if attention_bias else {}))
    for i in range(n_layers):
        for ours, theirs in layer.items():
            names[f"layers.{i}.{ours}"] = f"blk.{i}.{theirs}"
    return names


def _arch(gf: GGUFFile) -> str:
    arch = gf.metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelFormatError(f"{gf.path}: general.architecture is {arch!r}; supported "
                               f"architectures: {', '.join(ARCHITECTURES)}")
    return arch


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


def _head_dim(gf: GGUFFile, arch: str):
    """Per-head width from key_length / rope.dimension_count, or None for dim // n_heads."""
    key_length = gf.metadata.get(f"{arch}.attention.key_length")
    rope_dims = gf.metadata.get(f"{arch}.rope.dimension_count")
    if key_length is not None and rope_dims is not None and key_length != rope_dims:
        raise ModelFormatError(f"{gf.path}: partial rotary embeddings ({arch}.rope.dimension_count "
                               f"{rope_dims} != {arch}.attention.key_length {key_length}) are not supported")
    value_length = gf.metadata.get(f"{arch}.attention.value_length")
    if key_length is not None and value_length is not None and value_length != key_length:
        raise ModelFormatError(f"{gf.path}: {arch}.attention.value_length {value_length} differs from "
                               f"key_length {key_length}, which is not supported")
    if key_length is not None:
        return _meta_int(gf, f"{arch}.attention.key_length")
    if rope_dims is not None:
        return _meta_int(gf, f"{arch}.rope.dimension_count")
    return None


def _rope_scaling(gf: GGUFFile, arch: str):
    """{'type': ..., 'factor': ...} from {arch}.rope.scaling.* (or the older scale_linear), or None."""
    kind = gf.metadata.get(f"{arch}.rope.scaling.type")
    if kind is None and f"{arch}.rope.scale_linear" in gf.metadata:
        factor = _meta_float(gf, f"{arch}.rope.scale_linear", 1.0)
        return None if factor == 1.0 else {"type": "linear", "factor": factor}
    if kind is None or kind == "none":
        return None
    if not isinstance(kind, str):
        raise ModelFormatError(f"{gf.path}: metadata '{arch}.rope.scaling.type' must be a string, got {kind!r}")
    return {"type": kind, "factor": _meta_float(gf, f"{arch}.rope.scaling.factor", 1.0)}


def _rope_freq_factors(gf: GGUFFile):
    """Llama 3.1+ files carry their RoPE scaling as per-frequency divisors: rope_freqs.weight."""
    t = gf.tensors.get(ROPE_FREQS)
    if t is None:
        return None
    if len(t.shape) != 1 or t.type_name not in ("F32", "F16", "BF16"):
        raise ModelFormatError(f"{gf.path}: tensor {ROPE_FREQS!r} must be a float vector, got "
                               f"{t.type_name} of shape {t.shape}")
    return tuple(float(v) for v in dequantize(t))


def _vocab_size(gf: GGUFFile, arch: str) -> int:
    """Rows of the token embedding, cross-checked against the tokenizer and {arch}.vocab_size."""
    embd = gf.tensors.get("token_embd.weight")
    if embd is None or len(embd.shape) != 2:
        raise ModelFormatError(f"{gf.path}: missing 2-D tensor 'token_embd.weight'")
    vocab = embd.shape[0]
    tokens = gf.metadata.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) != vocab:
        raise ModelFormatError(f"{gf.path}: tokenizer.ggml.tokens has {len(tokens)} entries but "
                               f"token_embd.weight has {vocab} rows")
    declared = gf.metadata.get(f"{arch}.vocab_size")
    if declared is not None and declared != vocab:
        raise ModelFormatError(f"{gf.path}: {arch}.vocab_size {declared} differs from the "
                               f"{vocab} rows of token_embd.weight")
    return vocab


def gguf_config(gf: GGUFFile) -> Config:
    """Config of a llama or qwen2 GGUF file (hyperparameters under the `{arch}.` prefix)."""
    arch = _arch(gf)
    n_heads = _meta_int(gf, f"{arch}.attention.head_count")
    try:
        return Config(
            dim=_meta_int(gf, f"{arch}.embedding_length"),
            hidden_dim=_meta_int(gf, f"{arch}.feed_forward_length"),
            n_layers=_meta_int(gf, f"{arch}.block_count"),
            n_heads=n_heads,
            n_kv_heads=_meta_int(gf, f"{arch}.attention.head_count_kv", n_heads),
            vocab_size=_vocab_size(gf, arch),
            seq_len=_meta_int(gf, f"{arch}.context_length"),
            rope_theta=_meta_float(gf, f"{arch}.rope.freq_base", 10000.0),
            norm_eps=_meta_float(gf, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
            shared_classifier="output.weight" not in gf.tensors,
            rope_scaling=_rope_scaling(gf, arch),
            head_dim=_head_dim(gf, arch),
            arch=arch,
            attention_bias=ARCHITECTURES[arch].attention_bias,
            rope_freq_factors=_rope_freq_factors(gf),
        )
    except ModelFormatError as e:
        if str(e).startswith(gf.path):
            raise
        raise ModelFormatError(f"{gf.path}: {e}") from None


def _check_tensors(gf: GGUFFile, cfg: Config, names: dict) -> None:
    """Every needed tensor present with its shape and a supported type, and no tensor the
    engine would silently ignore."""
    missing = [g for g in names.values() if g not in gf.tensors]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ModelFormatError(f"{gf.path}: missing {len(missing)} tensor(s): {shown}")
    unused = sorted(set(gf.tensors) - set(names.values()) - {ROPE_FREQS})
    if unused:
        shown = ", ".join(repr(u) for u in unused[:8]) + (" ..." if len(unused) > 8 else "")
        raise ModelFormatError(f"{gf.path}: tensors the {cfg.arch} architecture here does not "
                               f"support (e.g. biases): {shown}")
    shapes = expected_shapes(cfg)
    for ours, theirs in names.items():
        t = gf.tensors[theirs]
        check_supported(t, gf.path)
        if tuple(t.shape) != shapes[ours]:
            raise ModelFormatError(f"{gf.path}: tensor {theirs!r} has shape {tuple(t.shape)}, "
                                   f"expected {shapes[ours]}")


def load_gguf(path, dtype=None, group_size: int | None = None, lazy: bool = False):
    """Load a llama or qwen2 GGUF file -> (Config, weights, metadata).

    dtype (the same meaning in every loader, see loaders/dtypes.py):
      None / 'auto': as stored, exactly. Block types become QTensors with no re-rounding
        (ggml_quants.to_qtensor: bits 4 for Q4_0/Q4_1/Q4_K/Q3_K/Q2_K, bits 8 for
        Q8_0/Q5_0/Q5_1/Q5_K/Q6_K; group 32, or 16 for Q6_K/Q3_K/Q2_K); F32 matrices stay
        memory-mapped views, F16/BF16 become float32.
      'fp32': every tensor dequantized bit for bit as gguf.quants.dequantize.
      'int8': bits-8 QTensors: the exact ones (4-bit types widened), F32/F16/BF16 quantized
        with quantize_q8 at 32 (halved until it fits).
      'q4': bits-4 QTensors: exact for the 4-bit types, others quantized to 4 bits at 32.
    group_size: requantize every matrix whose group size differs (int8/q4 only).
    Norms and biases are always float32. qwen2 Q/K rows (and biases) are permuted from the
    file's rotate-half layout to interleaved pairs.
    lazy: return the weights as a llama2c.weights.LazyWeights (each tensor converted when
        read, validated then; its release() drops the file map's resident pages), as
        Model.load does; metadata then has no 'dtype' / 'group_size' (they describe tensors
        not made yet).

    metadata: 'format' ('gguf'), 'path', 'gguf_version', 'gguf_metadata' (every GGUF key, e.g.
    'tokenizer.ggml.tokens'), 'arch', 'dtype' of the returned weights and, when the quantized
    matrices share one, their 'group_size' (loaders.dtypes.describe), 'tensor_types' (llama2c name -> ggml type name) and, when the
    file has them, 'bos_token_id' / 'eos_token_id'.
    """
    dtype = check_dtype(dtype)
    group_size = check_group_size_arg(group_size)
    gf = read_gguf(path)
    cfg = gguf_config(gf)
    per_layer = len(_LAYER_TENSORS) + (len(_BIAS_TENSORS) if cfg.attention_bias else 0)
    if cfg.n_layers * per_layer > len(gf.tensors):   # before naming every tensor
        raise ModelFormatError(f"{gf.path}: {cfg.arch}.block_count is {cfg.n_layers} but the file "
                               f"holds only {len(gf.tensors)} tensors")
    names = tensor_name_map(cfg.n_layers, cfg.shared_classifier, cfg.attention_bias)
    _check_tensors(gf, cfg, names)
    fallback = None      # group size for what has no exact form in the requested dtype
    if dtype in ("int8", "q4"):
        bits = 8 if dtype == "int8" else 4
        exact = {k for k, (b, _) in ggml_quants.EXACT_FORMAT.items() if b <= bits}
        if group_size is not None or any(gf.tensors[g].type_name not in exact
                                         for g in names.values() if len(gf.tensors[g].shape) == 2):
            fallback = default_group_size(cfg, dtype, group_size, 32)
    perms = {}           # qwen2: rotate-half rows -> interleaved pairs, weights and biases alike
    if ARCHITECTURES[cfg.arch].neox_rope:
        q_perm = permute_from_hf(np.arange(cfg.q_dim), cfg.n_heads)
        k_perm = permute_from_hf(np.arange(cfg.kv_dim), cfg.n_kv_heads)
        perms = {"wq": q_perm, "bq": q_perm, "wk": k_perm, "bk": k_perm}

    def make(ours):
        t = gf.tensors[names[ours]]
        if len(t.shape) == 1 or dtype == "fp32":
            w = dequantize(t)
        else:
            w = convert_matrix(as_stored(t), dtype, group_size, ours, fallback)
        perm = perms.get(ours.rsplit(".", 1)[-1])
        return w if perm is None else _permute_rows(w, perm)

    metadata = {"format": "gguf", "path": gf.path, "gguf_version": gf.version,
                "gguf_metadata": gf.metadata, "arch": cfg.arch,
                "tensor_types": {ours: gf.tensors[theirs].type_name for ours, theirs in names.items()}}
    for key in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{key}" in gf.metadata:
            metadata[key] = gf.metadata[f"tokenizer.ggml.{key}"]
    if lazy:
        shapes = expected_shapes(cfg)
        return cfg, LazyWeights({ours: shapes[ours] for ours in names}, make, gf.path,
                                release=gf.release_pages), metadata
    weights = {ours: make(ours) for ours in names}
    validate_weights(cfg, weights, source=gf.path)
    metadata["dtype"], gs = describe(weights)
    if gs is not None:
        metadata["group_size"] = gs
    return cfg, weights, metadata


# ----------------------------------------------------------------------------- writer

WRITABLE_TYPES = {"F32": 0, "Q4_1": 3, "Q8_0": 8}
# llama.cpp's general.file_type codes (LLAMA_FTYPE_*): the name of a file's mix, e.g. Q4_K_M
FILE_TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
                   10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S",
                   15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}
_FILE_TYPES = {name: code for code, name in FILE_TYPE_NAMES.items()}
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL_T = 0, 1, 2, 3, 4, 5, 6, 7
_UINT64, _INT64, _FLOAT64 = 10, 11, 12
_SCALAR_FORMATS = {_UINT8: "<B", _INT8: "<b", _UINT16: "<H", _INT16: "<h", _UINT32: "<I",
                   _INT32: "<i", _FLOAT32: "<f", _BOOL_T: "<?", _UINT64: "<Q", _INT64: "<q",
                   _FLOAT64: "<d"}
# Value types llama.cpp insists on for the tokenizer keys (it checks them).
_KEY_TYPES = {"tokenizer.ggml.scores": (_ARRAY, _FLOAT32), "tokenizer.ggml.token_type": (_ARRAY, _INT32),
              "tokenizer.ggml.tokens": (_ARRAY, _STRING), "tokenizer.ggml.merges": (_ARRAY, _STRING)}


def tokenizer_metadata(gguf_metadata: dict) -> dict:
    """The tokenizer keys (tokenizer.*) of a GGUF file's metadata, for write_gguf."""
    return {k: v for k, v in gguf_metadata.items() if k.startswith("tokenizer.")}


def _infer_type(v) -> int:
    if isinstance(v, bool):
        return _BOOL_T
    if isinstance(v, (int, np.integer)):
        return _UINT32 if 0 <= v < 2**32 else _INT64
    if isinstance(v, (float, np.floating)):
        return _FLOAT32
    if isinstance(v, str):
        return _STRING
    if isinstance(v, (list, tuple)):
        return _ARRAY
    raise TypeError(f"cannot store {type(v).__name__} in GGUF metadata")


def _element_type(values) -> int:
    types = {_infer_type(v) for v in values}
    if not types:
        return _UINT32
    if types <= {_UINT32, _INT64}:
        return _INT32 if all(-2**31 <= v < 2**31 for v in values) else _INT64
    if types <= {_UINT32, _INT64, _FLOAT32}:
        return _FLOAT32
    if len(types) == 1:
        return types.pop()
    raise TypeError(f"GGUF arrays hold one value type, got a mix: {sorted(types)}")


def _encode_string(s) -> bytes:
    b = s.encode("utf-8", "surrogateescape") if isinstance(s, str) else bytes(s)
    return _U64.pack(len(b)) + b


def _encode_value(vtype: int, v, etype: int | None = None) -> bytes:
    if vtype == _STRING:
        return _encode_string(v)
    if vtype == _ARRAY:
        etype = _element_type(v) if etype is None else etype
        head = _U32.pack(etype) + _U64.pack(len(v))
        if etype == _STRING:
            return head + b"".join(_encode_string(x) for x in v)
        if etype == _ARRAY:
            return head + b"".join(_encode_value(_ARRAY, x) for x in v)
        return head + np.asarray(v, dtype=_SCALAR_FORMATS[etype].replace("?", "u1")).tobytes()
    return struct.pack(_SCALAR_FORMATS[vtype], v)


def _kv(key: str, v, vtype: int | None = None, etype: int | None = None) -> bytes:
    if vtype is None:
        vtype, etype = _KEY_TYPES.get(key, (_infer_type(v), None))
    return _encode_string(key) + _U32.pack(vtype) + _encode_value(vtype, v, etype)


def gguf_quantize_weights(weights: dict, ggml_type: str | None = None, progress=None) -> dict:
    """The weights as write_gguf stores them: every matrix a float32 array (F32) or a QTensor
    that a Q8_0 / Q4_1 block holds exactly; vectors float32.

    ggml_type None keeps each matrix's type where it can: float32 -> F32, a QTensor already
    exactly Q8_0 or Q4_1 (e.g. loaded from such a file, or from Q4_0) as it is; any other
    QTensor is requantized from its values, Q8_0 for bits 8 and Q4_1 for bits 4 (with a
    warning: that adds error). 'F32', 'Q8_0' or 'Q4_1' converts every matrix to that type
    (ggml's reference quantizers; exact QTensors of that type are kept). progress(name,
    original, stored) is called per tensor.
    """
    import warnings
    if ggml_type is not None and ggml_type not in WRITABLE_TYPES:
        raise ValueError(f"ggml_type must be None, 'F32', 'Q8_0' or 'Q4_1', got {ggml_type!r}")
    out, requantized = {}, []
    for name, t in weights.items():
        w = t
        if np.ndim(getattr(t, "q", t)) != 2:
            w = np.ascontiguousarray(as_fp32(t), dtype=np.float32)
        else:
            want = ggml_type
            if want is None:
                if not isinstance(t, QTensor):
                    want = "F32"
                elif ggml_quants.q8_0_representable(t):
                    want = "Q8_0"
                elif ggml_quants.q4_1_representable(t):
                    want = "Q4_1"
                else:
                    want = "Q8_0" if t.bits == 8 else "Q4_1"
                    requantized.append(name)
            if want == "F32":
                w = np.ascontiguousarray(as_fp32(t), dtype=np.float32)
            elif want == "Q8_0" and not (isinstance(t, QTensor) and ggml_quants.q8_0_representable(t)):
                w = ggml_quants.quantize_q8_0(as_fp32(t), name)
            elif want == "Q4_1" and not (isinstance(t, QTensor) and ggml_quants.q4_1_representable(t)):
                w = ggml_quants.quantize_q4_1(as_fp32(t), name)
        out[name] = w
        if progress is not None:
            progress(name, t, w)
    if requantized:
        warnings.warn(f"{len(requantized)} quantized tensor(s) (e.g. {requantized[0]!r}) have no "
                      f"exact Q8_0/Q4_1 form (group size, offsets or scales); requantized, "
                      f"which adds error", stacklevel=2)
    return out


def _stored_type(t) -> str:
    if not isinstance(t, QTensor):
        return "F32"
    return "Q8_0" if ggml_quants.q8_0_representable(t) else "Q4_1"


def _tensor_bytes(t, ggml_type: str) -> bytes:
    if ggml_type == "F32":
        return np.ascontiguousarray(t, dtype="<f4").tobytes()
    return ggml_quants.encode_q8_0(t) if ggml_type == "Q8_0" else ggml_quants.encode_q4_1(t)


def _model_metadata(cfg: Config) -> list:
    """The architecture keys llama.cpp reads, with the value types it checks."""
    a = cfg.arch
    kv = [(f"{a}.context_length", cfg.seq_len, _UINT32),
          (f"{a}.embedding_length", cfg.dim, _UINT32),
          (f"{a}.block_count", cfg.n_layers, _UINT32),
          (f"{a}.feed_forward_length", cfg.hidden_dim, _UINT32),
          (f"{a}.attention.head_count", cfg.n_heads, _UINT32),
          (f"{a}.attention.head_count_kv", cfg.n_kv_heads, _UINT32),
          (f"{a}.rope.freq_base", float(cfg.rope_theta), _FLOAT32),
          (f"{a}.attention.layer_norm_rms_epsilon", float(cfg.norm_eps), _FLOAT32),
          (f"{a}.rope.dimension_count", cfg.head_size, _UINT32),
          (f"{a}.vocab_size", cfg.vocab_size, _UINT32)]
    if cfg.head_size * cfg.n_heads != cfg.dim:
        kv += [(f"{a}.attention.key_length", cfg.head_size, _UINT32),
               (f"{a}.attention.value_length", cfg.head_size, _UINT32)]
    if cfg.rope_type in ("linear", "dynamic"):
        kv += [(f"{a}.rope.scaling.type", cfg.rope_type, _STRING),
               (f"{a}.rope.scaling.factor", float(cfg.rope_scaling.get("factor", 1.0)), _FLOAT32)]
    return kv


def _rope_freqs_tensor(cfg: Config):
    """rope_freqs.weight for a Llama 3-style scaling (as llama.cpp's converter writes it), or None."""
    if cfg.rope_freq_factors is not None:
        return np.asarray(cfg.rope_freq_factors, dtype=np.float32)
    if cfg.rope_type == "llama3":
        base = cfg.rope_theta ** (-np.arange(0, cfg.head_size, 2, dtype=np.float64) / cfg.head_size)
        return (base / cfg.rope_frequencies()).astype(np.float32)
    return None


def write_gguf(path, config: Config, weights: dict, metadata: dict | None = None, *,
               ggml_type: str | None = None, name: str | None = None) -> None:
    """Write a model as a GGUF v3 file that llama.cpp and gguf-py read.

    weights: llama2c's weights dict (llama2c/weights.py); matrices are stored as F32, Q8_0 or
    Q4_1 (see gguf_quantize_weights for ggml_type), norms and biases as F32. QTensors a Q8_0 or
    Q4_1 block holds exactly are written as they are, so load_gguf gives them back unchanged.
    metadata: extra keys, e.g. tokenizer_metadata(...) of a GGUF source (value types inferred:
    int -> UINT32, float -> FLOAT32, lists -> arrays). Architecture keys come from config:
    general.architecture = config.arch; a qwen2 model's Q/K rows and biases are permuted back
    to the rotate-half layout its GGUF files use. Written tensor by tensor.
    """
    validate_weights(config, weights, "write_gguf")
    if config.arch not in ARCHITECTURES:
        raise ValueError(f"write_gguf: architecture {config.arch!r} is not supported")
    stored = gguf_quantize_weights(weights, ggml_type)
    names = tensor_name_map(config.n_layers, config.shared_classifier, config.attention_bias)
    if ARCHITECTURES[config.arch].neox_rope:   # back to the rotate-half rows qwen2 files hold
        q_perm = permute_to_hf(np.arange(config.q_dim), config.n_heads)
        k_perm = permute_to_hf(np.arange(config.kv_dim), config.n_kv_heads)
        perms = {"wq": q_perm, "bq": q_perm, "wk": k_perm, "bk": k_perm}
        for ours in names:
            if ours.rsplit(".", 1)[-1] in perms:
                stored[ours] = _permute_rows(stored[ours], perms[ours.rsplit(".", 1)[-1]])
    tensors = [(theirs, stored[ours]) for ours, theirs in names.items()]
    freqs = _rope_freqs_tensor(config)
    if freqs is not None:
        tensors.append((ROPE_FREQS, freqs))
    types = [_stored_type(t) for _, t in tensors]
    matrix_types = [ty for (_, t), ty in zip(tensors, types) if np.ndim(getattr(t, "q", t)) == 2]
    file_type = _FILE_TYPES[max(set(matrix_types), key=matrix_types.count)]

    own = [("general.architecture", config.arch, _STRING)]
    if name is not None:
        own.append(("general.name", name, _STRING))
    own += [("general.alignment", DEFAULT_ALIGNMENT, _UINT32), ("general.file_type", file_type, _UINT32)]
    own += _model_metadata(config)
    own_keys = {k for k, _, _ in own}
    extra = {k: v for k, v in (metadata or {}).items() if k not in own_keys
             and not k.startswith(config.arch + ".")}
    header = bytearray(GGUF_MAGIC + _U32.pack(3) + _U64.pack(len(tensors)) + _U64.pack(len(own) + len(extra)))
    for key, value, vtype in own:
        header += _kv(key, value, vtype)
    for key, value in extra.items():
        header += _kv(key, value)
    offset, sizes = 0, []
    for (tname, t), ty in zip(tensors, types):
        shape = np.shape(getattr(t, "q", t))
        header += _encode_string(tname) + _U32.pack(len(shape))
        header += b"".join(_U64.pack(n) for n in reversed(shape))
        header += _U32.pack(WRITABLE_TYPES[ty]) + _U64.pack(offset)
        block, size = GGML_TYPES[WRITABLE_TYPES[ty]][1:]
        nbytes = math.prod(shape) // block * size
        sizes.append(nbytes)
        offset += -(-nbytes // DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT
    header += b"\0" * (-len(header) % DEFAULT_ALIGNMENT)
    with open(path, "wb") as f:
        f.write(header)
        for (_, t), ty, nbytes in zip(tensors, types, sizes):
            data = _tensor_bytes(t, ty)
            assert len(data) == nbytes
            f.write(data)
            f.write(b"\0" * (-nbytes % DEFAULT_ALIGNMENT))
