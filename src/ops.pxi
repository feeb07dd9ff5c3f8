# ops.pxi: part of llama2c._engine (included by _engine.pyx; one file per concern so that the
# kernels, weights, model/session and sampler bindings change independently).
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

