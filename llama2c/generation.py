"""The generation core: options, the token loop, stop strings, log-probabilities, results and
stream chunks, sessions, the prompt cache and saved states.

Every way of generating runs through `Generation` here: Model.generate and Model.chat (with a
session from the model's PromptCache), GenerationSession.generate (Model.new_session), the
chat sessions of llama2c.chat and the CLI. Per generated token the loop makes one C call for
the forward pass (Session.eval, GIL released) and one for the sampler chain (Sampler.sample,
csrc/sampler.c), plus a few list operations.

    >>> s = model.new_session(seed=1)
    >>> r = s.generate("Once upon a time", max_new_tokens=32, stop=["."])
    >>> r.text, r.finish_reason, r.usage.decode_tokens_per_second
    >>> blob = s.save_state()                     # tokens, KV cache, logits, RNG
    >>> model.load_state(blob).generate(max_new_tokens=8)   # continues exactly like s would
"""
from __future__ import annotations

import json
import math
import numbers
import os
import struct
import threading
import time
import weakref
from collections import OrderedDict

try:    # hashlib's own blake2b, without hashlib loading OpenSSL (3.6 MB resident) with the model
    from _blake2 import blake2b
except ImportError:     # not CPython
    from hashlib import blake2b
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import _engine
from .errors import ContextLengthError, GenerationCancelled

# Tokens per prefill step: the batched kernels read each weight once per step, and between
# steps a cancel (or max_time) is noticed.
PREFILL_CHUNK = 64
RUN_SECONDS = 0.05      # the decode loop's runs in C take about this long (see Generation)
MAX_LOGPROBS = 20
DEFAULT_PROMPT_CACHE_BYTES = 256 << 20
DEFAULT_PROMPT_CACHE_ENTRIES = 4
FINISH_REASONS = ("stop", "length", "cancelled")

# ------------------------------------------------------------------------------------------
# options


def number(name, value, *, integer=False, minimum=0.0, maximum=None):
    """Validate a numeric argument; ValueError naming it for a wrong type, NaN/inf or a value
    out of range. Returns int or float."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
            integer and not isinstance(value, numbers.Integral)):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        rng = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {rng}, got {value!r}")
    return int(value) if integer else float(value)


@dataclass(frozen=True)
class GenerationOptions:
    """Every option of generate(), validated (GenerationOptions.make); the README's API table.

    The sampler applies, in this order (csrc/llama2c.h documents each rule): logit_bias,
    the penalties (repetition, presence, frequency over the last penalty_last_n tokens of the
    context, prompt included), temperature (0 = greedy: the argmax after bias and
    penalties), top_k, top_p, min_p, then a seeded draw.
    """
    max_new_tokens: int = 256          # most tokens to generate (the context may end sooner)
    temperature: float = 1.0           # 0 = greedy
    top_p: float = 0.9                 # nucleus: smallest set with this mass; 1 = off
    top_k: int = 0                     # keep the k most likely; 0 = off
    min_p: float = 0.0                 # keep tokens with p >= min_p * max p; 0 = off
    repetition_penalty: float = 1.0    # > 0; divides positive logits, multiplies negative; 1 = off
    presence_penalty: float = 0.0      # in [-2, 2]: subtracted once from each token seen
    frequency_penalty: float = 0.0     # in [-2, 2]: subtracted per occurrence
    penalty_last_n: int = 64           # window of the penalties (tokens of the context)
    logit_bias: tuple = ()             # ((token id, bias), ...); -inf bans a token
    seed: int | None = None            # None: random (sessions: their own RNG stream)
    stop: tuple = ()                   # strings that end generation (not part of the text)
    stop_token_ids: tuple | None = None  # ids that end generation (None: the model's EOS)
    logprobs: int | None = None        # k: each token's logprob and k alternatives (0..20)
    echo: bool = False                 # also the prompt's logprobs (k = logprobs or 0)
    max_time: float | None = None      # seconds; then finish_reason "cancelled"
    cancel: object = None              # CancelToken / threading.Event: set() to stop

    @classmethod
    def make(cls, vocab_size: int, **kwargs) -> "GenerationOptions":
        """Validated options from keyword arguments (TypeError for an unknown name, ValueError
        naming the argument for a bad value)."""
        unknown = set(kwargs) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        o = {**{k: f.default for k, f in cls.__dataclass_fields__.items()}, **kwargs}
        v = {}
        # counts larger than any context are clamped later (to the context / vocabulary)
        v["max_new_tokens"] = number("max_new_tokens", o["max_new_tokens"], integer=True)
        v["temperature"] = number("temperature", o["temperature"])
        v["top_p"] = number("top_p", o["top_p"], maximum=1.0)
        v["top_k"] = min(number("top_k", o["top_k"], integer=True), vocab_size)
        v["min_p"] = number("min_p", o["min_p"], maximum=1.0)
        rp = number("repetition_penalty", o["repetition_penalty"], minimum=None)
        if rp <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {o['repetition_penalty']!r}")
        v["repetition_penalty"] = rp
        v["presence_penalty"] = number("presence_penalty", o["presence_penalty"], minimum=-2.0,
                                       maximum=2.0)
        v["frequency_penalty"] = number("frequency_penalty", o["frequency_penalty"],
                                        minimum=-2.0, maximum=2.0)
        v["penalty_last_n"] = min(number("penalty_last_n", o["penalty_last_n"], integer=True),
                                  1 << 30)
        v["logit_bias"] = _logit_bias(o["logit_bias"], vocab_size)
        v["seed"] = None if o["seed"] is None else number("seed", o["seed"], integer=True,
                                                            maximum=2**64 - 1)
        v["stop"] = _stop_strings(o["stop"])
        ids = o["stop_token_ids"]
        if ids is not None:
            if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
                raise ValueError(f"stop_token_ids must be a list of token ids, got {ids!r}")
            ids = tuple(sorted({number("stop token id", i, integer=True, maximum=vocab_size - 1)
                                for i in ids}))
        v["stop_token_ids"] = ids
        lp = o["logprobs"]
        if lp is None or lp is False:
            lp = None
        elif lp is True:                  # the chosen tokens' logprobs, no alternatives
            lp = 0
        else:
            lp = number("logprobs", lp, integer=True, maximum=MAX_LOGPROBS)
        v["logprobs"] = lp
        if not isinstance(o["echo"], bool):
            raise ValueError(f"echo must be True or False, got {o['echo']!r}")
        v["echo"] = o["echo"]
        mt = o["max_time"]
        if mt is not None:
            mt = number("max_time", mt)
            if mt <= 0:
                raise ValueError(f"max_time must be > 0 seconds, got {o['max_time']!r}")
        v["max_time"] = mt
        cancel = o["cancel"]
        if cancel is not None and not callable(getattr(cancel, "is_set", None)):
            raise ValueError(f"cancel must be a llama2c.CancelToken or a threading.Event, "
                             f"got {type(cancel).__name__}")
        v["cancel"] = cancel
        return cls(**v)

    @property
    def penalties_on(self) -> bool:
        return self.penalty_last_n > 0 and (self.repetition_penalty != 1.0 or
                                            self.presence_penalty != 0.0 or
                                            self.frequency_penalty != 0.0)

    def sampler(self, vocab_size: int, seed: int, context: int) -> "_engine.Sampler":
        """The C sampler for these options, its RNG seeded with `seed` (the penalty window is
        at most the context)."""
        window = min(self.penalty_last_n, context) if self.penalties_on else 0
        return _engine.Sampler(vocab_size, self.temperature, self.top_p, self.top_k, seed,
                               min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                               presence_penalty=self.presence_penalty,
                               frequency_penalty=self.frequency_penalty,
                               penalty_last_n=window, logit_bias=dict(self.logit_bias) or None)


OPTION_NAMES = tuple(GenerationOptions.__dataclass_fields__)


def _logit_bias(bias, vocab_size) -> tuple:
    if bias is None:
        return ()
    items = bias.items() if isinstance(bias, dict) else bias
    try:
        items = list(items)
    except TypeError:
        raise ValueError(f"logit_bias must be a dict {{token id: bias}}, got {bias!r}") from None
    out = {}
    for item in items:
        if not isinstance(item, tuple) or len(item) != 2:
            raise ValueError(f"logit_bias must be a dict {{token id: bias}}, got {bias!r}")
        key, value = item
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            key = int(key)            # JSON object keys (the OpenAI API sends them as strings)
        key = number("logit_bias token id", key, integer=True, maximum=vocab_size - 1)
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and value == -math.inf:
            out[key] = -math.inf
        else:
            out[key] = number(f"logit_bias[{key}]", value, minimum=None)
    return tuple(sorted(out.items()))


def _stop_strings(stop) -> tuple:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, bytes) or not hasattr(stop, "__iter__"):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    out = []
    for s in stop:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {s!r}")
        if s not in out:
            out.append(s)
    return tuple(out)


class CancelToken:
    """Stops a generation from another thread: pass cancel=token to generate()/chat(), then
    token.cancel(). The call returns (or the stream ends) with finish_reason "cancelled" at the
    next token, or after the current prefill step (PREFILL_CHUNK tokens) of a long prompt.
    A threading.Event works the same way."""

    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    set = cancel

    def is_set(self) -> bool:
        return self._event.is_set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def reset(self) -> None:
        self._event.clear()

# ------------------------------------------------------------------------------------------
# results


@dataclass
class TokenLogprob:
    """A token and its log-probability under the model's raw distribution (log-softmax of the
    logits, before logit bias, penalties, temperature and truncation), with the k most likely
    tokens of that distribution as (token id, logprob) pairs, most likely first."""
    token_id: int
    logprob: float | None            # None for a prompt's first token (nothing predicts it)
    top: list = field(default_factory=list)


@dataclass
class Usage:
    """Token counts and timings of one call."""
    prompt_tokens: int = 0           # tokens of the context the answer continues (all of it)
    completion_tokens: int = 0       # tokens generated
    cached_tokens: int = 0           # prompt tokens whose keys/values came from a cache
    prefill_seconds: float = 0.0     # prompt evaluation, up to the first token's logits
    decode_seconds: float = 0.0      # from then to the end

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def prefill_tokens_per_second(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_seconds if self.prefill_seconds > 0 and n > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        n = self.completion_tokens
        return n / self.decode_seconds if self.decode_seconds > 0 and n > 0 else 0.0

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens, "cached_tokens": self.cached_tokens,
                "prefill_seconds": self.prefill_seconds, "decode_seconds": self.decode_seconds,
                "prefill_tokens_per_second": self.prefill_tokens_per_second,
                "decode_tokens_per_second": self.decode_tokens_per_second}


@dataclass
class GenerationResult:
    """What generate() and chat() return.

    text: the generated text (None without a tokenizer), without the stop string or the
        end-of-sequence token; with the prompt before it, it reads as the whole text.
    token_ids: every generated id, the end-of-sequence id or the tokens of a stop string
        included.
    finish_reason: "stop" (an end-of-sequence token or a stop string), "length"
        (max_new_tokens or the context is full) or "cancelled" (cancel, max_time, a closed
        stream).
    logprobs: with logprobs=k, a TokenLogprob per generated token.
    prompt_logprobs: with echo=True, a TokenLogprob per prompt token (the first has
        logprob None).
    stop_sequence: the stop string or stop token id that ended generation, if any.
    """
    text: str | None
    token_ids: list
    prompt_token_ids: list
    finish_reason: str
    usage: Usage = field(default_factory=Usage)
    logprobs: list | None = None
    prompt_logprobs: list | None = None
    stop_sequence: str | int | None = None

    @property
    def prompt_seconds(self) -> float:
        return self.usage.prefill_seconds

    @property
    def generate_seconds(self) -> float:
        return self.usage.prefill_seconds + self.usage.decode_seconds

    @property
    def tokens_per_second(self) -> float:
        return self.usage.decode_tokens_per_second

    def __str__(self) -> str:
        return self.text if self.text is not None else " ".join(map(str, self.token_ids))


@dataclass
class StreamChunk:
    """One item of a stream: the text that became final with this step (it may be "": text
    that could still turn into a stop string is held back), the ids sampled in it, their
    logprobs when asked; the last chunk carries finish_reason and usage."""
    text: str
    token_ids: list
    logprobs: list | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    prompt_logprobs: list | None = None   # with echo=True, on the first chunk only
    stop_sequence: str | int | None = None

    def __str__(self) -> str:
        return self.text


@dataclass
class ScoreResult:
    """Model.score: the log-probability of each token given the ones before it.
    logprobs[i] belongs to token_ids[i + 1] (the first token has nothing to be predicted
    from); top_ids / top_logprobs (n - 1, k) hold the k most likely tokens at each step."""
    token_ids: list
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray

    @property
    def total(self) -> float:
        """Sum of the logprobs: log p(token_ids[1:] | token_ids[0])."""
        return float(np.sum(self.logprobs, dtype=np.float64))

# ------------------------------------------------------------------------------------------
# sessions


def common_prefix(a: list, b: list) -> int:
    """Length of the common prefix of two lists (slice comparisons run in C)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n           # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class GenerationSession:
    """A sequence of tokens with its KV cache, for multi-turn use (Model.new_session()).

    tokens: the sequence so far (prompts and generated tokens); the cache holds all of them
    except, after a generation, the last sampled token (it is fed first on the next call).
    generate(prompt) appends the prompt to the sequence and continues it; generate() with no
    prompt continues the sequence as it is. With seed=None a call draws from the session's own
    RNG (seeded by Model.new_session(seed=...)), so a saved and reloaded session continues
    with the same draws. Not shared between threads.
    """

    def __init__(self, model, engine_session, seed: int | None = None, weak: bool = False):
        # a prompt cache's sessions refer to their model weakly: no model <-> cache cycle
        self._model = weakref.ref(model) if weak else model
        self._weak = weak
        self._sess = engine_session
        self._tokens: list = []
        self._logits = None          # logits after _tokens[-1] when the cache holds them all
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self._rng_state = _engine.seed_state(number("seed", seed, integer=True,
                                                    maximum=2**64 - 1))

    # ---- state ---------------------------------------------------------------------------

    @property
    def model(self):
        return self._model() if self._weak else self._model

    @property
    def context_length(self) -> int:
        return self._sess.context

    @property
    def engine_session(self):
        """The C session under this one (llama2c._engine.Session: eval, truncate, n_tokens,
        ...), for a driver that runs the forward passes itself and calls Generation.step."""
        return self._sess

    @property
    def tokens(self) -> list:
        return list(self._tokens)

    @property
    def n_tokens(self) -> int:
        return len(self._tokens)

    @property
    def n_cached(self) -> int:
        """Positions whose keys and values the cache holds (<= n_tokens)."""
        return self._sess.n_tokens

    @property
    def kv_bytes(self) -> int:
        """Bytes of keys and values for the cached positions (fp32 accounting)."""
        return self._sess.n_tokens * self.model._kv_bytes_per_token()

    def truncate(self, n: int) -> None:
        """Keep the first n tokens (and their cache)."""
        n = number("n", n, integer=True, maximum=len(self._tokens))
        if n < len(self._tokens):
            del self._tokens[n:]
            self._logits = None
        if self._sess.n_tokens > n:
            self._sess.truncate(n)

    def reset(self) -> None:
        """Forget every token."""
        self.truncate(0)

    def set_context(self, ids) -> int:
        """Make `ids` the sequence, keeping the cache of the prefix it shares with the current
        one; returns how many positions were kept."""
        ids = [int(t) for t in ids]
        keep = common_prefix(self._tokens[:self._sess.n_tokens], ids)
        if keep == len(ids) == len(self._tokens) == self._sess.n_tokens:
            return keep                      # same sequence: logits stay valid
        self._logits = None
        if self._sess.n_tokens > keep:
            self._sess.truncate(keep)
        self._tokens = ids
        return keep

    # ---- generation ----------------------------------------------------------------------

    def generate(self, prompt=None, *, stream: bool = False, special: bool = False, **options):
        """Append `prompt` (text, or token ids; None: nothing) and generate a continuation.
        Options and the result are those of Model.generate."""
        opts = GenerationOptions.make(self.model.vocab_size, **options)
        new = [] if prompt is None else self.model.encode_prompt(
            prompt, bos=not self._tokens, special=special).tolist()
        context = self._tokens + new
        if not context:
            raise ValueError("the prompt is empty: give at least one token")
        if len(context) > self.context_length:
            raise ContextLengthError(f"the session holds {len(self._tokens)} tokens; with "
                                     f"{len(new)} more they do not fit its context of "
                                     f"{self.context_length}")
        self.set_context(context)
        run = Generation(self.model, self, opts, session_rng=True)
        return run.stream() if stream else run.result()

    # ---- saved state ---------------------------------------------------------------------

    def save_state(self, path=None) -> bytes:
        """The session as bytes (and written to `path` if given): tokens, the cached keys and
        values, the last logits and the RNG state. Model.load_state(bytes or path) continues
        from it exactly, on the same model (a state from another model is refused)."""
        kv = self._sess.export_kv()
        logits = b"" if self._logits is None else np.asarray(self._logits, np.float32).tobytes()
        header = json.dumps({
            "model": self.model.fingerprint, "tokens": self._tokens,
            "n_cached": self._sess.n_tokens, "rng_state": int(self._rng_state),
            "context_length": self._sess.context, "kv_bytes": len(kv),
            "logits_bytes": len(logits), "version": STATE_VERSION}).encode()
        data = b"".join((STATE_MAGIC, struct.pack("<I", len(header)), header, kv, logits))
        if path is not None:
            Path(path).write_bytes(data)
        return data


STATE_MAGIC = b"L2CSTATE"
STATE_VERSION = 1


def load_state(model, data, engine_session_factory) -> GenerationSession:
    """Model.load_state: a GenerationSession from save_state()'s bytes (or a file of them)."""
    if isinstance(data, (str, os.PathLike)):
        data = Path(data).read_bytes()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"load_state expects bytes or a path, got {type(data).__name__}")
    data = bytes(data)
    if data[:8] != STATE_MAGIC or len(data) < 12:
        raise ValueError("not a llama2c session state (bad magic)")
    (n,) = struct.unpack_from("<I", data, 8)
    try:
        h = json.loads(data[12:12 + n])
    except ValueError:
        raise ValueError("corrupt session state: unreadable header") from None
    if h.get("version") != STATE_VERSION:
        raise ValueError(f"session state version {h.get('version')!r}, this llama2c reads "
                         f"{STATE_VERSION}")
    if h.get("model") != model.fingerprint:
        raise ValueError("this session state was saved from a different model (or weights, "
                         "dtype or build); it cannot continue on this one")
    kv_end = 12 + n + h["kv_bytes"]
    if len(data) != kv_end + h["logits_bytes"]:
        raise ValueError("corrupt session state: truncated or padded")
    tokens, n_cached = h["tokens"], h["n_cached"]
    if not 0 <= n_cached <= len(tokens) or any(
            not isinstance(t, int) or not 0 <= t < model.vocab_size for t in tokens):
        raise ValueError("corrupt session state: bad tokens")
    context = max(h["context_length"], len(tokens))
    if context > model.context_length:
        raise ContextLengthError(f"the state holds {len(tokens)} tokens of a {context}-position "
                                 f"context; this model was loaded with {model.context_length}")
    sess = GenerationSession(model, engine_session_factory(context), seed=1)
    logits = None
    if h["logits_bytes"]:
        logits = np.frombuffer(data[kv_end:], dtype=np.float32).copy()
    sess._sess.import_kv(data[12 + n:kv_end], n_cached, logits)
    sess._tokens = list(tokens)
    sess._logits = logits if n_cached == len(tokens) else None
    sess._rng_state = h["rng_state"]
    return sess

# ------------------------------------------------------------------------------------------
# the prompt cache


class PromptCache:
    """Idle sessions of a model, most recently used last, each holding the keys and values of
    its last tokens. generate() and chat() take the one sharing the longest prefix with their
    prompt and run only the rest, so a repeated system prompt or chat history is not run
    again; results are the same as without it.

    max_bytes: budget for the cached keys and values (fp32 accounting: 2 x n_layers x
        n_kv_heads x head_size x 4 bytes per position); 0 turns reuse off.
    max_entries: sessions kept.
    """

    def __init__(self, model, max_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
                 max_entries: int = DEFAULT_PROMPT_CACHE_ENTRIES):
        self.bytes_per_token = int(model._kv_bytes_per_token())
        self._model = weakref.ref(model)      # the model owns the cache
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.max_bytes = max_bytes
        self.max_entries = max_entries

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value) -> None:
        self._max_bytes = number("prompt_cache_bytes", value, integer=True)
        self._trim()

    @property
    def max_entries(self) -> int:
        return self._max_entries

    @max_entries.setter
    def max_entries(self, value) -> None:
        self._max_entries = number("max_entries", value, integer=True, minimum=1)
        self._trim()

    @property
    def enabled(self) -> bool:
        return self._max_bytes > 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(s.n_cached for s in self._entries.values()) * self.bytes_per_token

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def acquire(self, ids: list, reuse: bool = True) -> GenerationSession:
        """A session (taken out of the cache) whose sequence is `ids`, keeping the longest
        cached prefix when reuse is on."""
        best, best_n = None, 0
        with self._lock:
            full = len(self._entries) >= self._max_entries
            if reuse and self.enabled:
                for key, s in self._entries.items():
                    n = common_prefix(s._tokens[:s.n_cached], ids)
                    # below capacity, take over an entry only if it covers half the prompt
                    # or all of the entry is reused (llama.cpp's slot similarity rule)
                    if n > best_n and (full or 2 * n >= len(ids) or n == s.n_cached):
                        best, best_n = key, n
            if best is None:
                # no useful prefix: an empty idle session, else (at capacity) the least
                # recently used one, else a new one
                best = next((k for k, s in self._entries.items() if s.n_cached == 0), None)
                if best is None and full:
                    best = next(iter(self._entries))
            sess = self._entries.pop(best) if best is not None else None
        if sess is None:
            model = self._model()
            sess = GenerationSession(model, model._engine_session(model.context_length), seed=1,
                                     weak=True)
        if not reuse or not self.enabled:
            sess.reset()
        sess._sess.n_threads = sess.model.n_threads
        sess.set_context(ids)
        return sess

    def release(self, sess: GenerationSession) -> None:
        """Return a session after use; the least recently used ones go beyond the budget."""
        limit = self._max_bytes // max(self.bytes_per_token, 1)
        if sess.n_cached > limit:
            sess.truncate(limit)       # keep what fits (a prefix is still reusable)
        with self._lock:
            self._entries[id(sess)] = sess
            self._trim_locked()

    def _trim(self) -> None:
        if hasattr(self, "_max_entries") and hasattr(self, "_max_bytes"):
            with self._lock:
                self._trim_locked()

    def _trim_locked(self) -> None:
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        total = sum(s.n_cached for s in self._entries.values()) * self.bytes_per_token
        while total > self._max_bytes and self._entries:
            _, s = self._entries.popitem(last=False)
            total -= s.n_cached * self.bytes_per_token

# ------------------------------------------------------------------------------------------
# the token loop


class _Cancelled(Exception):
    pass


class _StopText:
    """Text release with stop strings: text that could still become a stop string is held
    back; a stop string found ends the text just before it."""

    def __init__(self, stops: tuple):
        self.stops = stops
        self.held = ""
        self.matched = None

    def push(self, piece: str) -> str:
        """Add decoded text; return the part that is final."""
        if not self.stops:
            return piece
        text = self.held + piece
        cut, matched = -1, None
        for s in self.stops:
            i = text.find(s)
            if i >= 0 and (cut < 0 or i < cut):
                cut, matched = i, s
        if matched is not None:
            self.matched, self.held = matched, ""
            return text[:cut]
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


def _logprob_rows(rows: np.ndarray, targets: np.ndarray, k: int) -> list:
    """TokenLogprob for each row of logits (n, V) and its target id."""
    lp, ids, tlp = _engine.logprobs(rows, targets, k)
    return [TokenLogprob(int(t), float(lp[i]),
                         [(int(a), float(b)) for a, b in zip(ids[i], tlp[i])])
            for i, t in enumerate(targets)]


class Generation:
    """One generation on a session: prefill of the uncached tokens, then sample -> decode ->
    feed back until a stop, the length limit or a cancel. `stream()` yields StreamChunks;
    `result()` runs the same loop to the end and returns a GenerationResult.

    on_done: called with the session when the loop ends, however it ends (also when this
        constructor raises).
    stop_token_ids: the default stop ids (options.stop_token_ids overrides them; None: the
        model's end-of-sequence ids).
    session_rng: with options.seed None, draw from the session's RNG stream and advance it
        (else a random seed).
    """

    def __init__(self, model, session: GenerationSession, opts: GenerationOptions,
                 on_done=None, stop_token_ids=None, session_rng: bool = False):
        self.model, self.session, self.opts = model, session, opts
        self.on_done = on_done
        self._done = False
        try:
            self._setup(stop_token_ids, session_rng)
        except BaseException:
            self._finish()
            raise

    def _setup(self, stop_token_ids, session_rng) -> None:
        model, session, opts = self.model, self.session, self.opts
        session._sess.n_threads = model.n_threads
        tokens = session._tokens
        self.prompt_ids = list(tokens)
        context = session.context_length
        if not tokens:
            raise ValueError("the prompt is empty: give at least one token")
        if len(tokens) > context:
            raise ContextLengthError(f"the prompt has {len(tokens)} tokens but the context holds "
                                     f"{context}")
        # the last token need not be fed back: a full context still yields one token
        self.max_new = min(opts.max_new_tokens, context - len(tokens) + 1)
        stop = opts.stop_token_ids if opts.stop_token_ids is not None else (
            stop_token_ids if stop_token_ids is not None else model.stop_ids())
        self.stop_ids = frozenset(stop)
        self.own_rng = opts.seed is None and session_rng
        seed = opts.seed
        if seed is None:
            seed = 1 if self.own_rng else int.from_bytes(os.urandom(8), "little")
        self.sampler = opts.sampler(model.vocab_size, seed, context)
        if self.own_rng:
            self.sampler.rng_state = session._rng_state
        self._fill_window()
        self.usage = Usage(prompt_tokens=len(tokens))
        self.generated: list = []
        self.logprobs = [] if opts.logprobs is not None else None
        self.prompt_logprobs = None
        self.finish_reason = None
        self.stop_sequence = None
        self.text_parts: list = []
        self._t0 = time.perf_counter()      # reset when the loop starts (a stream may wait)
        self._deadline = None
        self._started = False
        self._usage_final = False
        self._prompt_lp_sent = False
        self._t_prefill = None
        self._decoder = None
        self._stops = _StopText(())

    # ---- public ------------------------------------------------------------------------

    def stream(self):
        """The stream object (an iterator of StreamChunk with close())."""
        return GenerationStream(self)

    def result(self) -> GenerationResult:
        for _ in self._chunks(per_token=self.opts.logprobs is not None):
            pass
        return self.make_result()

    def make_result(self) -> GenerationResult:
        tok = self.model.tokenizer
        return GenerationResult(
            text="".join(self.text_parts) if tok is not None else None,
            token_ids=list(self.generated), prompt_token_ids=self.prompt_ids,
            finish_reason=self.finish_reason or "cancelled", usage=replace(self.usage),
            logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs,
            stop_sequence=self.stop_sequence)

    # ---- the loop ----------------------------------------------------------------------

    def _cancelled(self) -> bool:
        c = self.opts.cancel
        return (c is not None and c.is_set()) or (
            self._deadline is not None and time.perf_counter() > self._deadline)

    def _prefill(self, gs: GenerationSession) -> np.ndarray:
        """Run the uncached tokens; returns the logits after the last one (V,)."""
        sess, toks = gs._sess, gs._tokens
        echo = self.opts.echo
        if echo and sess.n_tokens > 0:
            sess.truncate(0)                   # the prompt's logprobs need every row
            gs._logits = None
        self.usage.cached_tokens = sess.n_tokens
        if sess.n_tokens == len(toks) and gs._logits is not None:
            return gs._logits
        if sess.n_tokens == len(toks):         # all cached but no logits: run the last again
            sess.truncate(len(toks) - 1)
            self.usage.cached_tokens = sess.n_tokens
        arr = np.asarray(toks, dtype=np.int32)
        V = self.model.vocab_size
        rows = np.empty((min(PREFILL_CHUNK, len(toks)), V), np.float32) if echo else None
        k = self.opts.logprobs or 0
        plp = [TokenLogprob(int(toks[0]), None, [])] if echo else None
        logits = None
        start = sess.n_tokens
        while start < len(toks):
            if self._cancelled():
                raise _Cancelled
            end = min(start + PREFILL_CHUNK, len(toks))
            chunk = arr[start:end]
            if echo:
                out = sess.eval(chunk, logits="all", out=rows[:end - start])
                targets = arr[start + 1:end + 1]
                plp += _logprob_rows(out[:len(targets)], targets, k)
                logits = out[end - start - 1].copy() if end == len(toks) else None
            elif end == len(toks):
                logits = sess.eval(chunk, logits="last")
            else:
                sess.eval(chunk, logits="none")
            start = end
        self.prompt_logprobs = plp
        gs._logits = logits
        return logits

    def begin(self) -> None:
        """Start the clock and the text decoder (the loop calls it; so does a driver that runs
        the forward passes itself, before its prefill)."""
        if self._started:
            raise RuntimeError("a generation runs once")
        self._started = True
        tok = self.model.tokenizer
        self._t0 = time.perf_counter()
        self._deadline = None if self.opts.max_time is None else self._t0 + self.opts.max_time
        self._stops = _StopText(self.opts.stop)
        self._decoder = None
        if tok is not None:
            # the text continues the prompt's (keeps a leading space) if the prompt shows any
            visible = any(tok.token_bytes(t) for t in reversed(self.session._tokens))
            self._decoder = tok.decode_stream(continuation=visible)

    def prefilled(self, cancelled: bool = False) -> StreamChunk | None:
        """Mark the end of the prefill; returns the final chunk if generation ends here
        (cancelled, or nothing to generate), else None."""
        self._t_prefill = time.perf_counter()
        self.usage.prefill_seconds = self._t_prefill - self._t0
        if cancelled:
            self.finish_reason = "cancelled"
        elif self.max_new <= 0:
            self.finish_reason = "length"
        return self._final("", [], None) if self.finish_reason is not None else None

    def step(self, logits: np.ndarray) -> StreamChunk:
        """One token from the logits (vocab,) after the last fed token: sample it (the C
        chain), its logprobs, the stop checks, its text. Returns its chunk; the last one has
        finish_reason set. Unless finished, the driver feeds self.generated[-1] next and calls
        step() with the logits after it. (The loop here drives it with Session.eval; a batched
        scheduler can drive many generations with one forward pass per step.)"""
        t = self.sampler.sample_accept(logits)
        return self._took(t, logits)

    def _took(self, t: int, logits: np.ndarray | None) -> StreamChunk:
        """What step() does after the draw: the token's logprobs (from the logits it was drawn
        from), the stop checks, its text."""
        gs, k = self.session, self.opts.logprobs
        lp = _logprob_rows(logits[None], np.array([t], np.int32), k) if k is not None else None
        gs._tokens.append(t)
        gs._logits = None
        self.generated.append(t)
        if lp is not None:
            self.logprobs += lp
        text = ""
        if t in self.stop_ids:
            self.finish_reason, self.stop_sequence = "stop", t
        elif self._decoder is not None:
            text = self._stops.push(self._decoder.push(t))
            if self._stops.matched is not None:
                self.finish_reason, self.stop_sequence = "stop", self._stops.matched
        if self.finish_reason is None:
            if len(self.generated) >= self.max_new:
                self.finish_reason = "length"
            elif self._cancelled():
                self.finish_reason = "cancelled"
        if self.finish_reason is not None:
            return self._final(text, [t], lp)
        self.text_parts.append(text)
        return StreamChunk(text, [t], lp, prompt_logprobs=self._take_prompt_logprobs())

    def _chunks(self, per_token: bool = True):
        """The loop, yielding StreamChunks (the last with finish_reason and usage). The decode
        loop runs in C (Session.decode: draw, feed back, repeat, with the GIL released): one
        token per call when streaming or computing logprobs, else runs of tokens sized to take
        about RUN_SECONDS, so that a cancel or max_time is seen soon and other Python threads
        cost one GIL hand-over per run, not per token. A run that overshoots a stop string is
        rewound (cache, RNG, penalty window): the result is the same as token by token."""
        self.begin()
        gs = self.session
        try:
            try:
                row = self._prefill(gs)
                final = self.prefilled()
            except (_Cancelled, GenerationCancelled):
                final = self.prefilled(cancelled=True)
            if final is not None:
                yield final
                return
            yield from self._decode(np.array(row, np.float32), per_token)
        finally:
            if self._t_prefill is None:
                self.prefilled()
            if not self._usage_final:
                self.usage.completion_tokens = len(self.generated)
                self.usage.decode_seconds = time.perf_counter() - self._t_prefill
            if self.finish_reason is None:
                self.finish_reason = "cancelled"        # closed stream, exception
            self._finish()
            # End this thread's OpenMP workers: libgomp stops spinning between parallel
            # regions once the workers of all threads that ran one outnumber the cores, so a
            # thread that generated once (the main thread that loaded the model, a web
            # framework's worker) must not keep them while another thread generates (3-4x
            # slower decode otherwise); the next call starts them again (tens of
            # microseconds). A driver of its own (the batch scheduler) keeps its workers.
            _engine.release_threads()

    def _fill_window(self) -> None:
        """The penalties' window: the last penalty_last_n tokens of the context."""
        if self.opts.penalties_on:
            self.sampler.accept_many(np.asarray(
                self.session._tokens[-self.opts.penalty_last_n:], np.int32))

    def _decode(self, row: np.ndarray, per_token: bool):
        sess, sampler = self.session._sess, self.sampler
        stop = np.array(sorted(self.stop_ids), np.int32)
        keep_logits = self.opts.logprobs is not None
        feed, per_tok = -1, None            # seconds per token, measured
        while True:
            n = self.max_new - len(self.generated)
            if not per_token and per_tok is not None:
                budget = RUN_SECONDS if self._deadline is None else min(
                    RUN_SECONDS, self._deadline - time.perf_counter())
                n = max(1, min(n, int(budget / per_tok)))
            elif not per_token:
                n = min(n, 4)
            else:
                n = 1
            out = np.empty(n, np.int32)
            rng = np.empty(n, np.uint64)
            t0 = time.perf_counter()
            n_out, cancelled = sess.decode(sampler, feed, row, out, rng, stop)
            if n_out:
                per_tok = (time.perf_counter() - t0) / n_out
            base = sess.n_tokens - n_out + 1        # where out[0] is (or would be) fed
            for i in range(n_out):
                chunk = self._took(int(out[i]), row if keep_logits else None)
                if chunk.finish_reason is not None:
                    if i < n_out - 1:               # rewind what the run did past the end
                        sess.truncate(base + i)
                        sampler.rng_state = int(rng[i])
                        sampler.reset_window()
                        self._fill_window()
                    yield chunk
                    return
                yield chunk
            if cancelled:
                self.finish_reason = "cancelled"
                yield self._final("", [], None)
                return
            feed = int(out[n_out - 1])

    def _final(self, text, ids, lp) -> StreamChunk:
        """The last chunk: the text still held back is released unless a stop string ended
        the text (the bytes of an unfinished character flush as U+FFFD; they can still
        complete a stop string)."""
        decoder, stops = self._decoder, self._stops
        if decoder is not None and not isinstance(self.stop_sequence, str):
            text += stops.push(decoder.flush())
            if stops.matched is not None:
                if self.stop_sequence is None:
                    self.finish_reason, self.stop_sequence = "stop", stops.matched
            else:
                text += stops.flush()
        self.text_parts.append(text)
        self.usage.completion_tokens = len(self.generated)
        self.usage.decode_seconds = time.perf_counter() - self._t0 - self.usage.prefill_seconds
        self._usage_final = True
        return StreamChunk(text, ids, lp, self.finish_reason, replace(self.usage),
                           prompt_logprobs=self._take_prompt_logprobs(),
                           stop_sequence=self.stop_sequence)

    def _take_prompt_logprobs(self):
        """The prompt's logprobs for the first chunk of a stream only."""
        if self._prompt_lp_sent:
            return None
        self._prompt_lp_sent = True
        return self.prompt_logprobs

    def expired(self) -> bool:
        """True once options.cancel is set or max_time has passed: a driver that runs the
        forward passes itself checks it between its steps (step() checks it too)."""
        return self._cancelled()

    def cancel(self) -> StreamChunk:
        """End the generation now with finish_reason "cancelled" (for a driver that runs the
        forward passes itself, e.g. when its client went away); returns the final chunk."""
        if self._t_prefill is None:
            return self.prefilled(cancelled=True)
        self.finish_reason = "cancelled"
        return self._final("", [], None)

    def finish(self) -> None:
        """End the generation (idempotent): the session's RNG advances, on_done runs. A driver
        that runs the forward passes itself calls it when done (or abandoning)."""
        self._finish()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        if self.own_rng:
            self.session._rng_state = self.sampler.rng_state
        if self.on_done is not None:
            self.on_done(self.session)


class GenerationStream:
    """An iterator of StreamChunk. close() (or leaving a `with` block, or dropping it) stops
    the generation at the next token; `result` is the GenerationResult once it has ended and
    `usage` the counts so far."""

    def __init__(self, run: Generation):
        self._run = run
        self._it = run._chunks()

    def __iter__(self):
        return self

    def __next__(self) -> StreamChunk:
        return next(self._it)

    def close(self) -> None:
        self._it.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self._it.close()
        except Exception:
            pass

    @property
    def usage(self) -> Usage:
        u = replace(self._run.usage)
        u.completion_tokens = len(self._run.generated)
        return u

    @property
    def result(self) -> GenerationResult | None:
        return self._run.make_result() if self._run._done else None

    @property
    def finish_reason(self) -> str | None:
        return self._run.finish_reason if self._run._done else None

# ------------------------------------------------------------------------------------------
# helpers for Model


def weights_fingerprint(config, weights: dict, extra: dict, tensor_parts: dict | None = None) -> str:
    """A short hash identifying a model's weights (a sample of every tensor's bytes, its shape
    and type) with its config and `extra` settings: saved states carry it. tensor_parts:
    name -> tensor_fingerprint(name, tensor) computed earlier (a model whose tensors were made
    one at a time and packed); the hash is the same."""
    h = blake2b(digest_size=16)
    h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    for name in sorted(weights):
        part = (tensor_parts or {}).get(name)
        h.update(part if part is not None else tensor_fingerprint(name, weights[name]))
    return h.hexdigest()


def tensor_fingerprint(name: str, t) -> bytes:
    """What weights_fingerprint hashes of one tensor: its name, and for each array (values,
    scales, offsets) its dtype, shape and a sample of its bytes."""
    parts = [name.encode()]
    for arr in (getattr(t, "q", t), getattr(t, "s", None), getattr(t, "m", None)):
        if arr is None:
            continue
        a = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        parts.append(str((arr.dtype, arr.shape)).encode())
        step = max(1, a.size // 64)
        parts += [a[::step][:64].tobytes(), a[:256].tobytes(), a[-256:].tobytes()]
    return b"".join(parts)
