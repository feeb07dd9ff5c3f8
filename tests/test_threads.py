"""Threads and processes: one Model shared by Python threads, the GIL released while the
engine runs, models in multiprocessing children (fork, forkserver, spawn), and the thread
count (n_threads, OMP_NUM_THREADS, CPU affinity)."""
import os
import subprocess
import textwrap
import threading
import time

import numpy as np
import pytest

import llama2c
from llama2c import Config
from llama2c import _threads
from llama2c.testing import make_random_model
from l2c_files import run_python

SMALL = Config(dim=128, hidden_dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256,
               seq_len=128)


@pytest.fixture(scope="module")
def small_model():
    return llama2c.Model(SMALL, make_random_model(SMALL, seed=1), n_threads=1)


def _jobs():
    jobs = []
    for i in range(6):
        prompt = [1 + i, 7, 42 + i, 3]
        jobs.append((prompt, dict(temperature=0.0)))
        jobs.append((prompt, dict(temperature=0.9, top_p=0.95, seed=100 + i)))
        jobs.append((prompt, dict(temperature=1.2, top_k=20, top_p=1.0, seed=7 * i + 1)))
    return jobs


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("stream", [False, True])
def test_concurrent_generation_matches_sequential(small_model, n_threads, stream):
    small_model.n_threads = n_threads
    jobs = _jobs()

    def run(job):
        prompt, kw = job
        if stream:
            chunks = small_model.generate(prompt, max_new_tokens=24, stream=True, **kw)
            return [t for chunk in chunks for t in chunk.token_ids]
        return small_model.generate(prompt, max_new_tokens=24, **kw).token_ids

    expected = [run(j) for j in jobs]
    results = {}
    errors = []
    barrier = threading.Barrier(4)

    def worker(w):
        try:
            barrier.wait()
            for rep in range(2):
                for k in range(w, len(jobs), 4):
                    results[(k, rep)] = run(jobs[k])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a generating thread hung"
    assert not errors, errors
    for (k, rep), got in results.items():
        assert got == expected[k], f"job {k} (rep {rep}) differs from the sequential run"
    assert len(results) == 2 * len(jobs)
    small_model.n_threads = 1


def test_concurrent_logits_match(small_model):
    ids = [[i, i + 1, 2 * i + 3] for i in range(8)]
    expected = [small_model.logits(x) for x in ids]
    out = [None] * len(ids)

    def worker(i):
        for _ in range(3):
            out[i] = small_model.logits(ids[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(ids))]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    for a, b in zip(out, expected):
        np.testing.assert_array_equal(a, b)


def test_gil_released_during_generate():
    cfg = Config(dim=512, hidden_dim=1376, n_layers=4, n_heads=8, n_kv_heads=8, vocab_size=4096,
                 seq_len=1024)
    model = llama2c.Model(cfg, make_random_model(cfg, seed=2), n_threads=1)
    model.generate([1], max_new_tokens=2, temperature=0)            # warm up
    t0 = time.perf_counter()
    model.generate([1], max_new_tokens=10, temperature=0)
    per_token = (time.perf_counter() - t0) / 10
    n_tokens = int(min(1000, max(20, 1.0 / per_token)))              # about one second

    def count(stop):
        n = 0
        while not stop.is_set():
            n += 1
        return n

    idle = threading.Event()
    threading.Timer(0.3, idle.set).start()
    t0 = time.perf_counter()
    idle_rate = count(idle) / (time.perf_counter() - t0)         # iterations/s, nothing else
    stop, box = threading.Event(), {}
    counter = threading.Thread(target=lambda: box.setdefault("n", count(stop)))
    counter.start()
    t0 = time.perf_counter()
    r = model.generate([1, 2, 3], max_new_tokens=n_tokens, temperature=0)
    elapsed = time.perf_counter() - t0
    stop.set()
    counter.join()
    rate = box["n"] / elapsed
    print(f"\n{len(r.token_ids)} tokens in {elapsed:.2f}s; counter {rate:.3g}/s during "
          f"generate vs {idle_rate:.3g}/s idle ({rate / idle_rate:.0%})")
    assert len(r.token_ids) == n_tokens
    # with the GIL held for the whole call the counter would advance only before and after it
    assert rate > 0.25 * idle_rate


# ----------------------------------------------------------------------------- processes

_MP_SCRIPT = textwrap.dedent("""
    import multiprocessing as mp, sys, time, numpy as np, llama2c
    from llama2c import Config
    from llama2c.testing import make_random_model
    from llama2c.loaders.llama2c_bin import write_llama2c_bin

    METHOD, PATH = sys.argv[1], sys.argv[2]
    cfg = Config(dim=256, hidden_dim=512, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=256,
                 seq_len=64)

    def child(q, path):
        try:
            m = MODEL if path is None else llama2c.Model.load(path, n_threads=2)
            q.put(("ok", m.logits([1, 2, 3]).tolist(),
                   m.generate([1, 2], max_new_tokens=5, temperature=0).token_ids))
        except BaseException as e:
            q.put(("error", f"{type(e).__name__}: {e}", None))

    if __name__ == "__main__":
        write_llama2c_bin(PATH, cfg, make_random_model(cfg, seed=3))
        MODEL = llama2c.Model.load(PATH, n_threads=2)
        ref = MODEL.logits([1, 2, 3])            # the parent has used OpenMP threads
        ref_gen = MODEL.generate([1, 2], max_new_tokens=5, temperature=0).token_ids
        ctx = mp.get_context(METHOD)
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(q, None if METHOD == "fork" else PATH))
        p.start()
        p.join(15)
        if p.is_alive():
            p.kill()
            print("HANG")
            sys.exit(3)
        status, logits, gen = q.get(timeout=5)
        if status == "error":
            print("ERROR", logits)
            sys.exit(4)
        assert np.allclose(np.array(logits, dtype=np.float32), ref, rtol=1e-5, atol=1e-5)
        assert gen == ref_gen, (gen, ref_gen)
        # the parent still works after its child
        assert np.array_equal(MODEL.logits([1, 2, 3]), ref)
        print("OK", p.exitcode)
""")


def _run_mp(tmp_path, method):
    import sys
    script = tmp_path / "mp_script.py"
    script.write_text(_MP_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(llama2c.__file__)))
    path = os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.run([sys.executable, str(script), method, str(tmp_path / "m.bin")],
                          capture_output=True, text=True, timeout=90,
                          env={**os.environ, "PYTHONPATH": path})


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_model_in_spawned_child(tmp_path, method):
    r = _run_mp(tmp_path, method)
    assert r.returncode == 0 and "OK 0" in r.stdout, (r.stdout, r.stderr[-3000:])


def _fork_fix_present():
    return hasattr(_threads, "in_forked_child")


@pytest.mark.xfail(not _fork_fix_present(), strict=True,
                   reason="KNOWN BUG (see report): GNU libgomp deadlocks in a fork()ed child "
                          "whose parent ran OpenMP parallel regions; fix: an os.register_at_fork "
                          "hook that makes the child's sessions run on one thread")
def test_model_in_forked_child_works_or_raises(tmp_path):
    r = _run_mp(tmp_path, "fork")
    assert "HANG" not in r.stdout, "the forked child hung (libgomp after fork)"
    # either the child computed the same results, or it raised a clear llama2c error
    assert (r.returncode == 0 and "OK 0" in r.stdout) or (
        r.returncode == 4 and ("Llama2cError" in r.stdout or "fork" in r.stdout)), (r.stdout, r.stderr[-3000:])


def test_fork_before_any_openmp_use_works(tmp_path):
    # A child forked before the parent started an OpenMP team runs with threads as usual.
    code = textwrap.dedent(f"""
        import os, sys, numpy as np, llama2c
        from llama2c import Config
        from llama2c.testing import make_random_model
        cfg = Config(dim=256, hidden_dim=512, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=256, seq_len=64)
        m = llama2c.Model(cfg, make_random_model(cfg, seed=3), n_threads=2)
        pid = os.fork()
        if pid == 0:
            m.logits([1, 2, 3]); os._exit(0)
        import time
        for _ in range(300):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done: break
            time.sleep(0.1)
        else:
            os.kill(pid, 9); print("HANG"); sys.exit(3)
        print("OK", os.waitstatus_to_exitcode(status))
    """)
    r = run_python(code, timeout=60)
    assert "OK 0" in r.stdout, (r.stdout, r.stderr[-2000:])


# ----------------------------------------------------------------------------- thread counts

def test_default_threads_respects_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _threads.default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "5,2")
    assert _threads.default_threads() == 5
    for bad in ("", "abc", "0", "-2"):
        monkeypatch.setenv("OMP_NUM_THREADS", bad)
        assert _threads.default_threads() == _threads.available_cores()
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert _threads.default_threads() == _threads.available_cores() >= 1


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no sched_setaffinity")
def test_default_threads_respects_affinity():
    code = textwrap.dedent("""
        import os, llama2c
        from llama2c import _threads
        from llama2c import Config
        from llama2c.testing import make_random_model
        cpu = sorted(os.sched_getaffinity(0))[0]
        os.sched_setaffinity(0, {cpu})
        cfg = Config(dim=32, hidden_dim=64, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=64, seq_len=16)
        m = llama2c.Model(cfg, make_random_model(cfg))
        print(_threads.available_cores(), _threads.default_threads(), m.n_threads,
              llama2c.kernel_info()["n_threads"])
    """)
    r = run_python(code, drop_env=("OMP_NUM_THREADS",), timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["1", "1", "1", "1"], r.stdout


_TASKS_SCRIPT = textwrap.dedent("""
    import os, sys, llama2c
    from llama2c import Config
    from llama2c.testing import make_random_model
    def tasks(): return len(os.listdir("/proc/self/task"))
    cfg = Config(dim=256, hidden_dim=512, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=256, seq_len=32)
    kw = {} if sys.argv[1] == "default" else {"n_threads": int(sys.argv[1])}
    m = llama2c.Model(cfg, make_random_model(cfg), **kw)
    before = tasks()
    # the engine's own session (the Python API's calls end their workers afterwards)
    import numpy as np
    from llama2c import _engine as E
    E.Session(m._engine, n_threads=m.n_threads).eval(np.array([1, 2, 3], np.int32), "last")
    print(m.n_threads, tasks() - before)
""")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc")
@pytest.mark.skipif(not llama2c.kernel_info()["openmp"], reason="built without OpenMP")
@pytest.mark.parametrize("arg,omp,want", [("1", "4", 1), ("3", None, 3), ("default", "2", 2),
                                          ("default", "1", 1)])
def test_engine_uses_n_threads(arg, omp, want):
    """The engine starts exactly n_threads - 1 OpenMP worker threads (n_threads from the
    argument, else OMP_NUM_THREADS)."""
    code = f"import sys; sys.argv = ['x', {arg!r}]\n" + _TASKS_SCRIPT
    env = {"OMP_NUM_THREADS": omp} if omp else {}
    r = run_python(code, env=env, drop_env=("OMP_NUM_THREADS",), timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    n, extra = map(int, r.stdout.split())
    assert n == want and extra == want - 1, r.stdout


def test_openmp_workers_are_released_by_threads_that_hand_the_engine_on():
    """libgomp stops spinning between parallel regions once the OpenMP workers of all threads
    that ever ran one outnumber the cores (decode 3-4x slower), so a call through the Python
    API ends its thread's workers (l2c_release_threads): after load, generate, logits and
    score the process has no OpenMP worker threads left, and a generation on another thread
    starts from a clean count. (Counts threads, times nothing.)"""
    code = textwrap.dedent("""
        import os, threading, time
        import llama2c
        from llama2c import Config, _engine
        from llama2c.testing import make_random_model
        def tasks():
            return len(os.listdir("/proc/self/task"))
        def settled(want):
            for _ in range(200):          # released threads exit asynchronously
                if tasks() == want:
                    return True
                time.sleep(0.01)
            return False
        base = tasks()
        cfg = Config(dim=128, hidden_dim=256, n_layers=2, n_heads=4, n_kv_heads=2,
                     vocab_size=300, seq_len=64)
        model = llama2c.Model(cfg, make_random_model(cfg, 1), n_threads=2)
        assert settled(base), ("after load", tasks(), base)
        model.generate([1, 2, 3], max_new_tokens=8, temperature=0)
        assert settled(base), ("after generate", tasks(), base)
        model.logits([1, 2, 3])
        model.score([1, 2, 3])
        assert settled(base), ("after logits/score", tasks(), base)
        out = []
        th = threading.Thread(target=lambda: out.append(
            model.generate([1, 2, 3], max_new_tokens=8, temperature=0).token_ids))
        th.start(); th.join()
        assert settled(base), ("after a thread's generate", tasks(), base)
        assert out[0] == model.generate([1, 2, 3], max_new_tokens=8, temperature=0).token_ids
        print("OK", _engine.release_threads())
    """)
    r = run_python(code, env={"OMP_NUM_THREADS": "2"}, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "OK True"
