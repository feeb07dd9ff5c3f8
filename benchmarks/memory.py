"""What a model costs: resident memory after load, load time, and the KV cache as it fills.

    python benchmarks/memory.py [MODEL ...] [--dtypes auto,int8,fp32] [--threads 2]
        [--contexts 0,100,1000] [--rounds 3]

Each (model, dtype) runs in a fresh interpreter: `import llama2c`, read /proc/self/status
(the baseline), import the modules a load needs (their code is the same for every model),
Model.load, read it again, then run a session to each --contexts length and read it again.
"Growth" is RssAnon + RssFile over the baseline; "imports" is the part of it that is module
code; "KV" is model.kv_cache_bytes(n) for the tokens held. The criterion of the tests
(tests/test_memory.py): growth after load <= 1.15 x weight bytes per token + KV in use +
imports + 10 MB for the tokenizer. Load time is the best of --rounds loads in that process
(the first one pays the page cache and imports).

Default models: the shared SmolLM2 Q4_1 and Q4_K_M GGUFs ($LLAMA2C_TEST_DATA/models).
"""
import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLAMA2C_TEST_DATA", ROOT.parent / "shared")) / "models"
DEFAULT_MODELS = [SHARED / "SmolLM2-135M-Instruct.Q4_1.gguf",
                  SHARED / "SmolLM2-135M-Instruct.Q4_K_M.gguf"]
MB = 1e6

_CHILD = textwrap.dedent("""
    import json, sys, time
    import numpy as np

    def status():
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("RssAnon", "RssFile"):
                    out[k] = int(v.split()[0]) * 1024
        return out

    args = json.loads(sys.argv[1])
    import llama2c
    s0 = status()                                  # the interpreter after `import llama2c`
    import llama2c.model, llama2c.loaders, llama2c.loaders.gguf, llama2c.tokenizer
    s1 = status()                                  # + the code a load runs
    t0 = time.perf_counter()
    model = llama2c.Model.load(args["path"], dtype=args["dtype"], n_threads=args["threads"])
    first = time.perf_counter() - t0
    s2 = status()
    kv = []
    for n in args["contexts"]:                     # a fresh session of the model's context
        s = model.new_session()
        s._sess.eval(np.arange(n, dtype=np.int32) % 1000 + 100, logits="none")
        kv.append({"tokens": n, "status": status(), "kv": model.kv_cache_bytes(n)})
        del s
    times = [first]
    for _ in range(args["rounds"] - 1):            # again: warm page cache, modules imported
        del model
        t0 = time.perf_counter()
        model = llama2c.Model.load(args["path"], dtype=args["dtype"], n_threads=args["threads"])
        times.append(time.perf_counter() - t0)
    print(json.dumps({"before": s0, "imports": s1, "after_load": s2, "first_load": first,
                      "best_load": min(times), "weight_bytes": model.weight_bytes(),
                      "resident_weights": model.resident_weight_bytes(), "dtype": model.dtype,
                      "kv_per_1000": model.memory()["kv_bytes_per_1000_tokens"], "kv": kv}))
""")


def measure(path, dtype, threads, contexts, rounds) -> dict:
    args = {"path": str(path), "dtype": dtype, "threads": threads, "contexts": contexts,
            "rounds": rounds}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], env=env,
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def _total(s: dict) -> int:
    return s["RssAnon"] + s["RssFile"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", default=DEFAULT_MODELS)
    ap.add_argument("--dtypes", default="auto,int8,fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", default="100,1000")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    contexts = [int(n) for n in args.contexts.split(",") if n]
    print("| model | dtype | weight bytes/token | resident weights | growth after load (anon + file)"
          " | imports | growth / weight bytes | growth - imports / weight bytes | load s (first, best)"
          + "".join(f" | growth at {n} tokens (KV)" for n in contexts) + " |")
    print("|---" * (9 + len(contexts)) + "|")
    for path in args.models:
        for dtype in args.dtypes.split(","):
            d = measure(path, None if dtype == "auto" else dtype, args.threads, contexts, args.rounds)
            wb, b = d["weight_bytes"], d["before"]
            grow = _total(d["after_load"]) - _total(b)
            imports = _total(d["imports"]) - _total(b)
            anon = d["after_load"]["RssAnon"] - b["RssAnon"]
            file = d["after_load"]["RssFile"] - b["RssFile"]
            row = (f"| {Path(path).name} | {dtype} ({d['dtype']}) | {wb / MB:.1f} MB | "
                   f"{d['resident_weights'] / MB:.1f} MB | {grow / MB:.1f} MB ({anon / MB:.1f} + "
                   f"{file / MB:.1f}) | {imports / MB:.1f} MB | {grow / wb:.3f}x | "
                   f"{(grow - imports) / wb:.3f}x | {d['first_load']:.2f}, {d['best_load']:.2f}")
            for k in d["kv"]:
                row += f" | {(_total(k['status']) - _total(b)) / MB:.1f} MB ({k['kv'] / MB:.1f})"
            print(row + " |", flush=True)


if __name__ == "__main__":
    main()
