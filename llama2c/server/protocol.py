"""The OpenAI API's request and response shapes, without any web framework.

parse_chat / parse_completion check a request body field by field (an ApiError names the
field in `param`) and turn it into prompts and llama2c.generation options; the *_response and
*_chunk functions build the JSON objects OpenAI clients read back: chat completions (message,
delta, logprobs {"content": [...]}) and legacy completions (text, logprobs {"tokens",
"token_logprobs", "top_logprobs", "text_offset"}).
"""
from __future__ import annotations

import math
import numbers
import time
import uuid
from dataclasses import dataclass, field

from ..generation import MAX_LOGPROBS

MAX_STOP = 16            # stop strings per request (OpenAI allows 4)
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An error answered with OpenAI's JSON shape:
    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def invalid(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)

# ------------------------------------------------------------------------------------------
# field checks


def _present(body: dict, name: str) -> bool:
    return body.get(name) is not None


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid(name, f"'{name}' must be a boolean, got {v!r}", "invalid_type")
    return v


def _num(body: dict, name: str, default, lo=None, hi=None, integer: bool = False):
    v = body.get(name)
    if v is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or (
            integer and not (isinstance(v, numbers.Integral) or float(v).is_integer())):
        raise invalid(name, f"'{name}' must be {kind}, got {v!r}", "invalid_type")
    if not math.isfinite(v):
        raise invalid(name, f"'{name}' must be finite, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else (f"<= {hi}" if lo is None else f"between {lo} and {hi}")
        raise invalid(name, f"'{name}' must be {rng}, got {v!r}")
    return int(v) if integer else float(v)


def _stop(body: dict) -> tuple:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise invalid("stop", f"'stop' must be a string or a list of strings, got {v!r}",
                      "invalid_type")
    items = [s for s in items if s]
    if len(items) > MAX_STOP:
        raise invalid("stop", f"'stop' may hold at most {MAX_STOP} strings, got {len(items)}")
    return tuple(items)


def _logit_bias(body: dict, vocab_size: int) -> dict:
    v = body.get("logit_bias")
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise invalid("logit_bias", "'logit_bias' must be an object {token id: bias}",
                      "invalid_type")
    out = {}
    for key, bias in v.items():
        try:
            tid = int(key)
        except (TypeError, ValueError):
            raise invalid("logit_bias", f"'logit_bias' keys must be token ids, got {key!r}") \
                from None
        if not 0 <= tid < vocab_size:
            raise invalid("logit_bias", f"'logit_bias' token id {tid} is outside "
                                        f"[0, {vocab_size})")
        if isinstance(bias, bool) or not isinstance(bias, numbers.Real) or not \
                -100 <= bias <= 100:
            raise invalid("logit_bias", f"'logit_bias' values must be numbers in [-100, 100], "
                                        f"got {bias!r} for token {key}")
        out[tid] = float(bias)
    return out


def _model(body: dict, model_name: str) -> str:
    name = body.get("model")
    if name is None:
        raise invalid("model", "you must provide a model parameter", "missing_required_parameter")
    if not isinstance(name, str):
        raise invalid("model", f"'model' must be a string, got {name!r}", "invalid_type")
    if name != model_name:
        raise ApiError(404, f"The model '{name}' does not exist; this server serves "
                            f"'{model_name}' (GET /v1/models)", param="model",
                       code="model_not_found")
    return name


def _unsupported(body: dict, names) -> None:
    for name in names:
        if body.get(name) not in (None, [], {}):
            raise invalid(name, f"'{name}' is not supported by this server",
                          "unsupported_parameter")

# ------------------------------------------------------------------------------------------
# requests


@dataclass
class Params:
    """What a completion or chat request asks for, checked."""
    kind: str                        # "chat" or "completion"
    model: str
    prompts: list                    # token id lists (chat: one) or texts to encode
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None    # None: up to the context
    options: dict = field(default_factory=dict)   # llama2c.generation options (shared)
    seed: int | None = None
    logprobs: int | None = None      # k alternatives (chat: top_logprobs), None: off
    echo: bool = False
    max_tokens_param: str = "max_tokens"

    def choice_options(self, j: int) -> dict:
        """The options of choice j: the seed of choice j is seed + j (mod 2**64), so choice 0
        is what the same request with n=1 returns."""
        o = dict(self.options)
        if self.seed is not None:
            o["seed"] = (self.seed + j) % 2**64
        return o


def _common(body: dict, kind: str, model_name: str, vocab_size: int, max_n: int) -> Params:
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object", "invalid_type")
    model = _model(body, model_name)
    stream = _bool(body, "stream")
    so = body.get("stream_options")
    include_usage = False
    if so is not None:
        if not stream:
            raise invalid("stream_options", "'stream_options' is only allowed with stream=true")
        if not isinstance(so, dict):
            raise invalid("stream_options", "'stream_options' must be an object", "invalid_type")
        include_usage = _bool(so, "include_usage")
    n = _num(body, "n", 1, 1, max_n, integer=True)
    temperature = _num(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _num(body, "top_p", 1.0, 0.0, 1.0)
    seed = _num(body, "seed", None, -2**63, 2**64 - 1, integer=True)
    opts = {
        "temperature": temperature, "top_p": top_p,
        "presence_penalty": _num(body, "presence_penalty", 0.0, -2.0, 2.0),
        "frequency_penalty": _num(body, "frequency_penalty", 0.0, -2.0, 2.0),
        "logit_bias": _logit_bias(body, vocab_size),
        "stop": _stop(body),
        # llama.cpp / vLLM extensions, for clients that send them (extra_body)
        "top_k": _num(body, "top_k", 0, 0, None, integer=True),
        "min_p": _num(body, "min_p", 0.0, 0.0, 1.0),
        "repetition_penalty": _num(body, "repetition_penalty", 1.0, 1e-6, None),
    }
    if seed is not None:
        seed %= 2**64
    return Params(kind, model, [], n=n, stream=stream, include_usage=include_usage,
                  options=opts, seed=seed)


def parse_chat(body: dict, model_name: str, vocab_size: int, max_n: int = 16) -> Params:
    """POST /v1/chat/completions: the messages stay for the chat template (p.prompts =
    [messages]); ApiError for anything invalid."""
    p = _common(body, "chat", model_name, vocab_size, max_n)
    messages = body.get("messages")
    if messages is None:
        raise invalid("messages", "you must provide a 'messages' parameter",
                      "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "'messages' must be a non-empty list of messages", "invalid_type")
    clean = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(where, f"'{where}' must be an object with 'role' and 'content'",
                          "invalid_type")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise invalid(f"{where}.role", f"'{where}.role' must be one of "
                                           f"{', '.join(CHAT_ROLES)}, got {role!r}")
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or \
                        not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise invalid(f"{where}.content[{j}]",
                                  f"'{where}.content[{j}]' must be a text part "
                                  f"{{'type': 'text', 'text': ...}}; got {kind!r} (only text "
                                  f"is supported)")
        elif content is None:
            if role != "assistant":
                raise invalid(f"{where}.content", f"'{where}.content' is required",
                              "missing_required_parameter")
            content = ""
        elif not isinstance(content, str):
            raise invalid(f"{where}.content", f"'{where}.content' must be a string or a list "
                                              f"of text parts", "invalid_type")
        msg = {"role": "system" if role == "developer" else role, "content": content}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        clean.append(msg)
    p.prompts = [clean]
    _unsupported(body, ("tools", "functions"))
    tc = body.get("tool_choice")
    if tc not in (None, "none", "auto"):
        raise invalid("tool_choice", "'tool_choice' is not supported by this server",
                      "unsupported_parameter")
    rf = body.get("response_format")
    if rf is not None and (not isinstance(rf, dict) or rf.get("type") != "text"):
        raise invalid("response_format", "only response_format {'type': 'text'} is supported",
                      "unsupported_parameter")
    mt, mct = body.get("max_tokens"), body.get("max_completion_tokens")
    if mct is not None:
        p.max_tokens = _num(body, "max_completion_tokens", None, 1, None, integer=True)
        p.max_tokens_param = "max_completion_tokens"
    if mt is not None:
        p.max_tokens = _num(body, "max_tokens", None, 1, None, integer=True)
        p.max_tokens_param = "max_tokens"
    if _bool(body, "logprobs"):
        p.logprobs = _num(body, "top_logprobs", 0, 0, MAX_LOGPROBS, integer=True)
    elif body.get("top_logprobs") is not None:
        raise invalid("top_logprobs", "'top_logprobs' requires 'logprobs': true")
    return p


def parse_completion(body: dict, model_name: str, vocab_size: int, max_n: int = 16,
                     max_prompts: int = 64) -> Params:
    """POST /v1/completions: p.prompts are texts or token id lists."""
    p = _common(body, "completion", model_name, vocab_size, max_n)
    prompt = body.get("prompt")
    if prompt is None:
        raise invalid("prompt", "you must provide a 'prompt' parameter",
                      "missing_required_parameter")

    def is_ids(x):
        return isinstance(x, list) and x and all(
            isinstance(t, int) and not isinstance(t, bool) for t in x)
    if isinstance(prompt, str):
        prompts = [prompt]
    elif is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, str) or is_ids(x)
                                                     for x in prompt):
        prompts = list(prompt)
    else:
        raise invalid("prompt", "'prompt' must be a string, a list of strings, a list of token "
                                "ids or a list of token id lists (non-empty)", "invalid_type")
    if len(prompts) > max_prompts:
        raise invalid("prompt", f"at most {max_prompts} prompts per request, got {len(prompts)}")
    for ids in prompts:
        if not isinstance(ids, str) and any(not 0 <= t < vocab_size for t in ids):
            raise invalid("prompt", f"'prompt' token ids must be in [0, {vocab_size})")
    p.prompts = prompts
    _unsupported(body, ("suffix",))
    best_of = _num(body, "best_of", None, 1, None, integer=True)
    if best_of is not None and best_of != p.n:
        raise invalid("best_of", "only best_of equal to n (or unset) is supported",
                      "unsupported_parameter")
    p.max_tokens = _num(body, "max_tokens", 16, 0, None, integer=True)
    lp = body.get("logprobs")
    if lp is not None and lp is not False:
        p.logprobs = _num(body, "logprobs", 0, 0, MAX_LOGPROBS, integer=True)
    p.echo = _bool(body, "echo")
    return p

# ------------------------------------------------------------------------------------------
# responses


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())


class TokenText:
    """Token strings and bytes for logprobs (a control token shows as its own text)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._cache = {}

    def bytes(self, t: int) -> bytes:
        b = self._cache.get(t)
        if b is None:
            b = self.tok.token_bytes(t) or (self.tok.id_to_token(t) or "").encode()
            self._cache[t] = b
        return b

    def text(self, t: int) -> str:
        return self.bytes(t).decode("utf-8", "replace")


def chat_logprobs(tt: TokenText, lps) -> dict | None:
    """OpenAI chat logprobs: {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}."""
    if lps is None:
        return None

    def entry(t, lp):
        return {"token": tt.text(t), "logprob": lp, "bytes": list(tt.bytes(t))}
    return {"content": [{**entry(x.token_id, x.logprob),
                         "top_logprobs": [entry(a, b) for a, b in x.top]} for x in lps],
            "refusal": None}


def completion_logprobs(tt: TokenText, lps, offset: int = 0) -> dict | None:
    """Legacy completions logprobs: parallel lists tokens, token_logprobs, top_logprobs
    ({token: logprob}; None for the prompt's first token) and text_offset."""
    if lps is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    for x in lps:
        s = tt.text(x.token_id)
        tokens.append(s)
        token_lps.append(x.logprob)
        tops.append(None if x.logprob is None else {tt.text(a): b for a, b in x.top})
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
