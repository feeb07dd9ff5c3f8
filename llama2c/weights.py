"""In-memory weights: a flat dict of named tensors, fp32 ndarrays or group-quantized QTensors.

Names follow llama2.c / Meta's checkpoint naming:
    tok_embeddings            (vocab_size, dim)
    layers.{i}.attention_norm (dim,)
    layers.{i}.wq             (n_heads*head_size, dim)
    layers.{i}.wk, .wv        (n_kv_heads*head_size, dim)
    layers.{i}.wo             (dim, n_heads*head_size)
    layers.{i}.ffn_norm       (dim,)
    layers.{i}.w1, .w3        (hidden_dim, dim)
    layers.{i}.w2             (dim, hidden_dim)
    norm                      (dim,)
    output                    (vocab_size, dim)   only when the classifier is not shared
    layers.{i}.bq             (n_heads*head_size,)     q/k/v biases, only when
    layers.{i}.bk, .bv        (n_kv_heads*head_size,)  config.attention_bias (qwen2)
Every matrix is (out_features, in_features), row-major, so y = W @ x. Q and K rows use the
interleaved-pair RoPE convention of llama2.c and GGUF.

Quantized format (QTensor): per-group quantization along the input dimension. For each row,
each run of `group_size` consecutive values shares one float32 scale s and optionally one
float32 offset m, and w = q * s + m (m = 0 without offsets). `s` and `m` are
(rows, cols // group_size) float32.
  bits=8: q int8 (rows, cols) in [-127, 127]. quantize_q8 is symmetric, as llama2.c's runq.c
          and ggml's Q8_0: s = max|w| / 127, q = round(w / s), no offsets; the same two separate
          arrays llama2.c version 2 files store, so those files map without a copy.
  bits=4: q uint8 (rows, cols) in [0, 15] (unsigned, one value per byte; the engine packs two
          per byte). quantize_q4 is asymmetric as ggml's Q4_1: s = (max - min) / 15, m = min,
          q = round((w - m) / s).
Loaders map quantized file formats onto these exactly (GGUF Q8_0 -> bits 8, Q4_0/Q4_1/Q4_K ->
bits 4 with offsets, ...); Q and K biases follow their rows' interleaved order; the engine packs whatever it is given (src/weights.pxi).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .config import Config
from .errors import ModelFormatError

MATRIX_NAMES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
NORM_NAMES = ("attention_norm", "ffn_norm")


@dataclass
class QTensor:
    q: np.ndarray          # (rows, cols): int8 (bits 8) or uint8 (bits 4)
    s: np.ndarray          # float32, (rows, cols // group_size)
    group_size: int
    m: np.ndarray | None = None   # float32 per-group offsets, same shape as s: w = q * s + m
    bits: int = 8          # 8: q int8 in [-127, 127]; 4: q uint8 in [0, 15] (unsigned)

    @property
    def shape(self):
        return self.q.shape

    def dequantize(self) -> np.ndarray:
        rows, cols = self.q.shape
        gs = self.group_size
        w = self.q.reshape(rows, cols // gs, gs).astype(np.float32) * self.s.reshape(rows, cols // gs, 1)
        if self.m is not None:
            w += self.m.reshape(rows, cols // gs, 1)
        return w.reshape(rows, cols)

    def dequantize_rows(self, rows) -> np.ndarray:
        """float32 (len(rows), cols): the given rows only (e.g. token embedding lookups)."""
        rows = np.asarray(rows)
        n, gs = len(rows), self.group_size
        w = self.q[rows].astype(np.float32).reshape(n, -1, gs) * self.s[rows][:, :, None]
        if self.m is not None:
            w += self.m[rows][:, :, None]
        return w.reshape(n, -1)


def check_group_size(group_size: int, cols: int, name: str = "tensor", multiple: int = 1) -> None:
    if not isinstance(group_size, (int, np.integer)) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"group size must be a positive integer, got {group_size!r}")
    if cols % group_size != 0:
        raise ValueError(
            f"group size {group_size} does not divide the input dimension {cols} of {name}; "
            f"pick a group size that divides every matrix's input dimension")
    if group_size % multiple:
        raise ValueError(f"group size {group_size} of {name} is not a multiple of {multiple}")


def quantize_q8(w: np.ndarray, group_size: int = 64, name: str = "tensor") -> QTensor:
    """Quantize a 2-D float matrix to int8 with one scale per `group_size` inputs (reference)."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D matrix, got shape {w.shape}")
    rows, cols = w.shape
    check_group_size(group_size, cols, name)
    g = w.reshape(rows, cols // group_size, group_size)
    wmax = np.abs(g).max(axis=2)
    scale = (wmax / np.float32(127.0)).astype(np.float32)
    inv = np.divide(np.float32(1.0), scale, out=np.zeros_like(scale), where=scale != 0)
    q = np.rint(g * inv[:, :, None]).astype(np.int8)
    return QTensor(q.reshape(rows, cols), scale, int(group_size))


Q4_MAX = 15


def quantize_q4(w: np.ndarray, group_size: int = 32, name: str = "tensor") -> QTensor:
    """Quantize a 2-D float matrix to 4 bits, asymmetric per group as ggml's Q4_1 (reference):
    per group of `group_size` inputs (a multiple of 8), m = min and s = (max - min) / 15, both
    rounded to IEEE halves as Q4_1 stores them (so the engine keeps them as halves: 5 bits per
    weight at group size 32), then q = round((w - m) / s) clipped to [0, 15] (round half to
    even). A constant group gets s = 0, q = 0 and m its value (exact when that is a half).
    Should a scale or offset not fit a half, the matrix keeps float32 ones. Returns a QTensor
    with bits=4."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D matrix, got shape {w.shape}")
    rows, cols = w.shape
    check_group_size(group_size, cols, name, multiple=8)
    g = w.reshape(rows, cols // group_size, group_size)
    lo = g.min(axis=2)
    scale = ((g.max(axis=2) - lo) / np.float32(Q4_MAX)).astype(np.float32)
    with np.errstate(over="ignore"):
        lo16, scale16 = lo.astype(np.float16).astype(np.float32), scale.astype(np.float16).astype(np.float32)
    if np.isfinite(lo16).all() and np.isfinite(scale16).all():
        lo, scale = lo16, scale16
    inv = np.divide(np.float32(1.0), scale, out=np.zeros_like(scale), where=scale != 0)
    q = np.clip(np.rint((g - lo[:, :, None]) * inv[:, :, None]), 0, Q4_MAX).astype(np.uint8)
    return QTensor(q.reshape(rows, cols), scale, int(group_size), lo, bits=4)


def as_fp32(t) -> np.ndarray:
    return t.dequantize() if isinstance(t, QTensor) else t


def expected_shapes(cfg) -> dict:
    """name -> shape for every tensor the config calls for."""
    d, h, hs = cfg.dim, cfg.hidden_dim, cfg.head_size
    shapes = {"tok_embeddings": (cfg.vocab_size, d), "norm": (d,)}
    if not cfg.shared_classifier:
        shapes["output"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention_norm"] = (d,)
        shapes[p + "ffn_norm"] = (d,)
        shapes[p + "wq"] = (cfg.n_heads * hs, d)
        shapes[p + "wk"] = (cfg.n_kv_heads * hs, d)
        shapes[p + "wv"] = (cfg.n_kv_heads * hs, d)
        shapes[p + "wo"] = (d, cfg.n_heads * hs)
        shapes[p + "w1"] = (h, d)
        shapes[p + "w2"] = (d, h)
        shapes[p + "w3"] = (h, d)
        if getattr(cfg, "attention_bias", False):   # qwen2: q/k/v projection biases
            shapes[p + "bq"] = (cfg.n_heads * hs,)
            shapes[p + "bk"] = (cfg.n_kv_heads * hs,)
            shapes[p + "bv"] = (cfg.n_kv_heads * hs,)
    return shapes


def validate_weights(cfg, weights, source: str = "model") -> None:
    """Check that every tensor is present with the right shape, dtype and finite scales. A
    LazyWeights is checked for names only: each of its tensors is checked when it is made."""
    lazy = isinstance(weights, LazyWeights)
    for name, shape in expected_shapes(cfg).items():
        if name not in weights:
            raise ModelFormatError(f"{source}: missing tensor {name!r} (expected shape {shape})")
        if not lazy:
            validate_tensor(name, weights[name], shape, source)


def validate_tensor(name: str, t, shape: tuple, source: str = "model") -> None:
    """Check one tensor: shape, dtype, 4-bit value range, finite scales and offsets."""
    if isinstance(t, QTensor):
        if t.bits not in (4, 8):
            raise ModelFormatError(f"{source}: tensor {name!r} has bits={t.bits!r}, expected 4 or 8")
        qtypes = (np.int8,) if t.bits == 8 else (np.uint8, np.int8)
        if t.q.shape != shape or t.q.dtype not in qtypes:
            raise ModelFormatError(f"{source}: tensor {name!r} has shape {t.q.shape} {t.q.dtype}, "
                                   f"expected {shape} {'int8' if t.bits == 8 else 'uint8'}")
        if t.bits == 4 and t.q.size and not (0 <= int(t.q.min()) and int(t.q.max()) <= 15):
            raise ModelFormatError(f"{source}: tensor {name!r}: 4-bit values must lie in 0..15")
        if t.s.shape != (shape[0], shape[1] // t.group_size) or t.s.dtype != np.float32:
            raise ModelFormatError(f"{source}: tensor {name!r} has scales of shape {t.s.shape}, "
                                   f"expected {(shape[0], shape[1] // t.group_size)}")
        if not np.isfinite(t.s).all():
            raise ModelFormatError(f"{source}: tensor {name!r} has a NaN or infinite scale")
        if t.m is not None:
            if t.m.shape != t.s.shape or t.m.dtype != np.float32:
                raise ModelFormatError(f"{source}: tensor {name!r} has offsets of shape {t.m.shape} "
                                       f"{t.m.dtype}, expected {t.s.shape} float32")
            if not np.isfinite(t.m).all():
                raise ModelFormatError(f"{source}: tensor {name!r} has a NaN or infinite offset")
    else:
        if tuple(t.shape) != shape:
            raise ModelFormatError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
        if t.dtype != np.float32:
            raise ModelFormatError(f"{source}: tensor {name!r} has dtype {t.dtype}, expected float32")


class LazyWeights(Mapping):
    """A weights dict whose tensors are made when asked for, one at a time, and not kept: the
    form Model.load asks the loaders for (load_any(..., lazy=True)), so that the engine packs
    each matrix while it is the only one that exists unpacked, and nothing of the file but
    what the engine keeps survives the load. Each tensor is validated as it is made.

    names: the tensors' names in the order the engine reads them (any order works);
    make(name): the tensor; shapes: name -> expected shape (for validation);
    release(): drops the source's resident pages (e.g. madvise(MADV_DONTNEED) on the file
    map) once the engine has packed what it needs; pages still read in place (an untied
    embedding used from the map) fault back in as they are read.
    Reading a tensor twice makes it twice: use dict(lazy) for a materialized copy.
    """

    def __init__(self, shapes: dict, make, source: str = "model", release=None):
        self._shapes = dict(shapes)
        self._make = make
        self._source = source
        self._release = release

    def __getitem__(self, name):
        shape = self._shapes[name]          # KeyError for an unknown name
        t = self._make(name)
        validate_tensor(name, t, shape, self._source)
        return t

    def __contains__(self, name):
        return name in self._shapes

    def __iter__(self):
        return iter(self._shapes)

    def __len__(self):
        return len(self._shapes)

    def release(self) -> None:
        """Give back the source's resident pages (see the class docstring); idempotent."""
        if self._release is not None:
            self._release()


def quantize_weights(cfg, weights: dict, group_size: int = 64, progress=None, bits: int = 8) -> dict:
    """Return a new dict with every matrix (embedding and classifier included) quantized to
    `bits` (8: quantize_q8, symmetric; 4: quantize_q4, asymmetric, but the token embedding and
    classifier at 8 bits, loaders.dtypes.EIGHT_BIT_IN_Q4); norms stay fp32. QTensors
    already at `group_size` are kept exactly (offsets m included; for bits 8 a 4-bit one is
    widened, widen_to_int8); others are requantized from their dequantized values.
    progress(name, old, new) is called per tensor.
    Raises ValueError if group_size does not divide an input dimension (or, for 4 bits, is not
    a multiple of 8)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    from .loaders.dtypes import EIGHT_BIT_IN_Q4    # (loaders.dtypes imports this module)
    quant = quantize_q8 if bits == 8 else quantize_q4
    out = {}
    for name, t in weights.items():
        keep8 = bits == 4 and name in EIGHT_BIT_IN_Q4 and not (isinstance(t, QTensor) and t.bits == 4)
        if isinstance(t, QTensor) and t.group_size == group_size and t.bits <= bits:
            out[name] = widen_to_int8(t) if bits == 8 else t
        elif isinstance(t, QTensor) and keep8 and t.group_size == group_size:
            out[name] = t
        elif np.ndim(t if not isinstance(t, QTensor) else t.q) == 2:
            out[name] = (quantize_q8 if keep8 else quant)(as_fp32(t), group_size, name)
        else:
            out[name] = t
        if progress is not None:
            progress(name, t, out[name])
    return out


def widen_to_int8(t: QTensor) -> QTensor:
    """A bits-4 QTensor as a bits-8 one with the same q, s and m (exact: q * s + m is the same
    float32 computation); bits-8 tensors are returned as they are."""
    if t.bits == 8:
        return t
    return QTensor(t.q.astype(np.int8), t.s, t.group_size, t.m, bits=8)


def dequantize_weights(weights: dict) -> dict:
    return {k: as_fp32(v) for k, v in weights.items()}


def fit_group_size(config: Config, gs: int, multiple: int = 4) -> int:
    """Largest group size <= gs dividing every matrix input dimension (halving, as llama2.c's
    export does, down to `multiple`: the int8 kernels take 4 inputs per step, the 4-bit ones
    8), with a warning when it had to back off."""
    want = gs
    dims = {config.dim, config.hidden_dim, config.n_heads * config.head_size}
    while gs > multiple and any(d % gs for d in dims):
        gs //= 2
    if gs % multiple or any(d % gs for d in dims):
        raise ValueError(f"no group size that is a multiple of {multiple} divides the model's "
                         f"dimensions {sorted(dims)}; use dtype='fp32'")
    if gs != want:
        warnings.warn(f"group size {want} does not divide the model's dimensions {sorted(dims)}; "
                      f"using {gs}")
    return gs
