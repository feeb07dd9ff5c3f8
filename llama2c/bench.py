"""Benchmarks: one definition of every speed figure llama2c reports.

`llama2c bench`, benchmarks/report.py and benchmarks/test_bench.py all measure through this
module, so a number means the same thing wherever it is printed:

- decode: greedy tokens after a 1-token prompt; each token is one forward pass of one token
  (tok/s = tokens / seconds of those forward passes, the argmax between them included). Each
  engine runs them the way its users' generation does: this package in its decode loop (one C
  call, Session.decode, as Model.generate), llama.cpp through llama-cpp-python's eval with the
  argmax in Python (as its generate), the NumPy reference in Python.
- prefill: an N-token prompt from an empty cache, logits of the last position only.
- long context: the prefill of an N-token prompt, then decode after it; resident memory.
- roofline: decode GB/s = weight bytes read per token x tok/s, against the memory read
  bandwidth probe (a 1 GiB buffer) and against a read of a buffer the size of the weights
  (caches included); prefill GFLOP/s (fp32) or GOP/s (int8: 2 x multiply-adds) = 2 x weight
  parameters per token x tok/s, against the peak of the kernel table.

Engines: `Llama2c` (this package on one kernel table), `Reference` (the NumPy reference) and
`LlamaCpp` (llama-cpp-python in a subprocess of any interpreter, through the runner script
benchmarks/peer_llamacpp.py). `interleaved()` runs rounds in which every engine runs every
case once, so slow drifts of the machine (memory bandwidth, other processes) hit all alike.

    >>> from llama2c import bench
    >>> engines = [bench.Llama2c.from_shape("stories15M", "int8")]
    >>> results = bench.interleaved(engines, bench.short_cases([1], 64, [128]), rounds=3)
    >>> print(bench.decode_table(engines, results, bench.Machine([1])))
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .config import Config

# ---- shapes --------------------------------------------------------------------------------

SHAPES = {
    # karpathy's TinyStories models (llama2.c), MHA, vocab 32000
    "stories15M": Config(dim=288, hidden_dim=768, n_layers=6, n_heads=6, n_kv_heads=6,
                         vocab_size=32000, seq_len=1024),
    "stories110M": Config(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, n_kv_heads=12,
                          vocab_size=32000, seq_len=1024),
    # SmolLM2-135M: GQA 9/3, tied embeddings, rope theta 100000 (context cut to 1024 here)
    "SmolLM2-135M": Config(dim=576, hidden_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3,
                           vocab_size=49152, seq_len=1024, rope_theta=100000.0),
    # a toy shape for fast tests of the harness itself
    "tiny": Config(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                   vocab_size=256, seq_len=1024),
}
README_SHAPES = ("stories15M", "stories110M", "SmolLM2-135M")

# the real model files: the shared Q4_1 file, and the F32 / Q8_0 files of the same weights
# that benchmarks/make_peer_models.py writes for the llama.cpp comparisons
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_Q4KM_GGUF = "SmolLM2-135M-Instruct.Q4_K_M.gguf"
PEER_GGUFS = ("SmolLM2-135M-Instruct.F32.gguf", "SmolLM2-135M-Instruct.Q8_0.gguf")

DEFAULT_GROUP_SIZE = 64     # int8 groups of the random-weight shapes (as `Model.load(dtype="int8")`)
FIRST_TOKEN = 1             # the 1-token prompt of decode (llama2.c's BOS)


def model_dirs() -> list:
    """Where real model files are looked for: $LLAMA2C_TEST_DATA/models (default
    ../shared/models beside the repository), then $LLAMA2C_PEERS/models (default /work/peers)."""
    repo = Path(__file__).resolve().parents[1]
    shared = Path(os.environ.get("LLAMA2C_TEST_DATA", repo.parent / "shared"))
    peers = Path(os.environ.get("LLAMA2C_PEERS", "/work/peers"))
    return [shared / "models", peers / "models"]


def find_model(name: str) -> Path | None:
    """A model file by name in model_dirs(), or None."""
    for d in model_dirs():
        if (d / name).is_file():
            return d / name
    return None


# ---- arithmetic ----------------------------------------------------------------------------

def layer_params(cfg: Config) -> int:
    """Weight parameters of the transformer blocks' matrices (q, k, v, o, w1, w2, w3): the
    multiply-adds per token of every matmul but the classifier."""
    per_layer = (cfg.dim * cfg.q_dim + 2 * cfg.dim * cfg.kv_dim + cfg.q_dim * cfg.dim
                 + 3 * cfg.dim * cfg.hidden_dim)
    return cfg.n_layers * per_layer


def prefill_ops_per_token(cfg: Config, n_prompt: int) -> float:
    """2 x weight parameters touched per prompt token: every block matrix, plus the classifier
    once per prompt (only the last position's logits are computed). Attention (about 0.5% of
    it for SmolLM2 at 512 tokens) is not counted."""
    return 2.0 * (layer_params(cfg) + cfg.vocab_size * cfg.dim / n_prompt)


def prompt_ids(n: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    """The benchmark prompt: n token ids drawn uniformly (the speed does not depend on them)."""
    return np.random.default_rng(seed).integers(0, vocab_size, n).astype(np.int32)


# ---- the machine ---------------------------------------------------------------------------

ISA_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
             "avx512_vnni", "avx512_bf16")


def cpu_model() -> str:
    """The CPU from /proc/cpuinfo: model name, family/model and the ISA flags the kernel
    tables care about (platform.processor() elsewhere)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model", "flags") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    isa = " ".join(f for f in ISA_FLAGS if f in flags)
    return (f"{fields['model name']} (family {fields.get('cpu family', '?')}, model "
            f"{fields.get('model', '?')}; {isa})")


def rss_bytes(pid: int | str = "self") -> dict:
    """Resident memory of a process: {"anon": RssAnon, "file": RssFile} in bytes (zeros where
    /proc is missing)."""
    out = {"anon": 0, "file": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile"):
                    out[key[3:].lower()] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def read_bandwidth(n_threads: int, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Memory read bandwidth in GB/s: the engine's C probe, best of reps sums of an nbytes
    buffer with n_threads (a buffer below the cache sizes measures the caches)."""
    from . import _engine
    return _engine.read_bandwidth(int(nbytes), reps, n_threads)


def available_simd() -> list:
    """Kernel tables this CPU and build can run, lowest first."""
    from . import _engine
    return list(_engine.available_simd())


# ---- kernels: a matmul with weights packed once, and the peak of a kernel table -------------

PEAK_SHAPE = (64, 256, 512)      # T, rows, cols: fp32 weights 512 KiB, int8 128 KiB (in L2)


class MatmulCase:
    """out (T, rows) = x (T, cols) @ w (rows, cols)^T on one kernel table, with the weights
    packed (and the activations quantized) once, in the constructor; calling it runs only the
    kernel. dtype "fp32" (panels), "int8" or "q4" (groups of group_size; activations 8-bit
    or two planes)."""

    def __init__(self, dtype: str, simd: str | None, T: int, rows: int, cols: int,
                 n_threads: int, act_bits: int = 16, group_size: int = 32, seed: int = 0):
        from . import _engine as E
        from .weights import quantize_q4, quantize_q8
        rng = np.random.default_rng(seed)
        self.x = rng.standard_normal((T, cols)).astype(np.float32)
        self.w = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        self.out = np.empty((T, rows), np.float32)
        self.ops = 2 * T * rows * cols           # FLOPs (fp32) or integer ops (int8, 4-bit)
        if dtype not in ("fp32", "int8", "q4"):
            raise ValueError(f"MatmulCase: dtype must be 'fp32', 'int8' or 'q4', got {dtype!r}")
        w = {"fp32": self.w, "int8": quantize_q8(self.w, group_size),
             "q4": quantize_q4(self.w, group_size)}[dtype]
        self.matrix = E.PackedMatrix(w)
        if dtype == "fp32":
            self.run = lambda: self.matrix.matmul(self.x, self.out, simd=simd, n_threads=n_threads)
        else:
            a = E.quantize(self.x, group_size, act_bits, simd=simd)
            self.run = lambda: self.matrix.matmul_q(a, self.out, simd=simd, n_threads=n_threads)

    def __call__(self) -> np.ndarray:
        self.run()
        return self.out


def best_of(fn, repeat: int = 5, number: int = 1) -> float:
    """Seconds of one call of fn: the best of `repeat` timings of `number` calls each."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


_peaks: dict = {}


def kernel_peak(dtype: str, simd: str, n_threads: int, act_bits: int = 16,
                measure: bool = False) -> tuple:
    """(GFLOP/s or GOP/s, how it was measured) of the kernel table's matmul, or (None, reason).

    Uses the engine's own probe `_engine.peak_gops(kind, simd, n_threads)` when the build has
    one; otherwise the best of a matmul on an L2-resident shape (PEAK_SHAPE) on that table.
    Measured on first use; measure=True measures again and keeps the best (interleaved() does
    so in every round, so the peak sees the same machine as the models)."""
    key = (dtype, simd, n_threads, act_bits)
    if key in _peaks and not measure:
        return _peaks[key]
    from . import _engine
    probe = getattr(_engine, "peak_gops", None)
    result = None
    if probe is not None:
        try:
            kind = "fp32" if dtype == "fp32" else "int8"     # 4-bit runs the int8 dot
            result = (float(probe(kind, simd, n_threads)), "peak_gops")
        except (TypeError, ValueError):
            result = None
    if result is None:
        T, rows, cols = PEAK_SHAPE
        try:
            case = MatmulCase(dtype, simd, T, rows, cols, n_threads, act_bits)
        except (NotImplementedError, ValueError) as e:
            result = (None, str(e))
        else:
            case()
            seconds = best_of(case, repeat=5, number=10)
            how = f"matmul {T}x{cols} @ ({rows}x{cols})^T, L2-resident"
            if dtype == "int8":
                how += f", {act_bits}-bit activations"
            result = (case.ops / seconds / 1e9, how)
    old = _peaks.get(key)
    if old is None or (result[0] or 0) > (old[0] or 0):
        _peaks[key] = result
    return _peaks[key]


# ---- engines ---------------------------------------------------------------------------------

class Engine:
    """What the harness measures. Subclasses time the cases themselves (in process, or in the
    peer's process); each time_* returns (tokens, seconds)."""
    label = "engine"
    dtype = "fp32"                 # "fp32" | "int8" | ...: GFLOP/s or GOP/s, and the peak
    simd = None                    # kernel table (None: not ours)
    act_bits = 16
    config: Config = None          # the model's shape (parameters per token)
    weight_bytes = 0               # weight bytes read per decoded token
    kv_bytes_per_token = 0         # KV cache bytes a decode step reads per position (0: unknown)
    threads_fixed = False          # True: the engine ignores the thread count (NumPy/BLAS)
    rss_after_load: dict = {}

    def time_decode(self, n: int, threads: int) -> tuple:
        raise NotImplementedError

    def time_prefill(self, n: int, threads: int) -> tuple:
        raise NotImplementedError

    def time_context(self, n: int, n_decode: int, threads: int) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Llama2c(Engine):
    """This package's engine: a loaded llama2c.Model on its kernel table, run through
    _engine.Session (the API the generation layer and the server use)."""

    def __init__(self, model, label: str | None = None, kv_dtype: str | None = None,
                 max_batch: int | None = None):
        from . import model as model_module
        self.model = model
        self.config = model.config
        self.dtype = model.dtype
        self.simd = model.simd
        self.act_bits = model.act_bits
        self.weight_bytes = model.weight_bytes()
        self.path = getattr(model, "path", None)       # the model file (None: random weights)
        self.kv_dtype = kv_dtype
        self.max_batch = max_batch or getattr(model_module, "PREFILL_CHUNK", 64)
        self.label = label or self.default_label()
        self.kv_bytes_per_token = model._kv_bytes_per_token(kv_dtype)
        self.rss_after_load = rss_bytes()
        self._session = None
        self._greedy = None      # the greedy sampler of decode_steps
        self.weights = None     # the weights as loaded (random shapes), for the reference peer
        self.source = None      # (path, dtype) of a model file, for the reference peer

    def default_label(self) -> str:
        label = f"llama2c {self.dtype} {self.simd}"
        if self.dtype != "fp32" and self.act_bits != 16:
            label += f" a{self.act_bits}"
        if self.kv_dtype:
            label += f" kv {self.kv_dtype}"
        return label

    @classmethod
    def from_shape(cls, shape, dtype: str = "fp32", simd: str | None = None,
                   act_bits: int | None = None, group_size: int = DEFAULT_GROUP_SIZE,
                   seed: int = 0, context: int | None = None, **kw) -> "Llama2c":
        """Random weights of a named shape (SHAPES) or a Config; dtype fp32 or int8."""
        from .model import Model
        from .testing import make_random_model
        from .weights import fit_group_size, quantize_weights
        cfg = SHAPES[shape] if isinstance(shape, str) else shape
        if context is not None:
            cfg = replace(cfg, seq_len=context)
        weights = make_random_model(cfg, seed)
        if dtype == "int8":
            with warnings.catch_warnings():     # stories15M's widths take groups of 32
                warnings.simplefilter("ignore")
                group_size = fit_group_size(cfg, group_size)
            weights = quantize_weights(cfg, weights, group_size)
        elif dtype != "fp32":
            raise ValueError(f"random-weight shapes are fp32 or int8, got dtype {dtype!r}")
        opts = {} if act_bits is None else {"act_bits": act_bits}
        engine = cls(Model(cfg, weights, simd=simd, **opts), **kw)
        engine.weights = weights        # the reference peer runs on the same arrays
        return engine

    @classmethod
    def from_file(cls, path, dtype: str | None = None, simd: str | None = None,
                  act_bits: int | None = None, context: int | None = None, **kw) -> "Llama2c":
        """A model file through Model.load (dtype None: as stored)."""
        from .model import Model
        opts = {} if act_bits is None else {"act_bits": act_bits}
        model = Model.load(path, dtype=dtype, simd=simd, context_length=context, **opts)
        engine = cls(model, **kw)
        engine.source = (str(path), dtype)      # the reference peer loads the same weights
        return engine

    # the phases (benchmarks/test_bench.py times them with pytest-benchmark)

    def session(self, context: int, threads: int):
        """A session with room for `context` positions, emptied, running on `threads`."""
        from . import _engine
        if self._session is None or self._session.context < context:
            self._session = None
            kwargs = {} if self.kv_dtype is None else {"kv_dtype": self.kv_dtype}
            try:
                self._session = _engine.Session(self.model._engine, context, self.max_batch,
                                                threads, **kwargs)
            except TypeError:
                if not kwargs:
                    raise
                raise ValueError(f"this build of the engine has no kv_dtype "
                                 f"(asked for {self.kv_dtype!r})") from None
        sess = self._session
        sess.truncate(0)
        sess.n_threads = threads
        return sess

    def start_decode(self, threads: int, context: int) -> tuple:
        """Run the 1-token prompt; returns (session, first generated token)."""
        sess = self.session(context, threads)
        logits = sess.eval(np.array([FIRST_TOKEN % self.config.vocab_size], np.int32))
        return sess, int(np.argmax(logits))

    def decode_steps(self, sess, token: int, n: int) -> int:
        """n greedy steps, each one forward pass of one token, in the engine's decode loop (one
        C call, as Model.generate runs it: forward, argmax, feed back); returns the last token."""
        from . import _engine
        V = self.config.vocab_size
        if self._greedy is None:
            self._greedy = _engine.Sampler(V, temperature=0.0)
        out = np.empty(n, np.int32)
        n_out, _ = sess.decode(self._greedy, token, np.empty(V, np.float32), out)
        if n_out != n:
            raise RuntimeError(f"decode: {n_out} of {n} steps (context full?)")
        return int(out[-1])

    def start_prefill(self, threads: int, context: int):
        return self.session(context, threads)

    @staticmethod
    def prefill(sess, ids: np.ndarray) -> int:
        """The prompt from the session's (empty) cache; returns the greedy next token."""
        return int(np.argmax(sess.eval(ids, logits="last")))

    # the measurements

    def time_decode(self, n, threads):
        sess, tok = self.start_decode(threads, n + 1)
        t0 = time.perf_counter()
        self.decode_steps(sess, tok, n)
        return n, time.perf_counter() - t0

    def time_prefill(self, n, threads):
        ids = prompt_ids(n, self.config.vocab_size)
        sess = self.start_prefill(threads, n)
        t0 = time.perf_counter()
        self.prefill(sess, ids)
        return n, time.perf_counter() - t0

    def time_context(self, n, n_decode, threads):
        ids = prompt_ids(n, self.config.vocab_size)
        sess = self.start_prefill(threads, n + n_decode)
        t0 = time.perf_counter()
        tok = self.prefill(sess, ids)
        t1 = time.perf_counter()
        self.decode_steps(sess, tok, n_decode)
        t2 = time.perf_counter()
        return {"prefill": t1 - t0, "decode": t2 - t1, "rss": rss_bytes()}

    def close(self):
        self._session = None


class Reference(Engine):
    """The NumPy reference (llama2c.reference.ReferenceModel) on a model's weights. Its
    prefill computes the logits of every position (ReferenceModel.logits); its threads are
    NumPy's BLAS threads."""
    threads_fixed = True
    max_decode = 16                 # its decode is slow: tok/s over at most this many tokens

    def __init__(self, config: Config, weights: dict, dtype: str, act_bits: int = 16,
                 context: int | None = None, label: str | None = None):
        from .reference import ReferenceModel
        if context is not None:
            config = replace(config, seq_len=min(context, config.seq_len))
        self.config = config
        self.dtype = dtype
        self.act_bits = act_bits
        self.ref = ReferenceModel(config, weights, act_bits=act_bits)
        self.weight_bytes = 0       # set by Reference.of: the bytes our engine reads
        self.label = label or f"NumPy reference {dtype}"
        self.rss_after_load = rss_bytes()

    @classmethod
    def of(cls, engine: Llama2c, context: int | None = None) -> "Reference":
        """The reference on the same weights as one of our engines."""
        weights = engine.weights
        if weights is None:
            from .loaders import load_any
            weights = load_any(engine.source[0], dtype=engine.source[1])[1]
        r = cls(engine.config, weights, engine.dtype, engine.act_bits, context)
        r.weight_bytes = engine.weight_bytes
        return r

    def time_decode(self, n, threads):
        n = min(n, self.max_decode)
        self.ref.reset()
        tok = int(np.argmax(self.ref.forward(FIRST_TOKEN % self.config.vocab_size, 0)))
        t0 = time.perf_counter()
        for pos in range(1, n + 1):
            tok = int(np.argmax(self.ref.forward(tok, pos)))
        return n, time.perf_counter() - t0

    def time_prefill(self, n, threads):
        ids = prompt_ids(n, self.config.vocab_size)
        t0 = time.perf_counter()
        self.ref.logits(ids)
        return n, time.perf_counter() - t0

    def time_context(self, n, n_decode, threads):
        raise NotImplementedError("the NumPy reference has no long-context mode")


def peer_runner() -> Path:
    """benchmarks/peer_llamacpp.py of the source tree ($LLAMA2C_PEER_RUNNER overrides)."""
    path = Path(os.environ.get("LLAMA2C_PEER_RUNNER",
                               Path(__file__).resolve().parents[1] / "benchmarks" / "peer_llamacpp.py"))
    if not path.is_file():
        raise FileNotFoundError(f"the llama.cpp peer runner {path} is missing: run from a source "
                                "checkout or set LLAMA2C_PEER_RUNNER")
    return path


def gguf_facts(path) -> tuple:
    """(Config, weight bytes read per decoded token, main weight type) of a GGUF file."""
    from .loaders.gguf import FILE_TYPE_NAMES, gguf_config, read_gguf
    gf = read_gguf(path)
    cfg = gguf_config(gf)
    sizes = {name: t.data.nbytes for name, t in gf.tensors.items()}
    per_token = sum(sizes.values())
    if "output.weight" in gf.tensors:       # untied: the embedding is only looked up
        per_token -= sizes.get("token_embd.weight", 0)
    by_type: dict = {}
    for name, t in gf.tensors.items():
        if len(t.shape) == 2 and name != "token_embd.weight":
            by_type[t.type_name] = by_type.get(t.type_name, 0) + sizes[name]
    main = max(by_type, key=by_type.get) if by_type else "?"
    # the file's own name for its mix (llama.cpp's general.file_type), e.g. Q4_K_M
    return cfg, per_token, FILE_TYPE_NAMES.get(gf.metadata.get("general.file_type"), main)


class LlamaCpp(Engine):
    """llama-cpp-python on a GGUF file, in a subprocess of `python` (default: this
    interpreter), driven through benchmarks/peer_llamacpp.py (JSON lines in and out); the
    subprocess times the cases itself. `build` is what its system info says: avx512 or avx2."""

    def __init__(self, path, python: str | None = None, context: int = 1024,
                 threads: int = 1, label: str | None = None):
        self.path = str(path)
        self.config, self.weight_bytes, self.wtype = gguf_facts(path)
        self.dtype = "fp32" if self.wtype in ("F32", "F16", "BF16") else "int8"
        self.python = python or sys.executable
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([self.python, str(peer_runner())], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        info = self.call("load", model=self.path, n_ctx=context, threads=threads)
        self.system_info = info["system_info"]
        self.version = info.get("version", "?")
        self.build = "avx512" if "AVX512 = 1" in self.system_info else (
            "avx2" if "AVX2 = 1" in self.system_info else "generic")
        self.rss_after_load = info["rss"]
        self.label = label or f"llama.cpp {self.wtype} ({self.build} build)"
        # its default cache: fp16 keys and values of every layer
        self.kv_bytes_per_token = 2 * self.config.n_layers * self.config.kv_dim * 2

    def call(self, cmd: str, **args) -> dict:
        """Send one command to the runner; return its reply or raise RuntimeError."""
        line = json.dumps({"cmd": cmd, **args})
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            reply = ""
        if not reply:
            self._stderr.seek(0)
            tail = self._stderr.read()[-2000:]
            raise RuntimeError(f"llama.cpp peer ({self.python}) exited:\n{tail}")
        out = json.loads(reply)
        if not out.get("ok"):
            raise RuntimeError(f"llama.cpp peer ({self.python}): {out.get('error')}")
        return out

    def time_decode(self, n, threads):
        r = self.call("decode", first=FIRST_TOKEN, n=n, threads=threads)
        return n, r["seconds"]

    def time_prefill(self, n, threads):
        r = self.call("prefill", ids=prompt_ids(n, self.config.vocab_size).tolist(), threads=threads)
        return n, r["seconds"]

    def time_context(self, n, n_decode, threads):
        r = self.call("context", ids=prompt_ids(n, self.config.vocab_size).tolist(),
                      n_decode=n_decode, threads=threads)
        return {"prefill": r["prefill_seconds"], "decode": r["decode_seconds"], "rss": r["rss"]}

    def close(self):
        if self.proc.poll() is None:
            try:
                self.call("quit")
            except RuntimeError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._stderr.close()


def llamacpp_build(python: str | None = None) -> str:
    """The system info string of llama-cpp-python in an interpreter (e.g. to check AVX512 = 0)."""
    out = subprocess.run([python or sys.executable, str(peer_runner()), "--info"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


# ---- timing: interleaved rounds ---------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    kind: str          # "decode" | "prefill" | "probe" (the bandwidth probe, engine-free)
    n: int             # tokens decoded, or prompt length
    threads: int


@dataclass
class Result:
    """The timings of one case on one engine, one per round."""
    tokens: int = 0
    seconds: list = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.best


def short_cases(threads: list, decode_tokens: int, prompts: list) -> list:
    """Decode and prefill cases for each thread count, plus the bandwidth probe."""
    cases = []
    for t in threads:
        cases.append(Case("probe", 0, t))
        cases.append(Case("decode", decode_tokens, t))
        cases += [Case("prefill", n, t) for n in prompts]
    return cases


def _run(engine: Engine, case: Case) -> tuple:
    if case.kind == "decode":
        return engine.time_decode(case.n, case.threads)
    if case.kind == "prefill":
        return engine.time_prefill(case.n, case.threads)
    raise ValueError(f"unknown case {case.kind!r}")


def interleaved(engines: list, cases: list, rounds: int = 3, warmup: bool = True,
                progress=None, results: dict | None = None) -> dict:
    """Run `rounds` rounds; in each, every case on every engine once (case by case, so one
    case's engines run back to back). Returns {(engine label, Case): Result}; probe cases are
    stored under the label "probe", with 1 / (GB/s) in place of seconds (1 / best = best GB/s).
    Engines with threads_fixed run only at the largest thread count. Results go into
    `results` when given, so a caller interrupted midway keeps what was measured."""
    top = max(c.threads for c in cases)
    results = {} if results is None else results
    if warmup:
        for e in engines:
            for c in cases:
                if c.kind != "probe" and not (e.threads_fixed and c.threads != top):
                    _run(e, Case(c.kind, min(c.n, 8), c.threads))
    tables = {(e.dtype, e.simd, e.act_bits) for e in engines if e.simd}
    for r in range(rounds):
        for case in cases:
            if case.kind == "probe":        # the memory probe and the kernel tables' peaks
                res = results.setdefault(("probe", case), Result(1))
                res.seconds.append(1.0 / read_bandwidth(case.threads))
                for nbytes in {e.weight_bytes for e in engines if e.weight_bytes}:
                    same_size_bandwidth(nbytes, case.threads, measure=True)
                for dtype, simd, bits in tables:
                    kernel_peak(dtype, simd, case.threads, bits, measure=True)
                continue
            for e in engines:
                if e.threads_fixed and case.threads != top:
                    continue
                tokens, seconds = _run(e, case)
                res = results.setdefault((e.label, case), Result(tokens))
                res.seconds.append(seconds)
                if progress:
                    progress(f"round {r + 1}/{rounds}: {e.label}, {case.kind} {case.n}, "
                             f"{case.threads} threads: {tokens / seconds:.1f} tok/s")
    return results


def long_context(engines: list, contexts: list, n_decode: int, threads: int, rounds: int = 1,
                 progress=None) -> dict:
    """Per engine and context: prefill of the context's prompt, decode of n_decode tokens after
    it and resident memory; context 0 means decode after a 1-token prompt. Each context is
    bracketed by two decodes after a 1-token prompt, one right before its prompt and one right
    after its decode, and the faster of the two is its "short": the ratio of decode after the
    context to it compares rounds run at the same moment (a shared machine's speed drifts by
    20-30% over minutes), and a short decode slowed by a passing load cannot inflate it.
    Returns {(engine label, context): dict(prefill=s, decode=s, short=s, rss=...)} with the
    best prefill of the rounds and the round of the best decode."""
    out: dict = {}
    for r in range(rounds):
        for n in contexts:
            for e in engines:
                if n == 0:
                    m = {"prefill": None, "decode": e.time_decode(n_decode, threads)[1], "rss": None}
                else:
                    before = e.time_decode(n_decode, threads)[1]
                    m = e.time_context(n, n_decode, threads)
                    m["short"] = min(before, e.time_decode(n_decode, threads)[1])
                if progress:
                    pre = f"prefill {n / m['prefill']:.1f} tok/s, " if m["prefill"] else ""
                    progress(f"round {r + 1}/{rounds}: {e.label}, context {n}: {pre}"
                             f"decode {n_decode / m['decode']:.1f} tok/s")
                old = out.get((e.label, n))
                if old is not None:
                    # the best prefill of the rounds, the round of the best decode (with its
                    # paired short decode), the first round's memory (later rounds find the
                    # largest context's cache still in use)
                    if old["decode"] < m["decode"]:
                        m["decode"] = old["decode"]
                        if n:
                            m["short"] = old["short"]
                    if m["prefill"] is not None:
                        m["prefill"] = min(m["prefill"], old["prefill"])
                    m["rss"] = old["rss"]
                out[e.label, n] = m
    return out


def bytes_bound(e: Engine, n: int) -> float | None:
    """The most of its short-context decode rate a purely bandwidth-bound engine keeps after n
    positions: weight bytes / (weight bytes + the keys and values of n positions), per step.
    None when the engine's cache size per position is not known."""
    if not e.weight_bytes or not e.kv_bytes_per_token:
        return None
    return e.weight_bytes / (e.weight_bytes + n * e.kv_bytes_per_token)


# ---- tables ----------------------------------------------------------------------------------

def _load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


@dataclass
class Machine:
    """What the header of a report states."""
    threads: list
    cpu: str = field(default_factory=cpu_model)
    cores: int = field(default_factory=lambda: len(os.sched_getaffinity(0))
                       if hasattr(os, "sched_getaffinity") else os.cpu_count())
    load_start: float | None = field(default_factory=lambda: _load_average())

    def header(self, engines: list, results: dict | None = None) -> str:
        from . import _engine
        info = _engine.kernel_info()
        tables = sorted({e.simd for e in engines if e.simd}, key=str)
        lines = [f"CPU: {self.cpu} ({self.cores} cores available); kernel tables: "
                 f"{', '.join(tables) or info['simd']} (available: {', '.join(info['available'])}); "
                 f"threads: {', '.join(map(str, self.threads))}; OpenMP: "
                 f"{'yes' if info['openmp'] else 'no'}"]
        if self.load_start is not None:
            load = (self.load_start, _load_average())
            lines.append(f"load average (1 min): {load[0]:.2f} at the start, {load[1]:.2f} at the "
                         f"end" + (" (other processes were running: noisy timings)"
                                   if max(load) > 0.5 * self.cores else ""))
        if results:
            probes = [f"{c.threads} thread{'s' if c.threads > 1 else ''} {1 / r.best:.1f} GB/s"
                      for (label, c), r in sorted(results.items(), key=lambda kv: kv[0][1].threads)
                      if label == "probe"]
            if probes:
                lines.append("memory read bandwidth (C probe, 1 GiB buffer, best of the rounds): "
                             + ", ".join(probes))
        for e in engines:
            if isinstance(e, LlamaCpp):
                lines.append(f"{e.label}: llama-cpp-python {e.version} ({e.python}), {e.path}")
        return "\n".join(lines)


def markdown(header: list, rows: list) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _mb(nbytes: float) -> str:
    """Megabytes, with a decimal for small ones."""
    mb = nbytes / 1e6
    return f"{mb:.0f}" if mb >= 100 else f"{mb:.1f}" if mb >= 1 else f"{mb:.2f}"


def _threads_label(e: Engine, t: int) -> str:
    return "BLAS" if e.threads_fixed else str(t)


_same_size: dict = {}


def same_size_bandwidth(nbytes: int, threads: int, measure: bool = False) -> float:
    """The probe over a buffer the size of the weights (caches included): measured on first use;
    measure=True measures again and keeps the best (interleaved() does so in every round)."""
    key = (nbytes, threads)
    if key not in _same_size or measure:
        gbs = read_bandwidth(threads, max(nbytes, 1 << 20))
        _same_size[key] = max(gbs, _same_size.get(key, 0.0))
    return _same_size[key]


def decode_rows(engines: list, results: dict) -> list:
    """Rows of the decode table: tok/s and the bandwidth roofline."""
    probe = {c.threads: 1 / r.best for (label, c), r in results.items() if label == "probe"}
    rows = []
    for e in engines:
        for (label, c), r in results.items():
            if label != e.label or c.kind != "decode":
                continue
            gbs = e.weight_bytes * r.tok_s / 1e9
            same = same_size_bandwidth(e.weight_bytes, c.threads)
            rows.append([e.label, _threads_label(e, c.threads), f"{r.tok_s:.1f}",
                         _mb(e.weight_bytes), f"{gbs:.1f}",
                         f"{100 * gbs / probe[c.threads]:.0f}%" if c.threads in probe else "-",
                         f"{100 * gbs / same:.0f}%", f"{max(r.seconds) / r.best:.2f}"])
    return rows


def decode_table(engines: list, results: dict) -> str:
    return markdown(["engine", "threads", "decode tok/s", "weight MB/token", "GB/s",
                     "% of probe", "% of same-size read", "worst / best round"],
                    decode_rows(engines, results))


def prefill_table(engines: list, results: dict) -> str:
    """tok/s per prompt length, achieved GFLOP/s (fp32) or GOP/s (int8) and % of the peak of
    our kernel table (measured on the same table and thread count)."""
    prompts = sorted({c.n for (_, c) in results if c.kind == "prefill"})
    threads = sorted({c.threads for (_, c) in results if c.kind == "prefill"})
    header = ["engine", "threads"] + [f"prefill {n}: tok/s (G(FL)OP/s, % of peak)" for n in prompts]
    rows = []
    for e in engines:
        for t in threads:
            cells = []
            for n in prompts:
                r = results.get((e.label, Case("prefill", n, t)))
                if r is None:
                    cells.append(None)
                    continue
                ops = prefill_ops_per_token(e.config, n) * r.tok_s / 1e9
                peak = kernel_peak(e.dtype, e.simd, t, e.act_bits)[0] if e.simd else None
                pct = f", {100 * ops / peak:.0f}%" if peak else ""
                cells.append(f"{r.tok_s:.0f} ({ops:.0f}{pct})")
            if any(cells):
                rows.append([e.label, _threads_label(e, t)] + [c or "-" for c in cells])
    return markdown(header, rows)


def peak_lines(engines: list, threads: list) -> str:
    """One line per (dtype, table, threads) peak the prefill table uses."""
    lines = []
    for dtype, simd, bits in sorted({(e.dtype, e.simd, e.act_bits) for e in engines if e.simd}, key=str):
        for t in threads:
            value, how = kernel_peak(dtype, simd, t, bits)
            unit = "GFLOP/s" if dtype == "fp32" else "GOP/s"
            shown = f"{value:.0f} {unit}" if value else "n/a"
            lines.append(f"peak {dtype} {simd}, {t} thread{'s' if t > 1 else ''}: {shown} ({how})")
    return "\n".join(lines)


def scaling_table(engines: list, results: dict) -> str | None:
    """tok/s with the most threads over tok/s with 1 thread, per engine and case."""
    threads = sorted({c.threads for (_, c) in results if c.kind != "probe"})
    if len(threads) < 2 or threads[0] != 1:
        return None
    hi = threads[-1]
    kinds = sorted({(c.kind, c.n) for (_, c) in results if c.kind != "probe"})
    rows = []
    for e in engines:
        if e.threads_fixed:
            continue
        cells = []
        for kind, n in kinds:
            a = results.get((e.label, Case(kind, n, 1)))
            b = results.get((e.label, Case(kind, n, hi)))
            cells.append(f"{b.tok_s / a.tok_s:.2f}x" if a and b else "-")
        rows.append([e.label] + cells)
    header = ["engine"] + [f"{k} {n}" if k == "prefill" else k for k, n in kinds]
    return f"thread scaling, {hi} threads / 1 thread:\n\n" + markdown(header, rows)


def context_table(engines: list, results: dict, n_decode: int) -> str:
    """The long-context table: prefill, decode after it (and against the decode after a
    1-token prompt timed around it, in the same round; and the bound of that ratio set by the
    bytes a step reads), resident memory."""
    mb = _mb
    rows = []
    for e in engines:
        rows.append([e.label, "after load", "-", "-", "-", "-", mb(e.rss_after_load.get("anon", 0)),
                     mb(e.rss_after_load.get("file", 0))])
        for (label, n), m in sorted(results.items(), key=lambda kv: kv[0][1]):
            if label != e.label:
                continue
            dec = n_decode / m["decode"]
            pre = f"{m['prefill']:.3g} s ({n / m['prefill']:.0f} tok/s)" if m["prefill"] else "-"
            vs = f"{100 * m['short'] / m['decode']:.0f}%" if n and m.get("short") else "-"
            bound = bytes_bound(e, n) if n else None
            rss = m["rss"] or {}
            rows.append([e.label, f"{n:,}" if n else "1-token prompt", pre, f"{dec:.1f}", vs,
                         f"{100 * bound:.0f}%" if bound else "-",
                         mb(rss["anon"]) if rss else "-", mb(rss["file"]) if rss else "-"])
    return markdown(["engine", "context", "prefill of the prompt", "decode tok/s after it",
                     "decode vs 1-token prompt", "bytes bound", "RssAnon MB", "RssFile MB"], rows)


def short_report(engines: list, results: dict, machine: Machine, rounds: int) -> str:
    """The Markdown report of interleaved() results: header, decode, prefill, thread scaling."""
    decode_n = next((c.n for (_, c) in results if c.kind == "decode"), 0)
    parts = [machine.header(engines, results),
             peak_lines(engines, sorted({c.threads for (_, c) in results})),
             f"\ndecode: {decode_n} greedy tokens after a 1-token prompt, one forward each "
             f"(the NumPy reference: {Reference.max_decode}); best of {rounds} interleaved rounds\n",
             decode_table(engines, results),
             "\nprefill: an N-token prompt from an empty cache (last logits only; the NumPy "
             "reference computes all of them); GFLOP/s for fp32, GOP/s for int8 = 2 x weight "
             "parameters per token x tok/s\n",
             prefill_table(engines, results)]
    scaling = scaling_table(engines, results)
    if scaling:
        parts += ["", scaling]
    return "\n".join(parts)


def peer_table(engines: list, results: dict) -> str | None:
    """tok/s of our engines over llama.cpp's on the same model file and the matching build
    (our avx512 table vs the AVX-512 build, avx2/avxvnni vs the AVX2-only one)."""
    peers = [e for e in engines if isinstance(e, LlamaCpp)]
    ours = [e for e in engines if isinstance(e, Llama2c)]
    kinds = sorted({(c.kind, c.n, c.threads) for (_, c) in results if c.kind != "probe"})
    rows = []
    for e in ours:
        build = "avx512" if e.simd == "avx512" else "avx2" if e.simd in ("avx2", "avxvnni") else None
        for p in peers:
            if p.build != build or p.path != e.path:
                continue
            cells = []
            for kind, n, t in kinds:
                a, b = results.get((e.label, Case(kind, n, t))), results.get((p.label, Case(kind, n, t)))
                cells.append(f"{a.tok_s / b.tok_s:.2f}x" if a and b else "-")
            rows.append([f"{e.label} / {p.label}"] + cells)
    if not rows:
        return None
    header = ["tok/s ratio"] + [f"{k} {n} ({t}t)" if k == "prefill" else f"{k} ({t}t)"
                                for k, n, t in kinds]
    return markdown(header, rows)


# ---- `llama2c bench` ---------------------------------------------------------------------------

DEFAULT_CONTEXTS = "1000,4000,8000"


def _int_list(text: str) -> list:
    """argparse type: comma-separated positive integers."""
    import argparse
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive(text: str) -> int:
    """argparse type: one positive integer."""
    import argparse
    values = _int_list(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return values[0]


def _name_list(text: str) -> list:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_arguments(p) -> None:
    """The options of `llama2c bench` (llama2c/cli.py adds them to its `bench` parser)."""
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="model files, or shapes with random weights: "
                        f"{', '.join(SHAPES)} (default: SmolLM2-135M)")
    p.add_argument("--dtype", type=_name_list, metavar="LIST",
                   help="weight types to load, e.g. fp32,int8 (files: default as stored; "
                        "shapes: default fp32,int8)")
    p.add_argument("--simd", type=_name_list, metavar="LIST",
                   help="kernel tables, e.g. avx512,avx2 (generic, avx2, avxvnni, avx512 as the "
                        "engine offers; default LLAMA2C_SIMD or the best)")
    p.add_argument("--threads", type=_int_list, metavar="LIST",
                   help="thread counts (default 1 and the available cores)")
    p.add_argument("--tokens", type=_positive, default=64, metavar="N", help="tokens to decode (default 64)")
    p.add_argument("--prompt", type=_int_list, default=[128, 512], metavar="LIST",
                   help="prefill prompt lengths (default 128,512)")
    p.add_argument("--repeat", type=_positive, metavar="N",
                   help="interleaved rounds; each figure is the best (default 3; 1 with "
                        "--long-context)")
    p.add_argument("--act-bits", type=_int_list, metavar="LIST",
                   help="activations of the int8 matmuls, 16 and/or 8, e.g. 16,8 (default: the "
                        "engine's)")
    p.add_argument("--kv-dtype", metavar="TYPE",
                   help="KV cache element type, where the engine has a choice (f16, fp32, int8, "
                        "or keys/values as f16/q8)")
    p.add_argument("--long-context", type=_int_list, nargs="?", const=DEFAULT_CONTEXTS,
                   metavar="LIST",
                   help=f"long-context mode: prefill of prompts of these lengths (default "
                        f"{DEFAULT_CONTEXTS}), decode after them, resident memory")
    p.add_argument("--peers", type=_name_list, default=[], metavar="LIST",
                   help="also measure, interleaved: llamacpp (llama-cpp-python on each GGUF "
                        "MODEL), reference (the NumPy reference, on the first --dtype)")
    p.add_argument("--llamacpp-models", type=_name_list, metavar="LIST",
                   help="GGUF files for the llamacpp peer (default: the GGUF MODELs)")
    p.add_argument("--llamacpp-python", type=_name_list, metavar="LIST",
                   help="interpreters whose llama-cpp-python builds to run (default: this one), "
                        "e.g. python,/work/peers/venv-avx2/bin/python")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def build_engines(args) -> list:
    """Our engines and the peers the command line asks for."""
    models = list(args.models) or ["SmolLM2-135M"]
    peers = set(args.peers)
    unknown = peers - {"llamacpp", "reference"}
    if unknown:
        raise ValueError(f"unknown peer {sorted(unknown)[0]!r}: expected llamacpp or reference")
    contexts = args.long_context or []
    need = max(contexts + list(args.prompt) + [0]) + args.tokens + 8
    engines, tags = [], {}
    for m in models:
        if m in SHAPES:
            tags[m] = f"{m} random" if len(models) > 1 else ""
        elif not Path(m).exists():
            raise FileNotFoundError(f"{m}: no such model file (or shape: {', '.join(SHAPES)})")
        elif len(models) > 1:
            tags[m] = gguf_facts(m)[2] if m.endswith(".gguf") else Path(m).name
        else:
            tags[m] = ""
    for m in models:
        is_shape = m in SHAPES
        dtypes = args.dtype or (["fp32", "int8"] if is_shape else [None])
        for dtype in dtypes:
            first = None
            for simd in args.simd or [None]:
                for i, bits in enumerate(args.act_bits or [None]):
                    if i and dtype == "fp32":       # act_bits only matter to int8 weights
                        continue
                    if is_shape:
                        e = Llama2c.from_shape(m, dtype, simd, bits, kv_dtype=args.kv_dtype,
                                               context=max(need, SHAPES[m].seq_len))
                    else:
                        e = Llama2c.from_file(m, dtype, simd, bits, kv_dtype=args.kv_dtype)
                    if i and e.dtype == "fp32":
                        continue
                    if tags[m]:
                        e.label += f" ({tags[m]})"
                    engines.append(e)
                    first = first or e
            if "reference" in peers and not contexts and dtype == dtypes[0]:
                engines.append(Reference.of(first, context=need))     # on the first dtype
                if tags[m]:
                    engines[-1].label += f" ({tags[m]})"
    if "llamacpp" in peers:
        files = args.llamacpp_models or [m for m in models if m not in SHAPES]
        if not files:
            raise ValueError("the llamacpp peer needs a GGUF model file (MODEL or --llamacpp-models)")
        for f in files:
            for python in args.llamacpp_python or [sys.executable]:
                engines.append(LlamaCpp(f, python, context=need, threads=max(args.threads)))
    labels = [e.label for e in engines]
    dup = next((lab for lab in labels if labels.count(lab) > 1), None)
    if dup:
        raise ValueError(f"two engines would both be labelled {dup!r}")
    return engines


def run_command(args, out=None) -> int:
    """`llama2c bench`: build the engines, measure, print the Markdown report."""
    out = out or sys.stdout
    from ._threads import default_threads
    args.threads = args.threads or sorted({1, default_threads()})
    progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    engines = build_engines(args)
    machine = Machine(args.threads)
    try:
        if args.long_context:
            rounds = args.repeat or 1
            threads = max(args.threads)
            results = long_context(engines, [0] + args.long_context, args.tokens, threads, rounds,
                                   progress)
            print(machine.header(engines), file=out)
            print(f"\nlong context, {threads} threads: prefill of an N-token prompt, then "
                  f"{args.tokens} greedy tokens after it; best of {rounds} rounds; vs 1-token prompt: "
                  "against the faster of two decodes after a 1-token prompt, timed right before the "
                  "prompt and right after the decode; bytes bound: weight bytes / (weight bytes + "
                  "KV cache bytes of the context), the most of that ratio a decode bound by its "
                  "reads keeps; resident memory of the process (llama2c engines share this one, "
                  "so theirs add up; llama.cpp runs in its own)\n", file=out)
            print(context_table(engines, results, args.tokens), file=out)
        else:
            rounds, results = args.repeat or 3, {}
            try:
                interleaved(engines, short_cases(args.threads, args.tokens, args.prompt), rounds,
                            progress=progress, results=results)
            except KeyboardInterrupt:       # report what was measured (e.g. under `timeout -s INT`)
                if not any(c.kind != "probe" for (_, c) in results):
                    raise
                print("(interrupted: the figures below are from the rounds that ran)\n", file=out)
                rounds = max(len(r.seconds) for r in results.values())
            print(short_report(engines, results, machine, rounds), file=out)
            ratios = peer_table(engines, results)
            if ratios:
                print("\nthis engine / llama.cpp on the same weights and the matching build:\n",
                      file=out)
                print(ratios, file=out)
    finally:
        for e in engines:
            e.close()
    return 0
