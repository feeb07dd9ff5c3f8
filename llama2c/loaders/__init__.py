"""Model file loaders. Each returns (Config, weights, metadata) in llama2c's weights convention
(see llama2c/weights.py); `load_any` recognises the format from the file itself (sniff_format)
and `dtype` means the same in every loader (see loaders/dtypes.py)."""
from __future__ import annotations

import mmap
import struct
from pathlib import Path

from ..errors import ModelFormatError
from .dtypes import check_dtype, check_group_size_arg

LLAMA2C_MAGIC = 0x616B3432  # "ak42" read as a little-endian uint32 (llama2.c v1/v2 files)

# Magic bytes of formats people try to load that llama2c does not read, with a hint.
_FOREIGN = [
    (b"PK\x03\x04", "a zip archive (a PyTorch .pt/.pth checkpoint?); export it to GGUF, "
                    "safetensors or llama2.c first"),
    (b"FUGG", "a big-endian GGUF file; only little-endian GGUF is supported"),
    (b"lmgg", "a legacy GGML file (pre-GGUF); re-convert the model with a current llama.cpp"),
    (b"fmgg", "a legacy GGMF file (pre-GGUF); re-convert the model with a current llama.cpp"),
    (b"tjgg", "a legacy GGJT file (pre-GGUF); re-convert the model with a current llama.cpp"),
    (b"\x89HDF", "an HDF5 file (Keras?); export it to GGUF, safetensors or llama2.c first"),
]


def sniff_format(path) -> str:
    """'gguf', 'llama2c' (v1/v2 magic, or no magic: a legacy v0 header, which the llama2.c
    loader then checks against the file size) or 'hf' (a directory with config.json).
    Raises ModelFormatError for a missing path or a recognisably foreign file."""
    p = Path(path)
    if not p.exists():
        raise ModelFormatError(f"{path}: model path does not exist")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelFormatError(f"{path}: directory has no config.json (expected a Hugging "
                                   f"Face model directory)")
        return "hf"
    try:
        with open(p, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot open model file ({e.strerror})") from None
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) >= 4 and struct.unpack_from("<I", head)[0] == LLAMA2C_MAGIC:
        return "llama2c"
    for magic, what in _FOREIGN:
        if head.startswith(magic):
            raise ModelFormatError(f"{path}: this is {what}")
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack_from("<Q", head)[0] < p.stat().st_size:
        raise ModelFormatError(f"{path}: this is a safetensors file; load its directory (with "
                               f"config.json) instead")
    return "llama2c"   # no magic: a legacy v0 header (7 int32), or nothing llama2c reads


def load_any(path, dtype=None, group_size: int | None = None, lazy: bool = False):
    """Load a GGUF file, a Hugging Face directory or a llama2.c checkpoint.

    dtype: None/'auto' (as stored, exactly), 'fp32', 'int8' or 'q4'; group_size: the group
    size for load-time quantization (and for requantizing stored groups of another size).
    See llama2c/loaders/dtypes.py for the full meaning, the same for every format.
    lazy: weights as a llama2c.weights.LazyWeights, each tensor made (converted, validated)
    when read and not kept, so the engine packs one matrix at a time (Model.load)."""
    dtype = check_dtype(dtype)
    group_size = check_group_size_arg(group_size)
    kind = sniff_format(path)
    if kind == "gguf":
        from .gguf import load_gguf
        return load_gguf(path, dtype, group_size, lazy=lazy)
    if kind == "hf":
        from .hf import load_hf
        return load_hf(path, dtype, group_size, lazy=lazy)
    from .llama2c_bin import load_llama2c_bin
    return load_llama2c_bin(path, dtype, group_size, lazy=lazy)


def drop_pages(mapping) -> None:
    """madvise(MADV_DONTNEED) on a read-only file map (where the OS has it): this process's
    resident pages of it go (the page cache keeps the data); pages read again fault back in.
    Loaders call it once the engine has packed the weights."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if mapping is not None and advice is not None and not mapping.closed:
        mapping.madvise(advice)
