# ops.pxi: part of llama2c._engine (included by _engine.pyx; one file per concern so that the
# kernels, weights, model/session and sampler bindings change independently).
cdef extern from "stdlib.h" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)

KV_DTYPES = {"f32": L2C_KV_F32, "f16": L2C_KV_F16, "q8": L2C_KV_Q8}
KV_DTYPE_NAMES = {v: k for k, v in KV_DTYPES.items()}
_KV_ALIASES = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16", "int8": "q8"}


def kv_dtype_name(name):
    """The canonical name of a KV cache type: 'f16', 'f32' or 'q8' for keys and values of one
    element type (aliases fp16, float16, fp32, float32, int8), or 'K/V' for keys of type K and
    values of type V (as 'f16/q8'; 'f16/f16' is 'f16'); ValueError otherwise."""
    keys = [_KV_ALIASES.get(p.strip(), p.strip()) for p in name.lower().split("/")] \
        if isinstance(name, str) else [None]
    if len(keys) > 2 or any(k not in KV_DTYPES for k in keys):
        raise ValueError(f"kv_dtype must be 'f16', 'f32', 'q8' or keys/values as 'f16/q8', "
                         f"got {name!r}")
    return keys[0] if len(keys) == 1 or keys[0] == keys[1] else f"{keys[0]}/{keys[1]}"


def kv_types(name):
    """(keys, values) element type codes of a KV cache type name (kv_dtype_name)."""
    key = kv_dtype_name(name)
    k, _, v = key.partition("/")
    return KV_DTYPES[k], KV_DTYPES[v or k]


def _kv_name(int32_t kt, int32_t vt):
    return KV_DTYPE_NAMES[kt] if kt == vt else f"{KV_DTYPE_NAMES[kt]}/{KV_DTYPE_NAMES[vt]}"


# a cache type in a saved state's header: the element type when keys and values share it (as
# before mixed types existed), else 16 + 4 * keys + values
def _kv_code(int32_t kt, int32_t vt):
    return kt if kt == vt else 16 + 4 * kt + vt


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


def swiglu(float[::1] hb, const float[::1] hb2, simd=None, int n_threads=1, int64_t rows=1):
    """In place: hb = silu(hb) * hb2, hb seen as `rows` rows of len(hb) / rows."""
    cdef const l2c_kernels *k = _table(simd)
    cdef int64_t n = hb.shape[0]
    if hb2.shape[0] != n:
        raise _shape_error("hb2", (hb2.shape[0],), (n,))
    if rows <= 0 or n % rows:
        raise ValueError(f"rows ({rows}) must divide len(hb) ({n})")
    n_threads = _nt(n_threads)
    if n == 0:
        return hb
    with nogil:
        k.swiglu(&hb[0], &hb2[0], rows, n // rows, n_threads)
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
              simd=None, int n_threads=1, kv_dtype="f32", int64_t block_size=L2C_KV_BLOCK):
    """Causal GQA attention of q (T, n_heads*hs) at positions pos0.. over k/v caches
    (>= pos0+T, n_kv_heads*hs) into out (T, n_heads*hs), through a KV pool of kv_dtype."""
    cdef int64_t T = q.shape[0]
    if out.shape[0] != T or out.shape[1] != q.shape[1]:
        raise _shape_error("out", (out.shape[0], out.shape[1]), (T, q.shape[1]))
    if pos0 < 0 or k_cache.shape[0] < pos0 + T or v_cache.shape[0] < pos0 + T:
        raise ValueError(f"k_cache/v_cache must hold positions 0..{pos0 + T - 1}")
    if T == 0:
        return out
    outs, _, _ = attention_seqs([np.asarray(q)], [np.asarray(k_cache)[:pos0 + T]],
                             [np.asarray(v_cache)[:pos0 + T]], [pos0], n_heads, n_kv_heads,
                             simd=simd, n_threads=n_threads, kv_dtype=kv_dtype,
                             block_size=block_size)
    np.asarray(out)[:] = outs[0]
    return out


def attention_ws_bytes(pos0s, ns, int64_t n_heads, int64_t n_kv_heads, int64_t head_size,
                       int64_t block_size=L2C_KV_BLOCK, int n_threads=1):
    """Bytes of attention workspace for spans of ns[i] rows at positions pos0s[i].. (the
    kernel's scratch: per-thread tiles, plus one block partial per decode row and block)."""
    cdef l2c_kvpool pool
    cdef l2c_span *spans
    cdef int64_t i, n = len(ns), r
    if len(pos0s) != n or n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads or head_size <= 0:
        raise ValueError("attention_ws_bytes: bad arguments")
    if block_size <= 0 or block_size % 16:
        raise ValueError(f"block_size must be a positive multiple of 16, got {block_size}")
    memset(&pool, 0, sizeof(pool))
    pool.block_size = block_size
    pool.n_layers = 1
    pool.n_kv_heads = n_kv_heads
    pool.head_size = head_size
    spans = <l2c_span *>calloc(max(n, 1), sizeof(l2c_span))
    if spans == NULL:
        raise MemoryError()
    row = 0
    for i in range(n):
        spans[i].pos0 = pos0s[i]
        spans[i].row0 = row
        spans[i].n = ns[i]
        row += ns[i]
    r = l2c_attention_ws_bytes(&pool, spans, n, n_heads, _nt(n_threads))
    free(spans)
    return r


cdef class _Workspace:
    """A 64-byte aligned scratch buffer (for the attention kernel)."""
    cdef void *p
    cdef int64_t nbytes

    def __dealloc__(self):
        free(self.p)

    cdef void *get(self, int64_t nbytes) except NULL:
        if nbytes > self.nbytes:
            free(self.p)
            self.p = NULL
            self.nbytes = 0
            if posix_memalign(&self.p, 64, <size_t>max(nbytes, 64)) != 0:
                self.p = NULL
                raise MemoryError(f"cannot allocate {nbytes} bytes of attention workspace")
            self.nbytes = nbytes
        return self.p


def attention_seqs(list qs, list ks, list vs, pos0s, int64_t n_heads, int64_t n_kv_heads,
                   simd=None, int n_threads=1, kv_dtype="f32", int64_t block_size=L2C_KV_BLOCK,
                   splits=None, bint interleave=True, bint readback=True, int repeat=1):
    """Attention of several sequences in one kernel call, over a one-layer KV pool.

    Sequence i has queries qs[i] (T_i, n_heads*hs) at positions pos0s[i].. and keys/values
    ks[i], vs[i] (pos0s[i] + T_i, n_kv_heads*hs) already roped; they are stored into the pool
    (kv_dtype: "f32", "f16", "q8" or keys/values as "f16/q8"; blocks of block_size positions,
    the sequences' blocks interleaved in the pool when `interleave`), then one attention call
    runs every query row.
    splits[i] (a list of lengths summing to T_i; default [T_i]) cuts sequence i's rows into
    spans: spans of <= 4 rows take the decode path (split over blocks), longer ones the
    prefill tiles. Returns (outs, stored, seconds): outs[i] (T_i, n_heads*hs), stored[i] =
    (k, v) as the pool holds them, read back as float32 (None unless readback), and the best
    time of `repeat` runs of the attention call (a benchmark)."""
    cdef const l2c_kernels *kt = _table(simd)
    cdef int32_t kdt, vdt
    kdt, vdt = kv_types(kv_dtype)
    cdef int64_t n = len(qs), i, j, hs, kvd, total = 0, n_blocks = 0, n_spans = 0, row, pos, h
    cdef l2c_kvpool pool
    cdef l2c_seq *seqs = NULL
    cdef l2c_span *spans = NULL
    cdef l2c_span st
    cdef const float[:, ::1] kk
    cdef const float[:, ::1] vv
    cdef float[:, ::1] ko
    cdef float[:, ::1] vo
    cdef float[:, ::1] qall
    cdef float[:, ::1] oall
    cdef void *ws
    cdef int rc = 0
    n_threads = _nt(n_threads)
    if n == 0 or len(ks) != n or len(vs) != n or len(pos0s) != n:
        raise ValueError("attention_seqs: qs, ks, vs and pos0s must be non-empty lists of one length")
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be a positive multiple of n_kv_heads ({n_kv_heads})")
    if block_size <= 0 or block_size % 16:
        raise ValueError(f"block_size must be a positive multiple of 16, got {block_size}")
    qdim = np.asarray(qs[0]).shape[1]
    if qdim % n_heads or (qdim // n_heads) % 2:
        raise ValueError(f"q width {qdim} is not n_heads ({n_heads}) x an even head size")
    hs = qdim // n_heads
    kvd = n_kv_heads * hs
    Ts = []
    for i in range(n):
        q, k, v = qs[i], ks[i], vs[i]
        for name, a in (("qs", q), ("ks", k), ("vs", v)):
            if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != 2 or not a.flags.c_contiguous:
                raise ValueError(f"{name}[{i}] must be a C-contiguous 2-D float32 array")
        if q.shape[1] != qdim:
            raise _shape_error(f"qs[{i}]", q.shape, (q.shape[0], qdim))
        if pos0s[i] < 0:
            raise ValueError(f"pos0s[{i}] must be >= 0")
        N = pos0s[i] + q.shape[0]
        if k.shape != (N, kvd) or v.shape != (N, kvd):
            raise ValueError(f"ks[{i}]/vs[{i}] must have shape {(N, kvd)}, got {k.shape}/{v.shape}")
        Ts.append(q.shape[0])
        total += q.shape[0]
        n_blocks += (N + block_size - 1) // block_size
    if splits is None:
        splits = [[t] for t in Ts]
    if len(splits) != n or any(sum(sp) != t or min(sp, default=1) <= 0 for sp, t in zip(splits, Ts)):
        raise ValueError("splits[i] must be positive lengths summing to the rows of qs[i]")
    _check(l2c_kvpool_init(&pool, 1, n_kv_heads, hs, kdt, vdt, block_size, max(n_blocks, 1)), "attention_seqs")
    seqs = <l2c_seq *>calloc(n, sizeof(l2c_seq))
    spans = <l2c_span *>calloc(sum(len(sp) for sp in splits) + 1, sizeof(l2c_span))
    try:
        if seqs == NULL or spans == NULL:
            raise MemoryError("attention_seqs")
        for i in range(n):
            _check(l2c_seq_init(&seqs[i], &pool, pos0s[i] + Ts[i]), "attention_seqs")
        # blocks: one at a time round-robin (interleaved tables) or sequence after sequence
        more = True
        while more:
            more = False
            for i in range(n):
                want = pos0s[i] + Ts[i]
                have = seqs[i].n_blocks * block_size
                if have < want:
                    _check(l2c_seq_reserve(&seqs[i], min(want, have + block_size) if interleave else want),
                           "attention_seqs")
                    more = True
        for i in range(n):
            kk = ks[i]
            vv = vs[i]
            st.blocks = seqs[i].blocks
            st.pos0 = 0
            st.row0 = 0
            st.n = pos0s[i] + Ts[i]
            seqs[i].n_pos = st.n
            if st.n:
                with nogil:
                    kt.kv_store(&pool, 0, &st, 1, &kk[0, 0], &vv[0, 0], n_threads)
        qcat = np.ascontiguousarray(np.concatenate(qs, axis=0)) if total else np.zeros((1, qdim), np.float32)
        out = np.zeros_like(qcat)
        qall = qcat
        oall = out
        row = 0
        for i in range(n):
            pos = pos0s[i]
            for j in splits[i]:
                spans[n_spans].blocks = seqs[i].blocks
                spans[n_spans].pos0 = pos
                spans[n_spans].row0 = row
                spans[n_spans].n = j
                n_spans += 1
                pos += j
                row += j
        wsb = _Workspace()
        ws = wsb.get(l2c_attention_ws_bytes(&pool, spans, n_spans, n_heads, n_threads))
        best = float("inf")
        for _ in range(max(repeat, 1)):
            t0 = time.perf_counter()
            if total:
                with nogil:
                    kt.attention(&oall[0, 0], &qall[0, 0], &pool, 0, spans, n_spans, n_heads, ws, n_threads)
            best = min(best, time.perf_counter() - t0)
        outs, stored = [], []
        row = 0
        for i in range(n):
            outs.append(out[row:row + Ts[i]])
            row += Ts[i]
            if not readback:
                stored.append(None)
                continue
            N = pos0s[i] + Ts[i]
            kb = np.empty((N, kvd), np.float32)
            vb = np.empty((N, kvd), np.float32)
            ko = kb
            vo = vb
            for pos in range(N):
                for h in range(n_kv_heads):
                    l2c_seq_read(&seqs[i], 0, h, pos, &ko[pos, h * hs], &vo[pos, h * hs])
            stored.append((kb, vb))
        return outs, stored, best
    finally:
        if seqs != NULL:
            for i in range(n):
                l2c_seq_free(&seqs[i])
        free(seqs)
        free(spans)
        l2c_kvpool_free(&pool)
