# model.pxi: part of llama2c._engine (included by _engine.pyx; one file per concern so that the
# kernels, weights, model/session and sampler bindings change independently).
cdef class Engine:
    """The C model: config + weight pointers into the caller's arrays (kept alive here)."""
    cdef l2c_model m
    cdef l2c_layer *layers
    cdef list _keep
    cdef object _arena
    cdef object _rope
    cdef readonly object config
    # name -> bytes the engine holds for the tensor (packed arrays; an in-place embedding's
    # arrays; vectors' copies)
    cdef readonly dict tensor_bytes
    # names of tensors read in place from a file map (pages resident only as they are read)
    cdef readonly frozenset mapped_tensors
    cdef set _mapped
    cdef int64_t held_bytes            # sum of tensor_bytes

    def __cinit__(self):
        self.layers = NULL

    def __init__(self, config, weights, simd=None, max_positions=None, int act_bits=16):
        """weights: a mapping name -> float32 array or QTensor (a dict, or a
        llama2c.weights.LazyWeights whose tensors are made as they are read: each is read once,
        packed, and not kept). max_positions: positions to prepare RoPE tables for (default
        config.seq_len, at most config.max_context); no session of this engine can hold more.
        act_bits: activations of the int8 matmuls, 8 or 16 (two int8 planes: 128x finer, twice
        the integer work)."""
        cdef int64_t i
        self.config = config
        if max_positions is None:
            max_positions = config.seq_len
        if not 0 < max_positions <= config.max_context:
            raise ValueError(f"max_positions must be in [1, {config.max_context}], got {max_positions}")
        self._keep = []
        self._arena = _WeightArena()
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
        if act_bits not in (8, 16):
            raise ValueError(f"act_bits must be 8 or 16, got {act_bits}")
        self.m.cfg.act_bits = act_bits
        cdef int64_t d = c.dim, h = c.hidden_dim, qd = c.n_heads * c.head_size
        cdef int64_t kvd = c.n_kv_heads * c.head_size
        self.layers = <l2c_layer *>calloc(c.n_layers, sizeof(l2c_layer))
        if self.layers == NULL:
            raise MemoryError("Engine: cannot allocate the layer table")
        self.tensor_bytes = {}
        self._mapped = set()
        # one tensor at a time: with lazy weights (llama2c.weights.LazyWeights) each is made
        # here, packed, and dropped before the next one is made
        for i in range(c.n_layers):
            p = f"layers.{i}."
            self.layers[i].rms_att = self._vector(weights, p + "attention_norm", d)
            self.layers[i].rms_ffn = self._vector(weights, p + "ffn_norm", d)
            self._matrix(&self.layers[i].wq, weights, p + "wq", (qd, d))
            self._matrix(&self.layers[i].wk, weights, p + "wk", (kvd, d))
            self._matrix(&self.layers[i].wv, weights, p + "wv", (kvd, d))
            self._matrix(&self.layers[i].wo, weights, p + "wo", (d, qd))
            self._matrix(&self.layers[i].w1, weights, p + "w1", (h, d))
            self._matrix(&self.layers[i].w2, weights, p + "w2", (d, h))
            self._matrix(&self.layers[i].w3, weights, p + "w3", (h, d))
            # optional q/k/v biases (qwen2)
            self.layers[i].bq = self._vector(weights, p + "bq", qd) if p + "bq" in weights else NULL
            self.layers[i].bk = self._vector(weights, p + "bk", kvd) if p + "bk" in weights else NULL
            self.layers[i].bv = self._vector(weights, p + "bv", kvd) if p + "bv" in weights else NULL
        self.m.layers = self.layers
        self.m.rms_final = self._vector(weights, "norm", d)
        if c.shared_classifier:  # packed once: the embedding rows are looked up in the classifier
            self._matrix(&self.m.wcls, weights, "tok_embeddings", (c.vocab_size, d))
            self.m.tok_embeddings = self.m.wcls
        else:
            self._matrix(&self.m.wcls, weights, "output", (c.vocab_size, d))
            self._matrix(&self.m.tok_embeddings, weights, "tok_embeddings", (c.vocab_size, d),
                         packed=False)
        self._arena.seal()
        self._arena = None
        self.mapped_tensors = frozenset(self._mapped)
        self._mapped = None
        self.held_bytes = sum(self.tensor_bytes.values())
        self._rope = np.ascontiguousarray(c.rope_frequencies(max_positions), dtype=np.float64)
        if self._rope.shape != (c.head_size // 2,) or not np.isfinite(self._rope).all():
            raise ValueError(f"rope frequencies: expected {c.head_size // 2} finite numbers")
        cdef const double[::1] fr = self._rope
        self.m.rope_freq = &fr[0]
        self.m.k = _table(simd)
        _check(l2c_model_check(&self.m), "model")

    def __dealloc__(self):
        free(self.layers)
        self.layers = NULL
        # a big model's packed arrays go back to the OS now, not when the heap's top shrinks
        self._keep = None
        if self.held_bytes >= TRIM_AFTER_BYTES:
            l2c_trim_heap()

    cdef _matrix(self, l2c_matrix *m, weights, str name, tuple shape, bint packed=True):
        """Fill m from weights[name] (made, packed and dropped here: _fill_matrix)."""
        try:
            t = weights[name]
        except KeyError:
            raise ValueError(f"missing tensor {name!r}") from None
        self.tensor_bytes[name], in_map = _fill_matrix(m, t, shape, name, self._keep, packed,
                                                       self._arena)
        if in_map:
            self._mapped.add(name)

    cdef const float *_vector(self, weights, str name, int64_t n) except NULL:
        try:
            t = weights[name]
        except KeyError:
            raise ValueError(f"missing tensor {name!r}") from None
        self.tensor_bytes[name] = 4 * n
        return _vector(t, n, name, self._keep)

    @property
    def act_bits(self):
        """8 or 16: the activations of the int8 matmuls."""
        return self.m.cfg.act_bits

    def kv_block_bytes(self, kv_dtype="f16", int64_t block_size=L2C_KV_BLOCK):
        """Bytes of one KV pool block of block_size positions (every layer and kv head) in
        kv_dtype (kv_dtype_name: "f16", "f32", "q8", "f16/q8", ...): what a session's cache grows
        by per block it fills."""
        kt, vt = kv_types(kv_dtype)
        cdef int64_t bb = l2c_kv_block_bytes(self.m.cfg.n_layers, self.m.cfg.n_kv_heads,
                                             self.m.cfg.head_size, kt, vt, block_size)
        if bb <= 0:
            raise ValueError(f"block_size must be a positive multiple of 16, got {block_size}")
        return bb

    @property
    def simd(self):
        """Name of the kernel table this model runs."""
        return self.m.k.name.decode()

    def set_simd(self, simd):
        """Switch this model's kernel table (None: the default)."""
        self.m.k = _table(simd)
        return self.simd


cdef int _logits_mode(object logits) except -1:
    if logits == "last":
        return L2C_LOGITS_LAST
    if logits == "all":
        return L2C_LOGITS_ALL
    if logits == "none" or logits is None:
        return L2C_LOGITS_NONE
    raise ValueError(f"logits must be 'last', 'all' or 'none', got {logits!r}")


@cython.no_gc_clear
cdef class KVPool:
    """A pool of KV cache blocks of one Engine: block_size positions of every layer and kv head
    per block, a fixed capacity (n_blocks, or as many blocks as budget_bytes holds; default: one
    full context of the engine), kv_dtype "f16" (default), "f32", "q8", or keys and values of two
    types as "f16/q8" (kv_dtype_name). Sessions created with
    pool=this share it: each holds only the blocks its positions fill. The memory is reserved
    at creation and touched only as blocks fill. Thread-safe: calls that change the pool
    (eval, forward_batch, truncate, import_kv, closing a session) take its lock."""
    cdef l2c_kvpool p
    cdef PyThread_type_lock lock
    cdef readonly Engine engine
    cdef l2c_state bs                  # the state of forward_batch (created on first use)
    cdef bint has_bs
    cdef readonly int64_t max_batch
    cdef volatile int32_t cancel_flag

    def __cinit__(self):
        self.lock = PyThread_allocate_lock()
        if self.lock == NULL:
            raise MemoryError("KVPool: cannot allocate a lock")

    def __init__(self, Engine engine, n_blocks=None, budget_bytes=None, kv_dtype="f16",
                 int64_t block_size=L2C_KV_BLOCK, int64_t max_batch=64):
        cdef int32_t kdt, vdt
        kdt, vdt = kv_types(kv_dtype)
        cdef l2c_config c = engine.m.cfg
        if self.p.n_blocks:
            raise RuntimeError("KVPool.__init__ called twice")
        if block_size <= 0 or block_size % 16:
            raise ValueError(f"block_size must be a positive multiple of 16, got {block_size}")
        if max_batch <= 0:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        cdef int64_t bb = l2c_kv_block_bytes(c.n_layers, c.n_kv_heads, c.head_size, kdt, vdt, block_size)
        if n_blocks is not None and budget_bytes is not None:
            raise ValueError("KVPool: give n_blocks or budget_bytes, not both")
        if budget_bytes is not None:
            if budget_bytes < bb:
                raise ValueError(f"budget_bytes={budget_bytes} is less than one block of "
                                 f"{block_size} positions ({bb} bytes)")
            n_blocks = int(budget_bytes) // bb
        elif n_blocks is None:
            n_blocks = (c.seq_len + block_size - 1) // block_size
        if not 0 < n_blocks < 2**31:
            raise ValueError(f"n_blocks must be in [1, 2**31), got {n_blocks}")
        self.engine = engine
        self.max_batch = max_batch
        _check(l2c_kvpool_init(&self.p, c.n_layers, c.n_kv_heads, c.head_size, kdt, vdt,
                               block_size, n_blocks), "KVPool")

    def __dealloc__(self):
        if self.has_bs:
            l2c_state_free(&self.bs)
        l2c_kvpool_free(&self.p)
        if self.lock != NULL:
            PyThread_free_lock(self.lock)

    @property
    def kv_dtype(self):
        """'f16', 'f32', 'q8', or keys/values of two types as 'f16/q8'."""
        return _kv_name(self.p.kdtype, self.p.vdtype)

    @property
    def block_size(self):
        """Positions per block."""
        return self.p.block_size

    @property
    def n_blocks(self):
        """Capacity in blocks."""
        return self.p.n_blocks

    @property
    def blocks_free(self):
        return self.p.n_free

    @property
    def blocks_used(self):
        return self.p.n_blocks - self.p.n_free

    @property
    def block_bytes(self):
        return self.p.block_bytes

    @property
    def bytes_per_token(self):
        """KV bytes of one position (all layers and kv heads)."""
        return self.p.block_bytes / self.p.block_size

    @property
    def capacity_tokens(self):
        return self.p.n_blocks * self.p.block_size

    def request_cancel(self):
        """Ask a running forward_batch() on this pool (in another thread) to stop before its next
        step; it then raises GenerationCancelled. Cleared when the next forward_batch starts."""
        self.cancel_flag = 1

    def __repr__(self):
        return (f"KVPool(kv_dtype={self.kv_dtype!r}, block_size={self.block_size}, "
                f"blocks_used={self.blocks_used}/{self.n_blocks}, "
                f"{self.p.block_bytes * self.p.n_blocks / 2**20:.1f} MiB)")


@cython.no_gc_clear
cdef class Session:
    """One sequence of an Engine: its KV cache positions (blocks of a KVPool: its own, or one
    shared with other sessions via pool=) and the activation buffers of its forward passes.
    Not shared between threads (each thread uses its own session)."""
    cdef l2c_state s
    cdef l2c_seq seq
    cdef readonly Engine engine
    cdef readonly KVPool pool
    cdef bint busy
    cdef readonly int64_t context
    cdef volatile int32_t cancel_flag   # set by request_cancel(), checked between steps
    cdef object _last                   # logits (vocab,) of the last position run, or None

    def __init__(self, Engine engine, int64_t context=0, int64_t max_batch=64, int n_threads=1,
                 kv_dtype=None, KVPool pool=None):
        """context: the most positions this session holds (default: the engine's); max_batch:
        rows per forward step (prefill chunk); kv_dtype: 'f16' (default), 'f32', 'q8' or
        'f16/q8' (keys/values) for a session with its own pool; pool: a KVPool of this engine
        to take blocks from."""
        self.engine = engine
        if context <= 0:
            context = engine.m.cfg.seq_len
        if context > engine.m.cfg.seq_len:
            raise ValueError(f"context {context} exceeds the model's {engine.m.cfg.seq_len} positions")
        if max_batch <= 0:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if pool is None:
            pool = KVPool(engine, n_blocks=(context + L2C_KV_BLOCK - 1) // L2C_KV_BLOCK,
                          kv_dtype="f16" if kv_dtype is None else kv_dtype)
        else:
            if pool.engine is not engine:
                raise ValueError("pool belongs to another Engine")
            if kv_dtype is not None and kv_types(kv_dtype) != (pool.p.kdtype, pool.p.vdtype):
                raise ValueError(f"kv_dtype={kv_dtype!r} differs from the pool's {pool.kv_dtype!r}")
        self.context = context
        self.pool = pool
        _check(l2c_state_init(&self.s, &engine.m, max_batch, _nt(n_threads)), "session")
        _check(l2c_seq_init(&self.seq, &pool.p, context), "session")
        self.s.cancel = &self.cancel_flag
        self._last = None

    def __dealloc__(self):
        if self.seq.pool != NULL and self.pool is not None:
            with nogil:
                PyThread_acquire_lock(self.pool.lock, WAIT_LOCK)
                l2c_seq_free(&self.seq)
                PyThread_release_lock(self.pool.lock)
        l2c_state_free(&self.s)

    @property
    def n_threads(self):
        return self.s.n_threads

    @n_threads.setter
    def n_threads(self, int n):
        self.s.n_threads = _nt(n)

    @property
    def n_tokens(self):
        """Positions whose keys and values the cache holds."""
        return self.seq.n_pos

    @property
    def kv_dtype(self):
        return self.pool.kv_dtype

    @property
    def max_batch(self):
        return self.s.max_batch

    cdef int _enter(self) except -1:
        if self.busy:
            raise RuntimeError("this session is already running in another thread")
        self.busy = True
        return 0

    # ---- the stable API (generation, chat, server): tokens are appended at n_tokens ----------

    def request_cancel(self):
        """Ask a running eval() (in another thread) to stop before its next step; it then
        raises GenerationCancelled. The flag is cleared when the next eval() starts."""
        self.cancel_flag = 1

    def truncate(self, int64_t n):
        """Keep the first n positions of the cache (0 <= n <= n_tokens), forget the rest (whole
        blocks beyond go back to the pool)."""
        if not 0 <= n <= self.seq.n_pos:
            raise ValueError(f"truncate: n must be in [0, {self.seq.n_pos}], got {n}")
        self._enter()
        try:
            if n < self.seq.n_pos:
                self._last = None
            with nogil:
                PyThread_acquire_lock(self.pool.lock, WAIT_LOCK)
                l2c_seq_truncate(&self.seq, n)
                PyThread_release_lock(self.pool.lock)
        finally:
            self.busy = False

    def eval(self, const int32_t[::1] tokens, logits="last", float[:, ::1] out=None):
        """Run tokens (n,) at positions n_tokens.., appending their keys and values to the cache.

        logits: "last" returns the last token's logits (vocab,) (a new array); "all" returns
        (n, vocab) logits of every token (into `out` when given); "none" returns None (and
        computes no logits). The tokens run in steps of max_batch with the GIL released;
        between steps a request_cancel() from another thread stops it with GenerationCancelled
        (the positions already run stay in the cache: n_tokens tells how many). Raises
        KVCacheFullError when a shared pool lacks the blocks (nothing is run then)."""
        cdef int64_t n = tokens.shape[0], V = self.engine.m.cfg.vocab_size, start = self.seq.n_pos
        cdef int mode = _logits_mode(logits)
        cdef l2c_run run
        cdef float *lp = NULL
        cdef float[::1] lv
        cdef int rc
        if n == 0:
            raise ValueError("eval: no tokens")
        if start + n > self.context:
            raise ContextLengthError(f"{n} tokens after {start} cached do not fit the "
                                     f"context of {self.context}")
        last = None
        if mode == L2C_LOGITS_ALL:
            if out is None:
                out = np.empty((n, V), dtype=np.float32)
            elif out.shape[0] != n or out.shape[1] != V:
                raise _shape_error("out", (out.shape[0], out.shape[1]), (n, V))
            lp = &out[0, 0]
        elif mode == L2C_LOGITS_LAST:
            last = np.empty(V, dtype=np.float32)
            lv = last
            lp = &lv[0]
        run.seq = &self.seq
        run.n_tokens = n
        run.logits = mode
        self._enter()
        self.cancel_flag = 0
        try:
            with nogil:
                PyThread_acquire_lock(self.pool.lock, WAIT_LOCK)
                rc = l2c_forward(&self.engine.m, &self.s, &self.pool.p, &run, 1, &tokens[0], lp)
                PyThread_release_lock(self.pool.lock)
        finally:
            self.busy = False
        if rc != L2C_OK:
            if self.seq.n_pos != start:
                self._last = None
            if rc == L2C_ERR_CANCELLED:
                raise GenerationCancelled(f"cancelled after {self.seq.n_pos - start} of {n} tokens")
            if rc == L2C_ERR_KVFULL:
                raise KVCacheFullError(
                    f"eval: {n} tokens after {start} need {l2c_seq_blocks_needed(&self.seq, start + n)} "
                    f"blocks of {self.pool.p.block_size} positions; the pool has {self.pool.p.n_free} free")
            _check(rc, "eval")
        if mode == L2C_LOGITS_ALL:
            self._last = np.array(out[n - 1])
            return np.asarray(out)
        if mode == L2C_LOGITS_LAST:
            self._last = last
            return last.copy()
        self._last = None
        return None

    def last_logits(self):
        """Copy of the logits (vocab,) of the last position, as the last eval (or import_kv)
        computed them; RuntimeError when it computed none (logits='none', truncate)."""
        if self._last is None:
            raise RuntimeError("no logits for the last position: the last eval ran with "
                               "logits='none' (or the cache was truncated or is empty)")
        return self._last.copy()

    def export_kv(self):
        """The cache's positions 0..n_tokens-1 as bytes: a header (kv dtype, model dimensions,
        n_tokens) and the keys/values in the cache's own element type. import_kv restores them
        into a session of the same model and kv dtype."""
        cdef int64_t n = self.seq.n_pos
        cdef int64_t nbytes = l2c_seq_state_bytes(&self.pool.p, n)
        header = _KV_HEADER.pack(_KV_MAGIC, _kv_code(self.pool.p.kdtype, self.pool.p.vdtype),
                                 self.pool.p.n_layers, self.pool.p.n_kv_heads,
                                 self.pool.p.head_size, n)
        buf = bytearray(len(header) + nbytes)
        buf[:len(header)] = header
        cdef unsigned char[::1] bv = buf
        if n:
            _check(l2c_seq_export(&self.seq, n, &bv[len(header)]), "export_kv")
        return bytes(buf)

    def import_kv(self, data, int64_t n_tokens, last_logits=None):
        """Restore what export_kv returned (n_tokens positions, and optionally the logits of the
        last one) into this session, replacing its contents. Refused with ValueError when the
        state comes from another model or kv dtype."""
        cdef const unsigned char[::1] dv = memoryview(data).cast("B")
        cdef const void *src = NULL
        cdef int rc
        cdef Py_ssize_t hl = _KV_HEADER.size
        if len(data) < hl or bytes(data[:6]) != _KV_MAGIC:
            raise ValueError("import_kv: not a saved KV state of this build")
        _, dtype, n_layers, n_kv, hs, n = _KV_HEADER.unpack(bytes(data[:hl]))
        p = &self.pool.p
        if dtype != _kv_code(p.kdtype, p.vdtype):
            held = {_kv_code(a, b): _kv_name(a, b) for a in KV_DTYPE_NAMES for b in KV_DTYPE_NAMES}
            raise ValueError(f"import_kv: the state holds {held.get(dtype, dtype)!r} "
                             f"keys/values, this session's cache is {self.kv_dtype!r}")
        if (n_layers, n_kv, hs) != (p.n_layers, p.n_kv_heads, p.head_size):
            raise ValueError(f"import_kv: the state is of another model (layers, kv heads, head "
                             f"size {(n_layers, n_kv, hs)}, this one {(p.n_layers, p.n_kv_heads, p.head_size)})")
        if n != n_tokens:
            raise ValueError(f"import_kv: the state holds {n} positions, n_tokens={n_tokens}")
        if not 0 <= n_tokens <= self.context:
            raise ContextLengthError(f"a state of {n_tokens} positions does not fit the context of {self.context}")
        if len(data) != hl + l2c_seq_state_bytes(p, n_tokens):
            raise ValueError(f"import_kv: {len(data)} bytes do not hold {n_tokens} positions of this model")
        lv = None
        if last_logits is not None:
            lv = np.array(last_logits, dtype=np.float32).reshape(-1)
            if lv.shape[0] != self.engine.m.cfg.vocab_size:
                raise _shape_error("last_logits", lv.shape, (self.engine.m.cfg.vocab_size,))
        if n_tokens:
            src = &dv[hl]
        self._enter()
        try:
            with nogil:
                PyThread_acquire_lock(self.pool.lock, WAIT_LOCK)
                rc = l2c_seq_import(&self.seq, n_tokens, src)
                PyThread_release_lock(self.pool.lock)
        finally:
            self.busy = False
        if rc == L2C_ERR_KVFULL:
            raise KVCacheFullError(f"import_kv: the pool has too few free blocks for {n_tokens} positions")
        _check(rc, "import_kv")
        self._last = lv

    # ---- the earlier API (positions given by the caller), on top of eval/truncate -------------

    def forward(self, const int32_t[::1] tokens, int64_t pos0, float[:, ::1] logits_all=None):
        """Run tokens (n,) at positions pos0.. (pos0 <= n_tokens: the cache is cut to pos0
        first); returns the last token's logits. If logits_all (n, vocab) is given it receives
        every row's logits."""
        cdef int64_t n = tokens.shape[0]
        if n == 0:
            raise ValueError("forward: no tokens")
        if pos0 < 0 or pos0 + n > self.context:
            raise ContextLengthError(
                f"{n} tokens at position {pos0} do not fit the context of {self.context}")
        if pos0 > self.seq.n_pos:
            raise ValueError(f"forward: position {pos0} is beyond the {self.seq.n_pos} cached")
        self.truncate(pos0)
        if logits_all is not None:
            self.eval(tokens, "all", logits_all)
            return self.last_logits()
        return self.eval(tokens, "last")

    def decode(self, Sampler sampler, int32_t feed, float[::1] logits, int32_t[::1] out,
               uint64_t[::1] rng_out=None, const int32_t[::1] stop=None):
        """The decode loop in one C call with the GIL released: feed token `feed` (-1: none;
        the first token is drawn from `logits` as given), then draw up to len(out) tokens into
        out, each accepted into the sampler's window and fed back except the last, stopping
        after a token of `stop` or when the context is full. logits (vocab,), in and out: the
        logits the next draw uses. rng_out (len(out),), optional: the sampler's RNG state after
        each token. Returns (n_out, cancelled): cancelled after request_cancel(), with the
        tokens drawn before it in out[:n_out] (the last one not fed)."""
        cdef int64_t n_prompt = 1 if feed >= 0 else 0, n_out = 0, n_stop = 0
        cdef int64_t V = self.engine.m.cfg.vocab_size, max_new = out.shape[0]
        cdef const int32_t *sp = NULL
        cdef uint64_t *rp = NULL
        cdef int32_t fed = feed
        cdef int rc
        if sampler.sp.vocab_size != V:
            raise ValueError("decode: the sampler's vocab size differs from the model's")
        if logits.shape[0] != V:
            raise _shape_error("logits", (logits.shape[0],), (V,))
        if max_new == 0:
            raise ValueError("decode: out is empty")
        if rng_out is not None:
            if rng_out.shape[0] < max_new:
                raise _shape_error("rng_out", (rng_out.shape[0],), (max_new,))
            rp = &rng_out[0]
        if feed >= V:
            raise ValueError(f"decode: token {feed} is not in the vocabulary of {V}")
        if self.seq.n_pos + n_prompt > self.context:
            raise ContextLengthError(f"decode: the context of {self.context} is full")
        if n_prompt == 0 and self.seq.n_pos == 0:
            raise ValueError("decode: an empty session has no logits to sample from")
        if stop is not None and stop.shape[0]:
            sp = &stop[0]
            n_stop = stop.shape[0]
        start = self.seq.n_pos
        self._enter()
        self.cancel_flag = 0
        try:
            with nogil:
                PyThread_acquire_lock(self.pool.lock, WAIT_LOCK)
                rc = l2c_generate(&self.engine.m, &self.s, &self.seq, &sampler.sp, &fed, n_prompt,
                                  &logits[0], &out[0], rp, max_new, sp, n_stop, &n_out)
                PyThread_release_lock(self.pool.lock)
        finally:
            self.busy = False
        self._last = None
        if rc == L2C_ERR_CANCELLED:
            return n_out, True
        _check(rc, "decode")
        return n_out, False


def forward_batch(sessions, token_arrays, logits_modes="last", n_threads=None):
    """One forward pass over several sessions that share one KVPool: session i appends
    token_arrays[i] (decode: one token; prefill: a chunk), all rows going through the model
    together in steps of the pool's max_batch rows (each weight read once per step). logits_modes:
    one of "last", "all", "none" or a list of them (one per session). Returns a list: per session
    the last row's logits (vocab,), every row's (n, vocab), or None. The GIL is released; each
    session's result is bitwise what it would get alone. Raises KVCacheFullError (nothing run)
    when the pool lacks blocks, ContextLengthError when a session's context would overflow,
    GenerationCancelled after pool.request_cancel() (n_tokens of each session tells what ran)."""
    cdef int64_t n = len(sessions), i, total = 0, n_logits = 0, V, off
    cdef Session se
    cdef KVPool pool
    cdef l2c_run *runs = NULL
    cdef const int32_t[::1] tv
    cdef float[:, ::1] lv
    cdef float *lp = NULL
    cdef int rc
    cdef int nth
    if n == 0:
        return []
    if len(token_arrays) != n:
        raise ValueError(f"forward_batch: {n} sessions but {len(token_arrays)} token arrays")
    modes = [logits_modes] * n if isinstance(logits_modes, str) or logits_modes is None else list(logits_modes)
    if len(modes) != n:
        raise ValueError(f"forward_batch: {n} sessions but {len(modes)} logits modes")
    modes = [_logits_mode(m) for m in modes]
    sess = list(sessions)
    for i in range(n):
        if not isinstance(sess[i], Session):
            raise ValueError(f"forward_batch: sessions[{i}] is not a Session")
    pool = (<Session>sess[0]).pool
    if len({id(s) for s in sess}) != n:
        raise ValueError("forward_batch: a session appears twice")
    toks = []
    for i in range(n):
        se = sess[i]
        if se.pool is not pool:
            raise ValueError("forward_batch: all sessions must share one KVPool")
        t = np.asarray(token_arrays[i])
        if t.ndim != 1 or (t.size and not np.issubdtype(t.dtype, np.integer)):
            raise ValueError(f"forward_batch: token_arrays[{i}] must be a 1-D array of token ids")
        if se.seq.n_pos + t.shape[0] > se.context:
            raise ContextLengthError(f"forward_batch: sessions[{i}]: {t.shape[0]} tokens after "
                                     f"{se.seq.n_pos} cached do not fit the context of {se.context}")
        toks.append(t.astype(np.int32, copy=False))
        total += t.shape[0]
        if modes[i] == L2C_LOGITS_ALL:
            n_logits += t.shape[0]
        elif modes[i] == L2C_LOGITS_LAST and t.shape[0] > 0:
            n_logits += 1
    engine = pool.engine
    V = engine.m.cfg.vocab_size
    nth = _nt(n_threads if n_threads is not None else (<Session>sess[0]).s.n_threads)
    flat = np.ascontiguousarray(np.concatenate(toks) if total else np.zeros(1, np.int32), dtype=np.int32)
    tv = flat
    logits = np.empty((max(n_logits, 1), V), dtype=np.float32)
    lv = logits
    if n_logits:
        lp = &lv[0, 0]
    if not pool.has_bs:
        _check(l2c_state_init(&pool.bs, &engine.m, pool.max_batch, nth), "forward_batch")
        pool.has_bs = True
    pool.bs.n_threads = nth
    pool.bs.cancel = &pool.cancel_flag
    runs = <l2c_run *>calloc(n, sizeof(l2c_run))
    if runs == NULL:
        raise MemoryError("forward_batch")
    entered = []
    try:
        for i in range(n):
            se = sess[i]
            se._enter()
            entered.append(se)
            runs[i].seq = &se.seq
            runs[i].n_tokens = toks[i].shape[0]
            runs[i].logits = modes[i]
        starts = [(<Session>s).seq.n_pos for s in sess]
        pool.cancel_flag = 0
        with nogil:
            PyThread_acquire_lock(pool.lock, WAIT_LOCK)
            rc = l2c_forward(&engine.m, &pool.bs, &pool.p, runs, n, &tv[0], lp)
            PyThread_release_lock(pool.lock)
    finally:
        for s in entered:
            (<Session>s).busy = False
        free(runs)
    if rc != L2C_OK:
        for i in range(n):
            se = sess[i]
            if se.seq.n_pos != starts[i]:
                se._last = None
        if rc == L2C_ERR_CANCELLED:
            raise GenerationCancelled("forward_batch: cancelled (each session's n_tokens tells what ran)")
        if rc == L2C_ERR_KVFULL:
            need = sum(l2c_seq_blocks_needed(&(<Session>sess[i]).seq,
                                             (<Session>sess[i]).seq.n_pos + toks[i].shape[0])
                       for i in range(n))
            raise KVCacheFullError(f"forward_batch: the batch needs {need} blocks of "
                                   f"{pool.p.block_size} positions; the pool has {pool.p.n_free} free")
        _check(rc, "forward_batch")
    result = []
    off = 0
    for i in range(n):
        se = sess[i]
        k = toks[i].shape[0]
        if modes[i] == L2C_LOGITS_ALL:
            r = logits[off:off + k]
            off += k
            if k:
                se._last = r[k - 1].copy()
        elif modes[i] == L2C_LOGITS_LAST and k:
            r = logits[off]
            off += 1
            se._last = r.copy()
        else:
            r = None
            if k:
                se._last = None
        result.append(r)
    return result
