"""llama2c: fast CPU inference of Llama-architecture language models.

    >>> import llama2c
    >>> model = llama2c.Model.load("smollm2")
    >>> print(model.generate("Once upon a time", max_new_tokens=64, stop=["\\n\\n"]).text)

The compiled engine is imported on first use, so pure-Python parts (llama2c.reference,
llama2c.tokenizer, the loaders) import without it.
"""
import os as _os

# OpenMP's threads wait between the engine's parallel regions (hundreds per token). libgomp
# spins ~300,000 iterations by default before sleeping: fastest on an idle machine, a collapse
# when other processes or this process's Python threads want the same cores (the spinning
# threads take their time slices). A short spin keeps the idle speed and avoids the collapse
# (benchmarks/spin_wait.py measures both); OMP_WAIT_POLICY or GOMP_SPINCOUNT set by the user
# win, and LLAMA2C_OMP_DEFAULTS=0 leaves libgomp's own default. libgomp reads these when the
# engine loads, after this.
if (_os.environ.get("LLAMA2C_OMP_DEFAULTS", "1") != "0"
        and "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ):
    _os.environ["GOMP_SPINCOUNT"] = "20000"
    _OMP_SPIN_DEFAULT = True        # ours, not the user's: llama2c serve replaces it
else:
    _OMP_SPIN_DEFAULT = False

from .config import Config  # noqa: E402
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
