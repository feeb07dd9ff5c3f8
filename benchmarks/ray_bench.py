"""Batch inference on one machine three ways: plain local generate_batch (one process, 2
threads) vs Ray Data with 1 worker x 2 threads vs 2 workers x 1 thread (llama2c.ray).

    python benchmarks/ray_bench.py [--model PATH] [--n 1000] [--max-tokens 48]

Each configuration generates the same --n short prompts (sampled, seeded per row, so every
configuration produces the same tokens) and is timed end to end: wall time, generated tokens
per second, rows per second; a Markdown table on stdout. Ray runs on a private instance bound to
127.0.0.1 (no dashboard, no usage reports); its start-up is not timed, the actors' model load
is. Throughput across nodes: each node runs its workers independently (no traffic between them
but the rows and results), so k nodes give about k x the per-node tokens/s of the same
configuration, minus the driver's share of the rows.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SUBJECTS = ["the sea", "a lighthouse", "bread", "the moon", "a small robot", "rain", "chess",
            "a library", "winter", "bees", "a train", "mountains", "tea", "a garden", "clocks",
            "the desert"]
STYLES = ["Write one sentence about", "Describe", "Give a fact about", "Tell a short story about"]


def prompts(n: int) -> list:
    return [{"id": i, "messages": [{"role": "user", "content":
             f"{STYLES[i % len(STYLES)]} {SUBJECTS[(i // len(STYLES)) % len(SUBJECTS)]}."}]}
            for i in range(n)]


def run_local(model_path, rows, defaults, batch_size):
    from llama2c.batchjob import run_rows
    from llama2c.model import Model
    t0 = time.perf_counter()
    model = Model.load(model_path, n_threads=2)
    outs = []
    for i in range(0, len(rows), batch_size):
        outs += run_rows(model, rows[i:i + batch_size], defaults=defaults)
    return time.perf_counter() - t0, outs


def run_ray(model_path, rows, defaults, batch_size, workers, threads):
    import ray
    import llama2c.ray as l2c_ray
    t0 = time.perf_counter()
    ds = ray.data.from_items(rows)
    outs = l2c_ray.generate_dataset(ds, model_path, workers=workers, threads_per_worker=threads,
                                    batch_size=batch_size, defaults=defaults).take_all()
    return time.perf_counter() - t0, outs


def main(argv=None) -> int:
    shared = Path(os.environ.get("LLAMA2C_TEST_DATA", ROOT.parent / "shared"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(shared / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--n", type=int, default=1000, help="prompts (default 1000)")
    ap.add_argument("--max-tokens", type=int, default=48, help="tokens per prompt (default 48)")
    ap.add_argument("--batch-size", type=int, default=64, help="rows per batch (default 64)")
    ap.add_argument("--configs", default="local,ray1x2,ray2x1",
                    help="comma-separated subset of local, ray1x2, ray2x1")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH")] if p)
    rows = prompts(args.n)
    defaults = {"max_new_tokens": args.max_tokens, "temperature": 0.7, "top_p": 0.9}
    configs = args.configs.split(",")
    results = []
    if "local" in configs:
        results.append(("local generate_batch, 1 process x 2 threads",
                        *run_local(args.model, rows, defaults, args.batch_size)))
    if any(c.startswith("ray") for c in configs):
        import ray
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, logging_level="warning")
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            if "ray1x2" in configs:
                results.append(("Ray Data, 1 worker x 2 threads",
                                *run_ray(args.model, rows, defaults, args.batch_size, 1, 2)))
            if "ray2x1" in configs:
                results.append(("Ray Data, 2 workers x 1 thread",
                                *run_ray(args.model, rows, defaults, args.batch_size, 2, 1)))
        finally:
            ray.shutdown()
    reference = None
    print(f"\n{args.n} prompts (chat, {args.max_tokens} new tokens at most, temperature 0.7, "
          f"seeded per row), {Path(args.model).name}, batch size {args.batch_size}\n")
    print("| configuration | wall s | generated tokens | tokens/s | rows/s | same tokens as local |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, wall, outs in results:
        by_id = {int(o["id"]) if "id" in o else i: list(o["token_ids"]) for i, o in enumerate(outs)}
        if reference is None:
            reference = by_id
        tokens = sum(int(o["completion_tokens"]) for o in outs)
        same = "yes" if by_id == reference else "NO"
        print(f"| {name} | {wall:.1f} | {tokens} | {tokens / wall:.1f} | {len(outs) / wall:.1f} | {same} |")
    print("\nEach configuration includes its model load (actors load the model once each). On k "
          "nodes, Ray Data runs k x the workers; rows are independent, so tokens/s scales with "
          "the nodes (about k x one node's figure, less the driver's share).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
