"""llama2c: fast CPU inference of Llama-architecture language models.

    >>> import llama2c
    >>> model = llama2c.Model.load("stories15M.bin", tokenizer="tokenizer.bin")
    >>> print(model.generate("Once upon a time", max_new_tokens=64).text)

The compiled engine is imported on first use, so pure-Python parts (llama2c.reference,
llama2c.tokenizer, the loaders) import without it.
"""
from .config import Config
from .errors import Llama2cError, ModelFormatError, TokenizerError, ContextLengthError

__version__ = "0.1.0"

__all__ = ["Model", "Tokenizer", "Config", "GenerationResult", "kernel_info", "Llama2cError",
           "ModelFormatError", "TokenizerError", "ContextLengthError", "__version__"]


def __getattr__(name):
    if name in ("Model", "GenerationResult"):
        from . import model
        return getattr(model, name)
    if name == "Tokenizer":
        from .tokenizer import Tokenizer
        return Tokenizer
    if name in ("kernel_info", "set_simd"):
        from . import _engine
        return getattr(_engine, name)
    raise AttributeError(f"module 'llama2c' has no attribute {name!r}")
