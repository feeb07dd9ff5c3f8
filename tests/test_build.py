"""Portability and interpreter safety.

* The baseline objects (everything but csrc/arch/kernels_{avx2,avxvnni,avx512}.c) contain no
  AVX or AVX-512 instruction, so the extension imports and runs its generic path on any x86-64
  CPU; the AVX2 and AVX-VNNI objects use ymm but no AVX-512 (no EVEX encoding at all: the
  AVX-VNNI dot products must be the VEX form), the AVX-512 object uses zmm.
* LLAMA2C_SIMD=generic gives the same logits as the default (best) kernel table.
* llama2c next to numpy and scikit-learn (another OpenMP runtime) in one process, and an
  interpreter that exits with live models, sessions and a half-consumed stream.
"""
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

import llama2c
from l2c_files import run_python

ROOT = Path(__file__).resolve().parents[1]
X86 = platform.machine().lower() in ("x86_64", "amd64")
BASELINE = ["csrc/forward.o", "csrc/kvcache.o", "csrc/dispatch.o", "csrc/linear.o", "csrc/pack.o",
            "csrc/arch/kernels_generic.o", "src/_engine.o"]
_INSN = re.compile(r"^\s*[0-9a-f]+:\s+([a-z][a-z0-9.]*)\s*(.*)$")


def _objects(rel):
    """Newest build/temp.*/<rel> (the one the current .so was linked from), or None."""
    found = glob.glob(str(ROOT / "build" / "temp.*" / rel))
    return max(found, key=os.path.getmtime) if found else None


def _instructions(obj):
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", obj], capture_output=True,
                         text=True, check=True).stdout
    for line in out.splitlines():
        m = _INSN.match(line)
        if m:
            yield m.group(1), m.group(2)


def _vector_use(obj):
    """Counts of VEX/EVEX instructions (mnemonics v*), ymm and zmm operands, and k masks."""
    counts = {"vex": 0, "ymm": 0, "zmm": 0, "kmask": 0}
    examples = []
    for mnem, ops in _instructions(obj):
        hit = False
        if mnem.startswith("v") and mnem not in ("verr", "verw"):
            counts["vex"] += 1
            hit = True
        if "%ymm" in ops:
            counts["ymm"] += 1
            hit = True
        if "%zmm" in ops:
            counts["zmm"] += 1
            hit = True
        if re.search(r"%k[0-7]\b", ops):
            counts["kmask"] += 1
            hit = True
        if hit and len(examples) < 5:
            examples.append(f"{mnem} {ops}")
    return counts, examples


needs_objdump = pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed")
needs_x86 = pytest.mark.skipif(not X86, reason="x86-64 only")
needs_build = pytest.mark.skipif(_objects("csrc/forward.o") is None,
                                 reason="no build/temp.*/ objects (an installed wheel, or built "
                                        "elsewhere): nothing to disassemble")
native_build = os.environ.get("LLAMA2C_NATIVE") == "1"


@needs_objdump
@needs_x86
@needs_build
@pytest.mark.skipif(native_build, reason="LLAMA2C_NATIVE=1 builds every object for this CPU")
@pytest.mark.parametrize("rel", BASELINE)
def test_baseline_objects_have_no_avx(rel):
    obj = _objects(rel)
    if obj is None:
        pytest.skip(f"{rel} not built")
    counts, examples = _vector_use(obj)
    assert counts == {"vex": 0, "ymm": 0, "zmm": 0, "kmask": 0}, (
        f"{rel} uses AVX instructions ({counts}), e.g. {examples}: it would crash with SIGILL "
        f"on an x86-64 CPU without AVX; only csrc/arch/kernels_avx*.c may be built with -mavx*")


@needs_objdump
@needs_x86
@needs_build
def test_simd_objects_use_their_isa():
    avx2, avx512 = _objects("csrc/arch/kernels_avx2.o"), _objects("csrc/arch/kernels_avx512.o")
    if avx2 is None or avx512 is None:
        pytest.skip("the AVX kernel objects were not built (compiler without -mavx512*?)")
    c2, ex2 = _vector_use(avx2)
    c512, _ = _vector_use(avx512)
    assert c2["ymm"] > 50, c2
    assert c2["zmm"] == 0 and c2["kmask"] == 0, (
        f"the AVX2 table uses AVX-512 ({c2}): SIGILL on AVX2-only CPUs")
    assert c512["zmm"] > 50, c512
    assert _evex_count(avx2) == 0


def _evex_count(obj):
    """Instructions with an EVEX prefix (0x62 first, after an optional 0x67; in 64-bit code
    0x62 is nothing else): AVX-512 encodings, even on ymm registers."""
    out = subprocess.run(["objdump", "-d", obj], capture_output=True, text=True, check=True).stdout
    n = 0
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and re.match(r"^\s*[0-9a-f]+:$", parts[0]):
            raw = parts[1].split()
            if raw and (raw[0] == "62" or raw[:2] == ["67", "62"]):
                n += 1
    return n


@needs_objdump
@needs_x86
@needs_build
def test_avxvnni_object_is_vex_only():
    obj = _objects("csrc/arch/kernels_avxvnni.o")
    if obj is None:
        pytest.skip("the AVX-VNNI kernel object was not built (compiler without -mavxvnni?)")
    counts, examples = _vector_use(obj)
    assert counts["ymm"] > 50 and counts["zmm"] == 0 and counts["kmask"] == 0, (counts, examples)
    text = subprocess.run(["objdump", "-d", obj], capture_output=True, text=True, check=True).stdout
    assert "{vex} vpdpbusd" in text, "the AVX-VNNI table has no VEX vpdpbusd"
    assert _evex_count(obj) == 0, "EVEX (AVX-512) encodings in the AVX-VNNI table: SIGILL on " \
                                  "AVX-VNNI CPUs without AVX-512 (Alder Lake)"


_SIMD_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np, llama2c
    from llama2c import Config
    from llama2c.testing import make_random_model
    from llama2c.weights import quantize_weights
    cfg = Config(dim=96, hidden_dim=224, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=300,
                 seq_len=64, shared_classifier=False)
    w = make_random_model(cfg, seed=5)
    ids = [(7 * i + 3) % 300 for i in range(40)]
    out = {"simd": None}
    for name, weights in (("fp32", w), ("int8", quantize_weights(cfg, w, 32))):
        m = llama2c.Model(cfg, weights, n_threads=2)
        out["simd"] = m.simd
        np.save(sys.argv[1] + f"_{name}.npy", m.logits(ids))
        out[name] = m.generate(ids[:3], max_new_tokens=10, temperature=0).token_ids
    print(json.dumps(out))
""")


@pytest.mark.parametrize("pair", [("generic", None)])
def test_generic_simd_matches_default(tmp_path, pair):
    results = {}
    for simd in pair:
        env = {"LLAMA2C_SIMD": simd} if simd else {}
        prefix = str(tmp_path / (simd or "default"))
        r = run_python(_SIMD_SCRIPT.replace("sys.argv[1]", repr(prefix)), env=env,
                       drop_env=("LLAMA2C_SIMD",), timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stderr == "", r.stderr
        results[simd] = json.loads(r.stdout.strip().splitlines()[-1])
        results[simd]["prefix"] = prefix
    gen, best = results["generic"], results[None]
    assert gen["simd"] == "generic"
    print(f"\ndefault table: {best['simd']}")
    for name in ("fp32", "int8"):
        a = np.load(gen["prefix"] + f"_{name}.npy")
        b = np.load(best["prefix"] + f"_{name}.npy")
        scale = np.abs(a).max()
        err = np.abs(a - b).max() / scale
        print(f"{name}: max |generic - {best['simd']}| / max|logit| = {err:.2e}")
        # int8: summation-order differences upstream can move an activation across a rounding
        # boundary of its quantization, a step of 1/16256 of its group's range
        assert err < (1e-4 if name == "fp32" else 1e-3), (name, err)
        assert gen[name] == best[name]


# ----------------------------------------------------------------------------- interpreter

def test_next_to_numpy_and_sklearn():
    pytest.importorskip("sklearn")
    code = textwrap.dedent("""
        import numpy as np, llama2c
        from sklearn.cluster import KMeans
        from llama2c import Config
        from llama2c.testing import make_random_model
        X = np.random.default_rng(0).standard_normal((4000, 16))
        def sk():
            return KMeans(n_clusters=8, n_init=2, random_state=0).fit(X).inertia_
        a = sk()                                   # sklearn's OpenMP runtime first
        cfg = Config(dim=256, hidden_dim=512, n_layers=2, n_heads=4, n_kv_heads=4,
                     vocab_size=512, seq_len=64)
        m = llama2c.Model(cfg, make_random_model(cfg), n_threads=2)
        l1 = m.logits(list(range(20)))             # then llama2c's, with 2 threads
        b = sk()
        l2 = m.logits(list(range(20)))
        g = m.generate([1, 2], max_new_tokens=8, temperature=0.7, seed=1)
        c = np.dot(X.T, X).trace()                 # numpy's BLAS
        assert a == b and np.array_equal(l1, l2) and len(g.token_ids) == 8
        print("OK")
    """)
    r = run_python(code, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "OK", (r.stdout, r.stderr[-3000:])


def test_interpreter_exit_with_live_objects(tmp_path):
    code = textwrap.dedent(f"""
        import threading, llama2c
        from llama2c import Config
        from llama2c.testing import make_random_model
        from llama2c.loaders.llama2c_bin import write_llama2c_bin
        from llama2c import _engine
        cfg = Config(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                     vocab_size=256, seq_len=64)
        w = make_random_model(cfg)
        path = {str(tmp_path / 'm.bin')!r}
        write_llama2c_bin(path, cfg, w)
        models = [llama2c.Model.load(path, n_threads=2), llama2c.Model(cfg, w, n_threads=1),
                  llama2c.Model.load(path, dtype="int8")]
        for m in models:
            m.generate([1, 2], max_new_tokens=3)
        stream = models[0].generate([5], max_new_tokens=20, stream=True, temperature=0)
        next(stream); next(stream)                  # half consumed, never closed
        sess = _engine.Session(models[1]._engine, 16, 8, 1)     # a raw session
        sess.forward(__import__("numpy").array([1, 2], dtype="int32"), 0)
        cycle = [models[2]]; cycle.append(cycle)   # a model inside a reference cycle
        print("bye")
    """)
    r = run_python(code, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "bye"
    assert r.stderr == ""


@needs_x86
@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
@pytest.mark.parametrize("src", ["kernels_f32.c", "kernels_q8.c", "kernels_q4.c", "kernels_peak.c",
                                 "pack.c"])
def test_kernel_sources_compile_on_their_own(src):
    """Each matrix-kernel source is a complete translation unit (its own includes, the shared
    kernels_common.h), under the flags of every kernel table (as setup.py gives them)."""
    import ast
    tree = ast.parse((ROOT / "setup.py").read_text())
    isa = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
               and getattr(node.targets[0], "id", None) == "ISA_FLAGS")
    for flags in [[]] + list(isa.values()):
        r = subprocess.run(["cc", "-std=gnu11", "-fsyntax-only", "-Wall", "-Werror",
                            "-Wno-unused-function", "-fopenmp", "-I", str(ROOT / "csrc"), *flags,
                            str(ROOT / "csrc" / src)], capture_output=True, text=True)
        assert r.returncode == 0, f"{src} {' '.join(flags)}:\n{r.stderr[-3000:]}"
