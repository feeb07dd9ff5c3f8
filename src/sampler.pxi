# sampler.pxi: part of llama2c._engine (included by _engine.pyx; one file per concern so that the
# kernels, weights, model/session and sampler bindings change independently).
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


