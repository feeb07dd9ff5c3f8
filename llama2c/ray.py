"""llama2c on a Ray cluster (the `ray` extra: pip install "llama2c[ray]"): batch inference with
Ray Data and serving with Ray Serve.

Batch inference: LlamaPredictor is a callable class for ray.data.Dataset.map_batches. Each
actor loads the model once (memory-mapped, so actors on one node share the weight pages) and
runs every batch through llama2c.batchjob.run_rows (Model.generate_batch / chat_batch:
continuous batching inside the actor). A row's result depends only on the row (its seed, or
one derived from its id), never on the actor, batch or node that ran it.

    import ray, llama2c.ray
    ds = ray.data.from_items([{"id": i, "prompt": f"Story {i}:", "max_tokens": 64}
                              for i in range(1000)])
    out = llama2c.ray.generate_dataset(ds, "/shared/SmolLM2-135M-Instruct.Q4_1.gguf",
                                       workers=4, threads_per_worker=2, batch_size=32)
    out.write_json("/shared/out")          # or out.iter_rows(), out.to_pandas()

    # the same by hand:
    ds.map_batches(LlamaPredictor, fn_constructor_kwargs={"model_path": path, "n_threads": 2},
                   compute=ray.data.ActorPoolStrategy(size=4), num_cpus=2, batch_size=32,
                   batch_format="pandas")

Serving: serve_app(model_path, num_replicas=2) is a Ray Serve application whose replicas each
run the OpenAI-compatible app (llama2c.server.create_app) over their own model and scheduler;
Serve's proxy spreads the requests over them.

    from ray import serve
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(llama2c.ray.serve_app(path, num_replicas=2, threads_per_replica=1))
    # -> http://127.0.0.1:8000/v1/chat/completions; `llama2c serve MODEL --ray --replicas 2`

The model path must be readable on every node that runs an actor or replica: a shared file
system, or a registry name ("smollm2") that each node fetches into its own cache (or that
`llama2c pull` filled beforehand).
"""
from __future__ import annotations

import json
import os

EXTRA_HINT = 'llama2c.ray needs Ray: pip install "llama2c[ray]"'

try:
    import ray
    import ray.data
except ImportError as e:          # the extra is missing: say which one
    raise ImportError(f"{EXTRA_HINT} (missing: {e.name})", name=e.name) from e

from .batchjob import output_columns, plain, run_rows

__all__ = ["LlamaPredictor", "generate_dataset", "serve_app", "serve_deployment",
           "run_jsonl_on_ray", "EXTRA_HINT"]

REQUEST_COLUMN = "request_json"       # a row as JSON text (llama2c batch's input lines)
RESPONSE_COLUMN = "response_json"     # the output row as JSON text

# ------------------------------------------------------------------------------------------
# Ray Data


def _load_model(model_path, n_threads, dtype, kv_dtype, context_length):
    from .model import Model, resolve_model_path
    return Model.load(resolve_model_path(model_path), n_threads=n_threads, dtype=dtype,
                      kv_dtype=kv_dtype or "f16", context_length=context_length)


class LlamaPredictor:
    """A callable class for Dataset.map_batches: generation (or scoring) of a batch of rows.

    model_path: a model file or directory readable on the worker's node, or a registry name.
    n_threads: kernel threads of the actor (give map_batches the same num_cpus).
    dtype, kv_dtype, context_length: as for Model.load.
    defaults: sampling options for rows that do not set them (e.g. {"max_new_tokens": 64,
        "temperature": 0}).
    mode: "generate" (columns text, token_ids, finish_reason, prompt_tokens,
        completion_tokens, logprobs, error) or "score" (token_ids, logprobs, score,
        prompt_tokens, error: Model.score of each prompt).
    max_batch, prefill_chunk, kv_budget: of the actor's continuous batching
        (Model.generate_batch).

    A batch (pandas or dict-of-NumPy format) has a "prompt" or "messages" column, optional
    sampling columns (llama2c.batchjob.ROW_OPTIONS, "max_tokens" for "max_new_tokens") and
    any others, which are passed through. A row without a seed gets one derived from its "id"
    (or its prompt). A row that cannot run gets "error" instead of failing the batch.
    A batch with a "request_json" column (each row a JSON object text) gives a
    "response_json" column instead (the output row with its id, as `llama2c batch` writes
    it).
    """

    def __init__(self, model_path, *, n_threads: int = 1, dtype: str | None = None,
                 kv_dtype: str | None = None, context_length: int | None = None,
                 defaults: dict | None = None, mode: str = "generate",
                 max_batch: int | None = None, prefill_chunk: int | None = None, kv_budget=None):
        self.model = _load_model(model_path, n_threads, dtype, kv_dtype, context_length)
        self.defaults = dict(defaults or {})
        self.mode = mode
        self.batch_kw = dict(max_batch=max_batch, prefill_chunk=prefill_chunk, kv_budget=kv_budget)
        run_rows(self.model, [], mode=mode)      # checks the mode here, not on every batch

    def __call__(self, batch):
        import pandas as pd
        is_pandas = isinstance(batch, pd.DataFrame)
        columns = list(batch.columns) if is_pandas else list(batch)
        n = len(batch) if is_pandas else (len(batch[columns[0]]) if columns else 0)
        if REQUEST_COLUMN in columns:
            rows = [json.loads(t) for t in _column(batch, REQUEST_COLUMN, is_pandas)]
            outs = self._run(rows)
            lines = [json.dumps({"id": r.get("id"),
                                 **{k: v for k, v in o.items() if v is not None}},
                                ensure_ascii=False, separators=(",", ":"))
                     for r, o in zip(rows, outs)]
            return pd.DataFrame({RESPONSE_COLUMN: lines}) if is_pandas else \
                {RESPONSE_COLUMN: _objects(lines)}
        values = {c: _column(batch, c, is_pandas) for c in columns}
        outs = self._run([{c: values[c][i] for c in columns} for i in range(n)])
        new = {c: [o[c] for o in outs] for c in output_columns(self.mode)}
        if is_pandas:
            result = batch.drop(columns=[c for c in new if c in columns])
            for c, v in new.items():       # object columns: lists, and ints beside None
                result[c] = pd.Series(v, index=result.index, dtype=object)
            return result
        return {**{c: batch[c] for c in columns if c not in new},
                **{c: _objects(v) for c, v in new.items()}}

    def _run(self, rows: list) -> list:
        return run_rows(self.model, rows, defaults=self.defaults, mode=self.mode, **self.batch_kw)


def _column(batch, name: str, is_pandas: bool) -> list:
    col = batch[name]
    return [plain(v) for v in (col.tolist() if is_pandas else list(col))]


def _objects(values: list):
    """A list as a 1-D NumPy object array (values may be lists of different lengths)."""
    import numpy as np
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def generate_dataset(ds, model_path, *, workers: int = 1, threads_per_worker: int = 1,
                     batch_size: int = 32, defaults: dict | None = None, mode: str = "generate",
                     **predictor_kwargs):
    """ds.map_batches(LlamaPredictor, ...) on `workers` actors of `threads_per_worker` CPUs
    each, `batch_size` rows per batch (each batch one continuous batch inside its actor).
    An actor that dies is restarted and its batch retried (Ray Data's default for actors:
    max_restarts=-1, max_task_retries=-1), so the output still has every row once. predictor_kwargs: LlamaPredictor's (dtype,
    kv_dtype, context_length, max_batch, prefill_chunk, kv_budget)."""
    kwargs = dict(model_path=_portable_path(model_path), n_threads=threads_per_worker,
                  defaults=defaults, mode=mode, **predictor_kwargs)
    return ds.map_batches(LlamaPredictor, fn_constructor_kwargs=kwargs,
                          compute=ray.data.ActorPoolStrategy(size=workers),
                          num_cpus=threads_per_worker, batch_size=batch_size,
                          batch_format="pandas")


def _portable_path(model_path) -> str:
    """A path that exists here, made absolute (workers do not share the driver's working
    directory); anything else (a registry name, a path only the cluster has) as given."""
    p = os.fspath(model_path)
    return os.path.abspath(p) if os.path.exists(p) else p


def connect(address: str | None):
    """ray.init for a command: "local" starts a private Ray instance on this machine (bound
    to 127.0.0.1), "auto" or an address joins a cluster; nothing if Ray is already
    initialized. Returns whether this call started the connection (the caller shuts it
    down)."""
    if ray.is_initialized():
        return False
    kw = dict(include_dashboard=False, log_to_driver=False, logging_level="warning")
    if address in (None, "local"):
        ray.init(_node_ip_address="127.0.0.1", **kw)
    else:
        ray.init(address=address, **kw)
    return True


def run_jsonl_on_ray(address, model_path, lines: list, out, bar, *, workers: int,
                     threads_per_worker: int, batch_size: int, defaults, mode: str,
                     load_kwargs: dict) -> None:
    """`llama2c batch --ray`: the input lines as a dataset, generated by generate_dataset;
    each output row is appended to `out` (llama2c.batchjob.OutputFile) as it arrives."""
    started = connect(address)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False            # ours is on stderr already
        ds = ray.data.from_items([{REQUEST_COLUMN: line} for line in lines])
        ds = generate_dataset(ds, model_path, workers=workers,
                              threads_per_worker=threads_per_worker, batch_size=batch_size,
                              defaults=defaults, mode=mode, **load_kwargs)
        for row in ds.iter_rows():
            o = json.loads(row[RESPONSE_COLUMN])
            out.write(o.pop("id"), o)
            bar.update(1)
    finally:
        if started:
            ray.shutdown()

# ------------------------------------------------------------------------------------------
# Ray Serve


def _replica_app(model_path, load, settings):
    """The OpenAI-compatible app of one replica, over its own model (loaded here, in the
    replica's process); responses say which replica answered (x-llama2c-replica)."""
    from ray import serve

    from .server import create_app
    model = _load_model(model_path, **load)
    app = create_app(model, settings)
    try:
        ctx = serve.get_replica_context()
        replica = getattr(getattr(ctx, "replica_id", None), "unique_id", None) or \
            getattr(ctx, "replica_tag", "")
    except Exception:             # not in a replica (a test calling this directly)
        replica = ""

    @app.middleware("http")
    async def tag_replica(request, call_next):
        response = await call_next(request)
        if replica:
            response.headers["x-llama2c-replica"] = str(replica)
        return response
    return app


def serve_deployment(model_path, *, settings=None, threads_per_replica: int = 1,
                     num_replicas: int | None = 1, autoscaling_config: dict | None = None,
                     dtype: str | None = None, kv_dtype: str | None = None,
                     context_length: int | None = None, name: str = "llama2c",
                     ray_actor_options: dict | None = None):
    """The Ray Serve deployment of the OpenAI-compatible app (not yet bound): each replica
    loads the model and serves llama2c.server.create_app(model, settings) with
    `threads_per_replica` kernel threads (and as many CPUs reserved). num_replicas fixed, or
    autoscaling_config (Serve's: {"min_replicas": 1, "max_replicas": 4,
    "target_ongoing_requests": 16, ...}; num_replicas is then ignored)."""
    from ray import serve
    try:
        import importlib
        importlib.import_module("llama2c.server.app")     # fail here, not in the replicas
        from .server import ServerSettings
    except ImportError as e:
        raise ImportError(f'Ray Serve runs llama2c\'s server: pip install "llama2c[ray,server]" '
                          f'(missing: {e.name})', name=e.name) from e
    settings = settings or ServerSettings()
    if settings.threads is None:
        settings.threads = threads_per_replica
    if settings.model_name is None:
        settings.model_name = os.path.splitext(os.path.basename(os.fspath(model_path)))[0]
    path = _portable_path(model_path)
    load = dict(n_threads=threads_per_replica, dtype=dtype, kv_dtype=kv_dtype,
                context_length=context_length)

    def build_app():           # called in each replica when it starts
        return _replica_app(path, load, settings)

    class LlamaServer:
        """A replica of llama2c's OpenAI-compatible server."""

    options = {"num_cpus": threads_per_replica, **(ray_actor_options or {})}
    scale = {"autoscaling_config": autoscaling_config} if autoscaling_config else \
        {"num_replicas": num_replicas}
    # a replica decodes up to max_batch sequences at once and queues the rest itself
    return serve.deployment(serve.ingress(build_app)(LlamaServer), name=name,
                            ray_actor_options=options,
                            max_ongoing_requests=max(settings.max_batch * 2, 32), **scale)


def serve_app(model_path, **kwargs):
    """serve_deployment(model_path, **kwargs).bind(): a Serve application, for
    serve.run(app, route_prefix="/")."""
    return serve_deployment(model_path, **kwargs).bind()
