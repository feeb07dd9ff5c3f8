"""Memory: llama2.c fp32 checkpoints are memory-mapped and the engine holds one packed copy of
their matrices (the kernels' 16-row panels; a tied embedding is read from the packed
classifier, not copied again), and repeated load/unload and generate calls do not leak.

Each measurement runs in a fresh interpreter (tests/l2c_files.run_python) so that pytest's own
allocations do not blur it. Figures: RssAnon / RssFile / RssShmem from /proc/self/status, and
glibc's mallinfo2 (bytes currently malloc'ed, arena + mmapped), which sees C-level leaks (a
session or sampler buffer not freed) far below RSS noise.

Run by hand for a longer soak:  python tests/test_memory.py 10000
"""
import json
import os
import sys
import textwrap

import pytest

from l2c_files import run_python

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)"),
    pytest.mark.skipif("asan" in os.environ.get("LD_PRELOAD", ""),
                       reason="ASan's quarantine and shadow memory make RSS meaningless"),
]

_COMMON = textwrap.dedent("""
    import ctypes, gc, json, os, sys
    import numpy as np

    def status():
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("RssAnon", "RssFile", "RssShmem", "VmRSS"):
                    out[k] = int(v.split()[0]) * 1024
        return out

    class _MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                    "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        _libc = ctypes.CDLL(None)
        _libc.mallinfo2.restype = _MallInfo2
        def malloced():
            m = _libc.mallinfo2()
            return m.uordblks + m.hblkhd
    except (AttributeError, OSError):
        def malloced():
            return -1
""")

_ZERO_COPY = _COMMON + textwrap.dedent("""
    import llama2c
    from llama2c import Config
    from llama2c.testing import make_random_model
    from llama2c.loaders.llama2c_bin import write_llama2c_bin

    path = sys.argv[1]
    cfg = Config(dim=1024, hidden_dim=2816, n_layers=2, n_heads=16, n_kv_heads=16,
                 vocab_size=4096, seq_len=256)
    w = make_random_model(cfg, seed=0)
    write_llama2c_bin(path, cfg, w)
    del w
    gc.collect()
    size = os.path.getsize(path)
    s0 = status()
    model = llama2c.Model.load(path, n_threads=1)
    s1 = status()
    model.generate([1, 2, 3], max_new_tokens=4, temperature=0)
    s2 = status()
    print(json.dumps({"file": size, "before": s0, "after_load": s1, "after_generate": s2,
                      "dtype": model.dtype}))
""")

_LEAKS = _COMMON + textwrap.dedent("""
    import llama2c
    from llama2c import Config
    from llama2c.testing import make_random_model
    from llama2c.loaders.llama2c_bin import write_llama2c_bin

    path, n_loads, n_calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    # small but with per-call buffers big enough that a leak shows: the sampler's scratch is
    # 8 bytes x vocab, a session's KV cache 2 x 4 bytes x n_layers x context x kv_dim
    cfg = Config(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=4096,
                 seq_len=256)
    write_llama2c_bin(path, cfg, make_random_model(cfg, seed=0))

    def cycle_loads(n):
        for i in range(n):
            m = llama2c.Model.load(path, n_threads=1)
            m.generate([1, 2], max_new_tokens=2, temperature=0.8, seed=i)
            list(m.generate([3], max_new_tokens=3, stream=True, seed=i))
            g = m.generate([4], max_new_tokens=5, stream=True, seed=i)
            next(g)                       # a half-consumed stream, dropped
            del g, m
        gc.collect()

    def cycle_calls(m, n):
        for i in range(n):
            if i % 4 == 3:
                list(m.generate([1 + i % 50], max_new_tokens=3, stream=True, seed=i))
            elif i % 4 == 2:
                m.logits([i % 4096, 5])
            else:
                m.generate([1 + i % 50, 7], max_new_tokens=3, temperature=0.9, top_k=i % 5,
                           seed=i)
        gc.collect()

    cycle_loads(5)                        # warm up: imports, caches, allocator pools
    a0, m0 = status(), malloced()
    cycle_loads(n_loads)
    a1, m1 = status(), malloced()
    model = llama2c.Model.load(path, n_threads=1)
    cycle_calls(model, 200)
    b0, mb0 = status(), malloced()
    cycle_calls(model, n_calls)
    b1, mb1 = status(), malloced()
    print(json.dumps({"loads": n_loads, "calls": n_calls,
                      "load_anon_growth": a1["RssAnon"] - a0["RssAnon"],
                      "load_malloc_growth": m1 - m0,
                      "call_anon_growth": b1["RssAnon"] - b0["RssAnon"],
                      "call_malloc_growth": mb1 - mb0,
                      "rss_anon_end": b1["RssAnon"], "malloc_end": mb1}))
""")

MB = 1 << 20


def test_fp32_checkpoint_is_packed_once(tmp_path):
    r = run_python(_ZERO_COPY.replace("sys.argv[1]", repr(str(tmp_path / "big.bin"))), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(r.stdout.strip().splitlines()[-1])
    size = d["file"]
    anon_load = d["after_load"]["RssAnon"] - d["before"]["RssAnon"]
    anon_gen = d["after_generate"]["RssAnon"] - d["before"]["RssAnon"]
    print(f"\nfile {size / MB:.1f} MB: RssAnon +{anon_load / MB:.2f} MB after load (the packed "
          f"matrices), +{anon_gen / MB:.2f} MB after a generate")
    assert d["dtype"] == "fp32"
    assert size > 100 * MB
    # one packed copy of the matrices (rows padded to 16: this model's are multiples of it)
    assert 0.9 * size < anon_load < 1.05 * size + 8 * MB
    assert anon_gen - anon_load < 16 * MB


def test_no_leaks_over_loads_and_generate_calls(tmp_path):
    r = run_python(_LEAKS.replace("sys.argv[1]", repr(str(tmp_path / "tiny.bin")))
                   .replace("int(sys.argv[2])", "50").replace("int(sys.argv[3])", "2000"),
                   timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"\n{d['loads']} loads: RssAnon {d['load_anon_growth'] / 1024:+.0f} KB, malloc "
          f"{d['load_malloc_growth'] / 1024:+.0f} KB; {d['calls']} calls: RssAnon "
          f"{d['call_anon_growth'] / 1024:+.0f} KB, malloc {d['call_malloc_growth'] / 1024:+.0f} KB")
    assert d["load_anon_growth"] < 4 * MB
    assert d["call_anon_growth"] < 4 * MB
    if d["malloc_end"] >= 0:      # glibc mallinfo2 available
        # one leaked sampler (32 KB) per call would be +64 MB; one leaked model per load +MBs
        assert d["load_malloc_growth"] < 1 * MB
        assert d["call_malloc_growth"] < 1 * MB


if __name__ == "__main__":   # a longer soak by hand: python tests/test_memory.py 10000
    import tempfile
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
    with tempfile.TemporaryDirectory() as d:
        r = run_python(_LEAKS.replace("sys.argv[1]", repr(os.path.join(d, "tiny.bin")))
                       .replace("int(sys.argv[2])", "50").replace("int(sys.argv[3])", str(n)),
                       timeout=3600)
    print(r.stdout, r.stderr[-3000:])
