"""The benchmark harness itself (llama2c/bench.py) on tiny models: the measured work is the
work it claims (greedy decode, prefill, the kernels), the numbers are sane, the tables
render, the llama.cpp peer protocol works (against a stand-in llama_cpp module, so
llama-cpp-python is never needed). No timing assertions."""
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from llama2c import bench
from llama2c.cli import main as cli_main
from llama2c.reference import ReferenceModel

from l2c_files import tiny_llama_gguf

TINY = bench.SHAPES["tiny"]
RUNNER = Path(__file__).resolve().parents[1] / "benchmarks" / "peer_llamacpp.py"


@pytest.fixture(scope="module")
def engines():
    fp32 = bench.Llama2c.from_shape("tiny", "fp32")
    int8 = bench.Llama2c.from_shape("tiny", "int8", simd=bench.available_simd()[0])
    return [fp32, int8, bench.Reference.of(fp32, context=256)]


def test_shapes_and_parameter_counts():
    smol = bench.SHAPES["SmolLM2-135M"]
    # per layer: q 576x576, k and v 576x192, o 576x576, w1/w2/w3 576x1536
    assert bench.layer_params(smol) == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    per_token = bench.prefill_ops_per_token(smol, 128)
    assert per_token == 2 * (bench.layer_params(smol) + 49152 * 576 / 128)
    assert bench.prefill_ops_per_token(smol, 512) < per_token
    ids = bench.prompt_ids(100, 40)
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < 40
    assert np.array_equal(ids, bench.prompt_ids(100, 40))      # the same prompt for every engine


def test_machine_facts():
    assert bench.cpu_model()
    rss = bench.rss_bytes()
    if os.path.exists("/proc/self/status"):
        assert rss["anon"] > 1 << 20 and rss["file"] > 0
    assert 0.1 < bench.read_bandwidth(1, 8 << 20, reps=2) < 10_000


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_matmul_case_computes_the_product(dtype):
    for simd in bench.available_simd():
        case = bench.MatmulCase(dtype, simd, 5, 48, 64, 2)
        expected = case.x @ case.w.T
        got = case().copy()
        tol = 1e-4 if dtype == "fp32" else 0.05      # int8 weights in groups of 32
        assert np.abs(got - expected).max() <= tol * np.abs(expected).max(), simd
        assert case.ops == 2 * 5 * 48 * 64


def test_kernel_peak_is_positive():
    value, how = bench.kernel_peak("fp32", bench.available_simd()[-1], 1)
    assert value > 0 and how
    assert bench.kernel_peak("fp32", bench.available_simd()[-1], 1) == (value, how)   # cached
    assert bench.kernel_peak("int8", bench.available_simd()[-1], 1)[0] > 0


def test_decode_is_greedy_decoding(engines):
    """decode = greedy tokens after a 1-token prompt: the same ids as the NumPy reference."""
    fp32 = engines[0]
    ref = ReferenceModel(TINY, fp32.weights).generate([bench.FIRST_TOKEN], 6)
    sess, first = fp32.start_decode(1, 8)
    assert first == ref[0]
    assert fp32.decode_steps(sess, first, 5) == ref[5]
    assert sess.n_tokens == 6                   # the prompt token and one forward per step


def test_prefill_is_the_prompt_pass(engines):
    fp32 = engines[0]
    ids = bench.prompt_ids(40, TINY.vocab_size)
    sess = fp32.start_prefill(2, 40)
    tok = fp32.prefill(sess, ids)
    assert sess.n_tokens == 40
    assert tok == int(np.argmax(ReferenceModel(TINY, fp32.weights).logits(ids)[-1]))


def test_timers_return_tokens_and_seconds(engines):
    for e in engines:
        n, s = e.time_decode(8, 1)
        assert n == 8 and 0 < s < 60
        n, s = e.time_prefill(16, 1)
        assert n == 16 and 0 < s < 60
    m = engines[1].time_context(100, 4, 2)
    assert m["prefill"] > 0 and m["decode"] > 0 and m["rss"]["anon"] > 0
    assert 0 < bench.best_of(lambda: None, repeat=3, number=2) < 1


def test_interleaved_rounds_and_tables(engines):
    cases = bench.short_cases([1, 2], 8, [16, 32])
    progress = []
    results = bench.interleaved(engines, cases, rounds=2, progress=progress.append)
    for (label, case), r in results.items():
        assert len(r.seconds) == 2 and r.best > 0 and math.isfinite(r.tok_s)
        if label == engines[2].label:           # the reference runs at the top thread count only
            assert case.threads == 2
    assert ("probe", bench.Case("probe", 0, 1)) in results
    assert len(progress) == 2 * (2 * 3 * 2 + 3)
    report = bench.short_report(engines, results, bench.Machine([1, 2]), 2)
    assert "CPU: " in report and "memory read bandwidth" in report and "peak fp32" in report
    for e in engines:
        assert e.label in report
    assert "| engine | threads | decode tok/s |" in report
    assert "prefill 16: tok/s" in report and "thread scaling" in report
    assert "nan" not in report and "inf" not in report
    rows = [line for line in report.splitlines() if line.startswith("| llama2c int8")]
    assert len(rows) == 5             # decode and prefill at 1 and 2 threads, thread scaling


def test_long_context_table(engines):
    ours = engines[:2]
    results = bench.long_context(ours, [0, 64, 200], 4, 2, rounds=2)
    assert set(results) == {(e.label, n) for e in ours for n in (0, 64, 200)}
    table = bench.context_table(ours, results, 4)
    assert table.count("| after load |") == 2 and table.count("| 1-token prompt |") == 2
    assert "| bytes bound |" in table
    for (label, n), m in results.items():     # each context's ratio: its own round's short decode
        assert (m.get("short") or 0) > 0 if n else "short" not in m
        if n:
            e = next(e for e in ours if e.label == label)
            dec = 4 / m["decode"]
            ratio = 100 * m["short"] / m["decode"]
            # the bound from the model's own sizes: weight bytes / (those + n positions' KV)
            kv = e.model.kv_cache_bytes(64 * n) / (64 * n)
            bound = 100 * e.weight_bytes / (e.weight_bytes + n * kv)
            assert 0 < bound < 100
            assert f"| {label} | {n} | " in table
            assert f"| {dec:.1f} | {ratio:.0f}% | {bound:.0f}% |" in table
    assert re.search(r"\| 200 \| [0-9.e-]+ s \([0-9]+ tok/s\) \| [0-9.]+ \| [0-9]+% \| [0-9]+% \| "
                     r"[0-9.]+ \| [0-9.]+ \|", table), table


class _Timed(bench.Engine):
    """An engine whose decodes take the given times in turn (no model behind it)."""
    label = "timed"
    weight_bytes = 1000
    kv_bytes_per_token = 10

    def __init__(self, decode_times):
        self.times = list(decode_times)

    def time_decode(self, n, threads):
        return n, self.times.pop(0)

    def time_context(self, n, n_decode, threads):
        return {"prefill": 1.0, "decode": self.times.pop(0), "rss": {"anon": 0, "file": 0}}


def test_long_context_short_is_the_faster_of_two():
    # before the prompt, the context's decode, after it: a short decode slowed by a passing
    # load (3.0 s) must not make the context look closer to the short-context rate
    for times in ([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]):
        e = _Timed(times)
        m = bench.long_context([e], [100], 4, 2)["timed", 100]
        assert m["short"] == 1.0 and m["decode"] == 2.0
        table = bench.context_table([e], {("timed", 100): m}, 4)
        assert "| 2.0 | 50% | 50% |" in table       # bound: 1000 / (1000 + 100 * 10)
    assert bench.bytes_bound(_Timed([]), 0) == 1.0
    assert bench.bytes_bound(bench.Engine(), 100) is None     # cache size not known: no bound


def test_markdown():
    assert bench.markdown(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"


def test_cli_bench_tiny(capsys):
    code = cli_main(["bench", "tiny", "--threads", "1", "--tokens", "4", "--prompt", "8,16",
                     "--repeat", "1", "--peers", "reference", "--act-bits", "16,8", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    for label in ("llama2c fp32", "llama2c int8", " a8 |", "NumPy reference fp32"):
        assert label in out, label
    assert "prefill 16: tok/s" in out
    assert cli_main(["bench", "tiny", "--long-context", "32,64", "--tokens", "2", "--threads", "1",
                     "--quiet"]) == 0
    out, _ = capsys.readouterr()
    assert "| 64 |" in out and "RssAnon MB" in out


@pytest.mark.parametrize("argv", [["--threads", "0"], ["--prompt", "x"], ["--tokens", "1,2"]])
def test_cli_bench_bad_arguments(capsys, argv):
    assert cli_main(["bench", "tiny"] + argv) == 2


def test_cli_bench_unknown_peer_and_model(capsys, tmp_path):
    assert cli_main(["bench", "tiny", "--peers", "vllm", "--quiet"]) == 1
    assert "unknown peer" in capsys.readouterr().err
    assert cli_main(["bench", str(tmp_path / "missing.gguf"), "--quiet"]) == 1


# ---- the llama.cpp peer runner, against a stand-in llama_cpp module ----------------------------

FAKE_LLAMA_CPP = '''
import ctypes
__version__ = "0.0-fake"

def llama_print_system_info():
    return b"AVX = 1 | AVX2 = 1 | AVX512 = 0 | "

class _Ctx:
    def __init__(self, n_vocab):
        self.buf = (ctypes.c_float * n_vocab)()
        self.threads = None
    def get_logits(self):
        return ctypes.cast(self.buf, ctypes.POINTER(ctypes.c_float))
    def set_n_threads(self, n, n_batch):
        self.threads = n

class _Model:
    def size(self):
        return 1234
    def n_params(self):
        return 99

class Llama:
    def __init__(self, path, n_ctx, n_threads, n_threads_batch, verbose):
        open(path, "rb").close()
        self.n_ctx, self.n_tokens = n_ctx, 0
        self._ctx, self._model = _Ctx(40), _Model()
    def n_vocab(self):
        return 40
    def reset(self):
        self.n_tokens = 0
    def eval(self, tokens):
        self.n_tokens += len(tokens)
        if self.n_tokens > self.n_ctx:
            raise RuntimeError("the context is full")
        for i in range(40):
            self._ctx.buf[i] = 0.0
        self._ctx.buf[(tokens[-1] + 1) % 40] = 1.0     # greedy: the next id
'''


@pytest.fixture()
def fake_llama_cpp(tmp_path, monkeypatch):
    pkg = tmp_path / "fake" / "llama_cpp"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(FAKE_LLAMA_CPP))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    monkeypatch.setenv("LLAMA2C_PEER_RUNNER", str(RUNNER))
    path = tmp_path / "tiny.gguf"
    path.write_bytes(tiny_llama_gguf()[0])
    return path


def test_peer_runner_protocol(fake_llama_cpp):
    proc = subprocess.run([sys.executable, str(RUNNER)], capture_output=True, text=True, input="\n".join([
        json.dumps({"cmd": "load", "model": str(fake_llama_cpp), "n_ctx": 32, "threads": 2}),
        json.dumps({"cmd": "decode", "first": 1, "n": 5, "threads": 1}),
        json.dumps({"cmd": "prefill", "ids": [3, 4, 5], "threads": 2}),
        json.dumps({"cmd": "context", "ids": list(range(20)), "n_decode": 3, "threads": 2}),
        json.dumps({"cmd": "prefill", "ids": list(range(40)), "threads": 2}),
        json.dumps({"cmd": "exit"}),
        json.dumps({"cmd": "quit"})]) + "\n", timeout=60)
    replies = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 0 and len(replies) == 7, proc.stderr
    load, decode, prefill, context, full, unknown, quit_ = replies
    assert load["ok"] and "AVX512 = 0" in load["system_info"] and load["size"] == 1234
    assert decode["ok"] and decode["seconds"] > 0 and prefill["seconds"] > 0
    assert context["prefill_seconds"] > 0 and context["decode_seconds"] > 0 and "rss" in context
    assert not full["ok"] and "context is full" in full["error"]
    assert not unknown["ok"] and "unknown command" in unknown["error"]
    assert quit_["ok"]
    info = subprocess.run([sys.executable, str(RUNNER), "--info"], capture_output=True, text=True)
    assert "AVX512 = 0" in info.stdout


def test_llamacpp_engine_in_the_harness(fake_llama_cpp, capsys):
    peer = bench.LlamaCpp(fake_llama_cpp, context=64, threads=2)
    try:
        assert peer.build == "avx2" and peer.dtype == "fp32" and peer.label == "llama.cpp F32 (avx2 build)"
        assert peer.config.dim == 16 and peer.weight_bytes > 0
        ours = bench.Llama2c.from_file(fake_llama_cpp, simd="avx2" if "avx2" in bench.available_simd() else None)
        results = bench.interleaved([ours, peer], bench.short_cases([2], 4, [8]), rounds=1)
        assert results[peer.label, bench.Case("decode", 4, 2)].tokens == 4
        assert peer.label in bench.short_report([ours, peer], results, bench.Machine([2]), 1)
        if ours.simd == "avx2":
            assert peer.label in bench.peer_table([ours, peer], results)
        with pytest.raises(RuntimeError, match="context is full"):
            peer.time_prefill(100, 2)
    finally:
        peer.close()
    assert peer.proc.returncode == 0


def test_llamacpp_engine_reports_a_dead_runner(fake_llama_cpp, tmp_path, monkeypatch):
    bad = tmp_path / "crash.py"
    bad.write_text("import sys\nsys.stderr.write('runner exploded')\nsys.exit(3)\n")
    monkeypatch.setenv("LLAMA2C_PEER_RUNNER", str(bad))
    with pytest.raises(RuntimeError, match="runner exploded"):
        bench.LlamaCpp(fake_llama_cpp)
