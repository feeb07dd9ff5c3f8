"""What `dtype=` means, the same in every loader (llama2.c .bin, GGUF, Hugging Face).

    None / "auto"  as stored, exactly: quantized blocks as QTensor (llama2.c v2: int8 groups;
                   GGUF: each block type's exact QTensor, bits 4 or 8), float weights float32
    "fp32"         every matrix dequantized to float32
    "int8"         every matrix a bits-8 QTensor: exact where the stored blocks already are
                   (GGUF 4-bit types are widened, same q/s/m), else quantize_q8 at `group_size`
                   (default: 32 for GGUF, 64 otherwise, halved until it divides the widths)
    "q4"           every matrix a bits-4 QTensor (but the token embedding and the classifier,
                   EIGHT_BIT_IN_Q4, kept at 8 bits unless stored in 4): exact for GGUF
                   Q4_0/Q4_1/Q4_K/Q3_K/Q2_K, else the 4-bit quantizer at `group_size` (default
                   32, halved down to 8 to fit)

With "int8" or "q4", a given `group_size` also replaces the stored group size: stored tensors
whose (exact) group size differs are requantized from their dequantized values (None and
"fp32" ignore it). Norms and biases are always float32.
"""
from __future__ import annotations

import numpy as np

from ..weights import QTensor, as_fp32, fit_group_size, quantize_q8, widen_to_int8

DTYPES = (None, "auto", "fp32", "int8", "q4")
# "q4" leaves these at 8 bits unless the file stores them in 4 (llama.cpp's 4-bit mixes keep the
# output matrix at 6 to 8 bits too): the token embedding, which is also the classifier of tied
# models, and the classifier. On SmolLM2 (tied) 4-bit there drops the top-1 agreement with fp32
# on alice.txt from 99.9% to 80% (perplexity 25.26 -> 26.94) for 12 MB less read per token.
EIGHT_BIT_IN_Q4 = frozenset({"tok_embeddings", "output"})


def check_dtype(dtype) -> str | None:
    """The canonical dtype: None for None/'auto', 'fp32' (also 'float32'), 'int8' or 'q4'."""
    if dtype == "float32":
        return "fp32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be None, 'auto', 'fp32', 'int8' or 'q4', got {dtype!r}")
    return None if dtype == "auto" else dtype


def check_group_size_arg(group_size) -> int | None:
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    return int(group_size)


def quantize_q4(w: np.ndarray, group_size: int = 32, name: str = "tensor") -> QTensor:
    """4-bit load-time quantization: llama2c.weights.quantize_q4 (the engine's reference
    quantizer) when this build has it, else ggml's Q4_1 reference quantizer (min/max per group,
    f16 scale and offset)."""
    from .. import weights
    engine_quantizer = getattr(weights, "quantize_q4", None)
    if engine_quantizer is not None:
        return engine_quantizer(w, group_size, name)
    from .ggml_quants import quantize_q4_1
    return quantize_q4_1(w, name, group_size)


def default_group_size(cfg, dtype: str, group_size: int | None, default: int) -> int:
    """The group size for load-time quantization: the given one (it must fit), or `default`
    halved until it divides every matrix width (with a warning), down to 4 (int8) / 8 (q4)."""
    multiple = 8 if dtype == "q4" else 4
    if group_size is not None:
        widths = sorted({cfg.dim, cfg.hidden_dim, cfg.q_dim})
        if group_size % multiple or any(w % group_size for w in widths):
            raise ValueError(f"group size {group_size} must be a multiple of {multiple} that "
                             f"divides the model's matrix widths {widths}")
        return group_size
    return fit_group_size(cfg, default, multiple)


def convert_matrix(t, dtype: str | None, group_size: int | None, name: str,
                   fallback_group_size: int | None = None, dequantized=None):
    """One matrix (float32 array or QTensor) in the representation dtype asks for.

    group_size None keeps exact QTensors at their own group size; fallback_group_size is the
    group size for quantizing a float matrix then. dequantized: the float32 values to
    requantize from (default as_fp32(t)).
    """
    if dtype is None:
        return t
    if dtype == "fp32":
        return dequantized if dequantized is not None else as_fp32(t)
    want_bits = 8 if dtype == "int8" else 4
    if want_bits == 4 and name in EIGHT_BIT_IN_Q4 and not (isinstance(t, QTensor) and t.bits == 4):
        want_bits = 8
    if isinstance(t, QTensor) and (group_size is None or t.group_size == group_size):
        if want_bits == 8:
            return widen_to_int8(t)
        if t.bits == 4:
            return t
    gs = group_size or fallback_group_size
    w = dequantized if dequantized is not None else as_fp32(t)
    return quantize_q8(w, gs, name) if want_bits == 8 else quantize_q4(w, gs, name)


def conversion_group_sizes(cfg, dtype: str | None, group_size: int | None, default: int,
                           matrices) -> tuple:
    """(group_size, fallback) for convert_matrix: the requested group size (checked) and the
    one for matrices with no exact form in `dtype`. matrices: the stored matrices (float32
    arrays or QTensors), or None when they are all float32."""
    fallback = None
    default = default if dtype == "int8" else 32
    if dtype in ("int8", "q4"):
        if group_size is not None:
            group_size = fallback = default_group_size(cfg, dtype, group_size, default)
        elif matrices is None or any(not isinstance(t, QTensor) or (dtype == "q4" and t.bits != 4)
                                     for t in matrices):
            fallback = default_group_size(cfg, dtype, None, default)
    return group_size, fallback


def convert_weights(cfg, weights: dict, dtype: str | None, group_size: int | None,
                    default: int) -> dict:
    """Every 2-D tensor through convert_matrix; vectors (norms, biases) unchanged. `default` is
    the int8 group size for float matrices (fitted to the model's widths) when none is given;
    q4 always defaults to 32."""
    if dtype is None:
        return weights
    matrices = [t for t in weights.values() if np.ndim(getattr(t, "q", t)) == 2]
    group_size, fallback = conversion_group_sizes(cfg, dtype, group_size, default, matrices)
    return {name: convert_matrix(t, dtype, group_size, name, fallback)
            if np.ndim(getattr(t, "q", t)) == 2 else t for name, t in weights.items()}


def convert_weights_lazy(cfg, stored, dtype: str | None, group_size: int | None, default: int,
                         source: str, release=None, all_float: bool = False):
    """convert_weights as a llama2c.weights.LazyWeights: each tensor of `stored` (a mapping,
    itself possibly lazy) converted when it is read. all_float: the stored matrices are all
    float32 (so they need not be made to choose the group sizes)."""
    from ..weights import LazyWeights, expected_shapes
    shapes = expected_shapes(cfg)
    names = [n for n in stored if n in shapes]
    if dtype is None:
        group_size = fallback = None
    else:
        matrices = None if all_float else [stored[n] for n in names if len(shapes[n]) == 2]
        group_size, fallback = conversion_group_sizes(cfg, dtype, group_size, default, matrices)
        del matrices

    def make(name):
        t = stored[name]
        return convert_matrix(t, dtype, group_size, name, fallback) if len(shapes[name]) == 2 else t

    return LazyWeights({n: shapes[n] for n in names}, make, source, release)


def describe(weights: dict) -> tuple:
    """(dtype, group_size) of a weights dict: dtype 'fp32', 'int8' (all matrices bits 8),
    'q4' (all bits 4) or 'mixed'; group_size the quantized matrices' common group size, or
    None (no quantized matrices, or several sizes)."""
    kinds, sizes = {}, set()
    for name, t in weights.items():
        if isinstance(t, QTensor):
            kinds[name] = "int8" if t.bits == 8 else "q4"
            sizes.add(t.group_size)
        elif np.ndim(t) == 2:
            kinds[name] = "fp32"
    return dtype_label(kinds), (sizes.pop() if len(sizes) == 1 else None)


def dtype_label(kinds: dict) -> str:
    """'fp32', 'int8', 'q4' or 'mixed' for {matrix name: its kind}: 'q4' also when only the
    token embedding and classifier are int8 (what dtype='q4' makes, and the common 4-bit GGUF
    files: Q4_0/Q4_1 with a Q8_0 or Q6_K embedding)."""
    every = set(kinds.values())
    if len(every) <= 1:
        return every.pop() if every else "fp32"
    body = {k for n, k in kinds.items() if n not in EIGHT_BIT_IN_Q4}
    ends = {k for n, k in kinds.items() if n in EIGHT_BIT_IN_Q4}
    return "q4" if body == {"q4"} and ends <= {"int8", "q4"} else "mixed"
