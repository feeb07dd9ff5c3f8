"""Offline batch jobs without Ray (llama2c.batchjob, `llama2c batch`): each row gets what
generate() / chat() give it alone with its seed (given, or derived from its id); a job killed
mid-way and restarted writes every row exactly once; malformed input is a clear error naming
the file and line; llama2c.ray without Ray names the extra."""
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import llama2c
from llama2c import cli
from llama2c.batchjob import parse_row, read_done, row_seed, run_rows
from llama2c.model import Model
from llama2c.testing import write_toy_gguf

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["the cat sat on the mat", "hello", "the dog ran and then the cat " * 3, "a",
           "hello world and then"]


def make_rows(n: int, max_tokens: int = 16) -> list:
    """n rows: prompts and chats, greedy and sampled, given and derived seeds, stops,
    penalties, logprobs."""
    rows = []
    for i in range(n):
        row = {"id": i if i % 3 else f"row-{i}", "max_tokens": max_tokens}
        if i % 5 == 4:
            row["messages"] = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        else:
            row["prompt"] = PROMPTS[i % len(PROMPTS)]
        if i % 4 == 0:
            row["temperature"] = 0
        else:
            row["temperature"] = 0.9
            if i % 4 == 1:
                row["seed"] = 1000 + i
        if i % 7 == 3:
            row.update(stop=["the"], presence_penalty=0.5, top_k=8)
        if i % 11 == 5:
            row["logprobs"] = 2
        rows.append(row)
    return rows


def write_jsonl(path, rows) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def read_jsonl(path) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory):
    return write_toy_gguf(tmp_path_factory.mktemp("batchjob") / "toy.gguf", seed=2)


@pytest.fixture(scope="module")
def toy(toy_path):
    return Model.load(toy_path, n_threads=1)


def test_rows_equal_generate_alone(toy):
    rows = make_rows(12)
    outs = run_rows(toy, rows, max_batch=4)
    for row, out in zip(rows, outs):
        kind, payload, options = parse_row(row)
        assert options["seed"] == row.get("seed", row_seed(row["id"]))
        options.pop("max_tokens", None)
        r = (toy.chat if kind == "messages" else toy.generate)(payload, **options)
        assert out["token_ids"] == r.token_ids and out["text"] == r.text, row
        assert out["finish_reason"] == r.finish_reason
        assert (out["prompt_tokens"], out["completion_tokens"]) == \
               (r.usage.prompt_tokens, r.usage.completion_tokens)
        assert out["error"] is None
        if "logprobs" in row:
            assert [t["logprob"] for t in out["logprobs"]] == [t.logprob for t in r.logprobs]
        else:
            assert out["logprobs"] is None
    # a derived seed depends on the id only: the same row under another id samples differently
    a, b = run_rows(toy, [{"id": 1, "prompt": "hello", "max_tokens": 24},
                          {"id": 2, "prompt": "hello", "max_tokens": 24}])
    assert a["token_ids"] != b["token_ids"]
    assert run_rows(toy, [{"id": 1, "prompt": "hello", "max_tokens": 24}])[0] == a


def test_bad_rows_fail_alone(toy):
    rows = [{"id": 1, "prompt": "hello", "max_tokens": 4, "temperature": 0},
            {"id": 2, "prompt": "hello", "temperature": -1},
            {"id": 3, "prompt": "the cat " * 400},
            {"id": 4},
            {"id": 5, "messages": [{"content": "no role"}]}]
    outs = run_rows(toy, rows)
    assert outs[0]["error"] is None and 1 <= outs[0]["completion_tokens"] <= 4
    assert "temperature" in outs[1]["error"] and outs[1]["finish_reason"] == "error"
    assert "context" in outs[2]["error"]
    assert "prompt" in outs[3]["error"]
    assert outs[4]["error"]


def test_score_mode(toy):
    out = run_rows(toy, [{"id": 0, "prompt": "the cat sat on the mat"}], mode="score")[0]
    r = toy.score("the cat sat on the mat")
    assert out["token_ids"] == r.token_ids and out["score"] == r.total
    assert out["logprobs"] == [float(x) for x in r.logprobs]


def test_cli_batch_equals_rows_and_resumes(toy, toy_path, tmp_path, capsys):
    rows = make_rows(30)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, rows)
    assert cli.main(["batch", toy_path, str(src), str(dst), "--batch-size", "7",
                     "--threads-per-worker", "1", "--no-progress"]) == 0
    got = {json.dumps(r["id"]): r for r in read_jsonl(dst)}
    assert len(got) == len(rows)
    for row, want in zip(rows, run_rows(toy, rows)):
        out = got[json.dumps(row["id"])]
        assert out == {"id": row["id"], **{k: v for k, v in want.items() if v is not None}}
    # resume: the last line cut short and a few rows missing -> completed, nothing twice
    lines = dst.read_text().splitlines(keepends=True)
    dst.write_text("".join(lines[:20]) + lines[20][:15])
    assert cli.main(["batch", toy_path, str(src), str(dst), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "incomplete last line" in err and "10 rows written, 20 already there" in err
    again = read_jsonl(dst)
    assert sorted(json.dumps(r["id"]) for r in again) == sorted(got)
    assert {json.dumps(r["id"]): r for r in again} == got


def test_cli_batch_killed_and_restarted(toy_path, tmp_path):
    rows = make_rows(200, max_tokens=48)
    src, dst, ref = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "ref.jsonl"
    write_jsonl(src, rows)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "llama2c", "batch", toy_path, str(src), str(dst),
                             "--batch-size", "2", "--threads-per-worker", "1", "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (dst.exists() and dst.read_text().count("\n") >= 4):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    partial = read_jsonl(dst)
    assert 4 <= len(partial) < len(rows)          # killed mid-job
    with open(dst, "a") as f:                     # and as if killed in the middle of a write
        f.write('{"id":"row-198","text":"the ca')
    assert cli.main(["batch", toy_path, str(src), str(dst), "--batch-size", "16",
                     "--threads-per-worker", "1", "--no-progress"]) == 0
    done = read_jsonl(dst)
    ids = [json.dumps(r["id"]) for r in done]
    assert len(ids) == len(set(ids)) == len(rows)
    assert done[:len(partial)] == partial
    assert cli.main(["batch", toy_path, str(src), str(ref), "--batch-size", "32",
                     "--no-progress"]) == 0
    assert {json.dumps(r["id"]): r for r in done} == {json.dumps(r["id"]): r for r in read_jsonl(ref)}


@pytest.mark.parametrize("content, message", [
    ('{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": "b",}\n', "in.jsonl:2: invalid JSON"),
    ('{"id": 1, "prompt": "a"}\n\n{"id": 1, "prompt": "b"}\n', "in.jsonl:3: duplicate id 1 (first on line 1)"),
    ('{"prompt": "a"}\n', 'in.jsonl:1: the row has no "id"'),
    ('{"id": [1], "prompt": "a"}\n', 'in.jsonl:1: "id" must be a string or an integer'),
    ('{"id": 1, "prompt": "a", "temprature": 1}\n', "in.jsonl:1: unknown field(s) temprature"),
    ('{"id": 1}\n', "in.jsonl:1: a row needs exactly one of 'prompt'"),
    ('{"id": 1, "prompt": "a", "top_p": 2}\n', "in.jsonl:1: top_p must be"),
    ('[1, 2]\n', "in.jsonl:1: expected a JSON object"),
])
def test_cli_batch_bad_input(toy_path, tmp_path, capsys, content, message):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(content)
    assert cli.main(["batch", toy_path, str(src), str(dst), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not dst.exists() or dst.read_text() == ""


def test_cli_batch_usage_errors(toy_path, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, make_rows(2))
    assert cli.main(["batch", toy_path, str(src), str(tmp_path / "o.jsonl"), "--workers", "2"]) == 2
    assert "--ray" in capsys.readouterr().err
    assert cli.main(["batch", toy_path, str(src), str(src)]) == 2
    # damaged output (not just a cut-off last line): refused, left alone
    out = tmp_path / "damaged.jsonl"
    out.write_text('{"id": 0, "text": "x"}\nnot json\n')
    assert cli.main(["batch", toy_path, str(src), str(out), "--no-progress"]) == 1
    assert "damaged.jsonl:2" in capsys.readouterr().err
    assert out.read_text() == '{"id": 0, "text": "x"}\nnot json\n'
    assert cli.main(["serve", toy_path, "--replicas", "2"]) == 2


def test_read_done_keeps_whole_lines(tmp_path):
    p = tmp_path / "out.jsonl"
    p.write_text('{"id": 1}\n{"id": "1"}\n{"id": 2, "te')
    assert read_done(p) == {"1", '"1"'}
    assert p.read_text() == '{"id": 1}\n{"id": "1"}\n'


def test_missing_ray_extra(monkeypatch, toy_path, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)          # import ray -> ImportError
    monkeypatch.delitem(sys.modules, "llama2c.ray", raising=False)
    monkeypatch.delattr(llama2c, "ray", raising=False)
    with pytest.raises(ImportError, match=r'pip install "llama2c\[ray\]"'):
        importlib.import_module("llama2c.ray")
    src = tmp_path / "in.jsonl"
    write_jsonl(src, make_rows(2))
    assert cli.main(["batch", toy_path, str(src), str(tmp_path / "o.jsonl"), "--ray", "auto"]) == 2
    assert 'pip install "llama2c[ray]"' in capsys.readouterr().err
    assert cli.main(["serve", toy_path, "--ray"]) == 2
    assert 'pip install "llama2c[ray]"' in capsys.readouterr().err
