# _engine.pyx: Cython bindings of llama2c's C engine (csrc/llama2c.h).
#
# Every entry point checks dtype, shape and contiguity of its arrays and raises ValueError
# naming the offending argument; nothing is copied at the boundary (a float64 or strided
# array is refused, not converted). Every kernel call, forward pass and generation loop runs
# with the GIL released.
from libc.stdint cimport int8_t, int32_t, int64_t, uint64_t
from l2c cimport *
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy

import os
import warnings

import numpy as np

from llama2c.errors import ContextLengthError

ISA_IDS = {"generic": L2C_ISA_GENERIC, "avx2": L2C_ISA_AVX2, "avx512": L2C_ISA_AVX512}
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
    raise ValueError(f"{what}: invalid argument (C status {rc})")


def _parse_simd(name):
    """'auto' | 'generic' (alias 'scalar') | 'avx2' | 'avx512' -> isa id (L2C_ISA_COUNT = auto)."""
    if name is None:
        return L2C_ISA_COUNT
    key = str(name).strip().lower()
    if key in ("", "auto", "best", "native"):
        return L2C_ISA_COUNT
    if key in ("scalar", "none", "off"):
        key = "generic"
    if key not in ISA_IDS:
        raise ValueError(f"unknown SIMD level {name!r}: expected one of auto, generic, avx2, avx512")
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


def kernel_info():
    """What the engine will run: chosen kernel table, available ones, OpenMP, thread count."""
    from llama2c._threads import default_threads
    return {
        "simd": l2c_kernels_get(_max_isa).name.decode(),
        "available": available_simd(),
        "avx512_vnni": bool(l2c_cpu_has_vnni()),
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


def matmul(float[:, ::1] out, const float[:, ::1] x, const float[:, ::1] w, simd=None,
           int n_threads=1):
    """out (T, d) = x (T, n) @ w (d, n)^T in fp32 (T == 1 runs the matrix-vector kernel)."""
    cdef const l2c_kernels *k = _table(simd)
    cdef int64_t T = x.shape[0], n = x.shape[1], d = w.shape[0]
    if w.shape[1] != n:
        raise _shape_error("w", (w.shape[0], w.shape[1]), (d, n))
    if out.shape[0] != T or out.shape[1] != d:
        raise _shape_error("out", (out.shape[0], out.shape[1]), (T, d))
    n_threads = _nt(n_threads)
    if T == 0 or d == 0:
        return out
    if n == 0:
        out[:, :] = 0
        return out
    with nogil:
        k.matmul_f32(&out[0, 0], &x[0, 0], &w[0, 0], T, n, d, n_threads)
    return out


def quantize_q8(int8_t[:, ::1] xq, float[:, ::1] xs, const float[:, ::1] x, int64_t group_size,
                simd=None, int n_threads=1, int32_t[:, ::1] xsum=None, int8_t[:, ::1] xl=None,
                int32_t[:, ::1] xsum_lo=None):
    """Group-wise quantization of x (T, n): 8-bit into xq (T, n) with scales xs (T, n/gs), or,
    when xl (T, n) is given, two planes v = 128 * xq + xl (see csrc/llama2c.h l2c_qact).
    xsum / xsum_lo (T, n/gs), if given, receive the planes' group sums."""
    cdef const l2c_kernels *k = _table(simd)
    cdef int64_t T = x.shape[0], n = x.shape[1]
    if group_size <= 0 or n % group_size != 0:
        raise ValueError(f"group size {group_size} must be positive and divide {n}")
    cdef int64_t ng = n // group_size
    if xq.shape[0] != T or xq.shape[1] != n:
        raise _shape_error("xq", (xq.shape[0], xq.shape[1]), (T, n))
    if xl is not None and (xl.shape[0] != T or xl.shape[1] != n):
        raise _shape_error("xl", (xl.shape[0], xl.shape[1]), (T, n))
    if xs.shape[0] != T or xs.shape[1] != ng:
        raise _shape_error("xs", (xs.shape[0], xs.shape[1]), (T, ng))
    if xsum is None:
        xsum = np.empty((T, ng), dtype=np.int32)
    if xsum_lo is None:
        xsum_lo = np.empty((T, ng), dtype=np.int32)
    if xsum.shape[0] != T or xsum.shape[1] != ng or xsum_lo.shape[0] != T or xsum_lo.shape[1] != ng:
        raise ValueError(f"xsum and xsum_lo must have shape {(T, ng)}")
    n_threads = _nt(n_threads)
    if T == 0 or n == 0:
        return xq, xs
    cdef l2c_qact a
    a.hi = &xq[0, 0]
    a.lo = &xl[0, 0] if xl is not None else NULL
    a.s = &xs[0, 0]
    a.sum_hi = &xsum[0, 0]
    a.sum_lo = &xsum_lo[0, 0] if xl is not None else NULL
    with nogil:
        k.quantize_q8(&a, &x[0, 0], T, n, group_size, n_threads)
    return xq, xs


def pack_q8(const int8_t[:, ::1] wq, const float[:, ::1] ws, int64_t group_size, wm=None):
    """Pack a row-major int8 matrix wq (d, n) with scales ws (d, n/gs) and optional offsets wm
    (like ws) into the kernels' 16-row block layout (see csrc/llama2c.h); returns
    (qp int8 1-D, sp float32 1-D, mp float32 1-D or None)."""
    cdef int64_t d = wq.shape[0], n = wq.shape[1]
    if group_size <= 0 or group_size % 4 or group_size > 256 or n % group_size:
        raise ValueError(f"group size {group_size} must be a multiple of 4, at most 256, dividing {n}")
    if ws.shape[0] != d or ws.shape[1] != n // group_size:
        raise _shape_error("ws", (ws.shape[0], ws.shape[1]), (d, n // group_size))
    cdef const float[:, ::1] mv
    cdef const float *mptr = NULL
    cdef float *mpptr = NULL
    qp = np.zeros(l2c_q8p_q_size(d, n), dtype=np.int8)
    sp = np.zeros(l2c_q8p_s_size(d, n, group_size), dtype=np.float32)
    mp = None
    cdef int8_t[::1] qv = qp
    cdef float[::1] sv = sp
    cdef float[::1] mpv
    if wm is not None:
        mv = wm
        if mv.shape[0] != d or mv.shape[1] != n // group_size:
            raise _shape_error("wm", (mv.shape[0], mv.shape[1]), (d, n // group_size))
        mp = np.zeros(l2c_q8p_s_size(d, n, group_size), dtype=np.float32)
        mpv = mp
        if d:
            mptr = &mv[0, 0]
            mpptr = &mpv[0]
    cdef int rc
    if d == 0:
        return qp, sp, mp
    with nogil:
        rc = l2c_pack_q8(&qv[0], &sv[0], mpptr, &wq[0, 0], &ws[0, 0], mptr, d, n, group_size)
    _check(rc, "pack_q8")
    return qp, sp, mp


def matmul_q8_packed(float[:, ::1] out, const int8_t[:, ::1] xq, const float[:, ::1] xs,
                     const int8_t[::1] qp, const float[::1] sp, int64_t group_size, simd=None,
                     int n_threads=1, const int32_t[:, ::1] xsum=None, const int8_t[:, ::1] xl=None,
                     const int32_t[:, ::1] xsum_lo=None, const float[::1] mp=None):
    """out (T, d) = A (T, n) @ W^T with W packed by pack_q8 (d = out.shape[1]); A is xq (8-bit)
    or 128 * xq + xl (two planes), with scales xs (T, n/gs). Group sums are computed here
    when not given."""
    cdef const l2c_kernels *k = _table(simd)
    cdef int64_t T = xq.shape[0], n = xq.shape[1], d = out.shape[1]
    if group_size <= 0 or group_size % 4 or group_size > 256 or n % group_size:
        raise ValueError(f"group size {group_size} must be a multiple of 4, at most 256, dividing {n}")
    cdef int64_t ng = n // group_size
    if xs.shape[0] != T or xs.shape[1] != ng:
        raise _shape_error("xs", (xs.shape[0], xs.shape[1]), (T, ng))
    if xl is not None and (xl.shape[0] != T or xl.shape[1] != n):
        raise _shape_error("xl", (xl.shape[0], xl.shape[1]), (T, n))
    if out.shape[0] != T:
        raise _shape_error("out", (out.shape[0], out.shape[1]), (T, d))
    if qp.shape[0] != l2c_q8p_q_size(d, n) or sp.shape[0] != l2c_q8p_s_size(d, n, group_size):
        raise ValueError(f"packed weights do not hold a ({d}, {n}) matrix with group size {group_size}")
    if mp is not None and mp.shape[0] != sp.shape[0]:
        raise ValueError("packed offsets must have the size of the packed scales")
    if xsum is None:
        xsum = np.asarray(xq).reshape(T, ng, group_size).sum(axis=2, dtype=np.int32)
    if xl is not None and xsum_lo is None:
        xsum_lo = np.asarray(xl).reshape(T, ng, group_size).sum(axis=2, dtype=np.int32)
    if xsum.shape[0] != T or xsum.shape[1] != ng:
        raise _shape_error("xsum", (xsum.shape[0], xsum.shape[1]), (T, ng))
    n_threads = _nt(n_threads)
    if T == 0 or d == 0:
        return out
    cdef l2c_qact a
    a.hi = <int8_t *>&xq[0, 0]
    a.lo = <int8_t *>&xl[0, 0] if xl is not None else NULL
    a.s = <float *>&xs[0, 0]
    a.sum_hi = <int32_t *>&xsum[0, 0]
    a.sum_lo = <int32_t *>&xsum_lo[0, 0] if xl is not None else NULL
    cdef l2c_matrix W
    W.type = L2C_Q8P
    W.group_size = group_size
    W.rows = d
    W.cols = n
    W.f = NULL
    W.q = &qp[0]
    W.s = &sp[0]
    W.m = &mp[0] if mp is not None else NULL
    with nogil:
        k.matmul_q8(&out[0, 0], &a, &W, T, n_threads)
    return out


def matmul_q8(float[:, ::1] out, const int8_t[:, ::1] xq, const float[:, ::1] xs,
              const int8_t[:, ::1] wq, const float[:, ::1] ws, int64_t group_size, simd=None,
              int n_threads=1, xl=None, wm=None):
    """out (T, d) = A (T, n) @ (wq * ws [+ wm]) (d, n)^T with exact int32 group sums (wq
    row-major; packs it first: for tests. The model packs once at load)."""
    cdef int64_t d = wq.shape[0], n = xq.shape[1]
    if wq.shape[1] != n:
        raise _shape_error("wq", (wq.shape[0], wq.shape[1]), (d, n))
    if out.shape[1] != d:
        raise _shape_error("out", (out.shape[0], out.shape[1]), (xq.shape[0], d))
    qp, sp, mp = pack_q8(wq, ws, group_size, wm)
    return matmul_q8_packed(out, xq, xs, qp, sp, group_size, simd, n_threads, xl=xl, mp=mp)


def rmsnorm(float[:, ::1] out, const float[:, ::1] x, const float[::1] w, float eps, simd=None,
            int n_threads=1):
    """out (T, n) = x * w / sqrt(mean(x^2) + eps), row-wise."""
    cdef const l2c_kernels *k = _table(simd)
    cdef int64_t T = x.shape[0], n = x.shape[1]
    if w.shape[0] != n:
        raise _shape_error("w", (w.shape[0],), (n,))
    if out.shape[0] != T or out.shape[1] != n:
        raise _shape_error("out", (out.shape[0], out.shape[1]), (T, n))
    n_threads = _nt(n_threads)
    if T == 0 or n == 0:
        return out
    with nogil:
        k.rmsnorm(&out[0, 0], &x[0, 0], &w[0], T, n, eps, n_threads)
    return out


def softmax(float[::1] x, simd=None):
    """In-place softmax of x (n,)."""
    cdef const l2c_kernels *k = _table(simd)
    cdef int64_t n = x.shape[0]
    if n == 0:
        return x
    with nogil:
        k.softmax(&x[0], n)
    return x


def rope_tables(int64_t n_positions, int64_t head_size, double theta=10000.0, double factor=1.0,
                freqs=None):
    """(cos, sin) float32 tables (n_positions, head_size/2) of angle p * freqs[i]; freqs
    default to theta^(-2i/head_size) / factor (Config.rope_frequencies gives scaled ones).
    Angles in float64, as the NumPy reference computes them."""
    if head_size <= 0 or head_size % 2 or n_positions <= 0:
        raise ValueError("rope_tables: need n_positions > 0 and an even head_size > 0")
    if freqs is None:
        if not theta > 0 or not factor > 0:
            raise ValueError("rope_tables: need theta > 0 and factor > 0")
        freqs = theta ** (-np.arange(0, head_size, 2, dtype=np.float64) / head_size) / factor
    freqs = np.asarray(freqs, dtype=np.float64)
    if freqs.shape != (head_size // 2,) or not np.isfinite(freqs).all():
        raise ValueError(f"rope_tables: freqs must be {head_size // 2} finite numbers")
    angle = np.arange(n_positions, dtype=np.float64)[:, None] * freqs[None, :]
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def rope(float[:, ::1] x, const int64_t[::1] pos, const float[:, ::1] cos_t,
         const float[:, ::1] sin_t, int64_t n_heads, int64_t head_size, simd=None,
         int n_threads=1):
    """In-place interleaved-pair RoPE of x (T, n_heads*head_size) at positions pos (T,)."""
    cdef const l2c_kernels *k = _table(simd)
    cdef int64_t T = x.shape[0], i
    if head_size <= 0 or head_size % 2:
        raise ValueError(f"head_size must be positive and even, got {head_size}")
    if x.shape[1] != n_heads * head_size:
        raise _shape_error("x", (x.shape[0], x.shape[1]), (T, n_heads * head_size))
    if pos.shape[0] != T:
        raise _shape_error("pos", (pos.shape[0],), (T,))
    if cos_t.shape[1] != head_size // 2 or sin_t.shape[0] != cos_t.shape[0] or sin_t.shape[1] != cos_t.shape[1]:
        raise ValueError("cos/sin tables must both be (max_pos, head_size/2)")
    for i in range(T):
        if pos[i] < 0 or pos[i] >= cos_t.shape[0]:
            raise ValueError(f"pos[{i}] = {pos[i]} is outside the table's {cos_t.shape[0]} positions")
    n_threads = _nt(n_threads)
    if T == 0 or n_heads == 0:
        return x
    with nogil:
        k.rope(&x[0, 0], &pos[0], &cos_t[0, 0], &sin_t[0, 0], T, n_heads, head_size, n_threads)
    return x


def swiglu(float[::1] hb, const float[::1] hb2, simd=None, int n_threads=1):
    """In place: hb = silu(hb) * hb2."""
    cdef const l2c_kernels *k = _table(simd)
    cdef int64_t n = hb.shape[0]
    if hb2.shape[0] != n:
        raise _shape_error("hb2", (hb2.shape[0],), (n,))
    n_threads = _nt(n_threads)
    if n == 0:
        return hb
    with nogil:
        k.swiglu(&hb[0], &hb2[0], n, n_threads)
    return hb


def add(float[::1] x, const float[::1] y, simd=None, int n_threads=1):
    """In place: x += y."""
    cdef const l2c_kernels *k = _table(simd)
    cdef int64_t n = x.shape[0]
    if y.shape[0] != n:
        raise _shape_error("y", (y.shape[0],), (n,))
    n_threads = _nt(n_threads)
    if n == 0:
        return x
    with nogil:
        k.add(&x[0], &y[0], n, n_threads)
    return x


def attention(float[:, ::1] out, const float[:, ::1] q, const float[:, ::1] k_cache,
              const float[:, ::1] v_cache, int64_t pos0, int64_t n_heads, int64_t n_kv_heads,
              simd=None, int n_threads=1):
    """Causal GQA attention of q (T, n_heads*hs) at positions pos0.. over k/v caches
    (>= pos0+T, n_kv_heads*hs) into out (T, n_heads*hs)."""
    cdef const l2c_kernels *k = _table(simd)
    cdef int64_t T = q.shape[0]
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be a positive multiple of n_kv_heads ({n_kv_heads})")
    if q.shape[1] % n_heads:
        raise ValueError(f"q width {q.shape[1]} is not a multiple of n_heads {n_heads}")
    cdef int64_t hs = q.shape[1] // n_heads
    if k_cache.shape[1] != n_kv_heads * hs or v_cache.shape[1] != n_kv_heads * hs:
        raise ValueError(f"k_cache/v_cache must have width n_kv_heads*head_size = {n_kv_heads * hs}")
    if pos0 < 0 or k_cache.shape[0] < pos0 + T or v_cache.shape[0] < pos0 + T:
        raise ValueError(f"k_cache/v_cache must hold positions 0..{pos0 + T - 1}")
    if out.shape[0] != T or out.shape[1] != q.shape[1]:
        raise _shape_error("out", (out.shape[0], out.shape[1]), (T, q.shape[1]))
    n_threads = _nt(n_threads)
    if T == 0:
        return out
    att = np.empty((T * n_heads, pos0 + T), dtype=np.float32)
    cdef float[:, ::1] a = att
    with nogil:
        k.attention(&out[0, 0], &a[0, 0], &q[0, 0], &k_cache[0, 0], &v_cache[0, 0], T, pos0,
                    n_heads, n_kv_heads, hs, pos0 + T, n_threads)
    return out

# ---------------------------------------------------------------------------------------------
# model, session, sampler


cdef object _fill_matrix(l2c_matrix *m, object t, tuple shape, str name, list keep,
                         bint packed=True):
    """Point m at tensor t (float32 ndarray, used in place; or QTensor, packed into the kernels'
    16-row layout when `packed`, else used in place for row lookups); check everything."""
    cdef const float[:, ::1] f
    cdef const int8_t[:, ::1] q
    cdef const float[:, ::1] s
    if hasattr(t, "group_size"):  # QTensor
        if not isinstance(t.q, np.ndarray) or t.q.dtype != np.int8 or not t.q.flags.c_contiguous:
            raise ValueError(f"{name}: int8 values must be a C-contiguous int8 array")
        if not isinstance(t.s, np.ndarray) or t.s.dtype != np.float32 or not t.s.flags.c_contiguous:
            raise ValueError(f"{name}: scales must be a C-contiguous float32 array")
        gs = int(t.group_size)
        if tuple(t.q.shape) != shape:
            raise _shape_error(name, t.q.shape, shape)
        if gs <= 0 or shape[1] % gs:
            raise ValueError(f"{name}: group size {gs} does not divide {shape[1]}")
        if tuple(t.s.shape) != (shape[0], shape[1] // gs):
            raise _shape_error(name + " scales", t.s.shape, (shape[0], shape[1] // gs))
        if gs % 4 or gs > 256:
            raise ValueError(f"{name}: group size {gs} is not a multiple of 4 up to 256")
        offsets = getattr(t, "m", None)
        if offsets is not None and (not isinstance(offsets, np.ndarray) or offsets.dtype != np.float32
                                    or tuple(offsets.shape) != tuple(t.s.shape)
                                    or not offsets.flags.c_contiguous):
            raise ValueError(f"{name}: offsets must be a C-contiguous float32 array shaped like the scales")
        m.group_size = gs
        m.f = NULL
        m.m = NULL
        if packed:
            qp, sp, mp = pack_q8(t.q, t.s, gs, offsets)
            _point_q8(m, qp, sp, mp)
            m.type = L2C_Q8P
            keep.extend((qp, sp, mp))
        else:
            q = t.q
            s = t.s
            m.type = L2C_Q8
            m.q = &q[0, 0]
            m.s = &s[0, 0]
            if offsets is not None:
                s = offsets
                m.m = &s[0, 0]
            keep.extend((t.q, t.s, offsets))
    else:
        if not isinstance(t, np.ndarray) or t.dtype != np.float32 or not t.flags.c_contiguous:
            raise ValueError(f"{name}: expected a C-contiguous float32 array, got "
                             f"{getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != shape:
            raise _shape_error(name, t.shape, shape)
        f = t
        m.type = L2C_F32
        m.group_size = 0
        m.f = &f[0, 0]
        m.q = NULL
        m.s = NULL
        m.m = NULL
        keep.append(t)
    m.rows = shape[0]
    m.cols = shape[1]


cdef object _point_q8(l2c_matrix *m, const int8_t[::1] qp, const float[::1] sp,
                      const float[::1] mp):
    m.q = &qp[0]
    m.s = &sp[0]
    m.m = &mp[0] if mp is not None else NULL


cdef const float *_vector(object t, int64_t n, str name, list keep) except NULL:
    cdef const float[::1] v
    if not isinstance(t, np.ndarray) or t.dtype != np.float32 or t.ndim != 1 or not t.flags.c_contiguous:
        raise ValueError(f"{name}: expected a contiguous 1-D float32 array")
    if t.shape[0] != n:
        raise _shape_error(name, t.shape, (n,))
    v = t
    keep.append(t)
    return &v[0]


cdef class Engine:
    """The C model: config + weight pointers into the caller's arrays (kept alive here)."""
    cdef l2c_model m
    cdef l2c_layer *layers
    cdef list _keep
    cdef object _rope
    cdef readonly object config

    def __cinit__(self):
        self.layers = NULL

    def __init__(self, config, dict weights, simd=None, max_positions=None, int act_bits=16):
        """max_positions: positions to prepare RoPE tables for (default config.seq_len, at most
        config.max_context); no session of this engine can hold more. act_bits: activations of
        the int8 matmuls, 8 or 16 (two int8 planes: 128x finer, twice the integer work)."""
        cdef int64_t i
        self.config = config
        if max_positions is None:
            max_positions = config.seq_len
        if not 0 < max_positions <= config.max_context:
            raise ValueError(f"max_positions must be in [1, {config.max_context}], got {max_positions}")
        self._keep = []
        c = config
        self.m.cfg.dim = c.dim
        self.m.cfg.hidden_dim = c.hidden_dim
        self.m.cfg.n_layers = c.n_layers
        self.m.cfg.n_heads = c.n_heads
        self.m.cfg.n_kv_heads = c.n_kv_heads
        self.m.cfg.head_size = c.head_size
        self.m.cfg.vocab_size = c.vocab_size
        self.m.cfg.seq_len = max_positions
        self.m.cfg.norm_eps = c.norm_eps
        self.m.cfg.group_size = 0
        if act_bits not in (8, 16):
            raise ValueError(f"act_bits must be 8 or 16, got {act_bits}")
        self.m.cfg.act_bits = act_bits
        cdef int64_t d = c.dim, h = c.hidden_dim, qd = c.n_heads * c.head_size
        cdef int64_t kvd = c.n_kv_heads * c.head_size
        self.layers = <l2c_layer *>calloc(c.n_layers, sizeof(l2c_layer))
        if self.layers == NULL:
            raise MemoryError("Engine: cannot allocate the layer table")
        keep = self._keep

        def get(name):
            try:
                return weights[name]
            except KeyError:
                raise ValueError(f"missing tensor {name!r}") from None

        for i in range(c.n_layers):
            p = f"layers.{i}."
            self.layers[i].rms_att = _vector(get(p + "attention_norm"), d, p + "attention_norm", keep)
            self.layers[i].rms_ffn = _vector(get(p + "ffn_norm"), d, p + "ffn_norm", keep)
            _fill_matrix(&self.layers[i].wq, get(p + "wq"), (qd, d), p + "wq", keep)
            _fill_matrix(&self.layers[i].wk, get(p + "wk"), (kvd, d), p + "wk", keep)
            _fill_matrix(&self.layers[i].wv, get(p + "wv"), (kvd, d), p + "wv", keep)
            _fill_matrix(&self.layers[i].wo, get(p + "wo"), (d, qd), p + "wo", keep)
            _fill_matrix(&self.layers[i].w1, get(p + "w1"), (h, d), p + "w1", keep)
            _fill_matrix(&self.layers[i].w2, get(p + "w2"), (d, h), p + "w2", keep)
            _fill_matrix(&self.layers[i].w3, get(p + "w3"), (h, d), p + "w3", keep)
            if self.layers[i].wq.type == L2C_Q8P and self.m.cfg.group_size == 0:
                self.m.cfg.group_size = self.layers[i].wq.group_size
        self.m.layers = self.layers
        _fill_matrix(&self.m.tok_embeddings, get("tok_embeddings"), (c.vocab_size, d),
                     "tok_embeddings", keep, packed=False)
        self.m.rms_final = _vector(get("norm"), d, "norm", keep)
        cls = get("tok_embeddings") if c.shared_classifier else get("output")
        _fill_matrix(&self.m.wcls, cls, (c.vocab_size, d), "output", keep)
        cos_t, sin_t = rope_tables(max_positions, c.head_size,
                                   freqs=c.rope_frequencies(max_positions))
        self._rope = (cos_t, sin_t)
        cdef float[:, ::1] cv = cos_t, sv = sin_t
        self.m.rope_cos = &cv[0, 0]
        self.m.rope_sin = &sv[0, 0]
        self.m.k = _table(simd)
        _check(l2c_model_check(&self.m), "model")

    def __dealloc__(self):
        free(self.layers)
        self.layers = NULL

    @property
    def act_bits(self):
        """8 or 16: the activations of the int8 matmuls."""
        return self.m.cfg.act_bits

    @property
    def simd(self):
        """Name of the kernel table this model runs."""
        return self.m.k.name.decode()

    def set_simd(self, simd):
        """Switch this model's kernel table (None: the default)."""
        self.m.k = _table(simd)
        return self.simd


cdef class Sampler:
    """Next-token sampler: greedy (temperature 0), temperature, top-k, top-p, seeded RNG."""
    cdef l2c_sampler sp

    def __init__(self, int64_t vocab_size, float temperature=1.0, float top_p=1.0,
                 int64_t top_k=0, uint64_t seed=0):
        _check(l2c_sampler_init(&self.sp, vocab_size, temperature, top_p, top_k, seed), "sampler")

    def __dealloc__(self):
        l2c_sampler_free(&self.sp)

    def sample(self, const float[::1] logits):
        """Draw one token id from logits (vocab_size,)."""
        if logits.shape[0] != self.sp.vocab_size:
            raise _shape_error("logits", (logits.shape[0],), (self.sp.vocab_size,))
        cdef int32_t tok
        with nogil:
            tok = l2c_sample(&self.sp, &logits[0])
        return tok


cdef class Session:
    """Per-conversation state of one Engine: activations and the KV cache. Not shared between
    threads (each thread uses its own session; the engine's weights are read-only)."""
    cdef l2c_state s
    cdef readonly Engine engine
    cdef bint busy
    cdef readonly int64_t context

    def __init__(self, Engine engine, int64_t context=0, int64_t max_batch=64, int n_threads=1):
        self.engine = engine
        if context <= 0:
            context = engine.m.cfg.seq_len
        if context > engine.m.cfg.seq_len:
            raise ValueError(f"context {context} exceeds the model's {engine.m.cfg.seq_len} positions")
        self.context = context
        _check(l2c_state_init(&self.s, &engine.m, max_batch, context, _nt(n_threads)), "session")

    def __dealloc__(self):
        l2c_state_free(&self.s)

    @property
    def n_threads(self):
        return self.s.n_threads

    @n_threads.setter
    def n_threads(self, int n):
        self.s.n_threads = _nt(n)

    cdef int _enter(self) except -1:
        if self.busy:
            raise RuntimeError("this session is already running in another thread")
        self.busy = True
        return 0

    def forward(self, const int32_t[::1] tokens, int64_t pos0, float[:, ::1] logits_all=None):
        """Run tokens (n,) at positions pos0..; returns the last token's logits (a copy).
        If logits_all (n, vocab) is given it receives every row's logits."""
        cdef int64_t n = tokens.shape[0], V = self.engine.m.cfg.vocab_size
        cdef float *la = NULL
        cdef int rc
        if n == 0:
            raise ValueError("forward: no tokens")
        if pos0 < 0 or pos0 + n > self.context:
            raise ContextLengthError(
                f"{n} tokens at position {pos0} do not fit the context of {self.context}")
        if logits_all is not None:
            if logits_all.shape[0] != n or logits_all.shape[1] != V:
                raise _shape_error("logits_all", (logits_all.shape[0], logits_all.shape[1]), (n, V))
            la = &logits_all[0, 0]
        self._enter()
        try:
            with nogil:
                rc = l2c_forward(&self.engine.m, &self.s, &tokens[0], n, pos0, la)
        finally:
            self.busy = False
        _check(rc, "forward")
        return self.last_logits()

    def last_logits(self):
        """Copy of the logits (vocab,) of the last token run."""
        out = np.empty(self.engine.m.cfg.vocab_size, dtype=np.float32)
        cdef float[::1] o = out
        memcpy(&o[0], self.s.logits, self.engine.m.cfg.vocab_size * sizeof(float))
        return out

    def generate(self, const int32_t[::1] prompt, int64_t pos0, int64_t max_new, Sampler sampler,
                 const int32_t[::1] stop=None):
        """Prefill prompt at pos0, then sample up to max_new tokens (each fed back except the
        last), stopping after a stop id. Returns the generated ids (int32 array)."""
        cdef int64_t n_prompt = prompt.shape[0], n_out = 0, n_stop = 0
        cdef const int32_t *pp = NULL
        cdef const int32_t *sp = NULL
        cdef int rc
        if max_new < 0:
            raise ValueError(f"max_new must be >= 0, got {max_new}")
        if sampler.sp.vocab_size != self.engine.m.cfg.vocab_size:
            raise ValueError("sampler vocab size differs from the model's")
        if pos0 < 0 or pos0 + n_prompt > self.context:
            raise ContextLengthError(
                f"a prompt of {n_prompt} tokens at position {pos0} does not fit the context of {self.context}")
        if n_prompt == 0 and pos0 == 0:
            raise ValueError("generate: an empty prompt at position 0 has no logits to sample from")
        out = np.zeros(max(max_new, 1), dtype=np.int32)
        cdef int32_t[::1] o = out
        if n_prompt:
            pp = &prompt[0]
        if stop is not None and stop.shape[0]:
            sp = &stop[0]
            n_stop = stop.shape[0]
        self._enter()
        try:
            with nogil:
                rc = l2c_generate(&self.engine.m, &self.s, &sampler.sp, pp, n_prompt, pos0, &o[0],
                                  max_new, sp, n_stop, &n_out)
        finally:
            self.busy = False
        _check(rc, "generate")
        return out[:n_out]
