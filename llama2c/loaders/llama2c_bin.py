"""Read and write llama2.c checkpoints (karpathy/llama2.c `export.py`), zero copy.

Three layouts exist, all little-endian:

    v0  legacy_export   7 x int32 header (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
                        vocab_size, seq_len); a negative vocab_size means "classifier not
                        shared". fp32 weights: tok_embeddings, every layer's attention_norm,
                        wq, wk, wv, wo, ffn_norm, w1, w2, w3, then norm, then (older exports,
                        e.g. the published stories15M.bin) the RoPE tables freq_cis_real and
                        freq_cis_imag (seq_len, head_size/2) each, then output if unshared.
    v1  version1_export 256-byte header: uint32 magic 0x616b3432 ("ak42"), int32 version=1,
                        the same 7 int32 (vocab positive), uint8 shared_classifier, zero pad.
                        fp32: all attention_norm, all ffn_norm, norm, tok_embeddings, all wq,
                        all wk, all wv, all wo, all w1, all w2, all w3, output if unshared.
    v2  version2_export header as v1 plus int32 group_size after the flag (version=2).
                        fp32: all attention_norm, all ffn_norm, norm. Then Q8_0 tensors, each
                        as int8 q (numel) immediately followed by its float32 scales
                        (numel / group_size): tok_embeddings, wq of layer 0, wq of layer 1, ...,
                        all wk, all wv, all wo, all w1, all w2, all w3, output if unshared.
                        (runq.c `init_quantized_tensors` reads q then s per tensor. An early
                        export.py wrote all scales after all q's; runq.c never read that
                        layout and neither does this module.)

Every matrix is PyTorch's nn.Linear weight (out_features, in_features), row-major, which is
this package's convention, so tensors are direct views of one read-only memory map.
None of the formats stores rope_theta or norm_eps: llama2.c hard-codes 10000 and 1e-5
(run.c `powf(10000.0f, ...)` and `ss += 1e-5f`), and so do we.
"""
from __future__ import annotations

import mmap
import os
import struct
import warnings
from dataclasses import dataclass

import numpy as np

from ..config import Config
from ..errors import ModelFormatError
from ..weights import QTensor, as_fp32, check_group_size, quantize_q8, validate_weights
from . import drop_pages
from .dtypes import (check_dtype, check_group_size_arg, convert_weights,
                     convert_weights_lazy, describe)

MAGIC = 0x616B3432            # "ak42" read as a little-endian uint32
HEADER_SIZE = 256             # v1/v2 header, zero padded
LEGACY_HEADER_SIZE = 7 * 4    # v0 header: 7 x int32
ROPE_THETA = 10000.0          # fixed by llama2.c, not stored in the file
NORM_EPS = 1e-5               # fixed by llama2.c, not stored in the file

_HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
# Upper bounds that no real model reaches; anything above them is a corrupt or foreign file.
_LIMITS = {"dim": 1 << 20, "hidden_dim": 1 << 22, "n_layers": 4096, "n_heads": 1 << 14,
           "n_kv_heads": 1 << 14, "vocab_size": 1 << 24, "seq_len": 1 << 24}


# ---------------------------------------------------------------------------------------------
# layout: the ordered list of tensors of each version, shared by the reader and the writer

@dataclass(frozen=True)
class _Entry:
    name: str | None    # weights-dict key; None for bytes that are skipped (v0 freq_cis)
    kind: str           # "f32" or "q8"
    shape: tuple

    def nbytes(self, group_size: int) -> int:
        """Bytes this tensor occupies in the file."""
        n = int(np.prod(self.shape))
        return 4 * n if self.kind == "f32" else n + 4 * (n // group_size)


def _per_layer(cfg: Config, name: str, kind: str, shape: tuple) -> list:
    """One entry per layer, layer 0 first: `layers.{i}.{name}`."""
    return [_Entry(f"layers.{i}.{name}", kind, shape) for i in range(cfg.n_layers)]


def _layout(cfg: Config, version: int, freq_cis: bool = False) -> list:
    """Ordered tensor entries of a version-`version` file (after the header)."""
    d, h, q_dim, kv_dim, v = cfg.dim, cfg.hidden_dim, cfg.q_dim, cfg.kv_dim, cfg.vocab_size
    mat = "q8" if version == 2 else "f32"
    norms = (_per_layer(cfg, "attention_norm", "f32", (d,)) + _per_layer(cfg, "ffn_norm", "f32", (d,)))
    matrices = (_per_layer(cfg, "wq", mat, (q_dim, d)) + _per_layer(cfg, "wk", mat, (kv_dim, d))
                + _per_layer(cfg, "wv", mat, (kv_dim, d)) + _per_layer(cfg, "wo", mat, (d, q_dim))
                + _per_layer(cfg, "w1", mat, (h, d)) + _per_layer(cfg, "w2", mat, (d, h))
                + _per_layer(cfg, "w3", mat, (h, d)))
    output = [] if cfg.shared_classifier else [_Entry("output", mat, (v, d))]
    if version == 0:
        half = (cfg.seq_len, cfg.head_size // 2)
        entries = ([_Entry("tok_embeddings", "f32", (v, d))]
                   + _per_layer(cfg, "attention_norm", "f32", (d,))
                   + matrices[:4 * cfg.n_layers]                      # wq, wk, wv, wo
                   + _per_layer(cfg, "ffn_norm", "f32", (d,))
                   + matrices[4 * cfg.n_layers:]                      # w1, w2, w3
                   + [_Entry("norm", "f32", (d,))])
        if freq_cis:
            entries += [_Entry(None, "f32", half), _Entry(None, "f32", half)]
        return entries + output
    return norms + [_Entry("norm", "f32", (d,)), _Entry("tok_embeddings", mat, (v, d))] + matrices + output


def _payload_size(entries: list, group_size: int) -> int:
    """Total bytes of the tensors (Python ints: no overflow on 13B+ models)."""
    return sum(e.nbytes(group_size) for e in entries)


# ---------------------------------------------------------------------------------------------
# reading

def _check_dims(dims: dict, source: str, hint: str = "") -> None:
    """Raise ModelFormatError unless every header integer is positive, sane and consistent."""
    for name in _HEADER_FIELDS:
        v = dims[name]
        if v <= 0 or v > _LIMITS[name]:
            raise ModelFormatError(f"{source}: header field {name}={v} is out of range "
                                   f"(1..{_LIMITS[name]}){hint}")
    if dims["dim"] % dims["n_heads"]:
        raise ModelFormatError(f"{source}: n_heads={dims['n_heads']} does not divide dim={dims['dim']}{hint}")
    if dims["n_heads"] % dims["n_kv_heads"]:
        raise ModelFormatError(
            f"{source}: n_kv_heads={dims['n_kv_heads']} does not divide n_heads={dims['n_heads']}{hint}")
    if (dims["dim"] // dims["n_heads"]) % 2:
        raise ModelFormatError(f"{source}: head size dim/n_heads={dims['dim'] // dims['n_heads']} "
                               f"must be even for RoPE{hint}")


def _parse_header(head: bytes, file_size: int, source: str) -> tuple:
    """Header bytes -> (version, dims dict, shared_classifier, group_size, header_size)."""
    if file_size < 4:
        raise ModelFormatError(f"{source}: file is {file_size} bytes, too small to be a llama2.c checkpoint")
    if head[:4] == b"GGUF":
        raise ModelFormatError(f"{source}: this is a GGUF file, not a llama2.c checkpoint")
    (magic,) = struct.unpack_from("<I", head, 0)
    if magic != MAGIC:
        # No magic: a legacy v0 file, whose header is just the 7 int32.
        hint = (f" (the file does not start with the llama2.c magic 0x{MAGIC:08x} 'ak42', "
                f"so it was read as a legacy v0 header)")
        if file_size < LEGACY_HEADER_SIZE:
            raise ModelFormatError(f"{source}: file is {file_size} bytes, shorter than the "
                                   f"{LEGACY_HEADER_SIZE}-byte legacy header{hint}")
        dims = dict(zip(_HEADER_FIELDS, struct.unpack_from("<7i", head, 0)))
        # "negative vocab size is hacky way of signaling unshared weights" (run.c)
        shared = dims["vocab_size"] > 0
        dims["vocab_size"] = abs(dims["vocab_size"])
        _check_dims(dims, source, hint)
        return 0, dims, shared, 0, LEGACY_HEADER_SIZE
    if file_size < 8:
        raise ModelFormatError(f"{source}: truncated header: file is {file_size} bytes")
    (version,) = struct.unpack_from("<i", head, 4)
    if version not in (1, 2):
        raise ModelFormatError(f"{source}: unsupported llama2.c file version {version} (known: 1, 2)")
    if file_size < HEADER_SIZE:
        raise ModelFormatError(f"{source}: truncated header: file is {file_size} bytes, the "
                               f"version {version} header is {HEADER_SIZE}")
    dims = dict(zip(_HEADER_FIELDS, struct.unpack_from("<7i", head, 8)))
    _check_dims(dims, source)
    flag = head[36]
    if flag not in (0, 1):
        raise ModelFormatError(f"{source}: shared_classifier flag is {flag}, expected 0 or 1")
    group_size = 0
    if version == 2:
        (group_size,) = struct.unpack_from("<i", head, 37)
        if group_size <= 0:
            raise ModelFormatError(f"{source}: group size must be positive, got {group_size}")
        for name in ("dim", "hidden_dim"):
            if dims[name] % group_size:
                raise ModelFormatError(
                    f"{source}: group size {group_size} does not divide {name}={dims[name]}")
    return version, dims, bool(flag), group_size, HEADER_SIZE


def _config(dims: dict, shared: bool) -> Config:
    """Config of a llama2.c file: rope_theta and norm_eps are llama2.c's fixed values."""
    return Config(**dims, rope_theta=ROPE_THETA, norm_eps=NORM_EPS, shared_classifier=shared)


def load_llama2c_bin(path, dtype: str | None = None, group_size: int | None = None,
                     lazy: bool = False):
    """Load a llama2.c .bin checkpoint -> (Config, weights dict, metadata dict).

    dtype (the same meaning in every loader, see loaders/dtypes.py): None/'auto' keeps what the
    file stores (fp32 for v0/v1, int8 QTensors for v2), 'fp32' dequantizes v2, 'int8'
    quantizes fp32 files with `group_size` (default 64, halved until it divides dim and
    hidden_dim, with a warning), 'q4' quantizes every matrix to 4 bits (default group 32).
    A given group_size also requantizes v2 groups of another size. Stored tensors are
    read-only views of one file map.
    metadata: format ('llama2c-v0' | 'llama2c-v1' | 'llama2c-v2'), version, path, file_size,
    shared_classifier, freq_cis (v0: whether the RoPE tables are present), dtype and
    group_size of the returned weights (loaders.dtypes.describe; v2: the file's group size
    when the weights are fp32).
    lazy: the weights as a llama2c.weights.LazyWeights (converted when read, as Model.load
    asks; its release() drops the map's resident pages); metadata then has no dtype/group_size.
    """
    dtype = check_dtype(dtype)
    group_size = check_group_size_arg(group_size)
    path = os.fspath(path)
    source = f"llama2.c checkpoint {path!r}"
    if not os.path.exists(path):
        raise ModelFormatError(f"{source}: no such file")
    if not os.path.isfile(path):
        raise ModelFormatError(f"{source}: not a regular file")
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
    version, dims, shared, group_size_file, header_size = _parse_header(head, file_size, source)
    cfg = _config(dims, shared)

    # The exact size the header implies; v0 may or may not carry the freq_cis tables.
    freq_cis = False
    if version == 0:
        sizes = {fc: header_size + _payload_size(_layout(cfg, 0, fc), 1) for fc in (False, True)}
        if file_size not in sizes.values():
            raise ModelFormatError(
                f"{source}: size does not match the legacy (v0) header {dims} "
                f"(shared classifier: {shared}): expected {sizes[False]} bytes (without the "
                f"freq_cis tables) or {sizes[True]} bytes (with them), got {file_size}")
        freq_cis = file_size == sizes[True]
    entries = _layout(cfg, version, freq_cis)
    expected = header_size + _payload_size(entries, group_size_file or 1)
    if file_size != expected:
        raise ModelFormatError(f"{source}: size does not match the version {version} header "
                               f"{dims} (shared classifier: {shared}"
                               + (f", group size {group_size_file}" if version == 2 else "")
                               + f"): expected {expected} bytes, got {file_size}")

    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    weights, off = {}, header_size
    for e in entries:
        n = int(np.prod(e.shape))
        if e.name is not None and e.kind == "f32":
            weights[e.name] = np.frombuffer(mm, "<f4", n, off).reshape(e.shape)
        elif e.name is not None:
            q = np.frombuffer(mm, np.int8, n, off).reshape(e.shape)
            s = np.frombuffer(mm, "<f4", n // group_size_file, off + n)
            s = s.reshape(e.shape[0], e.shape[1] // group_size_file)
            if not np.isfinite(s).all():
                raise ModelFormatError(f"{source}: tensor {e.name!r} has a NaN or infinite scale")
            weights[e.name] = QTensor(q, s, group_size_file)
        off += e.nbytes(group_size_file or 1)

    meta = {"format": f"llama2c-v{version}", "version": version, "path": path,
            "file_size": file_size, "shared_classifier": shared}
    if version == 0:
        meta["freq_cis"] = freq_cis
    if lazy:
        return cfg, convert_weights_lazy(cfg, weights, dtype, group_size, 64, source,
                                         release=lambda: drop_pages(mm)), meta
    weights = convert_weights(cfg, weights, dtype, group_size, default=64)
    meta["dtype"], gs = describe(weights)
    if gs is not None or version == 2:
        meta["group_size"] = gs if gs is not None else group_size_file
    return cfg, weights, meta


# ---------------------------------------------------------------------------------------------
# writing

def write_llama2c_bin(path, cfg: Config, weights: dict, version: int = 1, group_size: int = 64) -> None:
    """Write weights as a llama2.c v1 (fp32) or v2 (int8 Q8_0) file, byte for byte export.py's layout.

    v1 dequantizes QTensors; v2 quantizes fp32 matrices at group_size (QTensors already at that
    group size are written as they are). v2 cannot store per-group offsets (QTensor.m, e.g. from
    GGUF Q4_1): such tensors are requantized symmetrically from their dequantized values, with a
    warning. Tensors are written one at a time (streaming).
    """
    if version not in (1, 2):
        raise ValueError(f"version must be 1 or 2, got {version!r}")
    if cfg.head_size * cfg.n_heads != cfg.dim:
        raise ValueError(f"llama2.c files derive head size as dim / n_heads; this model has "
                         f"head size {cfg.head_size} with dim={cfg.dim}, n_heads={cfg.n_heads}")
    if cfg.arch != "llama" or cfg.attention_bias:
        raise ValueError(f"llama2.c files hold the plain llama block; this {cfg.arch} model has "
                         f"q/k/v biases they cannot store (write GGUF instead)")
    validate_weights(cfg, weights, "write_llama2c_bin")
    if version == 2:
        for name, cols in (("dim", cfg.dim), ("hidden_dim", cfg.hidden_dim)):
            check_group_size(group_size, cols, name)
    if (cfg.rope_theta != ROPE_THETA or cfg.norm_eps != NORM_EPS or cfg.rope_type != "default"
            or cfg.rope_freq_factors is not None):
        warnings.warn(f"llama2.c formats cannot store rope_theta={cfg.rope_theta}, "
                      f"norm_eps={cfg.norm_eps} or rope scaling {cfg.rope_scaling}; readers will "
                      f"assume rope_theta={ROPE_THETA:g}, norm_eps={NORM_EPS:g} and no scaling",
                      stacklevel=2)
    if version == 2 and any(isinstance(t, QTensor) and t.group_size != group_size for t in weights.values()):
        warnings.warn(f"re-quantizing int8 tensors to group size {group_size}: this adds "
                      f"quantization error", stacklevel=2)
    if version == 2 and any(isinstance(t, QTensor) and t.m is not None for t in weights.values()):
        warnings.warn("llama2.c version 2 files cannot store per-group offsets (e.g. GGUF Q4_1 "
                      "mins): re-quantizing those int8 tensors symmetrically from their "
                      "dequantized values; this adds quantization error", stacklevel=2)

    header = struct.pack("<Ii7iB", MAGIC, version, cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads,
                         cfg.n_kv_heads, cfg.vocab_size, cfg.seq_len, int(cfg.shared_classifier))
    if version == 2:
        header += struct.pack("<i", group_size)
    with open(path, "wb") as f:
        f.write(header + b"\0" * (HEADER_SIZE - len(header)))
        for e in _layout(cfg, version):
            t = weights[e.name]
            if e.kind == "f32":
                f.write(np.ascontiguousarray(as_fp32(t), dtype="<f4").data)
                continue
            if not (isinstance(t, QTensor) and t.group_size == group_size and t.m is None):
                t = quantize_q8(as_fp32(t), group_size, e.name)
            # serialize_int8(out_file, q); serialize_fp32(out_file, s)
            f.write(np.ascontiguousarray(t.q, dtype=np.int8).data)
            f.write(np.ascontiguousarray(t.s, dtype="<f4").data)
