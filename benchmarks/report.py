"""Print the benchmark table: C engine (fp32, int8) vs the NumPy reference, decode and prefill.

    python benchmarks/report.py [--threads 2] [--tokens 128] [--shapes stories110M,SmolLM2-135M]

Decode: tokens/s generating --tokens tokens greedily after a one-token prompt (no stop token).
int8: int8 weights with the default two-plane (16-bit) activations; "a8": with llama2.c runq.c's
8-bit activations (act_bits=8).
Prefill: tokens/s of a 128-token prompt (the prompt pass of generate(prompt, max_new_tokens=1)).
Each figure is the best of --repeat rounds, each round running every engine once. Bandwidth: weight bytes read per decoded token x
tokens/s, against the machine's read bandwidth measured by llama2c's C probe.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import llama2c  # noqa: E402
from llama2c import _engine  # noqa: E402
from llama2c.reference import ReferenceModel  # noqa: E402
from llama2c.testing import make_random_model  # noqa: E402
from llama2c.weights import fit_group_size, quantize_weights  # noqa: E402
from shapes import SHAPES  # noqa: E402

PROMPT = 128


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def c_runs(model, tokens):
    """(decode, prefill) callables of a C model."""
    prompt = list(np.arange(PROMPT) % model.vocab_size)
    return (lambda: model.generate([1], max_new_tokens=tokens, temperature=0, stop_token_ids=[]),
            lambda: model.generate(prompt, max_new_tokens=1, temperature=0))


def ref_runs(ref, tokens):
    """(decode, prefill) callables of the NumPy reference."""
    prompt = list(np.arange(PROMPT) % ref.config.vocab_size)
    return lambda: ref.generate([1], tokens), lambda: ref.generate(prompt, 1)


def measure(engines, repeat):
    """Best time of each (name, kind) over `repeat` rounds; each round runs every engine once,
    so slow drifts of the machine's memory bandwidth hit all of them alike."""
    for dec, pre in engines.values():       # warm-up
        dec(), pre()
    best = {}
    for _ in range(repeat):
        for name, (dec, pre) in engines.items():
            for kind, fn in (("decode", dec), ("prefill", pre)):
                best[name, kind] = min(best.get((name, kind), float("inf")), timed(fn))
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args(argv)

    bw = _engine.read_bandwidth(1 << 30, 5, args.threads)
    info = llama2c.kernel_info()
    print(f"kernels: {info['simd']} (available {', '.join(info['available'])}), "
          f"OpenMP {info['openmp']}, threads {args.threads}")
    print(f"memory read bandwidth (C probe, {args.threads} threads): {bw:.1f} GB/s\n")
    header = ("| shape | NumPy ref decode | C fp32 decode | fp32 / ref | C int8 decode | int8 / fp32 "
              "| int8 / ref | int8 weight GB/s (% of 1 GB read, % of same-size read) | NumPy ref prefill | C fp32 prefill "
              "| fp32 prefill / decode | C int8 prefill | C int8 a8 decode | C int8 a8 prefill |")
    print(header)
    print("|" + "|".join(["---"] * (header.count("|") - 1)) + "|")
    for name in args.shapes.split(","):
        cfg = SHAPES[name]
        w = make_random_model(cfg, 0)
        f32 = llama2c.Model(cfg, w, n_threads=args.threads)
        wq = quantize_weights(cfg, w, fit_group_size(cfg, args.group_size))
        i8 = llama2c.Model(cfg, wq, n_threads=args.threads)                  # 16-bit activations
        i8a8 = llama2c.Model(cfg, wq, n_threads=args.threads, act_bits=8)    # runq.c's 8-bit ones
        ref_tokens = min(args.tokens, 64)
        engines = {"fp32": c_runs(f32, args.tokens), "int8": c_runs(i8, args.tokens),
                   "int8a8": c_runs(i8a8, args.tokens)}
        if not args.no_reference:
            engines["ref"] = ref_runs(ReferenceModel(cfg, w), ref_tokens)
        t = measure(engines, args.repeat)
        f32_dec, i8_dec = args.tokens / t["fp32", "decode"], args.tokens / t["int8", "decode"]
        f32_pre, i8_pre = PROMPT / t["fp32", "prefill"], PROMPT / t["int8", "prefill"]
        a8_dec, a8_pre = args.tokens / t["int8a8", "decode"], PROMPT / t["int8a8", "prefill"]
        ref_dec = ref_tokens / t["ref", "decode"] if "ref" in engines else float("nan")
        ref_pre = PROMPT / t["ref", "prefill"] if "ref" in engines else float("nan")
        i8_gbs = i8.weight_bytes() * i8_dec / 1e9
        same = _engine.read_bandwidth(i8.weight_bytes(), 5, args.threads)   # caches included
        print(f"| {name} | {ref_dec:.1f} | {f32_dec:.1f} | {f32_dec / ref_dec:.2f}x | {i8_dec:.1f} "
              f"| {i8_dec / f32_dec:.2f}x | {i8_dec / ref_dec:.2f}x | {i8_gbs:.1f} ({100 * i8_gbs / bw:.0f}%, "
              f"{100 * i8_gbs / same:.0f}%) "
              f"| {ref_pre:.0f} | {f32_pre:.0f} | {f32_pre / f32_dec:.1f}x | {i8_pre:.0f} "
              f"| {a8_dec:.1f} ({a8_dec / ref_dec:.2f}x ref) | {a8_pre:.0f} |", flush=True)
        del f32, i8, i8a8, engines
    print("\n(tokens/s; decode = greedy generation after a 1-token prompt; "
          f"prefill = a {PROMPT}-token prompt; best of {args.repeat} interleaved rounds)")


if __name__ == "__main__":
    main()
