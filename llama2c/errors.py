"""Exceptions raised by llama2c. All derive from Llama2cError (and from ValueError where the
problem is bad input), so callers can catch one type."""


class Llama2cError(Exception):
    """Base class of every error llama2c raises on purpose."""


class ModelFormatError(Llama2cError, ValueError):
    """A model file is missing, truncated, or its contents are inconsistent."""


class TokenizerError(Llama2cError, ValueError):
    """A tokenizer file is malformed or does not match the model."""


class ContextLengthError(Llama2cError, ValueError):
    """A prompt (plus generation) does not fit in the model's context."""


class GenerationCancelled(Llama2cError):
    """A running forward pass or generation was cancelled (Session.request_cancel, a cancel
    handle, max_time)."""


class KVCacheFullError(Llama2cError, RuntimeError):
    """A KV pool has too few free blocks for a request (nothing was run): wait for other
    sequences to finish or give the pool a larger budget."""


class QueueFullError(Llama2cError, RuntimeError):
    """A batch scheduler's queue of waiting requests is full (its max_queue): retry later."""
