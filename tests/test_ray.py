"""llama2c on Ray (llama2c.ray), on a Ray instance this module starts bound to loopback (no
dashboard, no usage reports) and shuts down: a Ray Data job returns, row for row, what a local
run returns; a worker killed mid-job is retried and every row comes out once; `llama2c batch
--ray` equals `llama2c batch`; the Ray Serve deployment answers the openai client as the model
does alone, spreading requests over its replicas."""
import json
import os
import socket
import sys
import threading
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason='the ray extra is not installed: pip install "llama2c[ray]"')
pytest.importorskip("ray.data", reason='Ray Data is not installed: pip install "llama2c[ray]"')

from llama2c import cli  # noqa: E402
from llama2c.batchjob import run_rows  # noqa: E402
from llama2c.model import Model  # noqa: E402
from llama2c.testing import write_toy_gguf  # noqa: E402
from test_batchjob import make_rows, read_jsonl, write_jsonl  # noqa: E402

import llama2c.ray as l2c_ray  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Ray Serve's own pydantic models warn on import
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory):
    return write_toy_gguf(tmp_path_factory.mktemp("ray") / "toy.gguf", seed=2)


@pytest.fixture(scope="module")
def toy(toy_path):
    return Model.load(toy_path, n_threads=1)


@pytest.fixture(scope="module")
def ray_session():
    """A 2-CPU Ray instance on 127.0.0.1 only, for the whole module."""
    from ray import cloudpickle
    saved = {k: os.environ.get(k) for k in ("RAY_USAGE_STATS_ENABLED", "PYTHONPATH")}
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # the workers import llama2c from this tree (they inherit the environment from here)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, logging_level="warning")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])   # DyingPredictor
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        try:
            from ray import serve
            serve.shutdown()
        finally:
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def by_id(rows) -> dict:
    return {json.dumps(r["id"]): r for r in rows}


COLUMNS = ("text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens",
           "logprobs", "error")


def test_ray_data_matches_local(ray_session, toy, toy_path):
    rows = make_rows(200)
    ds = ray.data.from_items([{**r, "id": json.dumps(r["id"])} for r in rows])   # one id type
    got = l2c_ray.generate_dataset(ds, toy_path, workers=2, threads_per_worker=1,
                                   batch_size=16).take_all()
    assert len(got) == len(rows)
    got = {r["id"]: r for r in got}
    assert len(got) == len(rows)
    local = run_rows(toy, [{**r, "id": json.dumps(r["id"])} for r in rows])
    for row, want in zip(rows, local):
        out = got[json.dumps(row["id"])]
        assert {c: out[c] for c in COLUMNS} == want, row
        assert out["prompt"] == row.get("prompt")          # input columns pass through
    assert sum(o["logprobs"] is not None for o in local) > 0
    assert {o["finish_reason"] for o in local} == {"stop", "length"}


def test_ray_data_numpy_batches_and_score(ray_session, toy, toy_path):
    rows = [{"id": i, "prompt": p} for i, p in enumerate(["the cat sat", "hello world", "a dog"])]
    ds = ray.data.from_items(rows)
    got = ds.map_batches(l2c_ray.LlamaPredictor, fn_constructor_kwargs=dict(
        model_path=toy_path, mode="score"), compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1, batch_size=2).take_all()          # default format: dicts of NumPy arrays
    for out in got:
        r = toy.score(rows[out["id"]]["prompt"])
        assert list(out["token_ids"]) == r.token_ids and out["score"] == r.total
    greedy = l2c_ray.generate_dataset(ds, toy_path, defaults={"temperature": 0,
                                                              "max_new_tokens": 8}).take_all()
    for out in greedy:
        r = toy.generate(rows[out["id"]]["prompt"], temperature=0, max_new_tokens=8)
        assert list(out["token_ids"]) == r.token_ids and out["text"] == r.text


class DyingPredictor(l2c_ray.LlamaPredictor):
    """Dies (the process exits) on its second batch, once in the whole job (marker file)."""

    def __init__(self, model_path, marker, **kw):
        super().__init__(model_path, **kw)
        self.marker, self.calls = marker, 0

    def __call__(self, batch):
        self.calls += 1
        if self.calls == 2:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os._exit(1)
        return super().__call__(batch)


def test_killed_worker_is_retried(ray_session, toy, toy_path, tmp_path):
    rows = [{**r, "id": json.dumps(r["id"])} for r in make_rows(64, max_tokens=12)]
    marker = tmp_path / "died"
    ds = ray.data.from_items(rows).map_batches(
        DyingPredictor, fn_constructor_kwargs=dict(model_path=toy_path, marker=str(marker)),
        compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1, batch_size=8,
        batch_format="pandas", max_restarts=2, max_task_retries=2)
    got = ds.take_all()
    assert marker.exists()                          # a worker did die mid-job
    ids = [r["id"] for r in got]
    assert sorted(ids) == sorted(r["id"] for r in rows)      # every row, exactly once
    for row, want in zip(rows, run_rows(toy, rows)):
        out = next(r for r in got if r["id"] == row["id"])
        assert {c: out[c] for c in COLUMNS} == want


def test_cli_batch_on_ray_equals_local(ray_session, toy_path, tmp_path):
    rows = make_rows(40)
    src, local, remote = tmp_path / "in.jsonl", tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    write_jsonl(src, rows)
    assert cli.main(["batch", toy_path, str(src), str(local), "--no-progress", "-n", "12"]) == 0
    # half the rows done already: the Ray run does the rest
    lines = local.read_text().splitlines(keepends=True)
    remote.write_text("".join(lines[:20]))
    assert cli.main(["batch", toy_path, str(src), str(remote), "--ray", "auto", "--workers", "2",
                     "--batch-size", "8", "--no-progress", "-n", "12"]) == 0
    assert ray.is_initialized()                     # it joined this module's instance, left it up
    out = read_jsonl(remote)
    assert len(out) == len(rows) and by_id(out) == by_id(read_jsonl(local))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_matches_model(ray_session, toy, toy_path):
    import httpx
    import openai
    from ray import serve

    from llama2c.server import ServerSettings
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = l2c_ray.serve_app(toy_path, num_replicas=2, threads_per_replica=1,
                            settings=ServerSettings(model_name="toy", kv_budget="2MB"))
    serve.run(app, name="llama2c", route_prefix="/")
    try:
        url = f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["toy"]
        for text in ["hello", "the cat sat on the mat", "the dog ran"]:
            messages = [{"role": "user", "content": text}]
            r = client.chat.completions.create(model="toy", messages=messages, max_tokens=20,
                                               temperature=0)
            want = toy.chat(messages, max_new_tokens=20, temperature=0)
            assert r.choices[0].message.content == want.text
            assert r.usage.completion_tokens == want.usage.completion_tokens
            c = client.completions.create(model="toy", prompt=text, max_tokens=16, temperature=0)
            assert c.choices[0].text == toy.generate(text, max_new_tokens=16, temperature=0).text
        stream = client.chat.completions.create(model="toy", messages=messages, max_tokens=20,
                                                temperature=0, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == \
            want.text
        # requests spread over the replicas (each response says which one answered)
        seen, lock = set(), threading.Lock()

        def ask():
            with httpx.Client(base_url=url, timeout=60) as h:
                for _ in range(4):
                    resp = h.post("/v1/completions", json={"model": "toy", "prompt": "the cat",
                                                           "max_tokens": 32, "temperature": 0})
                    assert resp.status_code == 200
                    with lock:
                        seen.add(resp.headers["x-llama2c-replica"])
        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(seen) == 2
    finally:
        serve.delete("llama2c")
