"""Long-context speed and memory: prefill of a long prompt, decode after it, resident memory.

    python benchmarks/long_context.py [MODEL.gguf] [--contexts 1000,4000,8000] [--threads 2]
        [--kv-dtype f16] [--decode 64] [--rounds 2] [--llama-cpp]

For each context length n (tokens of benchmarks/data/alice.txt, repeated): the time to prefill
the n-token prompt in a fresh session, then the decode rate of --decode tokens after it (each a
one-token step, the GIL released, greedy feedback), and the process's resident memory
(RssAnon = heap and KV cache, RssFile = the mapped model file) after load and after each
context. The short-context decode rate (after 16 tokens) is the reference for "decode after 4k
>= 60% of short". With --llama-cpp, llama-cpp-python (an optional peer, never a dependency)
runs the same file, tokens and thread count in the same process, after our rounds (so that its
memory does not blur ours); --rounds repeats the timings and keeps the best.

Wall-clock timings on a busy machine are noisy: read them as best-of-rounds, and set
OMP_WAIT_POLICY=passive when other processes share the cores.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import llama2c  # noqa: E402
from llama2c import _engine as E  # noqa: E402

DEFAULT_MODEL = Path(os.environ.get("LLAMA2C_TEST_DATA", ROOT.parent / "shared")) / "models" / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"


def rss():
    """(RssAnon, RssFile) in MB from /proc/self/status (zeros where unavailable)."""
    out = {"RssAnon": 0, "RssFile": 0}
    try:
        for line in open("/proc/self/status"):
            k = line.split(":")[0]
            if k in out:
                out[k] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out["RssAnon"], out["RssFile"]


def prompt_ids(tokenizer, n):
    text = (ROOT / "benchmarks" / "data" / "alice.txt").read_text()
    ids = []
    while len(ids) < n + 1:
        ids += tokenizer.encode(text, bos=False)
    return ids[:n + 1]


def ours(model, ids, n, n_decode, max_batch):
    """(prefill seconds, decode tok/s, (RssAnon, RssFile) with the session alive) for an
    n-token prompt in a fresh session."""
    s = E.Session(model._engine, model.context_length, max_batch, model.n_threads,
                  kv_dtype=model.kv_dtype)
    t0 = time.perf_counter()
    logits = s.eval(np.asarray(ids[:n], np.int32), "last")
    prefill = time.perf_counter() - t0
    tok = np.empty(1, np.int32)
    t0 = time.perf_counter()
    for _ in range(n_decode):
        tok[0] = int(np.argmax(logits))
        logits = s.eval(tok, "last")
    return prefill, n_decode / (time.perf_counter() - t0), rss()


def peer(llm, ids, n, n_decode):
    """The same with llama-cpp-python's low-level eval (its KV cache reset first)."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids[:n])
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_vocab = llm.n_vocab()
    for _ in range(n_decode):   # its last row of logits (llama-cpp-python keeps none by default)
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
        llm.eval([int(np.argmax(logits))])
    return prefill, n_decode / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    ap.add_argument("--contexts", default="1000,4000,8000")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-dtype", default="f16", help="f16, f32, q8, or keys/values as f16/q8")
    ap.add_argument("--decode", type=int, default=64, help="tokens decoded after each prompt")
    ap.add_argument("--max-batch", type=int, default=64, help="prefill step (rows)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--llama-cpp", action="store_true", help="also run llama-cpp-python")
    args = ap.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]

    anon0, file0 = rss()
    model = llama2c.Model.load(args.model, n_threads=args.threads, kv_dtype=args.kv_dtype,
                               context_length=max(contexts) + args.decode + 1)
    anon1, file1 = rss()
    ids = prompt_ids(model.tokenizer, max(contexts) + args.decode)
    print(f"# {Path(args.model).name}: {model.dtype} weights, {args.kv_dtype} KV cache, "
          f"{model.simd}, {args.threads} threads, decode {args.decode} tokens, best of "
          f"{args.rounds} round(s)")
    print(f"# resident after load: RssAnon {anon1 - anon0:.0f} MB, RssFile {file1 - file0:.0f} MB "
          f"(weights read per token {model.weight_bytes() / 2**20:.0f} MB)")
    best = {}
    mem = {}
    for _ in range(args.rounds):
        for n in [16] + contexts:
            p, d, mem[n] = ours(model, ids, n, args.decode, args.max_batch)
            old = best.get(("ours", n), (np.inf, 0))
            best[("ours", n)] = (min(old[0], p), max(old[1], d))
    if args.llama_cpp:
        try:
            from llama_cpp import Llama
        except ImportError:
            print("# llama-cpp-python is not installed: no peer", file=sys.stderr)
        else:
            llm = Llama(args.model, n_ctx=max(contexts) + args.decode + 16, n_threads=args.threads,
                        n_threads_batch=args.threads, n_batch=512, verbose=False)
            for _ in range(args.rounds):
                for n in [16] + contexts:
                    p, d = peer(llm, ids, n, args.decode)
                    old = best.get(("llama.cpp", n), (np.inf, 0))
                    best[("llama.cpp", n)] = (min(old[0], p), max(old[1], d))
    short = best[("ours", 16)][1]
    model_kv_bytes = E.KVPool(model._engine, n_blocks=1, kv_dtype=args.kv_dtype).bytes_per_token
    print("| context | prefill | prefill tok/s | decode tok/s | decode vs short | RssAnon MB (KV) | "
          + ("llama.cpp prefill | llama.cpp decode | decode ratio | prefill ratio |" if args.llama_cpp else ""))
    print("|---|---|---|---|---|---|" + ("---|---|---|---|" if args.llama_cpp else ""))
    for n in [16] + contexts:
        p, d = best[("ours", n)]
        kv_mb = (n + args.decode) * model_kv_bytes / 2**20
        row = (f"| {n} | {p:.2f} s | {n / p:.0f} | {d:.1f} | {100 * d / short:.0f}% | "
               f"{mem[n][0] - anon0:.0f} ({kv_mb:.0f}) |")
        if ("llama.cpp", n) in best:
            lp, ld = best[("llama.cpp", n)]
            row += f" {lp:.2f} s | {ld:.1f} | {d / ld:.2f}x | {lp / p:.2f}x |"
        print(row)


if __name__ == "__main__":
    main()
