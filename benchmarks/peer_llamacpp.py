"""llama-cpp-python as a benchmark peer, in its own process: llama2c.bench.LlamaCpp runs this
script with any interpreter that has llama_cpp (the system one, or a virtualenv with another
build, e.g. /work/peers/venv-avx2) and talks to it in JSON lines on stdin/stdout. It needs only
the standard library, numpy and llama_cpp (not llama2c).

    python benchmarks/peer_llamacpp.py --info         # the build's system info, then exit

Commands (one JSON object per line; each reply is {"ok": true, ...} or {"ok": false, "error"}):
    {"cmd": "load", "model": PATH, "n_ctx": N, "threads": T}
        -> system_info, version, size (bytes of the tensors), n_params, rss
    {"cmd": "decode", "first": ID, "n": N, "threads": T}
        -> seconds of N greedy tokens after the 1-token prompt [ID], one eval each
    {"cmd": "prefill", "ids": [...], "threads": T}  -> seconds of the prompt from an empty cache
    {"cmd": "context", "ids": [...], "n_decode": N, "threads": T}
        -> prefill_seconds, decode_seconds (N greedy tokens after the prompt), rss
    {"cmd": "quit"}
The same definitions as llama2c.bench: greedy = argmax of the last logits, timed in here.
"""
import json
import os
import sys
import time

import numpy as np


def rss():
    out = {"anon": 0, "file": 0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile"):
                    out[key[3:].lower()] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def cpu_features(llama_cpp):
    """What ggml's CPU backend was built with (the system info string lists only the features
    that are on): e.g. "ggml_cpu_has: avx2 = 1 | avx512 = 0 | ..."."""
    import ctypes
    path = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-cpu.so")
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        return f"ggml_cpu_has: unavailable ({e})"
    names = ("avx2", "fma", "f16c", "avx_vnni", "avx512", "avx512_vnni", "avx512_bf16")
    flags = [f"{n} = {getattr(lib, 'ggml_cpu_has_' + n)()}" for n in names
             if hasattr(lib, "ggml_cpu_has_" + n)]
    return "ggml_cpu_has: " + " | ".join(flags)


class Peer:
    def __init__(self):
        self.llm = None

    def load(self, model, n_ctx, threads):
        import llama_cpp
        self.llm = llama_cpp.Llama(model, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   verbose=False)
        self.threads = threads
        return {"system_info": llama_cpp.llama_print_system_info().decode(),
                "version": llama_cpp.__version__, "size": self.llm._model.size(),
                "n_params": self.llm._model.n_params(), "rss": rss()}

    def _threads(self, threads):
        if threads != self.threads:
            self.llm._ctx.set_n_threads(threads, threads)
            self.threads = threads

    def _greedy(self):
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))
        return int(np.argmax(logits))

    def _steps(self, token, n):
        for _ in range(n):
            self.llm.eval([token])
            token = self._greedy()
        return token

    def decode(self, first, n, threads):
        self._threads(threads)
        self.llm.reset()
        self.llm.eval([first])
        token = self._greedy()
        t0 = time.perf_counter()
        self._steps(token, n)
        return {"seconds": time.perf_counter() - t0}

    def prefill(self, ids, threads):
        self._threads(threads)
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        self._greedy()
        return {"seconds": time.perf_counter() - t0}

    def context(self, ids, n_decode, threads):
        self._threads(threads)
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        token = self._greedy()
        t1 = time.perf_counter()
        self._steps(token, n_decode)
        t2 = time.perf_counter()
        return {"prefill_seconds": t1 - t0, "decode_seconds": t2 - t1, "rss": rss()}


def main():
    if "--info" in sys.argv[1:]:
        import llama_cpp
        print(f"llama-cpp-python {llama_cpp.__version__}: {llama_cpp.llama_print_system_info().decode()}")
        print(cpu_features(llama_cpp))
        return 0
    # replies go to the original stdout; anything the C library prints goes to stderr
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    peer = Peer()
    for line in sys.stdin:
        request = json.loads(line)
        cmd = request.pop("cmd")
        if cmd == "quit":
            replies.write(json.dumps({"ok": True}) + "\n")
            replies.flush()
            break
        try:
            if cmd not in ("load", "decode", "prefill", "context"):
                raise ValueError("unknown command")
            reply = {"ok": True, **getattr(peer, cmd)(**request)}
        except Exception as e:  # reported to the harness, which raises it
            reply = {"ok": False, "error": f"{cmd}: {type(e).__name__}: {e}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
