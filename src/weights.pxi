# weights.pxi: part of llama2c._engine (included by _engine.pyx; one file per concern so that the
# kernels, weights, model/session and sampler bindings change independently).
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


