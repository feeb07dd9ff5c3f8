"""How OpenMP's waiting between parallel regions affects llama2c on an idle and on a loaded
machine (a script, not a test): the measurement behind the README's advice on
OMP_WAIT_POLICY (libgomp's default, passive on a shared machine).

Between two parallel regions (one per matmul, attention, ... : hundreds per token) OpenMP's
worker threads wait for the next one. libgomp's default (OMP_WAIT_POLICY unset) spins about
300,000 iterations before sleeping when the threads fit the cores; OMP_WAIT_POLICY=passive
sleeps at once (a futex wake-up per region); GOMP_SPINCOUNT=N spins N iterations first. On an
idle machine spinning saves the wake-up latency; when another process wants the same cores,
spinning threads burn the time slices the other threads need (the collapse of issue 11.3).

Each configuration runs in a fresh subprocess (libgomp reads the variables when it starts):
decode tok/s (greedy, --tokens new tokens) and prefill tok/s (--prompt tokens), 2 threads,
best of --repeat, with and without a competing busy process (one pure-Python spinning loop per
--load-procs), configurations interleaved round by round.

    python benchmarks/spin_wait.py [--model FILE] [--rounds 2] [--load-procs 1]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LLAMA2C_TEST_DATA", ROOT.parent / "shared"))

POLICIES = {
    "libgomp default (spin ~300k; llama2c's default)": {},
    "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
    "OMP_WAIT_POLICY=passive": {"OMP_WAIT_POLICY": "passive"},
}

CHILD = r"""
import json, sys, time
import numpy as np
import llama2c
path, n_new, n_prompt, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
m = llama2c.Model.load(path, n_threads=2)
ids = np.random.default_rng(0).integers(100, m.vocab_size, n_prompt).tolist()
dec = pre = 0.0
for _ in range(repeat):
    m.prompt_cache.clear()
    r = m.generate(ids, max_new_tokens=n_new, temperature=0, stop_token_ids=[])
    pre = max(pre, r.usage.prefill_tokens_per_second)
    dec = max(dec, r.usage.decode_tokens_per_second)
print(json.dumps({"prefill": pre, "decode": dec}))
"""


def run(model, env_extra, load_procs, args):
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(load_procs)]
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, str(model), str(args.tokens),
                              str(args.prompt), str(args.repeat)], env=env, check=True,
                             capture_output=True, text=True, timeout=900).stdout
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DATA / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--load-procs", type=int, default=1)
    args = ap.parse_args()
    best: dict = {}
    for r in range(args.rounds):
        for load in (0, args.load_procs):
            names = list(POLICIES) if r % 2 == 0 else list(reversed(POLICIES))
            for name in names:
                got = run(args.model, POLICIES[name], load, args)
                key = (name, load)
                old = best.get(key, {"prefill": 0.0, "decode": 0.0})
                best[key] = {k: max(old[k], got[k]) for k in old}
                print(f"round {r}: {name}, {load} busy process(es): {got}", file=sys.stderr)
    print(f"\n{Path(args.model).name}, 2 threads, best of {args.rounds} rounds x "
          f"{args.repeat}; tok/s\n")
    print(f"| OpenMP waiting | decode, idle | decode, {args.load_procs} busy process | "
          f"prefill ({args.prompt}), idle | prefill, busy |")
    print("|---|---|---|---|---|")
    for name in POLICIES:
        i, b = best[(name, 0)], best[(name, args.load_procs)]
        print(f"| {name} | {i['decode']:.1f} | {b['decode']:.1f} | {i['prefill']:.0f} | "
              f"{b['prefill']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
