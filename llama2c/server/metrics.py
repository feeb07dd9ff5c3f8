"""Prometheus text exposition (format 0.0.4) of the server's counters and gauges, written by
hand: requests by endpoint and status, tokens, queue depth, running batch size, KV blocks and
tokens/s (llama2c.batch.Scheduler.stats)."""
from __future__ import annotations

import threading
from collections import Counter

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _value(v) -> str:
    return repr(float(v)) if isinstance(v, float) else str(int(v))


class Metrics:
    """Request counters of the HTTP layer (thread-safe), rendered with the scheduler's."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = Counter()           # (endpoint, status) -> count

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, str(status))] += 1

    def render(self, stats: dict | None, model_name: str) -> str:
        """The exposition text; `stats` is Scheduler.stats() (None before the model loaded)."""
        out = []

        def metric(name, kind, help_, samples):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            for labels, v in samples:
                out.append(f"{name}{_labels(labels)} {_value(v)}")

        with self._lock:
            reqs = sorted(self.requests.items())
        metric("llama2c_requests_total", "counter", "HTTP requests by endpoint and status code.",
               [({"endpoint": e, "status": s}, n) for (e, s), n in reqs])
        if stats is not None:
            m = {"model": model_name}
            for name, key, kind, help_ in (
                    ("llama2c_prompt_tokens_total", "prompt_tokens", "counter",
                     "Prompt tokens prefilled."),
                    ("llama2c_generation_tokens_total", "generated_tokens", "counter",
                     "Tokens generated."),
                    ("llama2c_sequences_total", "requests", "counter",
                     "Sequences submitted to the scheduler (one per choice)."),
                    ("llama2c_sequences_cancelled_total", "cancelled", "counter",
                     "Sequences cancelled (client gone, shutdown)."),
                    ("llama2c_sequences_failed_total", "failed", "counter",
                     "Sequences ended by an error."),
                    ("llama2c_preemptions_total", "preemptions", "counter",
                     "Sequences preempted for KV blocks (prefilled again later)."),
                    ("llama2c_scheduler_steps_total", "steps", "counter",
                     "Forward passes of the scheduler."),
                    ("llama2c_queue_depth", "queue_depth", "gauge",
                     "Sequences waiting for a place in the batch."),
                    ("llama2c_running_sequences", "running", "gauge",
                     "Sequences in the running batch."),
                    ("llama2c_kv_blocks_used", "kv_blocks_used", "gauge",
                     "KV cache blocks held by sequences."),
                    ("llama2c_kv_blocks_free", "kv_blocks_free", "gauge",
                     "KV cache blocks free."),
                    ("llama2c_kv_blocks_total", "kv_blocks_total", "gauge",
                     "KV cache blocks in the pool."),
                    ("llama2c_generation_tokens_per_second", "tokens_per_second", "gauge",
                     "Tokens generated per second over the last 10 seconds.")):
                metric(name, kind, help_, [(m, stats[key])])
        return "\n".join(out) + "\n"
