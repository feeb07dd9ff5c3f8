"""Chat with a model: chat templates, multi-turn sessions and the chat REPL.

Conversations are lists of messages, `{"role": ..., "content": str | [{"type": "text",
"text": ...}, ...]}` (text parts are joined with newlines), as OpenAI-style apps send them;
other keys (name, tool_calls, ...) reach the template untouched. They are rendered with the
model's chat template (GGUF `tokenizer.chat_template`, or the Hugging Face
tokenizer_config.json / chat_template.jinja) exactly as transformers' `apply_chat_template`
renders them. Models without a template get ChatML when their vocabulary has `<|im_start|>`,
else the Llama 2 chat format.

Special tokens are never injected: the template's own markup is encoded with its control
tokens, every message's content as plain text, so a user who types "<|im_end|>" gets the
characters, not the token (see chat_prompt_ids).

    >>> chat = model.new_chat(system="You are terse.", temperature=0)
    >>> chat.send("Name a colour.")
    'Blue.'
    >>> chat.send("Another one?")      # only the new turn is prefilled: the KV cache is kept
    'Red.'
"""
from __future__ import annotations

import contextlib
import json
import re
import secrets
import signal
import sys
import threading
from datetime import datetime
from functools import lru_cache

from .errors import ContextLengthError, Llama2cError, TokenizerError
from .generation import CancelToken, Generation, GenerationOptions

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

RESERVED_TEMPLATE_VARS = ("messages", "tools", "documents", "add_generation_prompt")


class ChatTemplateError(Llama2cError, ValueError):
    """A chat template failed to render (a syntax error, or the template refused the
    conversation through raise_exception), or its markup cannot be told from message content
    that holds control-token text."""

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

# ------------------------------------------------------------------------------------------
# messages


def normalize_messages(messages) -> list:
    """Messages as the template reads them: copies whose content is a string (text parts
    joined with newlines) or None. ValueError naming the message and field for anything
    malformed."""
    if isinstance(messages, (str, bytes, dict)) or not hasattr(messages, "__iter__"):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                         f"got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', "
                             f"got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}]['role'] must be a non-empty string, got {role!r}")
        content = m.get("content")
        if isinstance(content, (list, tuple)):
            texts = []
            for j, part in enumerate(content):
                if isinstance(part, str):
                    texts.append(part)
                    continue
                if not isinstance(part, dict):
                    raise ValueError(f"messages[{i}]['content'][{j}] must be a dict "
                                     f"{{'type': 'text', 'text': ...}}, got {type(part).__name__}")
                if part.get("type", "text") != "text":
                    raise ValueError(f"messages[{i}]['content'][{j}]: only 'text' parts are "
                                     f"supported, got type {part.get('type')!r}")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"messages[{i}]['content'][{j}]['text'] must be a string, "
                                     f"got {part.get('text')!r}")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{i}]['content'] must be a string or a list of text "
                             f"parts, got {type(content).__name__}")
        if content is None and "tool_calls" not in m and role != "assistant":
            raise ValueError(f"messages[{i}] has no 'content'")
        out.append({**m, "content": content})
    return out


@lru_cache(maxsize=8)
def _special_pattern(tokenizer):
    """A regex matching any control-token text of the tokenizer (None if it has none)."""
    names = set(tokenizer.special_tokens) | set(_markers(tokenizer))
    names = sorted((n for n in names if n), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, names))) if names else None


def _markers(tokenizer) -> dict:
    """BOS/EOS texts a template writes but the tokenizer does not match by itself (llama2.c's
    tokenizer.bin): text -> id, matched in the template's markup only."""
    specials = tokenizer.special_tokens
    return {t: i for t, i in ((_token_text(tokenizer, tokenizer.bos_id), tokenizer.bos_id),
                              (_token_text(tokenizer, tokenizer.eos_id), tokenizer.eos_id))
            if t and t not in specials}


def _check_plain(tokenizer, value, where: str) -> None:
    """Strings outside message contents (roles, names, tools, template variables) reach the
    markup: refuse control-token text there."""
    pattern = _special_pattern(tokenizer)
    if pattern is None:
        return
    if isinstance(value, str):
        m = pattern.search(value)
        if m:
            raise ValueError(f"{where} contains the control-token text {m.group()!r}")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_plain(tokenizer, k, f"{where} key")
            _check_plain(tokenizer, v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for j, v in enumerate(value):
            _check_plain(tokenizer, v, f"{where}[{j}]")

# ------------------------------------------------------------------------------------------
# rendering and encoding


def _template_context(tokenizer, add_generation_prompt, tools, template_kwargs) -> dict:
    kwargs = dict(template_kwargs or {})
    reserved = set(kwargs) & set(RESERVED_TEMPLATE_VARS)
    if reserved:
        raise ValueError(f"chat_template_kwargs may not set {', '.join(sorted(reserved))}")
    if tools is not None and (isinstance(tools, (str, bytes, dict)) or not hasattr(tools, "__iter__")):
        raise ValueError(f"tools must be a list of tool definitions, got {type(tools).__name__}")
    tokens = {name: _token_text(tokenizer, token_id)
              for name, token_id in (("bos_token", tokenizer.bos_id),
                                     ("eos_token", tokenizer.eos_id))}
    ctx = {name: text for name, text in tokens.items() if text is not None}
    ctx.update(kwargs)
    ctx.update(tools=list(tools) if tools is not None else None, documents=None,
               add_generation_prompt=bool(add_generation_prompt))
    return ctx


def _render(tokenizer, messages, ctx) -> str:
    import jinja2
    try:
        return _compile(chat_template(tokenizer)).render(messages=messages, **ctx)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template refused the conversation: {exc}") from None


def render_chat(tokenizer, messages, add_generation_prompt: bool = True, tools=None,
                template_kwargs: dict | None = None) -> str:
    """The conversation as the model's chat template writes it (transformers'
    apply_chat_template(messages, tokenize=False, add_generation_prompt=..., tools=...,
    **template_kwargs))."""
    messages = normalize_messages(messages)
    return _render(tokenizer, messages,
                   _template_context(tokenizer, add_generation_prompt, tools, template_kwargs))


def _align(text: str, pieces: list, contents: list):
    """Split `text` (the real rendering) along `pieces` of the placeholder rendering:
    markup strings at even places, content indices at odd ones. A content may appear as the
    template changed it (stripped); the first consistent reading wins (depth-first search).
    Returns [(text, is_markup), ...] or None."""
    stack = [(0, 0, None)]       # (piece index, position in text, path as a linked list)
    while stack:
        j, pos, path = stack.pop()
        if j == len(pieces):
            if pos == len(text):
                segments = []
                while path is not None:
                    segments.append(path[0])
                    path = path[1]
                return segments[::-1]
            continue
        if j % 2 == 0:
            markup = pieces[j]
            if text.startswith(markup, pos):
                stack.append((j + 1, pos + len(markup), ((markup, True), path)))
            continue
        c = contents[pieces[j]]
        for cand in reversed(list(dict.fromkeys((c, c.strip(), c.lstrip(), c.rstrip())))):
            if text.startswith(cand, pos):
                stack.append((j + 1, pos + len(cand), ((cand, False), path)))
    return None


def chat_prompt_ids(tokenizer, messages, add_generation_prompt: bool = True, tools=None,
                    template_kwargs: dict | None = None) -> list:
    """Token ids of a conversation, with no control token coming from message content.

    The template is rendered twice: with the real contents (the text transformers would
    produce) and with a unique placeholder per content; the placeholder rendering tells which
    spans of the real text are the template's markup. The whole text is then encoded in one
    piece (so it tokenizes as transformers tokenizes it) with control-token text matched only
    inside markup. BOS is added only when the template did not write it. If the spans cannot
    be told apart (a template that rewrites contents), the text is encoded as a whole when no
    content holds control-token text, else ChatTemplateError. Control-token text in roles,
    tools or template variables raises ValueError.
    """
    messages = normalize_messages(messages)
    ctx = _template_context(tokenizer, add_generation_prompt, tools, template_kwargs)
    for i, m in enumerate(messages):
        _check_plain(tokenizer, {k: v for k, v in m.items() if k != "content"}, f"messages[{i}]")
    _check_plain(tokenizer, tools, "tools")
    _check_plain(tokenizer, template_kwargs, "chat_template_kwargs")
    text = _render(tokenizer, messages, ctx)
    nonce = secrets.token_hex(8)
    contents, masked = [], []
    for m in messages:
        if isinstance(m["content"], str):
            masked.append({**m, "content": f"\x00{nonce}:{len(contents)}\x00"})
            contents.append(m["content"])
        else:
            masked.append(m)
    pieces = re.split(f"\x00{nonce}:(\\d+)\x00", _render(tokenizer, masked, ctx))
    pieces = [p if j % 2 == 0 else int(p) for j, p in enumerate(pieces)]
    segments = _align(text, pieces, contents)
    if segments is None:
        pattern = _special_pattern(tokenizer)
        if pattern is not None and any(pattern.search(c) for c in contents):
            raise ChatTemplateError(
                "the chat template changes message contents in a way that hides where they "
                "are, and a message holds control-token text; refusing to encode it")
        segments = [(text, True)]
    return encode_segments(tokenizer, segments)


def encode_segments(tokenizer, segments) -> list:
    """Ids of the rendered chat text given as (text, is_markup) segments (see
    chat_prompt_ids): control-token text matched only in markup, BOS added unless the text
    starts with it (as apply_chat_template(tokenize=True) does)."""
    bos_text = _token_text(tokenizer, tokenizer.bos_id)
    text = "".join(t for t, _ in segments)
    add_bos = not (bos_text and text.startswith(bos_text)) and tokenizer.add_bos \
        and tokenizer.bos_id is not None
    markers = _markers(tokenizer)
    specials = {**tokenizer.special_tokens, **markers} if markers else None
    return tokenizer.encode_chunks(segments, bos=add_bos, specials=specials)


def encode_chat(tokenizer, text: str) -> list:
    """Ids of a rendered conversation taken wholly as template markup (control-token text
    anywhere in it becomes control tokens). Prefer chat_prompt_ids, which keeps message
    contents plain."""
    return encode_segments(tokenizer, [(text, True)])


def chat_stop_ids(tokenizer) -> tuple:
    """The tokenizer's end-of-sequence ids plus the template's end-of-turn token."""
    ids = set(tokenizer.eos_ids)
    template, specials = chat_template(tokenizer), tokenizer.special_tokens
    ids.update(specials[t] for t in END_OF_TURN_TOKENS if t in template and t in specials)
    return tuple(sorted(ids))


def require_tokenizer(model):
    if model.tokenizer is None:
        raise TokenizerError("chat needs a tokenizer: load the model with tokenizer=PATH")
    return model.tokenizer

# ------------------------------------------------------------------------------------------
# multi-turn sessions


class ChatSession:
    """A conversation that keeps its KV cache between turns (Model.new_chat()).

    Each send() renders the whole conversation with the chat template but runs only the
    tokens the cache does not hold yet: normally the end of the last reply and the new turn.
    Its own options (the defaults of send()) are generate()'s; `seed` seeds the session's RNG
    stream, which every turn continues (a send(seed=...) uses its own).

    history: the messages so far (the system message first, if any).
    n_tokens: positions of the KV cache in use.
    last_result: the GenerationResult of the last turn (usage.cached_tokens: positions kept).
    """

    def __init__(self, model, system: str | None = None, context_length: int | None = None,
                 tools=None, **options):
        GenerationOptions.make(model.vocab_size, **options)        # fail early
        self.model = model
        self.system = system
        self.tools = tools
        self.options = dict(options)
        seed = self.options.pop("seed", None)
        self._tokenizer = require_tokenizer(model)
        self._stop = chat_stop_ids(self._tokenizer)
        self.session = model.new_session(context_length=context_length, seed=seed)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.history = [{"role": "system", "content": self.system}] if self.system else []
        self.session.reset()
        self.last_result = None

    @property
    def n_tokens(self) -> int:
        return self.session.n_cached

    @property
    def context_length(self) -> int:
        return self.session.context_length

    def send(self, content, stream: bool = False, cancel=None, **options):
        """Add a user message (a string or a list of text parts) and generate the reply.
        Options override the session's for this turn. Returns the reply text, or with
        stream=True an iterator of its pieces; the reply joins the history when it is
        complete (or when the iterator is closed early)."""
        user = normalize_messages([{"role": "user", "content": content}])[0]
        opts = GenerationOptions.make(self.model.vocab_size,
                                      **{**self.options, **options, "cancel": cancel})
        ids = chat_prompt_ids(self._tokenizer, self.history + [user], tools=self.tools)
        context = self.session.context_length
        if len(ids) > context:
            raise ContextLengthError(
                f"the conversation has {len(ids)} tokens but the context holds {context}: "
                f"reset() the chat or load the model with a larger context_length")
        self.session.set_context(ids)
        run = Generation(self.model, self.session, opts, stop_token_ids=self._stop,
                         session_rng=True)
        pieces = self._turn(user, run)
        return pieces if stream else "".join(pieces)

    def _turn(self, user, run):
        try:
            for chunk in run.stream():
                if chunk.text:
                    yield chunk.text
        finally:
            result = run.make_result()
            if result.token_ids or result.finish_reason != "cancelled":
                self.history += [user, {"role": "assistant", "content": result.text}]
            self.last_result = result          # (a turn cancelled before any token is not kept)

# ------------------------------------------------------------------------------------------
# interactive loop


@contextlib.contextmanager
def sigint_cancels(token: CancelToken):
    """While active, a first Ctrl-C sets `token` (the generation stops cleanly); a second one
    raises KeyboardInterrupt. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if token.is_set():
            raise KeyboardInterrupt
        token.cancel()

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def run_chat_cli(model, system: str | None = None, first: str | None = None,
                 context_length: int | None = None, **options) -> None:
    """Chat on the terminal: read lines after "> " until EOF or /exit (/reset starts over),
    stream each reply to stdout and its statistics to stderr; `first` is sent before reading.
    Ctrl-C during a reply stops it (what was said so far stays); at the prompt it exits.
    Works with piped stdin too."""
    session = ChatSession(model, system=system, context_length=context_length, **options)
    if first:
        _reply(session, first)
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
    """Stream one reply; Ctrl-C stops it and the statistics so far are printed."""
    token = CancelToken()
    try:
        with sigint_cancels(token):
            pieces = session.send(text, stream=True, cancel=token)
            try:
                for piece in pieces:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            finally:
                pieces.close()
    except ContextLengthError as exc:
        print(f"error: {exc} (type /reset)", file=sys.stderr)
        return
    print()
    r = session.last_result
    if r is not None:
        u = r.usage
        note = " (stopped)" if r.finish_reason == "cancelled" else ""
        print(f"[{u.completion_tokens} tokens{note}, {u.decode_tokens_per_second:.1f} tok/s; "
              f"prompt {u.prompt_tokens - u.cached_tokens} new tokens ({u.cached_tokens} cached) "
              f"in {u.prefill_seconds:.2f}s, context {session.n_tokens}/"
              f"{session.context_length}]", file=sys.stderr)
