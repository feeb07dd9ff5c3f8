"""The user-facing model: load a checkpoint, compute logits, generate text.

    model = Model.load("stories15M.bin", tokenizer="tokenizer.bin")
    result = model.generate("Once upon a time", max_new_tokens=100, temperature=0.8, seed=42)
    print(result.text)

The heavy lifting (prefill, the per-token loop, sampling) runs in C with the GIL released;
this layer checks arguments, tokenizes, and keeps a small pool of per-call sessions so that
several Python threads can generate from one model at the same time.
"""
from __future__ import annotations

import math
import numbers
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import _engine
from ._threads import default_threads, in_forked_child
from .config import Config
from .errors import ContextLengthError, TokenizerError
from .weights import QTensor, dequantize_weights, fit_group_size, quantize_weights, validate_weights

# Tokens per prefill chunk: the batched kernels read each weight once per chunk.
PREFILL_CHUNK = 64


@dataclass
class GenerationResult:
    """What generate() returns."""
    text: str | None                 # decoded generated text (None without a tokenizer)
    token_ids: list                  # generated ids (the stop token included when hit)
    prompt_token_ids: list           # the prompt as fed to the model
    finish_reason: str               # "stop" (a stop token) or "length" (budget or context)
    prompt_seconds: float = 0.0      # prefill time (up to the first sampled token)
    generate_seconds: float = 0.0    # time of the whole call
    stats: dict = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: generated tokens per second after the prefill."""
        n = len(self.token_ids)
        t = self.generate_seconds - self.prompt_seconds
        return n / t if t > 0 and n else 0.0

    def __str__(self) -> str:
        return self.text if self.text is not None else " ".join(map(str, self.token_ids))


def _number(name, value, *, integer=False, minimum=0.0, maximum=None):
    """Validate a numeric sampling argument; raise ValueError naming it."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
            integer and not isinstance(value, numbers.Integral)):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        rng = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {rng}, got {value!r}")
    return int(value) if integer else float(value)


def _weights_dtype(weights: dict) -> str:
    kinds = {isinstance(t, QTensor) for t in weights.values() if np.ndim(getattr(t, "q", t)) == 2}
    return "int8" if kinds == {True} else "fp32" if kinds == {False} else "mixed"


class Model:
    """A loaded model: weights (read-only, shared by threads) + tokenizer + the C engine."""

    def __init__(self, config: Config, weights: dict, tokenizer=None, n_threads: int | None = None,
                 context_length: int | None = None, simd: str | None = None,
                 metadata: dict | None = None, act_bits: int = 16, kv_dtype: str = "f16"):
        validate_weights(config, weights)
        self.kv_dtype = _engine.kv_dtype_name(kv_dtype)   # KV cache element type of sessions
        self.config = config
        self.weights = weights
        self.metadata = dict(metadata or {})
        if tokenizer is not None and tokenizer.vocab_size != config.vocab_size:
            raise TokenizerError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{config.vocab_size}")
        self.tokenizer = tokenizer
        if context_length is None:
            context_length = config.seq_len
        self.context_length = _number("context_length", context_length, integer=True, minimum=1,
                                      maximum=config.max_context)
        self._engine = _engine.Engine(config, weights, simd, self.context_length, act_bits)
        self.n_threads = default_threads() if n_threads is None else n_threads
        self._pool = []
        self._pool_lock = threading.Lock()

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def load(cls, path, tokenizer=None, dtype: str | None = None, n_threads: int | None = None,
             context_length: int | None = None, group_size: int | None = None,
             simd: str | None = None, act_bits: int = 16, kv_dtype: str = "f16") -> "Model":
        """Load a model file: a llama2.c checkpoint (.bin v0/v1/v2), a GGUF file, or a Hugging
        Face directory.

        tokenizer: a path (tokenizer.bin, tokenizer.json or a directory), a Tokenizer, or None
            to take the one the model file carries (GGUF, Hugging Face) or a tokenizer.bin
            beside a llama2.c checkpoint; without one the model works on token ids.
        dtype: None (as stored: int8 for quantized files, else fp32), "fp32" or "int8"
            (quantizes at load time with group_size, default 64; GGUF Q8_0/Q4_0/Q4_1 blocks map
            exactly to int8 groups of 32).
        n_threads: threads for the kernels (default: the cores this process may use).
        context_length: positions of the KV cache (default: the model's; beyond it only with
            dynamic NTK rope scaling, up to seq_len x factor).
        simd: kernel table ("auto", "generic", "avx2", "avx512"); default LLAMA2C_SIMD or auto.
        act_bits: activations of the int8 matmuls: 16 (two int8 planes, the default: about as
            accurate as the int8 weights allow) or 8 (llama2.c runq.c's scheme: faster prefill,
            coarser).
        kv_dtype: the KV cache's element type: "f16" (default), "f32" or "q8" (int8 with a
            scale per position and head).
        """
        from .loaders import load_any
        from .tokenizer import Tokenizer

        if dtype not in (None, "fp32", "int8"):
            raise ValueError(f"dtype must be None, 'fp32' or 'int8', got {dtype!r}")
        # the loaders' own int8 conversion keeps quantized blocks exact (GGUF)
        want = "auto" if dtype is None else "int8" if dtype == "int8" and group_size is None else None
        config, weights, metadata = load_any(path, dtype=want)
        stored = _weights_dtype(weights)
        if dtype is None:
            dtype = "int8" if stored in ("int8", "mixed") else "fp32"
        if dtype == "fp32" and stored != "fp32":
            weights = dequantize_weights(weights)
        elif dtype == "int8" and stored != "int8":
            gs = group_size or metadata.get("group_size") or 64
            weights = quantize_weights(config, weights, fit_group_size(config, gs))
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = Tokenizer.load(tokenizer)
        elif tokenizer is None:
            tokenizer = _tokenizer_from_model(path, metadata, config.vocab_size)
        model = cls(config, weights, tokenizer, n_threads=n_threads, context_length=context_length,
                    simd=simd, metadata=metadata, act_bits=act_bits, kv_dtype=kv_dtype)
        model.path = str(path)
        return model

    # ---- properties -------------------------------------------------------------------------

    @property
    def n_threads(self) -> int:
        """Kernel threads (1 in a fork()ed child: OpenMP's pool does not survive fork)."""
        return 1 if in_forked_child() else self._n_threads

    @n_threads.setter
    def n_threads(self, n):
        self._n_threads = _number("n_threads", n, integer=True, minimum=1)

    @property
    def dtype(self) -> str:
        """'fp32', 'int8' or 'mixed': the element type of the weight matrices."""
        return _weights_dtype(self.weights)

    @property
    def simd(self) -> str:
        return self._engine.simd

    @property
    def act_bits(self) -> int:
        """8 or 16: activation precision of the int8 matmuls."""
        return self._engine.act_bits

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def weight_bytes(self) -> int:
        """Bytes of weights read per decoded token (every matrix once, one embedding row)."""
        def nbytes(t):
            if isinstance(t, QTensor):
                return t.q.nbytes + t.s.nbytes + (t.m.nbytes if t.m is not None else 0)
            return t.nbytes

        total = sum(nbytes(t) for name, t in self.weights.items() if name != "tok_embeddings")
        if self.config.shared_classifier:
            total += nbytes(self.weights["tok_embeddings"])
        return total

    # ---- sessions ----------------------------------------------------------------------------

    def _checkout(self):
        with self._pool_lock:
            sess = self._pool.pop() if self._pool else None
        if sess is None:
            sess = _engine.Session(self._engine, self.context_length, PREFILL_CHUNK, self.n_threads,
                                   kv_dtype=self.kv_dtype)
        sess.n_threads = self.n_threads
        return sess

    def _checkin(self, sess) -> None:
        with self._pool_lock:
            if len(self._pool) < 2:
                self._pool.append(sess)

    # ---- logits --------------------------------------------------------------------------------

    def logits(self, token_ids) -> np.ndarray:
        """float32 (len(token_ids), vocab_size): the logits after each token, computed from
        position 0 with a fresh cache (one batched prefill)."""
        ids = self._ids(token_ids)
        if len(ids) == 0:
            raise ValueError("logits: token_ids is empty")
        if len(ids) > self.context_length:
            raise ContextLengthError(
                f"{len(ids)} tokens do not fit the context of {self.context_length}")
        out = np.empty((len(ids), self.config.vocab_size), dtype=np.float32)
        sess = self._checkout()
        try:
            sess.forward(ids, 0, out)
        finally:
            self._checkin(sess)
        return out

    def _ids(self, token_ids) -> np.ndarray:
        try:
            ids = np.asarray(token_ids)
        except Exception:
            raise ValueError("token ids must be a sequence of integers") from None
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"token ids must be a 1-D sequence of integers, got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            bad = int(ids[(ids < 0) | (ids >= self.config.vocab_size)][0])
            raise ValueError(f"token id {bad} is outside [0, {self.config.vocab_size})")
        return np.ascontiguousarray(ids, dtype=np.int32)

    def encode_prompt(self, prompt, bos: bool = True) -> np.ndarray:
        """A text (tokenized, with BOS when the tokenizer adds one) or a list of ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TokenizerError("this model has no tokenizer: pass token ids, or load it with "
                                     "tokenizer=PATH")
            return self._ids(self.tokenizer.encode(prompt, bos=bos))
        return self._ids(prompt)

    def stop_ids(self) -> tuple:
        """Ids that end generation: the tokenizer's end-of-sequence ids (none without one)."""
        if self.tokenizer is None:
            return ()
        return tuple(sorted(int(i) for i in self.tokenizer.eos_ids))

    # ---- generation ---------------------------------------------------------------------------

    def generate(self, prompt, max_new_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 0.9, top_k: int = 0, seed: int | None = None,
                 stream: bool = False, stop_token_ids=None):
        """Continue `prompt` (a text or a list of token ids) by up to max_new_tokens tokens.

        temperature 0 is greedy decoding; otherwise tokens are drawn from softmax(logits / T),
        restricted to the top_k most likely (0 = no limit) and to the smallest set whose
        probability exceeds top_p (1.0 = no limit). A seed makes the draw reproducible.
        Generation stops after a stop token (default: the tokenizer's end-of-sequence ids),
        after max_new_tokens, or when the context is full.

        Returns a GenerationResult, or with stream=True an iterator of text pieces (of token
        ids when the model has no tokenizer) that add up to the same text.
        """
        max_new_tokens = _number("max_new_tokens", max_new_tokens, integer=True)
        temperature = _number("temperature", temperature)
        top_p = _number("top_p", top_p, maximum=1.0)
        top_k = _number("top_k", top_k, integer=True)
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        seed = _number("seed", seed, integer=True, maximum=2**64 - 1)
        ids = self.encode_prompt(prompt)
        if len(ids) == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if len(ids) > self.context_length:
            raise ContextLengthError(f"the prompt has {len(ids)} tokens but the context holds "
                                     f"{self.context_length}")
        stop = self.stop_ids() if stop_token_ids is None else tuple(
            _number("stop token id", i, integer=True, maximum=self.config.vocab_size - 1)
            for i in stop_token_ids)
        stop_arr = np.asarray(stop, dtype=np.int32)
        # no more than the context can hold (the last sampled token need not be fed back)
        max_new_tokens = min(max_new_tokens, self.context_length - len(ids) + 1)
        top_k = min(top_k, self.config.vocab_size)
        sampler = _engine.Sampler(self.config.vocab_size, temperature, top_p, top_k, seed)
        if stream:
            return self._stream(ids, max_new_tokens, sampler, stop_arr)
        t0 = time.perf_counter()
        sess = self._checkout()
        try:
            # prefill (batched), then the sample -> feed-back loop from its logits; both in C
            # with the GIL released
            sess.forward(ids, 0)
            t1 = time.perf_counter()
            if max_new_tokens == 0:
                out = np.zeros(0, dtype=np.int32)
            else:
                out = sess.generate(ids[:0], len(ids), max_new_tokens, sampler, stop_arr)
        finally:
            self._checkin(sess)
        elapsed = time.perf_counter() - t0
        out = [int(t) for t in out]
        reason = "stop" if out and out[-1] in stop else "length"
        text = self.tokenizer.decode(out) if self.tokenizer is not None else None
        return GenerationResult(text, out, [int(t) for t in ids], reason, prompt_seconds=t1 - t0,
                                generate_seconds=elapsed)

    def _stream(self, ids, max_new_tokens, sampler, stop_arr):
        """Yield pieces token by token; each step is one C call with the GIL released."""
        stop = set(int(i) for i in stop_arr)
        decoder = self.tokenizer.decode_stream() if self.tokenizer is not None else None
        sess = self._checkout()
        try:
            pending, pos = ids, 0
            for _ in range(max_new_tokens):
                if pos + len(pending) > self.context_length:
                    break
                tok = int(sess.generate(pending, pos, 1, sampler, stop_arr)[0])
                pos += len(pending)
                pending = np.asarray([tok], dtype=np.int32)
                if decoder is None:
                    yield tok
                else:
                    piece = decoder.push(tok)
                    if piece:
                        yield piece
                if tok in stop:
                    break
            if decoder is not None:
                tail = decoder.flush()
                if tail:
                    yield tail
        finally:
            self._checkin(sess)

    # ---- chat ---------------------------------------------------------------------------------

    def chat(self, messages, max_new_tokens: int = 256, temperature: float = 1.0,
             top_p: float = 0.9, top_k: int = 0, seed: int | None = None, stream: bool = False):
        """Answer a conversation: `messages` ([{"role": ..., "content": ...}, ...]) rendered with
        the model's chat template (add_generation_prompt=True), generation stopping at the
        end-of-turn token. Sampling arguments and the result are those of generate().
        For a multi-turn conversation that keeps the KV cache, use new_chat()."""
        from .chat import chat
        return chat(self, messages, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_p=top_p, top_k=top_k, seed=seed, stream=stream)

    def new_chat(self, system: str | None = None, **sampling):
        """A llama2c.chat.ChatSession: a conversation that keeps its KV cache between turns."""
        from .chat import ChatSession
        return ChatSession(self, system=system, **sampling)

    def __repr__(self) -> str:
        c = self.config
        return (f"Model(dim={c.dim}, n_layers={c.n_layers}, n_heads={c.n_heads}, "
                f"n_kv_heads={c.n_kv_heads}, vocab_size={c.vocab_size}, dtype={self.dtype!r}, "
                f"simd={self.simd!r}, n_threads={self.n_threads})")


def _tokenizer_from_model(path, metadata, vocab_size):
    """The tokenizer a model file carries, or a tokenizer.bin beside a llama2.c checkpoint
    (used only when its vocabulary size matches; run.c would read it anyway)."""
    from .tokenizer import Tokenizer
    p = Path(path)
    if metadata.get("gguf_metadata") is not None and "tokenizer.ggml.tokens" in metadata["gguf_metadata"]:
        return Tokenizer.from_gguf_metadata(metadata["gguf_metadata"])
    if p.is_dir() and (p / "tokenizer.json").is_file():
        return Tokenizer.load(p)
    if p.is_file() and (p.parent / "tokenizer.bin").is_file():
        tok = Tokenizer.load(p.parent / "tokenizer.bin")
        if tok.vocab_size == vocab_size:
            return tok
    return None
