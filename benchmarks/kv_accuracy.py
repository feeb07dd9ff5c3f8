"""Accuracy of the KV cache element types against the fp32 cache, on a real model and real text.

    python benchmarks/kv_accuracy.py [MODEL.gguf] [--tokens 3000] [--greedy 64] [--threads 2]

For each kv dtype (f16, q8, and the mixed f16/q8 and q8/f16: keys/values) against f32, over
one long prompt (benchmarks/data/alice.txt, repeated until it is long enough): the logits at
every position (teacher-forced, one prefill), their error relative to the fp32 cache's
(max |diff| / max |logit| per position: the worst and the mean over positions), top-1
agreement, and the KL divergence of the softmax; then greedy decoding of --greedy tokens after
the whole prompt: how many leading tokens equal the fp32 cache's. Weights are the file's own,
as stored (4-bit for the shared Q4_1 file), the same for every cache.
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

KV_TYPES = ("f32", "f16", "q8", "f16/q8", "q8/f16")
DEFAULT_MODEL = Path(os.environ.get("LLAMA2C_TEST_DATA", ROOT.parent / "shared")) / "models" / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"


def log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    ap.add_argument("--tokens", type=int, default=3000, help="prompt length")
    ap.add_argument("--greedy", type=int, default=64, help="greedy tokens after the prompt")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    text = (ROOT / "benchmarks" / "data" / "alice.txt").read_text()
    models = {kv: llama2c.Model.load(args.model, n_threads=args.threads, kv_dtype=kv)
              for kv in KV_TYPES}
    tok = models["f32"].tokenizer
    ids = []
    while len(ids) < args.tokens:
        ids += tok.encode(text, bos=False)
    ids = ids[:args.tokens]
    print(f"model {Path(args.model).name}, {args.tokens}-token prompt ({models['f32'].dtype} weights, "
          f"{models['f32'].simd}), {args.greedy} greedy tokens after it")
    logits, greedy = {}, {}
    for kv, m in models.items():
        t0 = time.perf_counter()
        logits[kv] = m.logits(ids)
        greedy[kv] = m.generate(ids, max_new_tokens=args.greedy, temperature=0,
                                stop_token_ids=[]).token_ids
        print(f"  {kv}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    ref = logits["f32"]
    lp_ref = log_softmax(ref)
    print("| kv dtype | bytes/token | max logit err (worst pos) | mean logit err | top-1 agree | "
          "mean KL | greedy tokens equal to f32 |")
    print("|---|---|---|---|---|---|---|")
    for kv in KV_TYPES:
        L = logits[kv]
        err = np.abs(L - ref).max(axis=1) / np.abs(ref).max(axis=1)
        top1 = (L.argmax(axis=1) == ref.argmax(axis=1)).mean()
        kl = (np.exp(lp_ref) * (lp_ref - log_softmax(L))).sum(axis=1).mean()
        g = greedy[kv]
        same = next((i for i, (a, b) in enumerate(zip(g, greedy["f32"])) if a != b), len(g))
        per_tok = llama2c._engine.KVPool(models[kv]._engine, n_blocks=1, kv_dtype=kv).bytes_per_token
        print(f"| {kv} | {per_tok:.0f} | {err.max():.2e} | {err.mean():.2e} | {100 * top1:.2f}% | "
              f"{kl:.2e} | {same}/{len(g)} |")


if __name__ == "__main__":
    main()
