"""Matrix kernels per kernel table on the SmolLM2-135M shapes, against the table's peak probe.

    PYTHONPATH=. python benchmarks/kernels.py [--simd avx2,avx512] [--threads 2] [--T 1,4,64]
        [--kinds f32,q8a16,q8a8,q4a16,q4a8] [--rounds 5] [--layers 30]

For each kind of weights (fp32 panels; int8 and 4-bit blocks with 16-bit or 8-bit activations)
it packs `layers` layers of random weights of SmolLM2's shapes (wq 576x576, wk/wv 192x576, wo
576x576, w1/w3 1536x576, w2 576x1536) plus the 49152x576 classifier, then times one pass over
all of them (what a forward pass multiplies, attention and norms excluded) for T tokens: the
weights are more than the caches hold, so T = 1 reads them from memory as decode does. For
T = 1 each shape's layers are stacked into one tall matrix (rows x layers: the same bytes and
the same kernel in 8 calls per pass instead of 211, so Python's per-call cost stays out of the
figure); T > 1 runs the real per-layer matrices (a layer's outputs fit the caches, as in a
forward pass). Tables run in turn
inside every round (interleaved A/B, best of `rounds`), so a busy machine slows them alike;
`--clock cpu` times 1-thread runs by the thread's CPU time (immune to other processes taking
the core, not to their memory traffic). 2-thread figures need a quiet machine: OpenMP
threads wait for each other at every call, so a descheduled thread stalls the pair.

Reported per (table, kind, T): GFLOP/s (fp32) or GOP/s (2 per multiply-add), its share of the
table's peak probe (_engine.peak_gops: fp32 FMA chains, or the int8 dot instruction; the
quantized kernels also spend work on scales, so 100% is out of reach), tokens/s of the pass,
and for T = 1 the weight bytes read per second (GB/s, against the bandwidth probe).
Activation quantization is timed separately (quantize, once per layer input as the engine does).
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llama2c import _engine as E  # noqa: E402
from llama2c.weights import quantize_q4, quantize_q8  # noqa: E402

DIM, HIDDEN, KV, VOCAB = 576, 1536, 192, 49152
LAYER = [("wq", DIM, DIM), ("wk", KV, DIM), ("wv", KV, DIM), ("wo", DIM, DIM),
         ("w1", HIDDEN, DIM), ("w3", HIDDEN, DIM), ("w2", DIM, HIDDEN)]
KINDS = {"f32": (None, 16), "q8a16": ("q8", 16), "q8a8": ("q8", 8),
         "q4a16": ("q4", 16), "q4a8": ("q4", 8)}


def build(kind, n_layers, rng, stacked, gs=32):
    """Packed matrices in forward order: n_layers layers (or, stacked, each layer shape as one
    matrix of n_layers times the rows), then the classifier."""
    mats = []
    if stacked:
        shapes = [(r * n_layers, c) for _, r, c in LAYER] + [(VOCAB, DIM)]
    else:
        shapes = [(r, c) for _ in range(n_layers) for _, r, c in LAYER] + [(VOCAB, DIM)]
    for r, c in shapes:
        w = (rng.standard_normal((r, c)) * 0.05).astype(np.float32)
        t = w if kind is None else quantize_q8(w, gs) if kind == "q8" else quantize_q4(w, gs)
        mats.append(E.PackedMatrix(t))
    return mats


def run_pass(mats, xs, acts, simd, nth):
    """One pass over every matrix: the packed matmul on its (pre-quantized) input."""
    for P in mats:
        if acts is None:
            P.matmul(xs[P.shape[1]], out=None, simd=simd, n_threads=nth)
        else:
            P.matmul_q(acts[P.shape[1]], simd=simd, n_threads=nth)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--simd", default=",".join(t for t in E.available_simd() if t != "generic"))
    ap.add_argument("--threads", default="2")
    ap.add_argument("--T", default="1,4,8,16,64,128")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--seconds", type=float, default=0.3, help="minimum time per measurement")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: the calling thread's CPU time (1 thread only)")
    args = ap.parse_args()
    tables = args.simd.split(",")
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    threads = [int(t) for t in args.threads.split(",")]
    Ts = [int(t) for t in args.T.split(",")]
    rng = np.random.default_rng(0)

    print(f"kernel tables: {tables}; available: {E.available_simd()}; layers: {args.layers}")
    for nth in threads:
        bw = E.read_bandwidth(1 << 30, 5, nth)
        peaks = {t: {k: max(E.peak_gops(k, t, nth) for _ in range(3)) for k in ("fp32", "int8")}
                 for t in tables}
        if nth > 1 and args.clock == "cpu":
            raise SystemExit("--clock cpu measures one thread only")
        print(f"\n== {nth} thread(s): read bandwidth {bw:.1f} GB/s; peak probes: " +
              ", ".join(f"{t} fp32 {p['fp32']:.0f} GFLOP/s int8 {p['int8']:.0f} GOP/s"
                        for t, p in peaks.items()))
        for kname in args.kinds.split(","):
            qkind, act_bits = KINDS[kname]
            sets = {}
            if any(T == 1 for T in Ts):
                sets[True] = build(qkind, args.layers, rng, stacked=True)
            if any(T > 1 for T in Ts):
                sets[False] = build(qkind, args.layers, rng, stacked=False)
            mats = next(iter(sets.values()))
            nbytes = sum(P.nbytes for P in mats)
            params = sum(P.shape[0] * P.shape[1] for P in mats)
            print(f"\n{kname}: {params / 1e6:.1f} M weights, {nbytes / 1e6:.0f} MB packed")
            print(f"{'T':>4} {'table':>8} {'G(FL)OP/s':>10} {'% peak':>7} {'tok/s':>9} "
                  f"{'GB/s':>6} {'quant ms':>9}")
            for T in Ts:
                mats = sets[T == 1]
                xs = {n: (rng.standard_normal((T, n)) * 0.5).astype(np.float32)
                      for n in (DIM, HIDDEN)}
                best = {t: float("inf") for t in tables}
                qbest = {t: float("inf") for t in tables}
                for _ in range(args.rounds):
                    for t in tables:  # interleaved: every table once per round
                        acts = None
                        if qkind is not None:
                            acts, tq = {}, {}
                            for n, x in xs.items():
                                t0 = time.perf_counter()
                                acts[n] = E.quantize(x, 32, act_bits, t, nth)
                                tq[n] = time.perf_counter() - t0
                            # the engine quantizes 4 inputs per layer (3 of width DIM, 1 of
                            # HIDDEN) and the classifier's
                            qt = args.layers * (3 * tq[DIM] + tq[HIDDEN]) + tq[DIM]
                            qbest[t] = min(qbest[t], qt)
                        reps, t0, w0 = 0, clock(), time.perf_counter()
                        while True:
                            run_pass(mats, xs, acts, t, nth)
                            reps += 1
                            el = clock() - t0
                            if time.perf_counter() - w0 >= args.seconds:
                                break
                        best[t] = min(best[t], el / reps)
                for t in tables:
                    dt = best[t]
                    ops = 2.0 * T * params / dt / 1e9
                    peak = peaks[t]["fp32" if qkind is None else "int8"]
                    gbs = f"{nbytes / dt / 1e9:6.1f}" if T == 1 else " " * 6
                    q = f"{qbest[t] * 1e3:9.2f}" if qkind else " " * 9
                    print(f"{T:4d} {t:>8} {ops:10.1f} {100 * ops / peak:6.0f}% {T / dt:9.1f} "
                          f"{gbs} {q}")
            del mats, sets


if __name__ == "__main__":
    main()
