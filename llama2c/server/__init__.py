"""An OpenAI-compatible HTTP server over llama2c's batched generation (the `server` extra:
pip install "llama2c[server]").

    from llama2c import Model
    from llama2c.server import create_app, ServerSettings
    app = create_app(Model.load("smollm2"), ServerSettings(api_key="secret"))
    # uvicorn.run(app, host="127.0.0.1", port=8000), or `llama2c serve smollm2`

create_app takes a Model (the app builds and owns a llama2c.batch.Scheduler), a Scheduler (to
share one), or a zero-argument callable returning either, called on the first request (so a
process that imports the app, e.g. a Ray Serve replica, loads the model itself). Endpoints:
GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health, GET /metrics.
"""
from __future__ import annotations

from dataclasses import dataclass

EXTRA_HINT = 'the llama2c server needs its optional dependencies: pip install "llama2c[server]"'


@dataclass
class ServerSettings:
    """Settings of the app and of the scheduler it builds for a Model."""
    model_name: str | None = None      # the "model" clients send (default: the file's stem)
    api_key: str | None = None         # required as "Authorization: Bearer KEY" when set
    max_queue: int = 256               # sequences waiting before 429
    max_body_bytes: int = 1 << 20      # request bodies beyond: 413
    max_n: int = 16                    # most choices (n) per request
    kv_budget: object = "512MB"        # KV pool: bytes ("512MB") or positions (8192)
    max_batch: int = 16                # sequences per step
    prefill_chunk: int = 32            # prompt tokens per step
    threads: int | None = None         # kernel threads (default: the model's)


def __getattr__(name):
    if name in ("create_app", "run_server"):
        try:
            from . import app
        except ImportError as e:
            raise ImportError(f"{EXTRA_HINT} (missing: {e.name})") from e
        return getattr(app, name)
    raise AttributeError(f"module 'llama2c.server' has no attribute {name!r}")


__all__ = ["ServerSettings", "create_app", "run_server", "EXTRA_HINT"]
