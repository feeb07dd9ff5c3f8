"""Chat with a model: chat templates, one-shot chat, multi-turn sessions and the chat REPL.

Conversations are lists of messages, `{"role": "system" | "user" | "assistant", "content": str}`.
They are rendered to text with the model's chat template (GGUF `tokenizer.chat_template`, or
the Hugging Face tokenizer_config.json / chat_template.jinja) exactly as transformers'
`apply_chat_template` renders it, then tokenized without adding special tokens the template
already wrote. Models without a template get ChatML when their vocabulary has `<|im_start|>`,
else the Llama 2 chat format.

    >>> chat = model.new_chat(system="You are terse.", temperature=0)
    >>> chat.send("Name a colour.")
    'Blue.'
    >>> chat.send("Another one?")      # only the new turn is prefilled: the KV cache is kept
    'Red.'
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from datetime import datetime
from functools import lru_cache

import numpy as np

from . import _engine
from .errors import ContextLengthError, Llama2cError, TokenizerError
from .model import PREFILL_CHUNK, GenerationResult, _number

# Literal end-of-turn tokens of common templates; one that the template writes and the
# vocabulary has as a special token also stops generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Hugging Face's Llama 2 chat template: the system prompt goes into the first user turn,
# every exchange is "<s>[INST] user [/INST] assistant </s>".
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")

SAMPLING_DEFAULTS = dict(max_new_tokens=256, temperature=1.0, top_p=0.9, top_k=0, seed=None)


class ChatTemplateError(Llama2cError, ValueError):
    """A chat template failed to render (a syntax error, or the template refused the
    conversation through raise_exception)."""

# ------------------------------------------------------------------------------------------
# templates


def chat_template(tokenizer) -> str:
    """The template source for this tokenizer: its own, else ChatML or Llama 2."""
    if tokenizer.chat_template:
        return tokenizer.chat_template
    if tokenizer.token_to_id("<|im_start|>") is not None:
        return CHATML_TEMPLATE
    return LLAMA2_TEMPLATE


def _raise_exception(message):
    import jinja2
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(source: str):
    """A template compiled as transformers compiles chat templates."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {exc}") from None


def _token_text(tokenizer, token_id):
    """A special token's text; llama2.c's tokenizer.bin stores BOS as '\\n<s>\\n'."""
    text = tokenizer.id_to_token(token_id) if token_id is not None else None
    return text.strip() if text else None


def _check_messages(messages) -> list:
    if isinstance(messages, (str, bytes)) or not hasattr(messages, "__iter__"):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                         f"got {type(messages).__name__}")
    messages = list(messages)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be a dict with a string 'role', got {m!r}")
    return messages


def render_chat(tokenizer, messages, add_generation_prompt: bool = True) -> str:
    """The conversation as the model's chat template writes it (transformers'
    apply_chat_template(messages, tokenize=False, add_generation_prompt=...))."""
    import jinja2
    messages = _check_messages(messages)
    tokens = {name: _token_text(tokenizer, token_id)
              for name, token_id in (("bos_token", tokenizer.bos_id),
                                     ("eos_token", tokenizer.eos_id))}
    tokens = {name: text for name, text in tokens.items() if text is not None}
    try:
        return _compile(chat_template(tokenizer)).render(
            messages=messages, tools=None, documents=None,
            add_generation_prompt=add_generation_prompt, **tokens)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template refused the conversation: {exc}") from None


def encode_chat(tokenizer, text: str) -> list:
    """Token ids of a rendered conversation.

    Like apply_chat_template(tokenize=True), special tokens the template wrote are not added
    again; the model's BOS is added only when the text does not start with it. BOS/EOS texts
    that the tokenizer does not parse itself (llama2.c's tokenizer.bin) become their ids.
    """
    bos_text = _token_text(tokenizer, tokenizer.bos_id)
    ids = []
    if not (bos_text and text.startswith(bos_text)) and tokenizer.add_bos \
            and tokenizer.bos_id is not None:
        ids.append(tokenizer.bos_id)
    specials = tokenizer.special_tokens
    markers = {t: i for t, i in ((bos_text, tokenizer.bos_id),
                                 (_token_text(tokenizer, tokenizer.eos_id), tokenizer.eos_id))
               if t and t not in specials}
    start = 0
    if markers:
        pattern = re.compile("|".join(map(re.escape, sorted(markers, key=len, reverse=True))))
        for m in pattern.finditer(text):
            if m.start() > start:
                ids += tokenizer.encode(text[start:m.start()], bos=False)
            ids.append(markers[m.group()])
            start = m.end()
    if start < len(text):
        ids += tokenizer.encode(text[start:], bos=False)
    return ids


def chat_prompt_ids(tokenizer, messages, add_generation_prompt: bool = True) -> list:
    """render_chat then encode_chat."""
    return encode_chat(tokenizer, render_chat(tokenizer, messages, add_generation_prompt))


def chat_stop_ids(tokenizer) -> tuple:
    """The tokenizer's end-of-sequence ids plus the template's end-of-turn token."""
    ids = set(tokenizer.eos_ids)
    template, specials = chat_template(tokenizer), tokenizer.special_tokens
    ids.update(specials[t] for t in END_OF_TURN_TOKENS if t in template and t in specials)
    return tuple(sorted(ids))


def _tokenizer(model):
    if model.tokenizer is None:
        raise TokenizerError("chat needs a tokenizer: load the model with tokenizer=PATH")
    return model.tokenizer

# ------------------------------------------------------------------------------------------
# one-shot chat


def chat(model, messages, stream: bool = False, **sampling):
    """Model.chat: answer the last message of `messages` (see Model.generate for sampling)."""
    tokenizer = _tokenizer(model)
    ids = chat_prompt_ids(tokenizer, messages)
    return model.generate(ids, stream=stream, stop_token_ids=chat_stop_ids(tokenizer), **sampling)

# ------------------------------------------------------------------------------------------
# multi-turn sessions


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _sampler(vocab_size, temperature, top_p, top_k, seed):
    """A validated engine sampler (seed None: a random one)."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little")
    return _engine.Sampler(vocab_size, _number("temperature", temperature),
                           _number("top_p", top_p, maximum=1.0),
                           _number("top_k", top_k, integer=True),
                           _number("seed", seed, integer=True, maximum=2**64 - 1))


class ChatSession:
    """A conversation that keeps its KV cache between turns.

    Each send() renders the whole conversation with the chat template but prefills only the
    tokens the cache does not hold yet: the ids already fed are compared with the new
    rendering, and only from the first difference on (normally: the end of the last reply)
    is anything run again.

    history: the messages so far (the system message first, if any).
    n_tokens: positions of the KV cache in use.
    last_result: a GenerationResult for the last turn; its stats hold `prefilled` (tokens run
        through the model before sampling) and `reused` (cached positions kept).
    """

    def __init__(self, model, system: str | None = None, **sampling):
        unknown = set(sampling) - set(SAMPLING_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown sampling arguments: {', '.join(sorted(unknown))}")
        self.model = model
        self.system = system
        self.sampling = {**SAMPLING_DEFAULTS, **sampling}
        self._tokenizer = _tokenizer(model)
        self._stop = chat_stop_ids(self._tokenizer)
        self._session = _engine.Session(model._engine, model.context_length, PREFILL_CHUNK,
                                        model.n_threads, kv_dtype=model.kv_dtype)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.history = [{"role": "system", "content": self.system}] if self.system else []
        self._cached = []        # ids whose K/V the cache holds, at positions 0..n-1
        self.last_result = None

    @property
    def n_tokens(self) -> int:
        return len(self._cached)

    def send(self, user_text: str, stream: bool = False, max_new_tokens=None, temperature=None,
             top_p=None, top_k=None, seed=None):
        """Add a user message and generate the reply (arguments left None take the session's
        values). Returns the reply text, or with stream=True an iterator of its pieces; the
        reply joins the history when it is complete (or when the iterator is closed early)."""
        if not isinstance(user_text, str):
            raise TypeError(f"send() expects str, got {type(user_text).__name__}")
        given = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                     top_k=top_k, seed=seed)
        opts = {**self.sampling, **{k: v for k, v in given.items() if v is not None}}
        max_new = _number("max_new_tokens", opts.pop("max_new_tokens"), integer=True)
        sampler = _sampler(self.model.vocab_size, **opts)
        user = {"role": "user", "content": user_text}
        ids = chat_prompt_ids(self._tokenizer, self.history + [user])
        if len(ids) > self._session.context:
            raise ContextLengthError(
                f"the conversation has {len(ids)} tokens but the context holds "
                f"{self._session.context}: reset() the chat or load the model with a larger "
                f"context_length")
        # keep the cached prefix the new rendering shares; at least one token must be run
        # to get logits to sample from
        keep = min(_common_prefix(self._cached, ids), len(ids) - 1)
        pieces = self._turn(user, ids, keep, max_new, sampler)
        return pieces if stream else "".join(pieces)

    def _turn(self, user, ids, keep, max_new, sampler):
        """Prefill ids[keep:] at position keep, then yield reply pieces; record the turn."""
        t0 = time.perf_counter()
        first = None
        reply = []
        decoder = self._tokenizer.decode_stream()
        self._session.n_threads = self.model.n_threads
        try:
            for tok in self._tokens(ids, keep, max_new, sampler):
                if first is None:
                    first = time.perf_counter() - t0
                reply.append(tok)
                if tok not in self._stop:
                    piece = decoder.push(tok)
                    if piece:
                        yield piece
            tail = decoder.flush()
            if tail:
                yield tail
        finally:
            self._record(user, reply, ids, keep, first or 0.0, time.perf_counter() - t0)

    def _tokens(self, ids, keep, max_new, sampler):
        """Sampled ids, one engine call each; self._cached tracks what the cache holds (the
        last sampled id is never fed: the next turn's rendering feeds it)."""
        del self._cached[keep:]
        feed = ids[keep:]
        stop = np.asarray(self._stop, dtype=np.int32)
        for _ in range(max_new):
            if len(self._cached) + len(feed) > self._session.context:
                break
            tok = int(self._session.generate(np.asarray(feed, dtype=np.int32),
                                              len(self._cached), 1, sampler, stop)[0])
            self._cached += feed
            feed = [tok]
            yield tok
            if tok in self._stop:
                break

    def _record(self, user, reply, ids, keep, prompt_seconds, seconds):
        text_ids = reply[:-1] if reply and reply[-1] in self._stop else reply
        text = self._tokenizer.decode(text_ids)
        self.history += [user, {"role": "assistant", "content": text}]
        reason = "stop" if len(text_ids) < len(reply) else "length"
        self.last_result = GenerationResult(
            text, reply, list(ids), reason, prompt_seconds=prompt_seconds,
            generate_seconds=seconds, stats={"prefilled": len(ids) - keep, "reused": keep})

# ------------------------------------------------------------------------------------------
# interactive loop


def run_chat_cli(model, system: str | None = None, **sampling) -> None:
    """Chat on the terminal: read lines after "> " until EOF or /exit (/reset starts over),
    stream each reply to stdout and its speed to stderr. Works with piped stdin too."""
    session = ChatSession(model, system=system, **sampling)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        text = line.strip()
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text:
            _reply(session, text)


def _reply(session: ChatSession, text: str) -> None:
    """Stream one reply; Ctrl-C stops it (what was said so far stays in the history)."""
    try:
        pieces = session.send(text, stream=True)
        try:
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
        finally:
            pieces.close()
    except KeyboardInterrupt:
        pass
    except ContextLengthError as exc:
        print(f"error: {exc} (type /reset)", file=sys.stderr)
        return
    print()
    r = session.last_result
    if r is not None:
        print(f"[{len(r.token_ids)} tokens, {r.tokens_per_second:.1f} tok/s; prompt "
              f"{r.stats['prefilled']} new tokens in {r.prompt_seconds:.2f}s, "
              f"context {session.n_tokens}/{session.model.context_length}]", file=sys.stderr)
