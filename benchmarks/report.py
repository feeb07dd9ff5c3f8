"""Print the benchmark table: C engine (fp32, int8) vs the NumPy reference, decode and prefill.

    python benchmarks/report.py [--threads 2] [--tokens 128] [--shapes stories110M,SmolLM2-135M]

Decode: tokens/s generating --tokens tokens greedily after a one-token prompt (no stop token).
Prefill: tokens/s of a 128-token prompt (the prompt pass of generate(prompt, max_new_tokens=1)).
Each figure is the best of --repeat runs. Bandwidth: weight bytes read per decoded token x
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


def best(fn, repeat):
    """Smallest wall time of repeat calls of fn()."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_c(model, tokens, repeat):
    prompt = list(np.arange(PROMPT) % model.vocab_size)
    model.generate([1], max_new_tokens=8, temperature=0, stop_token_ids=[])     # warm-up
    dec = best(lambda: model.generate([1], max_new_tokens=tokens, temperature=0,
                                      stop_token_ids=[]), repeat)
    pre = best(lambda: model.generate(prompt, max_new_tokens=1, temperature=0), repeat)
    return tokens / dec, PROMPT / pre


def bench_ref(ref, tokens, repeat):
    prompt = list(np.arange(PROMPT) % ref.config.vocab_size)
    ref.generate([1], 4)
    dec = best(lambda: ref.generate([1], tokens), repeat)
    pre = best(lambda: ref.generate(prompt, 1), repeat)
    return tokens / dec, PROMPT / pre


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
              "| int8 / ref | int8 GB/s (% of read bw) | NumPy ref prefill | C fp32 prefill "
              "| fp32 prefill / decode | C int8 prefill |")
    print(header)
    print("|" + "|".join(["---"] * (header.count("|") - 1)) + "|")
    for name in args.shapes.split(","):
        cfg = SHAPES[name]
        w = make_random_model(cfg, 0)
        f32 = llama2c.Model(cfg, w, n_threads=args.threads)
        f32_dec, f32_pre = bench_c(f32, args.tokens, args.repeat)
        del f32
        gs = fit_group_size(cfg, args.group_size)
        i8 = llama2c.Model(cfg, quantize_weights(cfg, w, gs), n_threads=args.threads)
        i8_dec, i8_pre = bench_c(i8, args.tokens, args.repeat)
        i8_gbs = i8.weight_bytes() * i8_dec / 1e9
        del i8
        if args.no_reference:
            ref_dec = ref_pre = float("nan")
        else:
            ref_dec, ref_pre = bench_ref(ReferenceModel(cfg, w), min(args.tokens, 64), args.repeat)
        print(f"| {name} | {ref_dec:.1f} | {f32_dec:.1f} | {f32_dec / ref_dec:.2f}x | {i8_dec:.1f} "
              f"| {i8_dec / f32_dec:.2f}x | {i8_dec / ref_dec:.2f}x | {i8_gbs:.1f} ({100 * i8_gbs / bw:.0f}%) "
              f"| {ref_pre:.0f} | {f32_pre:.0f} | {f32_pre / f32_dec:.1f}x | {i8_pre:.0f} |", flush=True)
    print("\n(tokens/s; decode = greedy generation after a 1-token prompt; "
          f"prefill = a {PROMPT}-token prompt; best of {args.repeat})")


if __name__ == "__main__":
    main()
