"""Build of llama2c's native extension `llama2c._engine`.

One extension from csrc/ (C11 + OpenMP) and src/_engine.pyx (Cython). The kernels in
csrc/kernels.c (with the matrix kernels it includes: kernels_f32.c, kernels_q8.c, kernels_q4.c)
are compiled once per instruction set, each object with its own flags
(csrc/arch/kernels_{generic,avx2,avxvnni,avx512}.c); every other object targets the baseline of the
platform, and csrc/dispatch.c picks a kernel table at run time from the CPU's features. So a
wheel built here runs on any x86-64 CPU.

Environment switches:
  LLAMA2C_NATIVE=1     add -march=native to every object (a local build only; never a wheel)
  LLAMA2C_DEBUG=1      -O0 -g and Cython bounds checks on
  LLAMA2C_SANITIZE=address,undefined   build with those sanitizers (see tests/sanitize.sh)
  LLAMA2C_NO_OPENMP=1  build without OpenMP (the engine then runs on one thread)
"""
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("LLAMA2C_DEBUG") == "1"
NATIVE = os.environ.get("LLAMA2C_NATIVE") == "1"
SANITIZE = os.environ.get("LLAMA2C_SANITIZE", "").strip()
NO_OPENMP = os.environ.get("LLAMA2C_NO_OPENMP") == "1"
X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")

# Flags keyed by compiler type (msvc is listed for completeness; the x86 kernel flags and
# OpenMP probing below are for gcc/clang).
COMPILE_OPTIONS = {
    "msvc": ["/O2", "/openmp"],
    "other": ["-std=gnu11", "-O0" if DEBUG else "-O3", "-fno-math-errno", "-Wall",
              "-Wno-unused-function", "-Wno-unreachable-code"] + (["-g"] if DEBUG else []),
}
LINK_OPTIONS = {"msvc": [], "other": []}
# Per-file flags of the SIMD kernel objects (dispatch.c checks the same features at run time).
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avxvnni": ["-mavx2", "-mfma", "-mf16c", "-mavxvnni"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512vnni"],
}
KERNEL_SOURCES = ["csrc/kernels.c", "csrc/kernels_common.h", "csrc/kernels_f32.c",
                  "csrc/kernels_q8.c", "csrc/kernels_q4.c", "csrc/kernels_peak.c",
                  "csrc/ops.c", "csrc/attention.c", "csrc/sample_ops.c", "csrc/sample_exp.h",
                  "csrc/vec.h", "csrc/kv.h", "csrc/llama2c.h"]

CYTHON_DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}


def compiler_accepts(compiler, flags):
    """Compile an empty C file with `flags`; True if the compiler takes them."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write("int main(void) { return 0; }\n")
        try:
            compiler.compile([src], output_dir=tmp, extra_postargs=flags)
            return True
        except Exception:
            return False


class BuildExt(build_ext):
    def build_extensions(self):
        ctype = self.compiler.compiler_type
        key = ctype if ctype in COMPILE_OPTIONS else "other"
        cflags = list(COMPILE_OPTIONS[key])
        ldflags = list(LINK_OPTIONS[key])
        if key == "other":
            if NATIVE:
                cflags.append("-march=native")  # opt-in only (LLAMA2C_NATIVE=1)
            if SANITIZE:
                cflags += [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer", "-g"]
                ldflags += [f"-fsanitize={SANITIZE}"]
            if not NO_OPENMP and compiler_accepts(self.compiler, ["-fopenmp"]):
                cflags.append("-fopenmp")
                ldflags.append("-fopenmp")
            elif not NO_OPENMP:
                print("WARNING: the C compiler does not accept -fopenmp; llama2c is built without "
                      "OpenMP and will run on one thread.", file=sys.stderr)
        for ext in self.extensions:
            ext.extra_compile_args = cflags + ext.extra_compile_args
            ext.extra_link_args = ldflags + ext.extra_link_args
            if key == "other" and X86:
                self.add_isa_objects(ext, cflags)
        super().build_extensions()

    def add_isa_objects(self, ext, cflags):
        """Compile csrc/arch/kernels_<isa>.c with that ISA's flags and link the objects in; a
        table the compiler cannot build is left out (dispatch.c then never offers it)."""
        for isa, flags in ISA_FLAGS.items():
            if not compiler_accepts(self.compiler, flags):
                print(f"WARNING: the C compiler does not accept {' '.join(flags)}; "
                      f"the {isa} kernels are left out.", file=sys.stderr)
                continue
            objs = self.compiler.compile(
                [os.path.join("csrc", "arch", f"kernels_{isa}.c")],
                output_dir=self.build_temp,
                include_dirs=["csrc"],
                extra_postargs=cflags + flags,
                depends=KERNEL_SOURCES,
            )
            ext.extra_objects.extend(objs)
            ext.define_macros.append((f"L2C_HAVE_{isa.upper()}", "1"))


extensions = [
    Extension(
        "llama2c._engine",
        sources=["src/_engine.pyx", "csrc/forward.c", "csrc/kvcache.c", "csrc/linear.c", "csrc/pack.c",
                 "csrc/sampler.c", "csrc/dispatch.c", "csrc/arch/kernels_generic.c"],
        include_dirs=["csrc", "src", np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        depends=["csrc/internal.h", "src/l2c.pxd"] + KERNEL_SOURCES
        + sorted(str(p) for p in Path("src").glob("*.pxi")),
    )
]

setup(
    ext_modules=cythonize(extensions, compiler_directives=CYTHON_DIRECTIVES,
                          include_path=["src"]),
    cmdclass={"build_ext": BuildExt},
)
