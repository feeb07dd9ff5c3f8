"""The `llama2c` command line (llama2c.cli) and llama2c.evaluate: commands run in-process
through main() with captured output, and `python -m llama2c` in a real subprocess."""
import json
import math
import os
import re
import subprocess
import time
import sys
from pathlib import Path

import numpy as np
import pytest

import llama2c
from llama2c.cli import main
from llama2c.config import Config
from llama2c.evaluate import compare_int8, perplexity
from llama2c.loaders import load_any
from llama2c.loaders.llama2c_bin import write_llama2c_bin
from llama2c.model import Model
from llama2c.testing import make_random_model
from llama2c.weights import QTensor, quantize_weights

SMALL = dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, seq_len=64)
# llama2's 32000-token vocabulary on a tiny body, so tokenizer.bin fits it
VOCAB32K = dict(dim=32, hidden_dim=64, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=32000, seq_len=64)
TEXT = "Once upon a time, there was a little girl named Lily. She liked to play in the sun."


def _write_random(path, shape, seed=0):
    cfg = Config(**shape)
    weights = make_random_model(cfg, seed=seed)
    write_llama2c_bin(path, cfg, weights, version=1)
    return cfg, weights


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(path, cfg, weights) of a random-weight llama2.c v1 file with no tokenizer."""
    path = tmp_path_factory.mktemp("small") / "small.bin"
    cfg, weights = _write_random(path, SMALL)
    return path, cfg, weights


@pytest.fixture(scope="module")
def vocab32k(tmp_path_factory, shared_dir):
    """(model path, tokenizer.bin path) of a random model with llama2's vocabulary."""
    tokenizer = shared_dir / "models" / "tokenizer.bin"
    if not tokenizer.is_file():
        pytest.skip(f"{tokenizer} not found")
    path = tmp_path_factory.mktemp("v32k") / "v32k.bin"
    _write_random(path, VOCAB32K, seed=3)
    return path, tokenizer


@pytest.fixture(scope="module")
def tiny260k(shared_dir):
    path = shared_dir / "models" / "tiny260K.bin"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def _run_cli(capsys, *argv):
    """main(argv) in-process -> (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _subprocess(*argv):
    """`python -m llama2c argv` with the llama2c under test importable."""
    env = dict(os.environ)
    root = str(Path(llama2c.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "llama2c", *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=300)


def _log_softmax(logits):
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


# ---- run ---------------------------------------------------------------------------------------

def test_run_ids_greedy_matches_generate(capsys, small):
    path, _, _ = small
    code, out, err = _run_cli(capsys, "run", path, "--ids", "-i", "5 17 42", "-t", "0", "-n", "20")
    assert code == 0, err
    expected = Model.load(path).generate([5, 17, 42], max_new_tokens=20, temperature=0)
    assert out == " ".join(map(str, [5, 17, 42] + expected.token_ids)) + "\n"
    assert len(expected.token_ids) == 20       # -n: tokens to generate (llama.cpp's meaning)
    assert re.search(r"achieved tok/s: [0-9.]+", err)
    assert "prompt: 3 tokens" in err


def test_run_subprocess_matches_llama2c_golden(tiny260k, shared_dir):
    """`python -m llama2c run` reproduces run.c's greedy decoding of tiny260K (-n 200, BOS) with
    run.c's fp32 KV cache."""
    golden = json.loads((shared_dir / "golden" / "tiny260K_greedy.json").read_text())["greedy_ids"]
    proc = _subprocess("run", tiny260k, "-t", "0", "-n", "200", "--ids", "-i", "1", "--kv-dtype", "f32")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(t) for t in [1] + golden]
    assert "achieved tok/s:" in proc.stderr


def test_run_text_prompt_streams_prompt_then_text(capsys, vocab32k):
    path, tokenizer = vocab32k
    prompt = "Once upon a time"
    code, out, err = _run_cli(capsys, "run", path, "-z", tokenizer, "-i", prompt, "-t", "0", "-n", "12")
    assert code == 0, err
    model = Model.load(path, tokenizer=tokenizer)
    expected = model.generate(prompt, max_new_tokens=12, temperature=0)
    assert out == prompt + expected.text + "\n"
    # the continuation keeps its leading space: prompt + text is the decoded sequence
    assert out[:-1] == model.tokenizer.decode(model.encode_prompt(prompt).tolist() + expected.token_ids)


def test_run_same_seed_same_output(capsys, small):
    path, _, _ = small
    runs = [_run_cli(capsys, "run", path, "-n", "16", "-s", "7", "-t", "1.0") for _ in range(2)]
    assert runs[0][0] == 0 and runs[0][1] == runs[1][1]


@pytest.mark.parametrize("flags, name", [
    (["-t", "-1"], "-t/--temperature"),
    (["-p", "2"], "-p/--top-p"),
    (["-t", "abc"], "-t/--temperature"),
    (["-k", "-3"], "-k/--top-k"),
    (["-n", "x"], "-n/--max-new-tokens"),
    (["--min-p", "1.5"], "--min-p"),
    (["--repeat-penalty", "0"], "--repeat-penalty"),
    (["--presence-penalty", "nan"], "--presence-penalty"),
    (["-f", "a.txt", "-i", "b"], "-f/--file"),
])
def test_run_bad_parameter_is_usage_error(capsys, small, flags, name):
    code, out, err = _run_cli(capsys, "run", small[0], *flags)
    assert code == 2
    assert f"llama2c: error: argument {name}" in err
    assert "Traceback" not in err and out == ""


def test_run_text_without_tokenizer_is_usage_error(capsys, small):
    code, _, err = _run_cli(capsys, "run", small[0], "-i", "hello")
    assert code == 2 and "no tokenizer" in err and "--ids" in err


def test_missing_model_file(capsys, tmp_path):
    missing = tmp_path / "nope.bin"
    code, out, err = _run_cli(capsys, "run", missing)
    assert code == 1 and out == ""
    assert err.startswith("llama2c: error:") and str(missing) in err
    proc = _subprocess("info", missing)
    assert proc.returncode == 1
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr


def test_no_command_is_usage_error(capsys):
    code, _, err = _run_cli(capsys)
    assert code == 2 and "llama2c: error:" in err


# ---- chat, pull (wiring only: the helpers have their own tests) --------------------------------

def test_chat_passes_model_system_and_given_sampling(capsys, monkeypatch, small):
    import llama2c.chat
    calls = []
    monkeypatch.setattr(llama2c.chat, "run_chat_cli", lambda model, **kw: calls.append((model, kw)))
    code, _, err = _run_cli(capsys, "chat", small[0], "--system", "Be brief.", "-t", "0.5", "-s", "3",
                            "-n", "7", "--stop", "END", "--min-p", "0.1")
    assert code == 0, err
    (model, kw), = calls
    assert isinstance(model, Model)
    assert kw == {"system": "Be brief.", "first": None, "temperature": 0.5, "seed": 3,
                  "max_new_tokens": 7, "top_p": 0.9, "top_k": 0, "min_p": 0.1,
                  "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                  "penalty_last_n": 64, "stop": ["END"]}
    # llama2.c's spelling: run -m chat -y SYSTEM, -i the first message
    calls.clear()
    code, _, err = _run_cli(capsys, "run", small[0], "-m", "chat", "-y", "Be brief.", "-i", "Hi")
    assert code == 0, err
    (_, kw), = calls
    assert kw["system"] == "Be brief." and kw["first"] == "Hi" and kw["max_new_tokens"] == 256


def test_pull_prints_path(capsys, monkeypatch, tmp_path):
    import llama2c.hub
    monkeypatch.setattr(llama2c.hub, "pull", lambda name, cache_dir=None: tmp_path / f"{name}.gguf")
    code, out, _ = _run_cli(capsys, "pull", "smollm2")
    assert code == 0 and out.strip() == str(tmp_path / "smollm2.gguf")


# ---- quantize, convert -------------------------------------------------------------------------

def _assert_within_half_step(original: dict, quantized: dict):
    for name, t in quantized.items():
        if isinstance(t, QTensor):
            rows, cols = t.shape
            err = np.abs(np.asarray(original[name]) - t.dequantize()).reshape(rows, -1, t.group_size)
            assert (err <= t.s[:, :, None] * (0.5 + 1e-5) + 1e-12).all(), name


def test_quantize_writes_v2_within_half_a_scale(capsys, small, tmp_path):
    path, cfg, weights = small
    out_path = tmp_path / "q.bin"
    code, _, err = _run_cli(capsys, "quantize", path, out_path)
    assert code == 0, err
    _, qweights, meta = load_any(out_path)
    assert meta["format"] == "llama2c-v2" and meta["group_size"] == 64
    assert Model.load(out_path).dtype == "int8"
    _assert_within_half_step(weights, qweights)
    assert "max error" in err and "layers.1.w2" in err and "128x64" in err


def test_quantize_group_size(capsys, tiny260k, tmp_path):
    """tiny260K's hidden_dim 172 = 4 x 43: an explicit 8 is refused, the default backs off to 4."""
    code, _, err = _run_cli(capsys, "quantize", tiny260k, tmp_path / "q.bin", "--group-size", "8")
    assert code == 2 and "--group-size" in err and "172" in err
    assert not (tmp_path / "q.bin").exists()
    code, _, err = _run_cli(capsys, "quantize", tiny260k, tmp_path / "q.bin")
    assert code == 0, err
    assert "using 4" in err
    assert load_any(tmp_path / "q.bin")[2]["group_size"] == 4


def test_convert_round_trips(capsys, small, tmp_path):
    path, cfg, weights = small
    hf_dir, v1, v2 = tmp_path / "hf", tmp_path / "v1.bin", tmp_path / "v2.bin"
    assert _run_cli(capsys, "convert", path, hf_dir, "--format", "hf")[0] == 0
    assert _run_cli(capsys, "convert", hf_dir, v1, "--dtype", "fp32")[0] == 0
    cfg1, w1, meta1 = load_any(v1)
    assert meta1["format"] == "llama2c-v1" and cfg1.dim == cfg.dim
    for name, w in weights.items():
        np.testing.assert_array_equal(w1[name], w, err_msg=name)
    code, _, err = _run_cli(capsys, "convert", v1, v2, "--dtype", "int8")
    assert code == 0 and "of int8 weights" in err
    _, w2, meta2 = load_any(v2)
    assert meta2["format"] == "llama2c-v2"
    expected = quantize_weights(cfg, weights, 64)
    for name, t in expected.items():
        got = w2[name]
        if isinstance(t, QTensor):
            np.testing.assert_array_equal(got.q, t.q, err_msg=name)
            np.testing.assert_array_equal(got.s, t.s, err_msg=name)
    assert _run_cli(capsys, "convert", v2, tmp_path / "back.bin", "--dtype", "fp32")[0] == 0
    _assert_within_half_step(weights, w2)


def test_convert_rejects_mismatched_dtype_and_format(capsys, small, tmp_path):
    code, _, err = _run_cli(capsys, "convert", small[0], tmp_path / "x.bin", "--format", "v1", "--dtype", "int8")
    assert code == 2 and "--dtype" in err


# ---- perplexity ---------------------------------------------------------------------------------

def _reference_nll(model, ids, context, bos):
    """Mean NLL by the documented windows, straight from model.logits."""
    nll = []
    if bos is not None:
        for i in range(0, len(ids), context - 1):
            chunk = ids[i:i + context - 1]
            logp = _log_softmax(model.logits([bos] + chunk))
            nll += [-logp[j, t] for j, t in enumerate(chunk)]
    else:
        start = 0
        while True:
            window = ids[start:start + context]
            logp = _log_softmax(model.logits(window))
            nll += [-logp[j, t] for j, t in enumerate(window[1:])]
            if start + context >= len(ids):
                break
            start += context - 1
    return float(np.mean(nll)), len(nll)


def test_perplexity_cli_equals_direct_computation(capsys, vocab32k, tmp_path):
    path, tokenizer = vocab32k
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    code, out, err = _run_cli(capsys, "perplexity", path, text_file, "-z", tokenizer)
    assert code == 0, err
    printed = float(re.search(r"perplexity \(fp32\): ([0-9.]+)", out).group(1))
    model = Model.load(path, tokenizer=tokenizer)
    ids = model.tokenizer.encode(TEXT, bos=False)
    assert len(ids) + 1 <= model.context_length       # one window: BOS + the whole text
    logp = _log_softmax(model.logits([model.tokenizer.bos_id] + ids))
    nll = -np.mean(logp[np.arange(len(ids)), ids])
    assert math.isfinite(printed)
    assert printed == pytest.approx(math.exp(nll), rel=1e-4)
    assert f"tokens: {len(ids)}" in out


def test_perplexity_windows(vocab32k, small):
    path, tokenizer = vocab32k
    model = Model.load(path, tokenizer=tokenizer)
    ids = model.tokenizer.encode(TEXT, bos=False)
    r = perplexity(model, TEXT, context=8)
    nll, n = _reference_nll(model, ids, 8, bos=1)
    assert r["n_tokens"] == n == len(ids)
    assert r["nll"] == pytest.approx(nll, rel=1e-9)
    assert r["perplexity"] == pytest.approx(math.exp(nll), rel=1e-9)
    # no tokenizer, so no BOS: windows overlap by one token and the first token is not scored
    model = Model.load(small[0])
    ids = [int(t) for t in np.random.default_rng(1).integers(256, size=40)]
    r = perplexity(model, ids, context=8)
    nll, n = _reference_nll(model, ids, 8, bos=None)
    assert r["n_tokens"] == n == len(ids) - 1
    assert r["nll"] == pytest.approx(nll, rel=1e-9)


def test_compare_int8(small):
    path, cfg, weights = small
    fp32 = Model(cfg, weights)
    int8 = Model(cfg, quantize_weights(cfg, weights, 32))
    ids = [int(t) for t in np.random.default_rng(2).integers(256, size=48)]
    r = compare_int8(fp32, int8, ids, context=16)
    assert 0.0 <= r["top1_agreement"] <= 1.0
    assert 0.0 <= r["mean_kl"] < 0.05
    assert r["n_tokens"] == len(ids) - 1
    assert math.isfinite(r["ppl_fp32"]) and math.isfinite(r["ppl_int8"])
    assert r["ppl_fp32"] == pytest.approx(perplexity(fp32, ids, context=16)["perplexity"], rel=1e-9)
    same = compare_int8(fp32, fp32, ids, context=16)
    assert same["top1_agreement"] == 1.0 and same["mean_kl"] == pytest.approx(0.0, abs=1e-12)


def test_perplexity_compare_cli(capsys, vocab32k, tmp_path):
    path, tokenizer = vocab32k
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    code, out, err = _run_cli(capsys, "perplexity", path, text_file, "-z", tokenizer, "--compare")
    assert code == 0, err
    for field in ("perplexity fp32:", "perplexity int8:", "top-1 agreement:", "mean KL(fp32 || int8):"):
        assert field in out
    code, out4, err = _run_cli(capsys, "perplexity", path, text_file, "-z", tokenizer,
                               "--compare", "--dtype", "q4")
    assert code == 0, err
    ppl = {line.split(":")[0]: float(line.split(":")[1].split()[0])
           for line in (out + out4).splitlines() if line.startswith("perplexity")}
    assert ppl["perplexity q4"] != ppl["perplexity int8"]      # 4-bit is coarser than int8
    agree = float(out4.split("top-1 agreement:")[1].split()[0])
    assert 0.0 < agree <= 1.0
    code, _, err = _run_cli(capsys, "perplexity", path, text_file, "-z", tokenizer,
                            "--compare", "--dtype", "fp32")
    assert code == 2 and "--compare compares fp32 with another dtype" in err


def test_perplexity_without_tokenizer_is_an_error(capsys, small, tmp_path):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    code, _, err = _run_cli(capsys, "perplexity", small[0], text_file)
    assert code == 1 and "-z TOKENIZER" in err


# ---- bench, info -------------------------------------------------------------------------------

def test_bench_tiny_prints_fields(capsys):
    code, out, err = _run_cli(capsys, "bench", "tiny", "--tokens", "16", "--prompt", "32",
                              "--threads", "1", "--repeat", "1", "--quiet")
    assert code == 0, err
    for field in (r"memory read bandwidth \(C probe, 1 GiB buffer.*\): 1 thread [0-9.]+ GB/s",
                  r"\| llama2c fp32 \w+ \| 1 \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9]+% \| [0-9]+% \| [0-9.]+ \|",
                  r"\| llama2c int8 \w+ \| 1 \| [0-9]+ \([0-9]+, [0-9]+%\) \|",
                  r"decode: 16 greedy tokens", r"prefill 32: tok/s", r"CPU: .*kernel tables: "):
        assert re.search(field, out), field


def test_info(capsys, small):
    path, cfg, _ = small
    code, out, err = _run_cli(capsys, "info", path)
    assert code == 0, err
    assert "format: llama2c-v1" in out and "dtype: fp32" in out
    assert f"tensors: {2 * 9 + 2}" in out and f"dim: {cfg.dim}" in out
    assert "tokenizer: none" in out and "kernel_info:" in out
    assert "kv cache (f16)" in out
    code, out, err = _run_cli(capsys, "info", path, "--kv-dtype", "fp16/int8")
    assert code == 0, err
    kv = 1000 * cfg.n_layers * cfg.n_kv_heads * (2 * cfg.head_size + cfg.head_size + 4)
    assert f"kv cache (f16/q8): {kv} bytes per 1,000 tokens" in out
    code, _, err = _run_cli(capsys, "info", path, "--kv-dtype", "f16/bf16")
    assert code == 2 and "keys/values as 'f16/q8'" in err


# ---- run: prompt files, stop strings, registry names, Ctrl-C, --help vs README ------------

def test_run_prompt_file_and_stop(capsys, vocab32k, tmp_path):
    path, tokenizer = vocab32k
    prompt = "Once upon a time"
    (tmp_path / "p.txt").write_text(prompt, encoding="utf-8")
    base = ["run", path, "-z", tokenizer, "-t", "0", "-n", "12"]
    code, out_i, _ = _run_cli(capsys, *base, "-i", prompt)
    code_f, out_f, _ = _run_cli(capsys, *base, "-f", tmp_path / "p.txt")
    assert code == code_f == 0 and out_i == out_f
    text = out_i[len(prompt):-1]
    stop = text[4:6]
    code, out, err = _run_cli(capsys, *base, "-i", prompt, "--stop", stop, "--stop", "\x01")
    assert code == 0, err
    assert out == prompt + text[:text.find(stop)] + "\n"


def test_model_and_run_resolve_registry_names(capsys, monkeypatch, tmp_path, small):
    """A registry name loads from the cache directory (pre-filled here: no network)."""
    import hashlib
    import shutil
    from llama2c import hub
    path, _, _ = small
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(path, cache / "small.bin")
    data = (cache / "small.bin").read_bytes()
    monkeypatch.setitem(hub.REGISTRY, "tiny-test", hub.Entry(
        package="llm-tiny-test", version="0", member="llm_tiny_test/small.bin",
        sha256=hashlib.sha256(data).hexdigest(), size=len(data)))
    monkeypatch.setenv("LLAMA2C_CACHE", str(cache))
    monkeypatch.setenv("LLAMA2C_PYPI_URL", "http://127.0.0.1:9")     # any download would fail
    monkeypatch.setattr(hub, "_installed_file", lambda entry: None)
    m = Model.load("tiny-test")
    assert m.path == str(cache / "small.bin")
    code, out, err = _run_cli(capsys, "run", "tiny-test", "--ids", "-i", "1 2", "-t", "0", "-n", "4")
    assert code == 0, err
    assert out.split()[:2] == ["1", "2"] and len(out.split()) == 6


def test_run_smollm2_by_name_from_a_prefilled_cache(capsys, monkeypatch, tmp_path, shared_dir):
    from llama2c import hub
    gguf = shared_dir / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip(f"{gguf} not found")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / hub.REGISTRY["smollm2"].filename).symlink_to(gguf)
    monkeypatch.setenv("LLAMA2C_CACHE", str(cache))
    monkeypatch.setenv("LLAMA2C_PYPI_URL", "http://127.0.0.1:9")
    monkeypatch.setattr(hub, "_installed_file", lambda entry: None)
    code, out, err = _run_cli(capsys, "run", "smollm2", "-i", "The capital of France is",
                              "-t", "0", "-n", "4", "--context", "64")
    assert code == 0, err
    assert out.startswith("The capital of France is Paris")


def test_ctrl_c_stops_run_and_prints_stats(tmp_path):
    """SIGINT while `llama2c run` streams: the generation stops, the stats so far are printed
    and the exit code is 130."""
    import signal
    cfg = dict(SMALL, seq_len=8192)
    path = tmp_path / "long.bin"
    _write_random(path, cfg)
    env = dict(os.environ)
    root = str(Path(llama2c.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-m", "llama2c", "run", str(path), "--ids", "-i", "1",
                             "-t", "0", "-n", "0", "--threads", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    try:
        head = b""
        while len(head) < 2:                          # the prompt, then tokens stream
            head += proc.stdout.read(2 - len(head))
        assert head == b"1 "
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "achieved tok/s" in err and "stopped" in err
    n = int(re.search(r"\((\d+) tokens generated", err).group(1))
    assert 0 < n < 8192 and len(out.split()) == n


def _flags(text):
    return set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", text))


@pytest.mark.parametrize("command", ["run", "chat"])
def test_help_matches_readme(capsys, command):
    """Every option of `llama2c run --help` (and chat) is in the README's CLI table row, and
    the row names no other."""
    import argparse
    from llama2c.cli import build_parser
    readme = Path(__file__).resolve().parents[1] / "README.md"
    section = readme.read_text(encoding="utf-8").split("## Command line", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith(f"| `{command}")]
    assert len(rows) == 1, f"one row for `{command}` in the README's CLI table"
    code, out, _ = _run_cli(capsys, command, "--help")
    assert code == 0
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    options = [a.option_strings for a in sub.choices[command]._actions
               if a.option_strings and "--help" not in a.option_strings]
    documented = _flags(rows[0].split("|")[1])
    for strings in options:
        assert documented & set(strings), f"{strings} of `{command} --help` not in the README"
        assert set(strings) <= _flags(out)
    known = {s for strings in options for s in strings}
    assert documented <= known, documented - known
