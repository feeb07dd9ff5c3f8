"""llama2c: fast CPU inference of Llama-architecture language models.

    >>> import llama2c
    >>> model = llama2c.Model.load("smollm2")
    >>> print(model.generate("Once upon a time", max_new_tokens=64, stop=["\\n\\n"]).text)

The compiled engine is imported on first use, so pure-Python parts (llama2c.reference,
llama2c.tokenizer, the loaders) import without it.
"""
from .config import Config
from .errors import (Llama2cError, ModelFormatError, TokenizerError, ContextLengthError,
                     GenerationCancelled)

__version__ = "0.1.0"

_GENERATION = ("GenerationResult", "GenerationStream", "GenerationSession", "StreamChunk",
               "Usage", "TokenLogprob", "ScoreResult", "CancelToken", "GenerationOptions")

__all__ = ["Model", "Tokenizer", "Config", "kernel_info", "Llama2cError", "ModelFormatError",
           "TokenizerError", "ContextLengthError", "GenerationCancelled", "__version__",
           *_GENERATION]


def __getattr__(name):
    if name == "Model":
        from .model import Model
        return Model
    if name in _GENERATION:
        from . import generation
        return getattr(generation, name)
    if name == "Tokenizer":
        from .tokenizer import Tokenizer
        return Tokenizer
    if name in ("kernel_info", "set_simd"):
        from . import _engine
        return getattr(_engine, name)
    raise AttributeError(f"module 'llama2c' has no attribute {name!r}")
