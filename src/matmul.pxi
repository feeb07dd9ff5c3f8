# matmul.pxi: part of llama2c._engine (included by _engine.pyx; one file per concern so that the
# kernels, weights, model/session and sampler bindings change independently).
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


