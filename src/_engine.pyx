# _engine.pyx: Cython bindings of llama2c's C engine (csrc/llama2c.h).
#
# Every entry point checks dtype, shape and contiguity of its arrays and raises ValueError
# naming the offending argument; nothing is copied at the boundary (a float64 or strided
# array is refused, not converted). Every kernel call, forward pass and generation loop runs
# with the GIL released.
cimport cython
from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_acquire_lock, PyThread_release_lock, WAIT_LOCK)
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint64_t
from l2c cimport *
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

import os
import struct
import time
import warnings

import numpy as np

from llama2c.errors import ContextLengthError, GenerationCancelled, KVCacheFullError

ISA_IDS = {"generic": L2C_ISA_GENERIC, "avx2": L2C_ISA_AVX2, "avxvnni": L2C_ISA_AVXVNNI,
           "avx512": L2C_ISA_AVX512}
ISA_NAMES = {v: k for k, v in ISA_IDS.items()}

# The highest instruction set new models may use (LLAMA2C_SIMD / set_simd lower it).
cdef int _max_isa = L2C_ISA_COUNT


cdef int _check(int rc, str what) except -1:
    """Turn a C status code into a Python exception."""
    if rc == L2C_OK:
        return 0
    if rc == L2C_ERR_NOMEM:
        raise MemoryError(f"{what}: out of memory")
    if rc == L2C_ERR_RANGE:
        raise ContextLengthError(f"{what}: position out of the context range")
    if rc == L2C_ERR_TOKEN:
        raise ValueError(f"{what}: a token id is outside [0, vocab_size)")
    if rc == L2C_ERR_KVFULL:
        raise KVCacheFullError(f"{what}: the KV pool has too few free blocks (nothing was run)")
    if rc == L2C_ERR_CANCELLED:
        raise GenerationCancelled(f"{what}: cancelled")
    raise ValueError(f"{what}: invalid argument (C status {rc})")


def _parse_simd(name):
    """'auto' | 'generic' (alias 'scalar') | 'avx2' | 'avxvnni' | 'avx512' -> isa id
    (L2C_ISA_COUNT = auto)."""
    if name is None:
        return L2C_ISA_COUNT
    key = str(name).strip().lower()
    if key in ("", "auto", "best", "native"):
        return L2C_ISA_COUNT
    if key in ("scalar", "none", "off"):
        key = "generic"
    if key not in ISA_IDS:
        raise ValueError(f"unknown SIMD level {name!r}: expected one of auto, "
                         f"{', '.join(ISA_IDS)}")
    return ISA_IDS[key]


def set_simd(name="auto"):
    """Cap the instruction set that models loaded from now on use ('auto' = the best this CPU
    has; 'generic' forces the scalar kernels). Returns the name of the table that will be used."""
    global _max_isa
    _max_isa = _parse_simd(name)
    return l2c_kernels_get(_max_isa).name.decode()


cdef const l2c_kernels *_table(simd) except NULL:
    """The kernel table for `simd` (None: the default), or raise if the CPU cannot run it."""
    cdef int isa
    if simd is None:
        return l2c_kernels_get(_max_isa)
    isa = _parse_simd(simd)
    if isa == L2C_ISA_COUNT:
        return l2c_kernels_get(L2C_ISA_COUNT)
    cdef const l2c_kernels *k = l2c_kernels_exact(isa)
    if k == NULL:
        raise ValueError(f"this CPU (or this build) cannot run the {simd!r} kernels; "
                         f"available: {available_simd()}")
    return k


def available_simd():
    """Kernel tables this CPU and build can run, lowest first."""
    return [name for name, isa in ISA_IDS.items() if l2c_kernels_exact(isa) != NULL]


def release_threads():
    """End the calling thread's OpenMP worker threads (csrc/llama2c.h, l2c_release_threads):
    called by a thread that hands the engine to another one (after Model.load, when a
    Scheduler starts), so that only the threads that compute keep workers. True if released."""
    cdef int ok
    with nogil:
        ok = l2c_release_threads()
    return bool(ok)


def kernel_info():
    """What the engine will run: chosen kernel table, available ones, OpenMP, thread count."""
    from llama2c._threads import default_threads
    return {
        "simd": l2c_kernels_get(_max_isa).name.decode(),
        "available": available_simd(),
        "openmp": bool(l2c_openmp_enabled()),
        "omp_max_threads": l2c_omp_max_threads(),
        "n_threads": default_threads(),
    }


def read_bandwidth(int64_t nbytes=1 << 30, int reps=5, int n_threads=1):
    """Best-of-reps memory read bandwidth in GB/s with n_threads (a small C probe)."""
    cdef double r
    with nogil:
        r = l2c_read_bandwidth(nbytes, reps, n_threads)
    if r < 0:
        raise MemoryError("read_bandwidth: could not allocate the probe buffer")
    return r


# saved KV states (Session.export_kv): magic, kv dtype, n_layers, n_kv_heads, head_size, n_tokens
_KV_MAGIC = b"L2CKV1"
_KV_HEADER = struct.Struct("<6s2xiqqqq")

_env = os.environ.get("LLAMA2C_SIMD")
if _env:
    try:
        set_simd(_env)
    except ValueError as e:
        warnings.warn(f"ignoring LLAMA2C_SIMD: {e}")

# ---------------------------------------------------------------------------------------------
# kernels, one by one (tests and benchmarks call these; the model calls them from C)

cdef inline int _nt(int n_threads) except -1:
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    return n_threads


def _shape_error(name, got, expected):
    return ValueError(f"{name} has shape {tuple(got)}, expected {tuple(expected)}")


include "matmul.pxi"
include "ops.pxi"

# ---------------------------------------------------------------------------------------------
# model, session, sampler

include "weights.pxi"
include "vocab.pxi"
include "sampler.pxi"
include "model.pxi"
