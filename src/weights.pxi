# weights.pxi: part of llama2c._engine (included by _engine.pyx; one file per concern so that the
# kernels, weights, model/session and sampler bindings change independently).
#
# Weights as the engine holds them (csrc/llama2c.h "weight matrices"): every matrix a forward
# pass multiplies by is packed (fp32 panels, int8 or 4-bit blocks), in C, in parallel; an untied
# embedding is used in place when it is fp32 or an int8 view of a file map (row lookups read
# the map: only the rows looked up become resident), and packed otherwise (a quantized
# embedding is never expanded to fp32). Vectors (norms, biases) are copied, a few KB, so that
# the engine keeps no reference into a file map it does not read from.

import mmap

cdef extern from *:
    """
    #if defined(__GLIBC__)
    #include <malloc.h>
    /* give the heap's free pages back to the OS (glibc keeps freed chunks below live ones) */
    static int l2c_trim_heap(void) { return malloc_trim(0); }
    #else
    static int l2c_trim_heap(void) { return 0; }
    #endif
    """
    int l2c_trim_heap() nogil

cdef extern from *:
    """
    #if defined(__linux__)
    #include <sys/mman.h>
    #include <stdint.h>
    #define L2C_HUGE_PAGE ((int64_t)2 << 20)
    static int64_t l2c_round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
    /* Reserve at least `bytes` of anonymous memory (pages are made only when touched; no
       commit charge): *base and *len are the mapping, the return value its first 2 MB
       boundary, from which the pages are marked for transparent huge pages; NULL if refused. */
    static uint8_t *l2c_arena_map(int64_t bytes, void **base, int64_t *len) {
        const int64_t n = l2c_round_up(bytes, L2C_HUGE_PAGE) + L2C_HUGE_PAGE;
        void *m = mmap(NULL, (size_t)n, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) return NULL;
        uint8_t *a = (uint8_t *)(uintptr_t)l2c_round_up((int64_t)(uintptr_t)m, L2C_HUGE_PAGE);
    #if defined(MADV_HUGEPAGE)
        madvise(a, (size_t)((uint8_t *)m + n - a), MADV_HUGEPAGE);
    #endif
        *base = m;
        *len = n;
        return a;
    }
    /* Give back what lies past the first `used` bytes from a: the untouched part of a huge page
       the last bytes fall in, and the rest of the mapping (*len shrinks). */
    static void l2c_arena_trim(void *base, int64_t *len, uint8_t *a, int64_t used) {
        uint8_t *end = (uint8_t *)base + *len;
        uint8_t *e4 = a + l2c_round_up(used, 4096), *e2 = a + l2c_round_up(used, L2C_HUGE_PAGE);
        if (e2 > end) e2 = end;
        if (e2 > e4) madvise(e4, (size_t)(e2 - e4), MADV_DONTNEED);
        if (end > e2) {
            munmap(e2, (size_t)(end - e2));
            *len = (int64_t)(e2 - (uint8_t *)base);
        }
    }
    static void l2c_arena_unmap(void *base, int64_t len) { munmap(base, (size_t)len); }
    #else
    static uint8_t *l2c_arena_map(int64_t bytes, void **base, int64_t *len) {
        (void)bytes; *base = NULL; *len = 0; return NULL;
    }
    static void l2c_arena_trim(void *base, int64_t *len, uint8_t *a, int64_t used) {
        (void)base; (void)len; (void)a; (void)used;
    }
    static void l2c_arena_unmap(void *base, int64_t len) { (void)base; (void)len; }
    #endif
    """
    uint8_t *l2c_arena_map(int64_t bytes, void **base, int64_t *len) nogil
    void l2c_arena_trim(void *base, int64_t *len, uint8_t *a, int64_t used) nogil
    void l2c_arena_unmap(void *base, int64_t len) nogil


cdef class _ArenaChunk:
    """One mapping of a _WeightArena, exported as a writable byte buffer: the arrays carved from
    it (np.frombuffer) keep it alive, and it is unmapped when the last one goes."""
    cdef void *base
    cdef int64_t length
    cdef uint8_t *data
    cdef Py_ssize_t size
    cdef public int64_t used

    def __cinit__(self, int64_t size):
        self.data = l2c_arena_map(size, &self.base, &self.length)
        self.size = size if self.data != NULL else 0
        self.used = 0

    @property
    def capacity(self):
        """Bytes that can be carved (0: the system refused the mapping)."""
        return self.size

    def trim(self):
        """Give back the pages past `used` (no more is carved from this chunk)."""
        if self.data != NULL:
            l2c_arena_trim(self.base, &self.length, self.data, self.used)
            self.size = self.used

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        buffer.buf = self.data
        buffer.obj = self
        buffer.len = self.size
        buffer.readonly = 0
        buffer.itemsize = 1
        buffer.format = "B"
        buffer.ndim = 1
        buffer.shape = &self.size
        buffer.strides = &buffer.itemsize
        buffer.suboffsets = NULL
        buffer.internal = NULL

    def __dealloc__(self):
        if self.base != NULL:
            l2c_arena_unmap(self.base, self.length)


# the size of an arena's mappings (address space, not memory: only the pages carved are made)
ARENA_CHUNK_BYTES = 1 << 30


class _WeightArena:
    """Where an Engine's packed weights go: one mapping (a new one each ARENA_CHUNK_BYTES)
    whose arrays follow each other from a 2 MB boundary, in transparent huge pages. Decode
    reads every weight once per token, tens to thousands of megabytes: with 4 KB pages a
    stream crosses a page (a TLB miss and a walk, and the hardware prefetcher stops) every
    4 KB. SmolLM2 decode, A/B of builds, 2 threads, median of 5-6 alternating rounds: 4-bit
    +13% (AVX-512) / +7% (AVX2), int8 +6% / +10%. seal() gives back the unused end of the
    mapping (resident memory after load unchanged); where the system refuses a mapping the
    arrays are ordinary numpy ones. (A huge page is zeroed whole when first touched: on a
    virtual machine whose memory the host has not backed yet, a first fp32 load can take
    seconds longer.)"""

    def __init__(self):
        self.chunk = None
        self.refused = False

    def alloc(self, int64_t count, dtype):
        dtype = np.dtype(dtype)
        nbytes = count * dtype.itemsize
        if self.refused:
            return _aligned(count, dtype)
        c = self.chunk
        start = 0 if c is None else (c.used + 63) // 64 * 64
        if c is None or start + nbytes > c.capacity:
            self.seal()
            c = _ArenaChunk(max(ARENA_CHUNK_BYTES, nbytes))
            if c.capacity == 0:
                self.refused = True
                return _aligned(count, dtype)
            self.chunk, start = c, 0
        c.used = start + nbytes
        return np.frombuffer(c, np.uint8, nbytes, start).view(dtype)

    def seal(self):
        """No more arrays: give back the pages of the mapping past the last one."""
        if self.chunk is not None:
            self.chunk.trim()
            self.chunk = None


cdef object _new_array(object arena, int64_t count, dtype):
    return _aligned(count, dtype) if arena is None else arena.alloc(count, dtype)


# an engine holding this many bytes of weights trims the heap when it is freed (a C constant:
# engines may be freed at interpreter exit, after the module's globals)
cdef int64_t TRIM_AFTER_BYTES = 16 << 20


def trim_heap():
    """Return free heap pages to the OS (glibc malloc_trim; a no-op elsewhere); True if any.
    Model.load calls it once the unpacked tensors, freed one by one between the packed arrays
    the engine keeps, are gone: glibc gives back only the top of the heap by itself."""
    cdef int r
    with nogil:
        r = l2c_trim_heap()
    return bool(r)


# weights per matrix from which packing runs on OpenMP's default thread count
PACK_PARALLEL_MIN = 1 << 20


cdef object _pack_matrix(l2c_matrix *m, object t, tuple shape, str name, list keep,
                         bint packed=True, int n_threads=0, object arena=None):
    """Point m at tensor t, packed into the engine's layout (or in place for lookups when not
    `packed`), checking dtype, shape, contiguity and group size; the arrays m points into are
    appended to `keep` (the caller keeps them alive as long as m); packed arrays are carved
    from `arena` (a _WeightArena) when given."""
    cdef const float[:, ::1] fv
    cdef const float[:, ::1] sv
    cdef const float[:, ::1] mv
    cdef const int8_t[:, ::1] q8
    cdef const uint8_t[:, ::1] q4
    cdef float[::1] fpv
    cdef int8_t[::1] qpv
    cdef uint8_t[::1] spv
    cdef uint8_t[::1] mpv
    cdef const float *mptr = NULL
    cdef void *mpptr = NULL
    cdef int64_t rows = shape[0], cols = shape[1], gs
    cdef int rc = L2C_OK, f16, bits, nth = n_threads
    if nth <= 0:  # packing a small matrix is faster than waking threads
        nth = l2c_omp_max_threads() if rows * cols >= PACK_PARALLEL_MIN else 1
    m.rows = rows
    m.cols = cols
    m.f = NULL
    m.q = NULL
    m.s = NULL
    m.m = NULL
    m.scales_f16 = 0
    m.group_size = 0
    if rows <= 0 or cols <= 0:
        raise ValueError(f"{name}: a matrix needs rows and columns, got shape {shape}")
    if not hasattr(t, "group_size"):  # fp32
        if not isinstance(t, np.ndarray) or t.dtype != np.float32 or not t.flags.c_contiguous:
            raise ValueError(f"{name}: expected a C-contiguous float32 array, got "
                             f"{getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != shape:
            raise _shape_error(name, t.shape, shape)
        fv = t
        if not packed:
            m.type = L2C_F32
            m.f = &fv[0, 0]
            keep.append(t)
            return
        fp = _new_array(arena, l2c_packed_size(L2C_F32P, rows, cols), np.float32)
        fpv = fp
        with nogil:
            rc = l2c_pack_f32p(&fpv[0], &fv[0, 0], rows, cols, nth)
        _check(rc, name)
        m.type = L2C_F32P
        m.f = &fpv[0]
        keep.append(fp)
        return

    # QTensor: q (rows, cols) int8 (bits 8) or values 0..15 (bits 4), s (rows, cols/gs) float32
    bits = int(getattr(t, "bits", 8))
    if bits not in (4, 8):
        raise ValueError(f"{name}: bits must be 4 or 8, got {bits}")
    q = t.q
    if not isinstance(q, np.ndarray) or not q.flags.c_contiguous or (
            q.dtype != np.int8 and not (bits == 4 and q.dtype == np.uint8)):
        want = "int8" if bits == 8 else "uint8 (or int8)"
        raise ValueError(f"{name}: {bits}-bit values must be a C-contiguous {want} array, got "
                         f"{getattr(q, 'dtype', type(q).__name__)}")
    if tuple(q.shape) != shape:
        raise _shape_error(name, q.shape, shape)
    gs = int(t.group_size)
    mult = 4 if bits == 8 else 8
    if gs <= 0 or gs % mult or gs > L2C_GROUP_MAX or cols % gs:
        raise ValueError(f"{name}: group size {gs} must be a multiple of {mult}, at most "
                         f"{L2C_GROUP_MAX}, dividing {cols}")
    s = t.s
    if not isinstance(s, np.ndarray) or s.dtype != np.float32 or not s.flags.c_contiguous:
        raise ValueError(f"{name}: scales must be a C-contiguous float32 array")
    if tuple(s.shape) != (rows, cols // gs):
        raise _shape_error(name + " scales", s.shape, (rows, cols // gs))
    offsets = getattr(t, "m", None)
    if offsets is not None and (not isinstance(offsets, np.ndarray) or offsets.dtype != np.float32
                                or tuple(offsets.shape) != tuple(s.shape)
                                or not offsets.flags.c_contiguous):
        raise ValueError(f"{name}: offsets must be a C-contiguous float32 array shaped like the scales")
    sv = s
    m.group_size = gs
    if offsets is not None:
        mv = offsets
        mptr = &mv[0, 0]
    if bits == 8 and not packed:  # row-major in place: lookups only
        q8 = q
        m.type = L2C_Q8
        m.q = &q8[0, 0]
        m.s = &sv[0, 0]
        m.m = mptr
        keep.extend((q, s, offsets))
        return
    cdef int64_t ns = l2c_packed_scales(rows, cols, gs)
    with nogil:
        f16 = l2c_f16_exact(&sv[0, 0], rows * (cols // gs))
        if f16 and mptr != NULL:
            f16 = l2c_f16_exact(mptr, rows * (cols // gs))
    stype = np.uint16 if f16 else np.float32
    qp = _new_array(arena, l2c_packed_size(L2C_Q8P if bits == 8 else L2C_Q4P, rows, cols), np.int8)
    sp = _new_array(arena, ns, stype)
    mp = _new_array(arena, ns, stype) if offsets is not None else None
    qpv = qp
    spv = sp.view(np.uint8)
    if mp is not None:
        mpv = mp.view(np.uint8)
        mpptr = &mpv[0]
    if bits == 8:
        q8 = q
        with nogil:
            rc = l2c_pack_q8p(&qpv[0], &spv[0], mpptr, &q8[0, 0], &sv[0, 0], mptr, rows, cols,
                              gs, f16, nth)
    else:
        q4 = q.view(np.uint8)
        with nogil:
            rc = l2c_pack_q4p(&qpv[0], &spv[0], mpptr, &q4[0, 0], &sv[0, 0], mptr, rows, cols,
                              gs, f16, nth)
        if rc != L2C_OK:
            raise ValueError(f"{name}: 4-bit values must lie in [0, 15]")
    _check(rc, name)
    m.type = L2C_Q8P if bits == 8 else L2C_Q4P
    m.q = &qpv[0]
    m.s = &spv[0]
    m.m = mpptr
    m.scales_f16 = f16
    keep.extend((qp, sp, mp))


def _file_mapped(a):
    """Whether array a is a view into a memory-mapped file (mmap.mmap, np.memmap)."""
    while True:
        if isinstance(a, mmap.mmap):
            return True
        if isinstance(a, memoryview):
            a = a.obj
        elif isinstance(a, np.ndarray):
            a = a.base
        else:
            return False


cdef object _fill_matrix(l2c_matrix *m, object t, tuple shape, str name, list keep,
                         bint packed=True, object arena=None):
    """Point m at tensor t for the engine: a float32 ndarray or a QTensor (bits 8 or 4), packed
    for the matmul kernels (packed=True) or, for an untied embedding (packed=False), used in
    place when that costs no copy: fp32 (the caller's array, e.g. a file map) and int8 groups
    that are views of a file map (llama2.c v2); any other quantized embedding (GGUF Q8_0, 4-bit)
    is packed, which serves lookups as well. Returns (bytes the engine holds for it, whether
    they are pages of a file map rather than the engine's own memory)."""
    cdef Py_ssize_t first = len(keep)
    mapped = False
    if not packed and hasattr(t, "group_size"):
        mapped = int(getattr(t, "bits", 8)) == 8 and _file_mapped(t.q) and _file_mapped(t.s)
        packed = not mapped
    elif not packed:
        mapped = _file_mapped(t)
    _pack_matrix(m, t, shape, name, keep, packed, 0, arena)
    held = {id(a): a.nbytes for a in keep[first:] if isinstance(a, np.ndarray)}
    return sum(held.values()), mapped


cdef const float *_vector(object t, int64_t n, str name, list keep) except NULL:
    """The engine's own copy of a float32 vector (norm weights, biases)."""
    cdef const float[::1] v
    if not isinstance(t, np.ndarray) or t.dtype != np.float32 or t.ndim != 1 or not t.flags.c_contiguous:
        raise ValueError(f"{name}: expected a contiguous 1-D float32 array")
    if t.shape[0] != n:
        raise _shape_error(name, t.shape, (n,))
    t = t.copy()
    v = t
    keep.append(t)
    return &v[0]
