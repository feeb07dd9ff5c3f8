# matmul.pxi: part of llama2c._engine (included by _engine.pyx; one file per concern so that the
# kernels, weights, model/session and sampler bindings change independently).
#
# The matrix kernels one by one, for tests and benchmarks (the model calls them from C):
#   quantize(x, group_size, act_bits)     -> QAct       activations, as the int8/4-bit kernels read them
#   PackedMatrix(w)                        weights packed as the engine packs them (F32P, Q8P, Q4P)
#   PackedMatrix.matmul(x) / .matmul_q(a)  out = x @ W^T with any kernel table
#   matmul_many(mats, x)                   several matrices on one input in one kernel call
#   PackedMatrix.row(i)                    row lookups (the embedding)
#   matmul(out, x, w)                      fp32 convenience: packs w on every call
#   peak_gops(kind)                        the kernel table's peak (GFLOP/s or GOP/s)

TYPE_NAMES = {L2C_F32: "f32", L2C_Q8: "q8", L2C_F32P: "f32p", L2C_Q8P: "q8p", L2C_Q4P: "q4p"}


cdef class QAct:
    """Activations x (T, n) quantized in groups of group_size (csrc/llama2c.h l2c_qact): hi int8
    (T, n) and, for 16-bit (two-plane) activations, lo int8 (T, n) with v = 128 hi + lo; s
    float32 (T, n/gs) scales; sum_hi, sum_lo int32 (T, n/gs) group sums; v16 int16 (T, n)."""
    cdef l2c_qact a
    cdef readonly object hi, lo, s, sum_hi, sum_lo, v16
    cdef readonly int64_t T, n, group_size

    def __init__(self, int64_t T, int64_t n, int64_t group_size, int act_bits=16):
        if act_bits not in (8, 16):
            raise ValueError(f"act_bits must be 8 or 16, got {act_bits}")
        if T < 0 or n <= 0 or group_size <= 0 or n % group_size:
            raise ValueError(f"group size {group_size} must be positive and divide n = {n}")
        self.T, self.n, self.group_size = T, n, group_size
        ng = n // group_size
        self.hi = np.zeros((T, n), np.int8)
        self.lo = np.zeros((T, n), np.int8) if act_bits == 16 else None
        self.s = np.zeros((T, ng), np.float32)
        self.sum_hi = np.zeros((T, ng), np.int32)
        self.sum_lo = np.zeros((T, ng), np.int32) if act_bits == 16 else None
        self.v16 = np.zeros((T, n), np.int16)
        self._point()

    cdef _point(self):
        cdef int8_t[:, ::1] hi = self.hi
        cdef int8_t[:, ::1] lo
        cdef float[:, ::1] s = self.s
        cdef int32_t[:, ::1] sh = self.sum_hi
        cdef int32_t[:, ::1] sl
        cdef int16_t[:, ::1] v = self.v16
        if self.T == 0:
            return
        self.a.hi = &hi[0, 0]
        self.a.s = &s[0, 0]
        self.a.sum_hi = &sh[0, 0]
        self.a.v16 = &v[0, 0]
        self.a.lo = NULL
        self.a.sum_lo = NULL
        if self.lo is not None:
            lo = self.lo
            sl = self.sum_lo
            self.a.lo = &lo[0, 0]
            self.a.sum_lo = &sl[0, 0]

    @property
    def act_bits(self):
        return 8 if self.lo is None else 16

    @staticmethod
    def from_codes(hi, s, int64_t group_size, lo=None):
        """A QAct holding given codes (hi int8 (T, n), lo int8 or None, scales s (T, n/gs));
        the group sums and v16 are computed here (NumPy)."""
        hi = np.asarray(hi)
        if hi.dtype != np.int8 or hi.ndim != 2:
            raise ValueError("hi must be a 2-D int8 array")
        T, n = hi.shape
        q = QAct(T, n, group_size, 16 if lo is not None else 8)
        q.hi[...] = hi
        s = np.asarray(s)
        if s.shape != q.s.shape:
            raise _shape_error("s", s.shape, q.s.shape)
        q.s[...] = s
        ng = n // group_size
        q.sum_hi[...] = hi.reshape(T, ng, group_size).sum(axis=2, dtype=np.int32)
        v = hi.astype(np.int16)
        if lo is not None:
            lo = np.asarray(lo)
            if lo.shape != hi.shape or lo.dtype != np.int8:
                raise ValueError("lo must be an int8 array shaped like hi")
            q.lo[...] = lo
            q.sum_lo[...] = lo.reshape(T, ng, group_size).sum(axis=2, dtype=np.int32)
            v = 128 * v + lo
        q.v16[...] = v
        return q


def quantize(const float[:, ::1] x, int64_t group_size, int act_bits=16, simd=None,
             int n_threads=1):
    """Quantize activations x (T, n) in groups of group_size as the engine does before an int8
    or 4-bit matmul: 8-bit (act_bits=8) or two planes (16). Returns a QAct."""
    cdef const l2c_kernels *k = _table(simd)
    cdef int64_t T = x.shape[0], n = x.shape[1]
    if group_size <= 0 or n == 0 or n % group_size != 0:
        raise ValueError(f"group size {group_size} must be positive and divide {n}")
    n_threads = _nt(n_threads)
    cdef QAct q = QAct(T, n, group_size, act_bits)
    if T == 0:
        return q
    with nogil:
        k.quantize(&q.a, &x[0, 0], T, n, group_size, n_threads)
    return q


cdef object _aligned(int64_t count, dtype):
    """An uninitialised 1-D array of count elements whose data starts on a 64-byte boundary
    (the kernels load 64 bytes at a time; the packers write every element)."""
    dtype = np.dtype(dtype)
    nbytes = count * dtype.itemsize
    buf = np.empty(nbytes + 64, np.uint8)
    off = (-buf.ctypes.data) % 64
    return buf[off:off + nbytes].view(dtype)


cdef class PackedMatrix:
    """A weight matrix as the engine holds it. From a float32 (rows, cols) array: L2C_F32P
    panels; from a QTensor: L2C_Q8P (bits 8) or L2C_Q4P (bits 4), scales and offsets stored as
    halves when all are exactly halves. packed=False keeps float32 arrays and 8-bit QTensors
    row-major in place (L2C_F32, L2C_Q8: lookups only), as an untied embedding is held."""
    cdef l2c_matrix m
    cdef list _keep

    def __init__(self, w, bint packed=True, int n_threads=0):
        self._keep = []
        shape = tuple(w.shape) if hasattr(w, "shape") else None
        if shape is None or len(shape) != 2:
            raise ValueError(f"w: expected a 2-D matrix, got {type(w).__name__}")
        _pack_matrix(&self.m, w, shape, "w", self._keep, packed, n_threads)

    @property
    def kind(self):
        """'f32', 'q8' (row-major, lookups only), 'f32p', 'q8p' or 'q4p'."""
        return TYPE_NAMES[self.m.type]

    @property
    def shape(self):
        return (self.m.rows, self.m.cols)

    @property
    def group_size(self):
        return self.m.group_size

    @property
    def scales_f16(self):
        return bool(self.m.scales_f16)

    @property
    def nbytes(self):
        """Bytes of the arrays the kernels read (weights, scales, offsets)."""
        return sum(a.nbytes for a in self._keep if isinstance(a, np.ndarray))

    def row(self, int64_t i, float[::1] out=None):
        """Row i (cols,) dequantized (q * s + m in float32)."""
        if not 0 <= i < self.m.rows:
            raise IndexError(f"row {i} out of range [0, {self.m.rows})")
        if out is None:
            out = np.empty(self.m.cols, np.float32)
        if out.shape[0] != self.m.cols:
            raise _shape_error("out", (out.shape[0],), (self.m.cols,))
        cdef int rc
        with nogil:
            rc = l2c_matrix_row(&out[0], &self.m, i)
        _check(rc, "row")
        return np.asarray(out)

    def rows(self, idx):
        """float32 (len(idx), cols): the given rows (as the embedding lookup reads them)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), self.m.cols), np.float32)
        for j, i in enumerate(idx):
            self.row(int(i), out[j])
        return out

    cdef int _check_matmul(self, int64_t T, out, int64_t n) except -1:
        if self.m.type not in (L2C_F32P, L2C_Q8P, L2C_Q4P):
            raise ValueError(f"a {TYPE_NAMES[self.m.type]} matrix serves lookups only (pack it)")
        if n != self.m.cols:
            raise ValueError(f"x has {n} columns, the matrix {self.m.cols}")
        if out.shape[0] != T or out.shape[1] != self.m.rows:
            raise _shape_error("out", (out.shape[0], out.shape[1]), (T, self.m.rows))
        return 0

    def matmul(self, const float[:, ::1] x, float[:, ::1] out=None, int act_bits=16, simd=None,
               int n_threads=1):
        """out (T, rows) = x (T, cols) @ W^T with the kernels of `simd`; a quantized matrix
        quantizes x first (act_bits 8 or 16), as the engine does."""
        cdef const l2c_kernels *k = _table(simd)
        cdef int64_t T = x.shape[0]
        if out is None:
            out = np.empty((T, self.m.rows), np.float32)
        self._check_matmul(T, out, x.shape[1])
        n_threads = _nt(n_threads)
        if T == 0:
            return np.asarray(out)
        cdef l2c_mm job
        if self.m.type == L2C_F32P:
            job.out, job.x, job.a, job.W = &out[0, 0], &x[0, 0], NULL, &self.m
            with nogil:
                k.matmul(&job, 1, T, n_threads)
            return np.asarray(out)
        return self.matmul_q(quantize(x, self.m.group_size, act_bits, simd, n_threads), out,
                             simd, n_threads)

    def matmul_q(self, QAct a, float[:, ::1] out=None, simd=None, int n_threads=1):
        """out (T, rows) = A @ W^T for activations already quantized at W's group size."""
        cdef const l2c_kernels *k = _table(simd)
        if self.m.type not in (L2C_Q8P, L2C_Q4P):
            raise ValueError("matmul_q needs an int8 or 4-bit packed matrix")
        if a.group_size != self.m.group_size:
            raise ValueError(f"activations quantized in groups of {a.group_size}, the matrix "
                             f"has groups of {self.m.group_size}")
        cdef int64_t T = a.T
        if out is None:
            out = np.empty((T, self.m.rows), np.float32)
        self._check_matmul(T, out, a.n)
        n_threads = _nt(n_threads)
        if T == 0:
            return np.asarray(out)
        cdef l2c_mm job
        job.out, job.x, job.a, job.W = &out[0, 0], NULL, &a.a, &self.m
        with nogil:
            k.matmul(&job, 1, T, n_threads)
        return np.asarray(out)


def matmul_many(mats, const float[:, ::1] x, int act_bits=16, simd=None, int n_threads=1):
    """[x @ W^T for W in mats] in one call of the kernel (one parallel region whose threads
    split the blocks of all the matrices, as the model runs q/k/v and w1/w3); x is quantized
    once per group size of the int8/4-bit matrices. Returns the list of outputs."""
    cdef const l2c_kernels *k = _table(simd)
    cdef int64_t T = x.shape[0], i, n = len(mats)
    cdef PackedMatrix W
    cdef QAct a
    cdef float[:, ::1] o
    if n > 16:
        raise ValueError(f"at most 16 matrices per call, got {n}")
    n_threads = _nt(n_threads)
    cdef l2c_mm jobs[16]
    acts, outs = {}, []
    for i in range(n):
        W = mats[i]
        out = np.empty((T, W.m.rows), np.float32)
        W._check_matmul(T, out, x.shape[1])
        outs.append(out)
        o = out
        jobs[i].out = &o[0, 0] if T else NULL
        jobs[i].x = &x[0, 0] if T else NULL
        jobs[i].a = NULL
        jobs[i].W = &W.m
        if W.m.type != L2C_F32P:
            if W.m.group_size not in acts:
                acts[W.m.group_size] = quantize(x, W.m.group_size, act_bits, simd, n_threads)
            a = acts[W.m.group_size]
            jobs[i].a = &a.a
    if T:
        with nogil:
            k.matmul(jobs, <int>n, T, n_threads)
    return outs


def matmul(float[:, ::1] out, const float[:, ::1] x, const float[:, ::1] w, simd=None,
           int n_threads=1):
    """out (T, d) = x (T, n) @ w (d, n)^T in fp32 (packs w into panels on every call: for tests;
    the engine packs once, see PackedMatrix)."""
    cdef int64_t T = x.shape[0], n = x.shape[1], d = w.shape[0]
    _table(simd)
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
    return PackedMatrix(np.asarray(w)).matmul(x, out, simd=simd, n_threads=n_threads)


def peak_gops(kind="fp32", simd=None, int n_threads=1, double seconds=0.2):
    """Peak of a kernel table: GFLOP/s of independent FMA chains (kind "fp32") or GOP/s of its
    int8 dot instruction (kind "int8": vpdpbusd on the VNNI tables, vpmaddubsw+vpmaddwd on
    avx2; 2 ops per multiply-add), with n_threads threads; best of 3 runs of about `seconds`."""
    import time
    cdef const l2c_kernels *k = _table(simd)
    cdef int kd
    if kind == "fp32":
        kd = L2C_PEAK_FP32
    elif kind == "int8":
        kd = L2C_PEAK_INT8
    else:
        raise ValueError(f"kind must be 'fp32' or 'int8', got {kind!r}")
    n_threads = _nt(n_threads)
    cdef int64_t reps = 1 << 14
    cdef double ops, t
    best = 0.0
    while True:  # calibrate reps to about `seconds`
        t0 = time.perf_counter()
        with nogil:
            ops = k.peak(kd, reps, n_threads)
        t = time.perf_counter() - t0
        if t >= seconds / 4 or reps > (1 << 40):
            break
        reps *= 4
    best = ops / t
    for _ in range(2):
        t0 = time.perf_counter()
        with nogil:
            ops = k.peak(kd, reps, n_threads)
        best = max(best, ops / (time.perf_counter() - t0))
    return best / 1e9
