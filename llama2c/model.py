"""The user-facing model: load a checkpoint, compute logits and scores, generate text.

    model = Model.load("smollm2")                     # a registry name, a file or a directory
    result = model.generate("Once upon a time", max_new_tokens=100, temperature=0.8, seed=42)
    print(result.text, result.finish_reason, result.usage)

The forward pass and the sampler run in C with the GIL released; the token loop, stop
strings, log-probabilities, sessions and the prompt cache live in llama2c.generation, which
every entry point here (generate, chat, new_session, load_state) calls. The weights are handed
to the C engine, which packs them; the model keeps only a manifest of them (names, shapes,
types, bytes). Model.load streams them: each tensor is made from the file, packed and dropped
before the next (llama2c.weights.LazyWeights), and the file map's pages are released after,
so a loaded model costs its packed weights (weight_bytes(), info()), not the file plus
copies. Several Python threads may generate from one model at once.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _engine
from ._threads import default_threads, in_forked_child
from .config import Config
from .errors import ContextLengthError, TokenizerError
from .generation import (DEFAULT_PROMPT_CACHE_BYTES, PREFILL_CHUNK, Generation,
                         GenerationOptions, GenerationResult, GenerationSession, PromptCache,
                         ScoreResult, load_state, number, tensor_fingerprint, weights_fingerprint)
from .weights import LazyWeights, QTensor, validate_weights

__all__ = ["Model", "GenerationResult", "TensorInfo", "PREFILL_CHUNK"]


@dataclass(frozen=True)
class TensorInfo:
    """One weight tensor as loaded (the engine holds the data)."""
    name: str
    shape: tuple
    dtype: str             # "fp32", "int8" or "q4" (4-bit values)
    group_size: int        # values per scale (0 for fp32)
    has_offset: bool       # per-group offsets (w = q * s + m)
    nbytes: int            # bytes the engine holds for it: packed values, scales, offsets
    mapped: bool = False   # read in place from the file map (an untied embedding): its pages
                           # are resident only as rows are looked up


def _tensor_kind(t) -> tuple:
    """(shape, dtype, group_size, has_offset, nbytes) of a float32 array or QTensor."""
    if isinstance(t, QTensor):
        nbytes = t.q.nbytes + t.s.nbytes + (t.m.nbytes if t.m is not None else 0)
        kind = "q4" if getattr(t, "bits", 8) == 4 else "int8"
        return tuple(t.q.shape), kind, int(t.group_size), t.m is not None, nbytes
    return tuple(np.shape(t)), "fp32", 0, False, int(np.asarray(t).nbytes)


class _Consumed(Mapping):
    """The weights as the engine reads them, each tensor once: its kind and fingerprint are
    noted as it passes, so that nothing needs to make it again (LazyWeights make each tensor
    on demand and keep none)."""

    def __init__(self, weights):
        self._weights = weights
        self.kinds, self.parts = {}, {}

    def note(self, name, t):
        self.kinds[name] = _tensor_kind(t)
        self.parts[name] = tensor_fingerprint(name, t)

    def __getitem__(self, name):
        t = self._weights[name]
        self.note(name, t)
        return t

    def __contains__(self, name):
        return name in self._weights

    def __iter__(self):
        return iter(self._weights)

    def __len__(self):
        return len(self._weights)


def _manifest_dtype(manifest: dict) -> str:
    from .loaders.dtypes import dtype_label
    return dtype_label({n: t.dtype for n, t in manifest.items() if len(t.shape) == 2})


def resolve_model_path(path) -> str:
    """A model path, or a registry name (llama2c.hub.REGISTRY, e.g. "smollm2") resolved to its
    cached file (downloaded on first use) when no such file or directory exists."""
    p = os.fspath(path)
    if not os.path.exists(p):
        from . import hub
        if p in hub.REGISTRY:
            return str(hub.pull(p))
    return p


class Model:
    """A loaded model: the C engine (weights packed, read-only, shared by threads), its
    tokenizer, and a cache of recent sessions (prompt_cache)."""

    def __init__(self, config: Config, weights: Mapping, tokenizer=None, n_threads: int | None = None,
                 context_length: int | None = None, simd: str | None = None,
                 metadata: dict | None = None, act_bits: int = 16, kv_dtype: str = "f16",
                 prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES):
        validate_weights(config, weights)
        self.kv_dtype = _engine.kv_dtype_name(kv_dtype)   # KV cache element type of sessions
        self.config = config
        self.metadata = dict(metadata or {})
        if tokenizer is not None and tokenizer.vocab_size != config.vocab_size:
            raise TokenizerError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{config.vocab_size}")
        self.tokenizer = tokenizer
        if context_length is None:
            context_length = config.seq_len
        self.context_length = number("context_length", context_length, integer=True, minimum=1,
                                     maximum=config.max_context)
        self.n_threads = default_threads() if n_threads is None else n_threads
        consumed = _Consumed(weights)
        self._engine = _engine.Engine(config, consumed, simd,
                                      self.context_length, act_bits)
        # what the model keeps of the weights: their description, not their arrays
        held, mapped = self._engine.tensor_bytes, self._engine.mapped_tensors
        self.manifest = {}
        for name in weights:
            if name not in consumed.kinds:    # a tensor the engine does not read
                consumed.note(name, weights[name])
            shape, kind, gs, offset, nbytes = consumed.kinds[name]
            self.manifest[name] = TensorInfo(name, shape, kind, gs, offset,
                                             int(held.get(name, nbytes)), name in mapped)
        self.fingerprint = weights_fingerprint(config, weights, {
            "act_bits": act_bits, "manifest": [(t.name, t.dtype, t.group_size, t.has_offset)
                                               for t in self.manifest.values()]},
            tensor_parts=consumed.parts)
        if isinstance(weights, LazyWeights):   # packed: the file's pages are not needed now
            weights.release()
        self.prompt_cache = PromptCache(self, max_bytes=prompt_cache_bytes)
        _engine.release_threads()      # packing's OpenMP workers: see Generation._chunks

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def load(cls, path, tokenizer=None, dtype: str | None = None, n_threads: int | None = None,
             context_length: int | None = None, group_size: int | None = None,
             simd: str | None = None, act_bits: int = 16, kv_dtype: str = "f16",
             prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES) -> "Model":
        """Load a model: a llama2.c checkpoint (.bin v0/v1/v2), a GGUF file, a Hugging Face
        directory, or a registry name ("smollm2": downloaded once into the cache, see
        llama2c.hub).

        tokenizer: a path (tokenizer.bin, tokenizer.json or a directory), a Tokenizer, or None
            to take the one the model file carries (GGUF, Hugging Face) or a tokenizer.bin
            beside a llama2.c checkpoint; without one the model works on token ids.
        dtype: None/"auto" (as stored, exactly: quantized blocks as 4- or 8-bit groups, float
            weights fp32), "fp32", "int8" or "q4" (8- or 4-bit groups: exact where the file's
            blocks already are, else quantized at load time with group_size); see
            llama2c/loaders/dtypes.py.
        n_threads: threads for the kernels (default: the cores this process may use).
        context_length: positions of the KV cache (default: the model's; beyond it only with
            dynamic NTK rope scaling, up to seq_len x factor).
        simd: kernel table ("auto", "generic", "avx2", "avx512"); default LLAMA2C_SIMD or auto.
        act_bits: activations of the int8 matmuls: 16 (two int8 planes, the default) or 8.
        kv_dtype: the KV cache's element type: "f16" (default), "f32" or "q8" (int8 with a
            scale per position and head), or one for the keys and one for the values as
            "f16/q8" (fp16 keys, int8 values: the keys are the sensitive half).
        prompt_cache_bytes: budget of the prompt cache (keys/values of recent prompts reused by
            generate and chat); 0 turns it off. Also settable as model.prompt_cache.max_bytes.
        """
        from .loaders import load_any
        from .tokenizer import Tokenizer

        path = resolve_model_path(path)
        # dtype/group_size mean the same for every format (llama2c/loaders/dtypes.py); lazy:
        # each tensor is made when the engine packs it, then dropped
        config, weights, metadata = load_any(path, dtype=dtype, group_size=group_size, lazy=True)
        own_tokenizer = tokenizer is None
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = Tokenizer.load(tokenizer)
        elif tokenizer is None:
            tokenizer = _tokenizer_from_model(path, metadata, config.vocab_size)
        if own_tokenizer and tokenizer is not None:
            metadata = _lean_metadata(metadata)
        model = cls(config, weights, tokenizer, n_threads=n_threads, context_length=context_length,
                    simd=simd, metadata=metadata, act_bits=act_bits, kv_dtype=kv_dtype,
                    prompt_cache_bytes=prompt_cache_bytes)
        # the last references to the file map (unless a tensor is read in place) and to the
        # GGUF vocabulary arrays the tokenizer has taken what it needs from
        del weights, metadata
        _engine.trim_heap()
        model.metadata.update(_describe_manifest(model.manifest))
        model.path = str(path)
        return model

    # ---- properties -------------------------------------------------------------------------

    @property
    def n_threads(self) -> int:
        """Kernel threads (1 in a fork()ed child: OpenMP's pool does not survive fork)."""
        return 1 if in_forked_child() else self._n_threads

    @n_threads.setter
    def n_threads(self, n):
        self._n_threads = number("n_threads", n, integer=True, minimum=1)

    @property
    def dtype(self) -> str:
        """'fp32', 'int8', 'q4' or 'mixed': the element type of the weight matrices."""
        return _manifest_dtype(self.manifest)

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
        """Bytes of weights the engine reads per decoded token: every packed matrix once (a tied
        embedding is the classifier), the norms and biases, one row of an untied embedding."""
        total = sum(t.nbytes for name, t in self.manifest.items() if name != "tok_embeddings")
        emb = self.manifest["tok_embeddings"]
        return total + (emb.nbytes if self.config.shared_classifier
                        else emb.nbytes // self.config.vocab_size)

    def resident_weight_bytes(self) -> int:
        """Bytes of weights the engine holds in its own memory once loaded (packed matrices,
        norms, biases); an untied embedding read in place from the file map (TensorInfo.mapped)
        is not counted: only the rows looked up become resident."""
        return sum(t.nbytes for t in self.manifest.values() if not t.mapped)

    def kv_cache_bytes(self, n_tokens: int, kv_dtype: str | None = None) -> int:
        """Bytes of KV cache a session holding n_tokens positions uses: whole blocks of 64
        positions (every layer and kv head), in kv_dtype (default: the model's). The pool is
        reserved for the full context but touched only as blocks fill."""
        block = self._engine.kv_block_bytes(kv_dtype or self.kv_dtype)
        return -(-int(n_tokens) // 64) * block

    def memory(self, contexts=(1000, 4000, 8000)) -> dict:
        """What this model costs (bytes): 'weight_bytes_per_token', 'resident_weights',
        'mapped_weights' (read in place from the file, resident as rows are read),
        'kv_bytes_per_1000_tokens' (this model's kv_dtype) and 'total' {context: resident
        weights + the KV cache of that many tokens}."""
        kv_1000 = self._engine.kv_block_bytes(self.kv_dtype) * 1000 // 64
        resident = self.resident_weight_bytes()
        return {"weight_bytes_per_token": self.weight_bytes(), "resident_weights": resident,
                "mapped_weights": sum(t.nbytes for t in self.manifest.values() if t.mapped),
                "kv_dtype": self.kv_dtype, "kv_bytes_per_1000_tokens": kv_1000,
                "total": {n: resident + self.kv_cache_bytes(n) for n in contexts}}

    # ---- sessions ----------------------------------------------------------------------------

    def _kv_bytes_per_token(self, kv_dtype: str | None = None) -> int:
        """Bytes of keys and values one position holds in a KV cache of kv_dtype (default:
        this model's; the engine's block of 64 positions, over 64)."""
        return self._engine.kv_block_bytes(kv_dtype or self.kv_dtype, 64) // 64

    def _engine_session(self, context: int):
        """A C session (KV cache of `context` positions) of this model's engine."""
        return _engine.Session(self._engine, context, PREFILL_CHUNK, self.n_threads,
                               kv_dtype=self.kv_dtype)

    def new_session(self, context_length: int | None = None,
                    seed: int | None = None) -> GenerationSession:
        """A llama2c.generation.GenerationSession: a token sequence with its own KV cache and
        RNG stream, continued by session.generate(prompt or None, **options); save_state()
        and Model.load_state() carry it across processes. context_length: positions of its
        cache (default and maximum: the model's)."""
        ctx = self.context_length if context_length is None else number(
            "context_length", context_length, integer=True, minimum=1, maximum=self.context_length)
        return GenerationSession(self, self._engine_session(ctx), seed=seed)

    def load_state(self, data) -> GenerationSession:
        """A session from GenerationSession.save_state()'s bytes or a file holding them; it
        continues exactly where the saved one was. ValueError for a state of another model."""
        return load_state(self, data, self._engine_session)

    # ---- logits and scores ---------------------------------------------------------------------

    def logits(self, token_ids) -> np.ndarray:
        """float32 (len(token_ids), vocab_size): the logits after each token, computed from
        position 0 (one batched prefill)."""
        ids = self._ids(token_ids)
        if len(ids) == 0:
            raise ValueError("logits: token_ids is empty")
        if len(ids) > self.context_length:
            raise ContextLengthError(
                f"{len(ids)} tokens do not fit the context of {self.context_length}")
        gs = self.prompt_cache.acquire(ids.tolist(), reuse=False)
        try:
            out = gs._sess.eval(ids, logits="all")
            gs._logits = out[-1].copy()
        finally:
            self.prompt_cache.release(gs)
            _engine.release_threads()
        return out

    def score(self, text_or_ids, top_logprobs: int = 0, special: bool = False) -> ScoreResult:
        """Log-probability of each token of a text (tokenized with BOS when the tokenizer adds
        one) or of a list of ids, given the tokens before it: the model's raw distribution
        (log-softmax of the logits), computed by the batched prefill. The first token is not
        scored. top_logprobs=k also returns the k most likely tokens at each position."""
        k = number("top_logprobs", top_logprobs, integer=True, maximum=20)
        ids = self.encode_prompt(text_or_ids, special=special)
        if len(ids) < 2:
            raise ValueError("score: give at least two tokens (the first is not scored)")
        if len(ids) > self.context_length:
            raise ContextLengthError(
                f"{len(ids)} tokens do not fit the context of {self.context_length}")
        n, V = len(ids), self.vocab_size
        lp = np.empty(n - 1, np.float32)
        top_ids = np.empty((n - 1, k), np.int32)
        top_lp = np.empty((n - 1, k), np.float32)
        rows = np.empty((min(PREFILL_CHUNK, n), V), np.float32)
        gs = self.prompt_cache.acquire(ids.tolist(), reuse=False)
        try:
            for start in range(0, n - 1, PREFILL_CHUNK):
                end = min(start + PREFILL_CHUNK, n - 1)      # rows start..end-1 predict ids[start+1..end]
                out = gs._sess.eval(ids[start:end], logits="all", out=rows[:end - start])
                a, b, c = _engine.logprobs(out, ids[start + 1:end + 1], k)
                lp[start:end], top_ids[start:end], top_lp[start:end] = a, b, c
        finally:
            self.prompt_cache.release(gs)
            _engine.release_threads()
        return ScoreResult([int(t) for t in ids], lp, top_ids, top_lp)

    # ---- tokens --------------------------------------------------------------------------------

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

    def encode_prompt(self, prompt, bos: bool = True, special: bool = False) -> np.ndarray:
        """A text (tokenized, with BOS when the tokenizer adds one; control-token text is
        plain text unless special=True) or a list of ids, as int32 ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TokenizerError("this model has no tokenizer: pass token ids, or load it with "
                                     "tokenizer=PATH")
            return self._ids(self.tokenizer.encode(prompt, bos=bos, special=special))
        return self._ids(prompt)

    def stop_ids(self) -> tuple:
        """Ids that end generation: the tokenizer's end-of-sequence ids (none without one)."""
        if self.tokenizer is None:
            return ()
        return tuple(sorted(int(i) for i in self.tokenizer.eos_ids))

    # ---- generation ---------------------------------------------------------------------------

    def generate(self, prompt, max_new_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 0.9, top_k: int = 0, seed: int | None = None,
                 stream: bool = False, stop_token_ids=None, *, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, penalty_last_n: int = 64, logit_bias=None,
                 stop=None, logprobs: int | None = None, echo: bool = False,
                 max_time: float | None = None, cancel=None, special: bool = False):
        """Continue `prompt` (a text or a list of token ids) by up to max_new_tokens tokens.

        Sampling, in this order (csrc/llama2c.h documents each rule): logit_bias ({id: bias},
        -inf bans), repetition_penalty / presence_penalty / frequency_penalty over the last
        penalty_last_n tokens (prompt included), temperature (0 = greedy: the argmax after
        bias and penalties), top_k (0 = off), top_p (1 = off), min_p (0 = off); seed makes the
        draws reproducible.
        Generation ends at a stop token (stop_token_ids; default: the tokenizer's
        end-of-sequence ids) or a stop string (stop="..." or a list; not part of the text),
        after max_new_tokens, when the context is full, or at a cancel (cancel: a
        CancelToken or threading.Event; max_time: seconds), even during a long prefill.
        logprobs=k (0..20): each generated token's log-probability and its k most likely
        alternatives under the model's raw distribution (log-softmax of the logits, before
        bias, penalties, temperature and truncation); echo=True adds the prompt tokens'.
        special=True parses control-token text in a text prompt ("<|im_end|>") as control
        tokens; by default it is plain text.
        The keys and values of the longest prefix shared with a recent call are reused
        (prompt_cache); results are the same with and without.

        Returns a GenerationResult; with stream=True a GenerationStream of StreamChunks (text
        delta, token ids, logprobs; the last one with finish_reason and usage) that adds up
        to the same text and ids.
        """
        opts = GenerationOptions.make(
            self.vocab_size, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed, stop_token_ids=stop_token_ids, min_p=min_p,
            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, penalty_last_n=penalty_last_n,
            logit_bias=logit_bias, stop=stop, logprobs=logprobs, echo=echo, max_time=max_time,
            cancel=cancel)
        return self._generate(self.encode_prompt(prompt, special=special), opts, stream)

    def _generate(self, ids, opts: GenerationOptions, stream: bool, stop_token_ids=None):
        """The one path of generate() and chat(): a cached session, then the core loop."""
        if len(ids) == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if len(ids) > self.context_length:
            raise ContextLengthError(f"the prompt has {len(ids)} tokens but the context holds "
                                     f"{self.context_length}")
        gs = self.prompt_cache.acquire(ids.tolist() if hasattr(ids, "tolist") else list(ids))
        run = Generation(self, gs, opts, on_done=self.prompt_cache.release,
                         stop_token_ids=stop_token_ids)
        return run.stream() if stream else run.result()

    def generate_batch(self, prompts, options=None, *, max_batch: int | None = None,
                       kv_budget=None, prefill_chunk: int | None = None, special: bool = False,
                       **shared) -> list:
        """generate() for many prompts at once, by continuous batching (llama2c.batch): one
        forward pass per step for all the sequences running, chunked prefill of the prompts
        interleaved with the decodes. Returns a GenerationResult per prompt, in order, each
        identical to generate(prompt, **its options) alone (greedy: the same ids; sampled: the
        same ids for the same seed).

        options: None, or a list of per-prompt option dicts that override the shared keyword
            options (those of generate(), except stream).
        max_batch: most sequences per step (default 16); prefill_chunk: most prompt tokens per
            step (default 32); kv_budget: the KV pool ("512MB", or positions; default: room for
            every request, at most 512 MB, at least the longest one).
        """
        from .batch import generate_batch
        return generate_batch(self, prompts, options, max_batch=max_batch, kv_budget=kv_budget,
                              prefill_chunk=prefill_chunk, special=special, **shared)

    # ---- chat ---------------------------------------------------------------------------------

    def chat_batch(self, conversations, options=None, *, max_batch: int | None = None,
                   kv_budget=None, prefill_chunk: int | None = None, **shared) -> list:
        """chat() for many conversations at once (as generate_batch): a GenerationResult per
        conversation, in order, each identical to chat(messages, **its options) alone."""
        from .batch import chat_batch
        return chat_batch(self, conversations, options, max_batch=max_batch, kv_budget=kv_budget,
                          prefill_chunk=prefill_chunk, **shared)

    def chat(self, messages, *, tools=None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None, stream: bool = False, **options):
        """Answer a conversation: `messages` ([{"role": ..., "content": str or [{"type":
        "text", "text": ...}, ...]}, ...]) rendered with the model's chat template (tools and
        chat_template_kwargs passed to it), the template's markup encoded as control tokens and
        every message's content as plain text, generation stopping at the end-of-turn token.
        Options and the result are those of generate(). For a conversation that keeps its KV
        cache between turns, see new_chat(); repeated histories also hit the prompt cache."""
        from .chat import chat_prompt_ids, chat_stop_ids, require_tokenizer
        tok = require_tokenizer(self)
        opts = GenerationOptions.make(self.vocab_size, **options)
        ids = chat_prompt_ids(tok, messages, add_generation_prompt=add_generation_prompt,
                              tools=tools, template_kwargs=chat_template_kwargs)
        return self._generate(self._ids(ids), opts, stream, stop_token_ids=chat_stop_ids(tok))

    def new_chat(self, system: str | None = None, *, context_length: int | None = None,
                 **options):
        """A llama2c.chat.ChatSession: a conversation that keeps its KV cache between turns;
        options are the defaults of its send()."""
        from .chat import ChatSession
        return ChatSession(self, system=system, context_length=context_length, **options)

    def __repr__(self) -> str:
        c = self.config
        return (f"Model(dim={c.dim}, n_layers={c.n_layers}, n_heads={c.n_heads}, "
                f"n_kv_heads={c.n_kv_heads}, vocab_size={c.vocab_size}, dtype={self.dtype!r}, "
                f"simd={self.simd!r}, n_threads={self.n_threads})")


# GGUF tokenizer arrays a built Tokenizer holds itself (in a leaner form): not kept twice
_TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                     "tokenizer.ggml.merges")


def _lean_metadata(metadata: dict) -> dict:
    """The metadata a model whose tokenizer was built from its GGUF file keeps: the file's
    keys without the vocabulary arrays (about 10 MB of Python strings for a 50k vocabulary;
    model.tokenizer has what it needs of them)."""
    gguf = metadata.get("gguf_metadata")
    if not gguf or "tokenizer.ggml.tokens" not in gguf:
        return metadata
    return dict(metadata, gguf_metadata={k: v for k, v in gguf.items()
                                         if k not in _TOKENIZER_ARRAYS})


def _describe_manifest(manifest: dict) -> dict:
    """metadata 'dtype' ('fp32', 'int8', 'q4' or 'mixed') and, when the quantized matrices
    share one, 'group_size': loaders.dtypes.describe of the weights as loaded."""
    sizes = {t.group_size for t in manifest.values() if t.dtype != "fp32"}
    out = {"dtype": _manifest_dtype(manifest)}
    if len(sizes) == 1:
        out["group_size"] = sizes.pop()
    return out


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
