"""The attention kernel alone: one layer of a SmolLM2-shaped model (9 query heads, 3 kv heads,
head size 64) over a KV pool, per kernel table and cache type.

    python benchmarks/attention.py [--context 4000] [--threads 1,2] [--rows 1,64]

rows 1 is a decode step (split over blocks); rows 64 a prefill chunk at the end of the context
(tiles of 16 rows). Best of --repeat calls; the keys and values of one layer stay in the cache
between calls, so this is the kernel's compute rate, not the memory-bound rate of a whole model
(30 layers of KV at 4k tokens do not fit in any cache).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama2c import _engine as E  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4000)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rows", default="1,64")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--heads", default="9,3,64", help="n_heads,n_kv_heads,head_size")
    args = ap.parse_args(argv)
    H, KV, hs = (int(x) for x in args.heads.split(","))
    rng = np.random.default_rng(0)
    print(f"attention, one layer: {H} heads, {KV} kv heads, head size {hs}, context {args.context}")
    print("| table | kv | rows | threads | us per call | GFLOP/s | KV GB/s read |")
    print("|---|---|---|---|---|---|---|")
    for simd in E.available_simd():
        for kv in ("f32", "f16", "q8"):
            for T in (int(r) for r in args.rows.split(",")):
                q = rng.standard_normal((T, H * hs)).astype(np.float32)
                k = rng.standard_normal((args.context, KV * hs)).astype(np.float32)
                v = rng.standard_normal((args.context, KV * hs)).astype(np.float32)
                for nth in (int(t) for t in args.threads.split(",")):
                    _, _, t = E.attention_seqs([q], [k], [v], [args.context - T], H, KV, simd=simd,
                                               kv_dtype=kv, n_threads=nth, readback=False,
                                               repeat=args.repeat)
                    pairs = T * args.context - T * (T - 1) / 2          # (query row, position)
                    flops = 4 * pairs * H * hs                          # q.k and p.v, 2 flops/MAC
                    kv_bytes = args.context * KV * hs * 2 * {"f32": 4, "f16": 2, "q8": 1}[kv]
                    print(f"| {simd} | {kv} | {T} | {nth} | {t * 1e6:.0f} | {flops / t / 1e9:.1f} | "
                          f"{kv_bytes / t / 1e9:.1f} |")


if __name__ == "__main__":
    main()
