"""Model file loaders. Each returns (Config, weights, metadata) in llama2c's weights convention
(see llama2c/weights.py); `load_any` picks the loader from the file itself."""
from __future__ import annotations

from pathlib import Path

from ..errors import ModelFormatError


def load_any(path, dtype=None):
    """Load a GGUF file (magic b'GGUF'), a Hugging Face directory (config.json + safetensors)
    or, for anything else, a llama2.c checkpoint. dtype 'auto' is as stored, with a GGUF
    file's quantized blocks mapped exactly to int8."""
    p = Path(path)
    if not p.exists():
        raise ModelFormatError(f"{path}: model path does not exist")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelFormatError(f"{path}: directory has no config.json (expected a Hugging Face model)")
        from .hf import load_hf
        return load_hf(p, None if dtype == "auto" else dtype)
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot open model file ({e.strerror})") from None
    if magic == b"GGUF":
        from .gguf import load_gguf
        return load_gguf(p, dtype)
    from .llama2c_bin import load_llama2c_bin
    return load_llama2c_bin(p, None if dtype == "auto" else dtype)
