"""The OpenAI-compatible app (FastAPI) over a llama2c.batch.Scheduler.

Every generation request becomes one scheduler request per choice (and per prompt); their
chunks come back from the scheduler's thread through loop.call_soon_threadsafe into one
asyncio queue per HTTP request. Streams are server-sent events (sse-starlette) ending with
`data: [DONE]`. A client that goes away (its stream closes, or the connection of a
non-streamed request drops) has its sequences cancelled at the next scheduler step, which
frees their KV blocks. Errors use OpenAI's JSON shape (protocol.ApiError).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..batch import Scheduler, asyncio_sink
from ..errors import ContextLengthError, QueueFullError
from . import ServerSettings, protocol
from .metrics import CONTENT_TYPE, Metrics
from .protocol import ApiError

log = logging.getLogger("llama2c.server")

ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")
CLIENT_CLOSED = 499          # nginx's "client closed request", for the metrics


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))

# ------------------------------------------------------------------------------------------
# state


class ServerState:
    """The app's backend (resolved on first use), settings and metrics."""

    def __init__(self, backend, settings: ServerSettings):
        self.settings = settings
        self.metrics = Metrics()
        self._backend = backend
        # a callable is called on the first request; a Model or Scheduler serves at startup
        self.lazy = callable(backend) and not isinstance(backend, Scheduler) and \
            not hasattr(backend, "_engine")
        self._scheduler = None
        self._owned = False
        self._lock = threading.Lock()
        self.created = protocol.now()

    def resolve(self) -> Scheduler:
        """The scheduler (built from a Model, or the callable called, once), started."""
        with self._lock:
            if self._scheduler is None:
                backend = self._backend() if self.lazy else self._backend
                if isinstance(backend, Scheduler):
                    self._scheduler = backend
                elif hasattr(backend, "_engine"):
                    s = self.settings
                    self._scheduler = Scheduler(backend, s.kv_budget, max_batch=s.max_batch,
                                                prefill_chunk=s.prefill_chunk,
                                                max_queue=s.max_queue, n_threads=s.threads)
                    self._owned = True
                else:
                    raise TypeError(f"create_app: expected a Model, a Scheduler or a callable "
                                    f"returning one, got {type(backend).__name__}")
            self._scheduler.start()
            return self._scheduler

    async def ready(self) -> Scheduler:
        if self._scheduler is not None:
            return self._scheduler
        return await run_in_threadpool(self.resolve)

    @property
    def scheduler(self):
        return self._scheduler

    @property
    def model_name(self) -> str:
        if self.settings.model_name:
            return self.settings.model_name
        path = getattr(self._scheduler.model, "path", None) if self._scheduler else None
        return Path(path).stem if path else "llama2c"

    def close(self) -> None:
        if self._owned and self._scheduler is not None:
            self._scheduler.close()

# ------------------------------------------------------------------------------------------
# plumbing: request counting, errors, body, auth


class _CountRequests:
    """ASGI middleware: count every HTTP request by endpoint and response status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            self.metrics.count_request(path if path in ENDPOINTS else "other", status)


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def read_json(request: Request, limit: int) -> dict:
    """The JSON body, refused with 413 beyond `limit` bytes (by Content-Length, and while
    reading whatever the header says)."""
    too_large = ApiError(413, f"the request body exceeds {limit} bytes",
                         code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        parts.append(chunk)
    try:
        body = json.loads(b"".join(parts))
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_type")
    return body


async def _watch_disconnect(request: Request, reqs: list, gone: list) -> None:
    """Cancel `reqs` when the client of a non-streamed request disconnects."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gone.append(True)
                for r in reqs:
                    r.cancel()
                return
    except Exception:
        return

# ------------------------------------------------------------------------------------------
# generation


def _check_lengths(p: protocol.Params, prompt_ids: list, context: int) -> list:
    """max_new_tokens of each prompt; 400 when a prompt plus max_tokens exceeds the context."""
    where = "messages" if p.kind == "chat" else "prompt"
    out = []
    for ids in prompt_ids:
        if not ids:
            raise protocol.invalid(where, f"the {where} is empty (no tokens)")
        n = len(ids)
        if p.max_tokens is None:
            if n >= context:
                raise ApiError(400, f"This model's maximum context length is {context} tokens; "
                                    f"the {where} has {n}, leaving no room for a completion",
                               param=where, code="context_length_exceeded")
            out.append(context - n)
        else:
            if n + p.max_tokens > context:
                raise ApiError(400, f"This model's maximum context length is {context} tokens. "
                                    f"However, you requested {n + p.max_tokens} tokens ({n} in "
                                    f"the {where}, {p.max_tokens} in the completion). Please "
                                    f"reduce the length of the {where} or the completion.",
                               param=p.max_tokens_param if n < context else where,
                               code="context_length_exceeded")
            out.append(p.max_tokens)
    return out


def _token_logprobs(result_or_chunk, stop_ids) -> list | None:
    """Logprobs without the end-of-sequence token that ended generation (its text is not
    part of the answer either)."""
    lps = result_or_chunk.logprobs
    if lps and isinstance(result_or_chunk.stop_sequence, int) and \
            lps[-1].token_id == result_or_chunk.stop_sequence:
        lps = lps[:-1]
    return lps


class Completion:
    """One generation request of the API: its scheduler requests, their chunks, the
    response."""

    def __init__(self, state: ServerState, p: protocol.Params, prompt_ids: list,
                 prompt_texts: list | None, stop_ids):
        self.state, self.p = state, p
        self.prompt_ids, self.prompt_texts = prompt_ids, prompt_texts
        self.stop_ids = stop_ids
        self.id = protocol.new_id(p.kind)
        self.created = protocol.now()
        self.tt = protocol.TokenText(state.scheduler.model.tokenizer) \
            if state.scheduler.model.tokenizer is not None else None
        self.queue: asyncio.Queue = asyncio.Queue()
        self.reqs: list = []

    def submit(self) -> None:
        sched, p = self.state.scheduler, self.p
        max_new = _check_lengths(p, self.prompt_ids, sched.context)
        items, tags = [], []
        for i, ids in enumerate(self.prompt_ids):
            for j in range(p.n):
                o = p.choice_options(j)
                o.update(max_new_tokens=max_new[i], logprobs=p.logprobs, echo=p.echo)
                items.append((ids, o))
                tags.append(i * p.n + j)
        loop = asyncio.get_running_loop()
        try:
            self.reqs = sched.submit_many(items, stop_token_ids=self.stop_ids,
                                          sinks=[asyncio_sink(loop, self.queue, t) for t in tags],
                                          tags=tags)
        except QueueFullError as e:
            raise ApiError(429, f"the server is busy: {e}", type="rate_limit_exceeded",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except ContextLengthError as e:
            raise ApiError(400, str(e), code="context_length_exceeded") from None
        except (TypeError, ValueError) as e:
            raise ApiError(400, str(e), code="invalid_value") from None
        except RuntimeError as e:             # the scheduler is closed: shutting down
            raise ApiError(503, f"the server is shutting down: {e}", type="server_error",
                           code="unavailable") from None

    def cancel_all(self) -> None:
        for r in self.reqs:
            if not r.done:
                r.cancel()

    def _prompt_text(self, i: int) -> str:
        if self.prompt_texts is not None and isinstance(self.prompt_texts[i], str):
            return self.prompt_texts[i]
        tok = self.state.scheduler.model.tokenizer
        return tok.decode(self.prompt_ids[i]) if tok is not None else ""

    def usage(self, results: dict) -> dict:
        prompt = sum(len(ids) for ids in self.prompt_ids)
        completion = sum(r.usage.completion_tokens for r in results.values())
        return protocol.usage_dict(prompt, completion)

    # ---- not streamed --------------------------------------------------------------------

    async def respond(self, request: Request) -> Response:
        gone: list = []
        watcher = asyncio.ensure_future(_watch_disconnect(request, self.reqs, gone))
        try:
            results, remaining = {}, len(self.reqs)
            while remaining:
                tag, item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    remaining -= 1
                    results[tag] = self.reqs[tag].result
        finally:
            watcher.cancel()
            self.cancel_all()
        if gone:
            return Response(status_code=CLIENT_CLOSED)
        if any(r.finish_reason == "cancelled" for r in results.values()):
            raise ApiError(503, "the request was cancelled: the server is shutting down",
                           type="server_error", code="cancelled")
        choices = [self._choice(tag, results[tag]) for tag in sorted(results)]
        obj = "chat.completion" if self.p.kind == "chat" else "text_completion"
        return JSONResponse({"id": self.id, "object": obj, "created": self.created,
                             "model": self.p.model, "system_fingerprint": f"llama2c-{__version__}",
                             "choices": choices, "usage": self.usage(results)})

    def _choice(self, tag: int, r) -> dict:
        lps = _token_logprobs(r, self.stop_ids)
        if self.p.kind == "chat":
            return {"index": tag, "message": {"role": "assistant", "content": r.text},
                    "logprobs": protocol.chat_logprobs(self.tt, lps) if lps is not None else None,
                    "finish_reason": r.finish_reason}
        i = tag // self.p.n
        text, logprobs = r.text or "", None
        prompt_text = self._prompt_text(i) if (self.p.echo or lps is not None) else ""
        if self.p.echo:
            text = prompt_text + text
        if lps is not None:
            entries = (r.prompt_logprobs or []) + lps if self.p.echo else lps
            logprobs = protocol.completion_logprobs(self.tt, entries,
                                                    0 if self.p.echo else len(prompt_text))
        return {"index": tag, "text": text, "logprobs": logprobs,
                "finish_reason": r.finish_reason}

    # ---- streamed ------------------------------------------------------------------------

    def _chunk(self, choices: list, usage=None) -> dict:
        obj = "chat.completion.chunk" if self.p.kind == "chat" else "text_completion"
        c = {"id": self.id, "object": obj, "created": self.created, "model": self.p.model,
             "system_fingerprint": f"llama2c-{__version__}", "choices": choices}
        if self.p.include_usage:
            c["usage"] = usage
        return {"data": _dumps(c)}

    def _delta(self, tag: int, item, first: bool) -> dict | None:
        """The chunk of a StreamChunk's text and logprobs (None when it has neither)."""
        lps = _token_logprobs(item, self.stop_ids) if item.logprobs is not None else None
        if self.p.kind == "chat":
            if not item.text and not lps:
                return None
            logprobs = protocol.chat_logprobs(self.tt, lps) if lps else None
            return self._chunk([{"index": tag, "delta": {"content": item.text},
                                 "logprobs": logprobs, "finish_reason": None}])
        text, entries = item.text, lps
        if first and self.p.echo:
            text = self._prompt_text(tag // self.p.n) + text
            if entries is not None:
                entries = (item.prompt_logprobs or []) + entries
        if not text and not entries:
            return None
        logprobs = protocol.completion_logprobs(self.tt, entries) if entries else None
        return self._chunk([{"index": tag, "text": text, "logprobs": logprobs,
                             "finish_reason": None}])

    async def events(self):
        """The server-sent events of a streamed response."""
        try:
            if self.p.kind == "chat":
                for tag in range(len(self.reqs)):
                    yield self._chunk([{"index": tag, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}])
            results, remaining, seen = {}, len(self.reqs), set()
            while remaining:
                tag, item = await self.queue.get()
                if isinstance(item, BaseException):
                    log.error("generation failed: %r", item)
                    yield {"data": _dumps(ApiError(500, "generation failed", type="server_error",
                                                   code="internal_error").body())}
                    return
                if item.finish_reason == "cancelled":
                    yield {"data": _dumps(ApiError(503, "the request was cancelled: the server "
                                                        "is shutting down", type="server_error",
                                                   code="cancelled").body())}
                    return
                delta = self._delta(tag, item, tag not in seen)
                seen.add(tag)
                if delta is not None:
                    yield delta
                if item.finish_reason is not None:
                    remaining -= 1
                    results[tag] = self.reqs[tag].result
                    finish = {"index": tag, "finish_reason": item.finish_reason, "logprobs": None}
                    finish.update({"delta": {}} if self.p.kind == "chat" else {"text": ""})
                    yield self._chunk([finish])
            if self.p.include_usage:
                yield self._chunk([], usage=self.usage(results))
            yield {"data": "[DONE]"}
        finally:
            self.cancel_all()


async def _generate(request: Request, state: ServerState, p: protocol.Params, prompt_ids: list,
                    prompt_texts, stop_ids) -> Response:
    c = Completion(state, p, prompt_ids, prompt_texts, stop_ids)
    c.submit()
    if p.stream:
        return EventSourceResponse(c.events(), sep="\n", ping=15,
                                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await c.respond(request)

# ------------------------------------------------------------------------------------------
# the app


def create_app(backend, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app serving `backend` (a Model, a Scheduler, or a zero-argument callable
    returning one, called on the first request) with OpenAI's API; see llama2c.server."""
    settings = settings or ServerSettings()
    state = ServerState(backend, settings)

    @asynccontextmanager
    async def lifespan(app):
        if not state.lazy:
            await state.ready()
        yield
        await run_in_threadpool(state.close)

    app = FastAPI(title="llama2c", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.llama2c = state
    app.add_middleware(_CountRequests, metrics=state.metrics)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        if e.status_code == 404:
            err = ApiError(404, f"Unknown request URL: {request.method} {request.url.path}",
                           code="unknown_url")
        elif e.status_code == 405:
            err = ApiError(405, f"Method {request.method} is not allowed for {request.url.path}",
                           code="method_not_allowed")
        else:
            err = ApiError(e.status_code, str(e.detail))
        return _error_response(err)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error_response(ApiError(500, "internal server error", type="server_error",
                                        code="internal_error"))

    async def check_key(request: Request):
        key = settings.api_key
        if not key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "You didn't provide an API key: send it as "
                                "'Authorization: Bearer KEY'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(check_key)]

    @app.get("/health")
    async def health():
        sched = state.scheduler if state.lazy else await state.ready()
        if sched is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "model": state.model_name, "queue_depth": sched.queue_depth,
                "running": sched.running}

    @app.get("/metrics")
    async def metrics():
        sched = state.scheduler
        text = state.metrics.render(sched.stats() if sched else None,
                                    state.model_name if sched else "")
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    def model_card() -> dict:
        sched = state.scheduler
        return {"id": state.model_name, "object": "model", "created": state.created,
                "owned_by": "llama2c", "context_length": sched.context}

    @app.get("/v1/models", dependencies=auth)
    async def list_models():
        await state.ready()
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def get_model(model_id: str):
        await state.ready()
        if model_id != state.model_name:
            raise ApiError(404, f"The model '{model_id}' does not exist", param="model",
                           code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request):
        body = await read_json(request, settings.max_body_bytes)
        sched = await state.ready()
        model = sched.model
        p = protocol.parse_chat(body, state.model_name, model.vocab_size, settings.max_n)
        if model.tokenizer is None:
            raise protocol.invalid("messages", "this model has no tokenizer: chat is not available")
        from ..chat import chat_prompt_ids, chat_stop_ids

        def encode():
            try:
                return chat_prompt_ids(model.tokenizer, p.prompts[0])
            except ValueError as e:
                raise protocol.invalid("messages", f"the messages cannot be rendered: {e}") \
                    from None
        ids = await run_in_threadpool(encode)
        return await _generate(request, state, p, [ids], None, chat_stop_ids(model.tokenizer))

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request):
        body = await read_json(request, settings.max_body_bytes)
        sched = await state.ready()
        model = sched.model
        p = protocol.parse_completion(body, state.model_name, model.vocab_size, settings.max_n)
        if model.tokenizer is None and any(isinstance(x, str) for x in p.prompts):
            raise protocol.invalid("prompt", "this model has no tokenizer: give token ids")

        def encode():
            # control-token text in a prompt stays plain text (special=False)
            return [model.encode_prompt(x).tolist() if isinstance(x, str) else list(x)
                    for x in p.prompts]
        ids = await run_in_threadpool(encode)
        return await _generate(request, state, p, ids, p.prompts, None)

    return app


def run_server(backend, settings: ServerSettings | None = None, host: str = "127.0.0.1",
               port: int = 8000, log_level: str = "info") -> None:
    """Serve create_app(backend, settings) with uvicorn until interrupted."""
    import uvicorn
    app = create_app(backend, settings)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
