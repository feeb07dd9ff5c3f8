# l2c.pxd: the C API of csrc/llama2c.h, declared nogil (the kernels never touch Python).
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint64_t

ctypedef const float[::1] const_float1d
ctypedef const float[:, ::1] const_float2d
ctypedef float[::1] float1d
ctypedef float[:, ::1] float2d
ctypedef const int8_t[:, ::1] const_int8_2d

cdef extern from "llama2c.h" nogil:
    int L2C_OK
    int L2C_ERR_ARG
    int L2C_ERR_NOMEM
    int L2C_ERR_RANGE
    int L2C_ERR_TOKEN
    int L2C_ERR_KVFULL
    int L2C_ERR_CANCELLED
    int L2C_KV_F32
    int L2C_KV_F16
    int L2C_KV_Q8
    int L2C_KV_BLOCK
    int L2C_LOGITS_NONE
    int L2C_LOGITS_LAST
    int L2C_LOGITS_ALL
    int L2C_F32
    int L2C_Q8
    int L2C_Q8P
    int L2C_F32P
    int L2C_Q4P
    int L2C_PANEL
    int L2C_GROUP_MAX
    int L2C_ISA_GENERIC
    int L2C_ISA_AVX2
    int L2C_ISA_AVXVNNI
    int L2C_ISA_AVX512
    int L2C_ISA_COUNT
    int L2C_PEAK_FP32
    int L2C_PEAK_INT8

    ctypedef struct l2c_matrix:
        int32_t type
        int32_t group_size
        int64_t rows
        int64_t cols
        int32_t scales_f16
        const float *f
        const int8_t *q
        const void *s
        const void *m

    ctypedef struct l2c_qact:
        int8_t *hi
        int8_t *lo
        float *s
        int32_t *sum_hi
        int32_t *sum_lo
        int16_t *v16

    ctypedef struct l2c_mm:
        float *out
        const float *x
        const l2c_qact *a
        const l2c_matrix *W

    ctypedef struct l2c_kvpool:
        int32_t kdtype, vdtype
        int64_t block_size
        int64_t n_layers
        int64_t n_kv_heads
        int64_t head_size
        int64_t slab_bytes
        int64_t block_bytes
        int64_t n_blocks
        int64_t n_free

    ctypedef struct l2c_seq:
        l2c_kvpool *pool
        int64_t n_pos
        int64_t max_pos
        int64_t n_blocks
        int32_t *blocks

    ctypedef struct l2c_span:
        const int32_t *blocks
        int64_t pos0
        int64_t row0
        int64_t n

    ctypedef struct l2c_kernels:
        const char *name
        int isa
        void (*quantize)(const l2c_qact *a, const float *x, int64_t T, int64_t n, int64_t gs, int n_threads) noexcept nogil
        void (*matmul)(const l2c_mm *jobs, int n_jobs, int64_t T, int n_threads) noexcept nogil
        void (*rmsnorm)(float *o, const float *x, const float *w, int64_t T, int64_t n, float eps, int n_threads) noexcept nogil
        void (*softmax)(float *x, int64_t n) noexcept nogil
        void (*rope)(float *x, const int64_t *pos, const float *cos_t, const float *sin_t, int64_t T,
                     int64_t n_heads, int64_t head_size, int n_threads) noexcept nogil
        void (*swiglu)(float *hb, const float *hb2, int64_t T, int64_t n, int n_threads) noexcept nogil
        void (*add)(float *x, const float *y, int64_t n, int n_threads) noexcept nogil
        void (*kv_store)(const l2c_kvpool *pool, int64_t layer, const l2c_span *spans, int64_t n_spans,
                         const float *k, const float *v, int n_threads) noexcept nogil
        void (*attention)(float *out, const float *q, const l2c_kvpool *pool, int64_t layer,
                          const l2c_span *spans, int64_t n_spans, int64_t n_heads, void *ws,
                          int n_threads) noexcept nogil
        float (*read_sum)(const float *x, int64_t n, int n_threads) noexcept nogil
        double (*peak)(int kind, int64_t reps, int n_threads) noexcept nogil

    int64_t l2c_packed_size(int32_t type, int64_t rows, int64_t cols)
    int64_t l2c_packed_scales(int64_t rows, int64_t cols, int64_t gs)
    int l2c_f16_exact(const float *x, int64_t n)
    int l2c_pack_f32p(float *fp, const float *w, int64_t rows, int64_t cols, int n_threads)
    int l2c_pack_q8p(int8_t *qp, void *sp, void *mp, const int8_t *q, const float *s,
                     const float *m, int64_t rows, int64_t cols, int64_t gs, int f16, int n_threads)
    int l2c_pack_q4p(int8_t *qp, void *sp, void *mp, const uint8_t *q, const float *s,
                     const float *m, int64_t rows, int64_t cols, int64_t gs, int f16, int n_threads)
    int l2c_matrix_row(float *x, const l2c_matrix *W, int64_t row)
    int l2c_matrix_ok(const l2c_matrix *W, int64_t rows, int64_t cols, int for_matmul)

    const l2c_kernels *l2c_kernels_get(int max_isa)
    const l2c_kernels *l2c_kernels_exact(int isa)
    int l2c_cpu_supports(int isa)
    int l2c_openmp_enabled()
    int l2c_omp_max_threads()
    int l2c_release_threads()

    ctypedef struct l2c_config:
        int64_t dim
        int64_t hidden_dim
        int64_t n_layers
        int64_t n_heads
        int64_t n_kv_heads
        int64_t head_size
        int64_t vocab_size
        int64_t seq_len
        float norm_eps
        int32_t act_bits

    ctypedef struct l2c_layer:
        const float *rms_att
        const float *rms_ffn
        l2c_matrix wq
        l2c_matrix wk
        l2c_matrix wv
        l2c_matrix wo
        l2c_matrix w1
        l2c_matrix w2
        l2c_matrix w3
        const float *bq
        const float *bk
        const float *bv

    ctypedef struct l2c_model:
        l2c_config cfg
        l2c_matrix tok_embeddings
        const l2c_layer *layers
        const float *rms_final
        l2c_matrix wcls
        const double *rope_freq
        const l2c_kernels *k

    int l2c_model_check(const l2c_model *m)

    int64_t l2c_kv_block_bytes(int64_t n_layers, int64_t n_kv_heads, int64_t head_size,
                               int32_t kdtype, int32_t vdtype, int64_t block_size)
    int l2c_kvpool_init(l2c_kvpool *p, int64_t n_layers, int64_t n_kv_heads, int64_t head_size,
                        int32_t kdtype, int32_t vdtype, int64_t block_size, int64_t n_blocks)
    void l2c_kvpool_free(l2c_kvpool *p)
    int l2c_seq_init(l2c_seq *s, l2c_kvpool *p, int64_t max_pos)
    void l2c_seq_free(l2c_seq *s)
    int64_t l2c_seq_blocks_needed(const l2c_seq *s, int64_t n_pos)
    int l2c_seq_reserve(l2c_seq *s, int64_t n_pos)
    int l2c_seq_truncate(l2c_seq *s, int64_t n)
    int64_t l2c_seq_state_bytes(const l2c_kvpool *p, int64_t n)
    int l2c_seq_export(const l2c_seq *s, int64_t n, void *dst)
    int l2c_seq_import(l2c_seq *s, int64_t n, const void *src)
    int l2c_seq_read(const l2c_seq *s, int64_t layer, int64_t head, int64_t pos, float *k, float *v)
    int64_t l2c_attention_ws_bytes(const l2c_kvpool *pool, const l2c_span *spans, int64_t n_spans,
                                   int64_t n_heads, int n_threads)

    ctypedef struct l2c_state:
        int64_t max_batch
        int n_threads
        const volatile int32_t *cancel

    int l2c_state_init(l2c_state *s, const l2c_model *m, int64_t max_batch, int n_threads)
    void l2c_state_free(l2c_state *s)

    ctypedef struct l2c_run:
        l2c_seq *seq
        int64_t n_tokens
        int32_t logits

    int l2c_forward(const l2c_model *m, l2c_state *s, l2c_kvpool *pool, const l2c_run *runs,
                    int64_t n_runs, const int32_t *tokens, float *logits)

    ctypedef struct l2c_sampler_params:
        float temperature
        float top_p
        float min_p
        int64_t top_k
        float repetition_penalty
        float presence_penalty
        float frequency_penalty
        int64_t penalty_last_n

    ctypedef struct l2c_sampler:
        int64_t vocab_size
        l2c_sampler_params p
        uint64_t rng_state
        int64_t window_len
        const l2c_kernels *k

    void l2c_sampler_params_default(l2c_sampler_params *p)
    int l2c_sampler_init(l2c_sampler *sp, int64_t vocab_size, const l2c_sampler_params *p, uint64_t seed)
    void l2c_sampler_free(l2c_sampler *sp)
    void l2c_sampler_set_kernels(l2c_sampler *sp, const l2c_kernels *k)
    int l2c_sampler_set_bias(l2c_sampler *sp, const int32_t *ids, const float *bias, int64_t n)
    int l2c_sampler_accept(l2c_sampler *sp, int32_t token)
    void l2c_sampler_reset_window(l2c_sampler *sp)
    int32_t l2c_sample(l2c_sampler *sp, const float *logits)
    float l2c_random_f32(uint64_t *state)
    uint64_t l2c_seed_state(uint64_t seed)
    int l2c_logprobs(float *token_lp, int32_t *top_ids, float *top_lp, const float *logits,
                     int64_t n, int32_t token, int64_t k, float *work, int32_t *scratch)
    int l2c_generate(const l2c_model *m, l2c_state *s, l2c_seq *seq, l2c_sampler *sp,
                     const int32_t *prompt, int64_t n_prompt, float *logits, int32_t *out,
                     uint64_t *rng_out, int64_t max_new, const int32_t *stop, int64_t n_stop,
                     int64_t *n_out)
    double l2c_read_bandwidth(int64_t bytes, int reps, int n_threads)
