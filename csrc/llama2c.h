// llama2c.h: the one public C header of llama2c's engine (kernels, forward pass, sampler).
//
// Conventions (after llama2.c and ggml):
//   - every public symbol is prefixed l2c_; everything else is static;
//   - kernels take the output first, const/restrict inputs, int64_t sizes and offsets;
//   - nothing here prints or exits: functions return L2C_OK (0) or a negative status code;
//   - no mutable globals: a model, its per-session state and its sampler are separate objects,
//     the kernel table is chosen per model, so two models (or sessions) live in one process.
#ifndef LLAMA2C_H
#define LLAMA2C_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// ---------------------------------------------------------------------------------------------
// status codes
#define L2C_OK 0
#define L2C_ERR_ARG (-1)      // bad argument (size, null pointer, unsupported type)
#define L2C_ERR_NOMEM (-2)    // allocation failed
#define L2C_ERR_RANGE (-3)    // position / token id / length out of range
#define L2C_ERR_TOKEN (-4)    // a token id outside [0, vocab_size)

// ---------------------------------------------------------------------------------------------
// weight matrices
//
// A matrix W (rows, cols) is used as out = X @ W^T (X: T activation rows of cols values). Types:
//   L2C_F32   row-major fp32 (rows, cols), e.g. an untied embedding used in place. Lookups only.
//   L2C_Q8    row-major int8 q (rows, cols) + float scales s (rows, cols/gs) [+ offsets m], as
//             llama2.c version 2 files store it. Lookups only.
//   L2C_F32P  fp32 in panels of 16 rows, k-major inside a panel (matmul + lookups):
//               f[(p*cols + k)*16 + r] = W[16p + r][k]          (rows past the end: 0)
//             so one 64-byte load holds column k of 16 rows: the outer-product kernels load it
//             once and multiply it by a broadcast activation x[t][k] for several tokens t.
//   L2C_Q8P   int8 in blocks of 16 rows (matmul + lookups). For each group g and each run of 4
//             inputs j, the 4 bytes of each of the 16 rows side by side, offset by 128 (u8):
//               q[((b*ng + g)*(gs/4) + j)*64 + r*4 + c] = (uint8)(Q[16b + r][g*gs + 4j + c] + 128)
//             (ng = cols/gs), so one 64-byte load feeds a 16-lane u8 x s8 dot instruction
//             (vpdpbusd: 16 rows x 4 inputs) with 4 activation bytes broadcast; the +128 adds
//             128 * sum(x over the group) to each lane, which the kernels take off (the
//             activation quantizer returns the group sums). Values Q in [-127, 127].
//   L2C_Q4P   4-bit unsigned Q in [0, 15], two per byte, blocks of 16 rows (matmul + lookups):
//               q[((b*ng + g)*(gs/8) + j)*64 + r*4 + c] = Q[16b + r][g*gs + 8j + c]
//                                                       | Q[16b + r][g*gs + 8j + 4 + c] << 4
//             so one 64-byte load, masked (low nibbles) and shifted (high nibbles), gives two
//             Q8P-shaped vectors (inputs 8j..8j+3 and 8j+4..8j+7 of 16 rows); the nibble is the
//             unsigned operand of vpdpbusd / vpmaddubsw as it is (no offset).
// Quantized types: w = Q * s + m per group of gs consecutive inputs of a row (m = 0 when there
// are no offsets). Packed types store s and m per (block, group) for the block's 16 rows:
//   s[(b*ng + g)*16 + r] = S[16b + r][g]              (m likewise; rows past the end: 0)
// as IEEE halves when every scale and offset of the matrix is exactly a half (GGUF Q8_0,
// Q4_0, Q4_1, Q5_x blocks), else as floats (scales_f16 says which). Group sizes: multiples of
// 4 (L2C_Q8, L2C_Q8P) or 8 (L2C_Q4P), at most 256, dividing cols; one model may mix them.
// Every type serves row lookups (l2c_matrix_row), so a tied classifier is packed once and the
// token embedding reads its rows from it.
#define L2C_F32 0
#define L2C_Q8 1
#define L2C_Q8P 2
#define L2C_F32P 3
#define L2C_Q4P 4
#define L2C_PANEL 16          // rows per panel / block of the packed types
#define L2C_Q8_ROWS L2C_PANEL
#define L2C_Q8_MAX 127.0f
#define L2C_GROUP_MAX 256

typedef struct {
    int32_t type;        // L2C_F32, L2C_Q8, L2C_F32P, L2C_Q8P or L2C_Q4P
    int32_t group_size;  // quantized types: inputs per scale
    int64_t rows, cols;
    int32_t scales_f16;  // quantized packed types: s and m hold halves (1) or floats (0)
    const float *f;      // L2C_F32: (rows, cols); L2C_F32P: panels (l2c_packed_size floats)
    const int8_t *q;     // L2C_Q8: (rows, cols); L2C_Q8P, L2C_Q4P: l2c_packed_size bytes
    const void *s;       // scales: L2C_Q8 float (rows, cols/gs); packed: l2c_packed_scales
    const void *m;       // NULL, or per-group offsets laid out as s: w = q * s + m
} l2c_matrix;

// Elements of the packed data array of `type` (floats for L2C_F32P, bytes for L2C_Q8P and
// L2C_Q4P), and of its scale (and offset) arrays; -1 for a bad type or size.
int64_t l2c_packed_size(int32_t type, int64_t rows, int64_t cols);
int64_t l2c_packed_scales(int64_t rows, int64_t cols, int64_t gs);
// 1 if every x[i] is exactly an IEEE half (NaN: no), else 0.
int l2c_f16_exact(const float *x, int64_t n);
// Pack row-major weights into the types above (arrays sized as above, zero padding written
// here). s, m: float (rows, cols/gs) (m NULL: no offsets, then mp NULL too); f16: store the
// scales (and offsets) as halves (only when l2c_f16_exact says so for both). Q4P takes q as one
// value 0..15 per byte. L2C_OK, or L2C_ERR_ARG (bad size or group size, or a 4-bit value
// above 15). Parallel over blocks with n_threads.
int l2c_pack_f32p(float *restrict fp, const float *restrict w, int64_t rows, int64_t cols,
                  int n_threads);
int l2c_pack_q8p(int8_t *restrict qp, void *restrict sp, void *restrict mp,
                 const int8_t *restrict q, const float *restrict s, const float *restrict m,
                 int64_t rows, int64_t cols, int64_t gs, int f16, int n_threads);
int l2c_pack_q4p(int8_t *restrict qp, void *restrict sp, void *restrict mp,
                 const uint8_t *restrict q, const float *restrict s, const float *restrict m,
                 int64_t rows, int64_t cols, int64_t gs, int f16, int n_threads);
// x (cols,) = row `row` of W, dequantized (q * s + m in float32), for every type.
// L2C_OK or L2C_ERR_ARG / L2C_ERR_RANGE.
int l2c_matrix_row(float *restrict x, const l2c_matrix *W, int64_t row);
// 1 if W is a well-formed (rows, cols) matrix: pointers, group size and scale storage for its
// type; with for_matmul, only the packed types (the matmul reads nothing else).
int l2c_matrix_ok(const l2c_matrix *W, int64_t rows, int64_t cols, int for_matmul);

// Quantized activations, T rows of n values in groups of gs (n/gs groups per row). 8-bit:
// hi = round(x / s) with s = max|x| / 127. Two-plane ("15-bit"): v = round(x / s) with
// s = max|x| / (127 * 128), split as v = 128 * hi + lo, hi = round(v / 128) in [-127, 127],
// lo in [-64, 64]; each plane is an int8 operand of the same dot instructions, so the
// activations keep 128x finer steps for twice the integer work (decode stays memory-bound).
// v16 holds the codes as int16 (hi, or 128 hi + lo) for kernels that multiply int16 pairs
// (vpmaddwd: the avx2 table's int8 matmul).
typedef struct {
    int8_t *hi;          // (T, n)
    int8_t *lo;          // (T, n), NULL for 8-bit activations
    float *s;            // (T, n/gs) scales
    int32_t *sum_hi;     // (T, n/gs) sums of hi over each group
    int32_t *sum_lo;     // (T, n/gs) sums of lo (NULL for 8-bit)
    int16_t *v16;        // (T, n) the codes as int16
} l2c_qact;

// ---------------------------------------------------------------------------------------------
// kernels: one table per instruction set, each entry a scalar ("generic") twin in the generic
// table. Chosen at run time from the CPU's features (see l2c_kernels_get).
//
// The invariant every table keeps: out[t][i] of a matmul depends only on row t of the input
// and row i of W, bitwise, whatever T, t's place in a tile and n_threads (threads split output
// rows, never a sum). fp32: each output is one fused multiply-add chain over k = 0..cols-1 in
// order; int8/4-bit: exact int32 sums per group, then the group's float terms added in group
// order. So a token's logits are the same alone, in a prefill chunk or in a batch.
#define L2C_ISA_GENERIC 0
#define L2C_ISA_AVX2 1      // AVX2 + FMA + F16C
#define L2C_ISA_AVXVNNI 2   // AVX2 + FMA + F16C + AVX-VNNI (vpdpbusd on ymm: Alder Lake, Zen 5)
#define L2C_ISA_AVX512 3    // AVX-512 F/BW/VL + VNNI (Ice Lake, Zen 4 and later)
#define L2C_ISA_COUNT 4

#define L2C_PEAK_FP32 0     // peak probe kinds: fp32 FMA chains (2 flops per lane)
#define L2C_PEAK_INT8 1     // the table's int8 dot (2 ops per multiply-add)

typedef struct l2c_kernels {
    const char *name;
    int isa;
    // quantize X (T, n) row-wise into groups of gs (8-bit, or two planes when a->lo is set);
    // fills hi (lo), s, sums and v16                                    [parallel over groups]
    void (*quantize)(const l2c_qact *a, const float *restrict x, int64_t T, int64_t n,
                     int64_t gs, int n_threads);
    // out (T, W->rows) = X (T, W->cols) @ W^T for a packed W: L2C_F32P reads x (T, cols)
    // float, L2C_Q8P and L2C_Q4P read a (x quantized at W's group size). T == 1 is the decode
    // matrix-vector product.                                            [parallel over rows]
    void (*matmul)(float *restrict out, const float *restrict x, const l2c_qact *a,
                   const l2c_matrix *W, int64_t T, int n_threads);
    // o (T, n) = x * w / sqrt(mean(x^2) + eps), row-wise                [parallel over rows]
    void (*rmsnorm)(float *restrict o, const float *restrict x, const float *restrict w,
                    int64_t T, int64_t n, float eps, int n_threads);
    // in-place softmax of x (n,)
    void (*softmax)(float *x, int64_t n);
    // in-place rotary embedding of x (T, n_heads*head_size) at positions pos[T], using the
    // interleaved-pair convention: pairs (x[2i], x[2i+1]) of each head rotated by
    // angle pos * freq[i]; cos/sin come from tables (max_pos, head_size/2).
    void (*rope)(float *restrict x, const int64_t *restrict pos, const float *restrict cos_t,
                 const float *restrict sin_t, int64_t T, int64_t n_heads, int64_t head_size,
                 int n_threads);
    // hb (T*n) = silu(hb) * hb2, elementwise                              [parallel over chunks]
    void (*swiglu)(float *restrict hb, const float *restrict hb2, int64_t n, int n_threads);
    // x += y, elementwise (residual)
    void (*add)(float *restrict x, const float *restrict y, int64_t n, int n_threads);
    // causal grouped-query attention for T query rows at positions pos0..pos0+T-1:
    //   q (T, n_heads*hs), keys/values of this layer kc/vc (max_pos, n_kv_heads*hs) already
    //   hold positions 0..pos0+T-1; out (T, n_heads*hs); att scratch (T*n_heads, att_stride)
    //   with att_stride >= pos0+T.                                  [parallel over (t, head)]
    void (*attention)(float *restrict out, float *restrict att, const float *restrict q,
                      const float *restrict kc, const float *restrict vc, int64_t T, int64_t pos0,
                      int64_t n_heads, int64_t n_kv_heads, int64_t hs, int64_t att_stride,
                      int n_threads);
    // sum of x (n,) read in 64 KB chunks shared by the threads (the bandwidth probe)
    float (*read_sum)(const float *restrict x, int64_t n, int n_threads);
    // the peak probe: `reps` rounds of independent dependency chains of the table's fp32 FMA
    // (kind L2C_PEAK_FP32) or int8 dot instruction (L2C_PEAK_INT8) on each of n_threads
    // threads; returns the operations done (the caller times it)
    double (*peak)(int kind, int64_t reps, int n_threads);
} l2c_kernels;

// The best table this CPU supports, capped at max_isa (use L2C_ISA_COUNT for no cap).
const l2c_kernels *l2c_kernels_get(int max_isa);
// The table for exactly this isa, or NULL if the CPU (or the build) cannot run it.
const l2c_kernels *l2c_kernels_exact(int isa);
// 1 if the CPU supports isa (and the build has it), else 0.
int l2c_cpu_supports(int isa);
// 1 if built with OpenMP; number of processors OpenMP would use by default.
int l2c_openmp_enabled(void);
int l2c_omp_max_threads(void);

// ---------------------------------------------------------------------------------------------
// model

typedef struct {
    int64_t dim;          // transformer width
    int64_t hidden_dim;   // FFN width
    int64_t n_layers;
    int64_t n_heads;
    int64_t n_kv_heads;   // < n_heads: grouped-query attention
    int64_t head_size;
    int64_t vocab_size;
    int64_t seq_len;      // positions the RoPE tables cover (the most a state can hold)
    float norm_eps;       // RMSNorm epsilon
    int32_t act_bits;     // activations of int8 matmuls: 8, or 16 (two planes, see l2c_qact)
} l2c_config;

// layer matrices are packed: L2C_F32P, L2C_Q8P or L2C_Q4P (any mix)
typedef struct {
    const float *rms_att;   // (dim,)
    const float *rms_ffn;   // (dim,)
    l2c_matrix wq;          // (n_heads*hs, dim)
    l2c_matrix wk;          // (n_kv_heads*hs, dim)
    l2c_matrix wv;          // (n_kv_heads*hs, dim)
    l2c_matrix wo;          // (dim, n_heads*hs)
    l2c_matrix w1;          // (hidden_dim, dim)
    l2c_matrix w2;          // (dim, hidden_dim)
    l2c_matrix w3;          // (hidden_dim, dim)
} l2c_layer;

typedef struct {
    l2c_config cfg;
    l2c_matrix tok_embeddings;  // (vocab_size, dim), any type (row lookups); a copy of wcls
                                //   when the classifier is tied
    const l2c_layer *layers;    // (n_layers,) owned by the caller
    const float *rms_final;     // (dim,)
    l2c_matrix wcls;            // (vocab_size, dim): the classifier, packed
    const float *rope_cos;      // (seq_len, head_size/2): cos(p * freq[i]); the caller computes
    const float *rope_sin;      // (seq_len, head_size/2)   the frequencies (theta, scaling)
    const l2c_kernels *k;       // kernel table
} l2c_model;


// Check shapes, types and pointers of a filled-in model. L2C_OK or L2C_ERR_ARG.
int l2c_model_check(const l2c_model *m);

// The input of one or more matrices: a float activation x (T, n) and, for the int8 matrices
// that read it, x quantized once per group size they use (runq.c: quantize once, reuse for
// q/k/v and w1/w3). The forward pass sets an input explicitly at the stage that produces it,
// with the matrices that will read it, then runs each of them on it (csrc/internal.h).
#define L2C_INPUT_VARIANTS 4   // distinct group sizes among one input's readers

typedef struct {
    const float *x;                      // (T, n), the caller's
    int64_t T, n;
    int n_variants;
    int64_t gs[L2C_INPUT_VARIANTS];      // group size of each quantized variant
    l2c_qact q[L2C_INPUT_VARIANTS];      // x quantized at gs[i], (T, n) each
    int64_t max_rows, max_n;             // capacity
} l2c_input;

// Mutable per-session buffers: activations for up to max_batch tokens and the KV cache.
typedef struct {
    int64_t max_batch;   // tokens per forward chunk (prefill)
    int64_t seq_len;     // positions the KV cache holds
    int64_t dim, hidden_dim, q_dim, kv_dim, vocab_size, n_layers, n_heads;
    int n_threads;
    float *x;            // (max_batch, dim)   residual stream
    float *xb;           // (max_batch, max(dim, q_dim))
    float *xb2;          // (max_batch, dim)
    float *hb;           // (max_batch, hidden_dim)
    float *hb2;          // (max_batch, hidden_dim)
    float *q;            // (max_batch, q_dim)
    float *att;          // (max_batch * n_heads, seq_len)
    float *logits;       // (vocab_size,)      logits of the last token of the last forward
    float *key_cache;    // (n_layers, seq_len, kv_dim)
    float *value_cache;  // (n_layers, seq_len, kv_dim)
    l2c_input in;        // the current matrix input, quantized (see l2c_input)
    int64_t *pos;        // (max_batch,)
} l2c_state;

int l2c_state_init(l2c_state *s, const l2c_model *m, int64_t max_batch, int64_t seq_len,
                   int n_threads);
void l2c_state_free(l2c_state *s);

// Run the transformer on tokens[0..n) at positions pos0..pos0+n-1, filling the KV cache.
// n == 1 uses the matrix-vector kernels; n > 1 runs chunks of up to max_batch tokens through
// the batched (matrix-matrix) kernels. If logits_all != NULL it receives (n, vocab_size) logits;
// the last token's logits are always left in s->logits.
int l2c_forward(const l2c_model *m, l2c_state *s, const int32_t *tokens, int64_t n,
                int64_t pos0, float *logits_all);

// ---------------------------------------------------------------------------------------------
// sampler

typedef struct {
    int64_t vocab_size;
    float temperature;   // 0 = greedy (argmax)
    float top_p;         // nucleus; >= 1 or <= 0 disables
    int64_t top_k;       // <= 0 or >= vocab disables
    uint64_t rng_state;  // xorshift64* state, never 0
    float *probs;        // (vocab_size,) scratch
    int32_t *idx;        // (vocab_size,) scratch
} l2c_sampler;

int l2c_sampler_init(l2c_sampler *sp, int64_t vocab_size, float temperature, float top_p,
                     int64_t top_k, uint64_t seed);
void l2c_sampler_free(l2c_sampler *sp);
// Pick the next token from logits (vocab_size,); logits are not modified.
int32_t l2c_sample(l2c_sampler *sp, const float *logits);
float l2c_random_f32(uint64_t *state);

// Run prompt (prefill, if n_prompt > 0) then sample up to max_new tokens, each fed back,
// stopping after a token in stop[0..n_stop). out receives the generated ids, *n_out their
// count. pos0 is the position of prompt[0] (the KV cache before it is kept: multi-turn).
// If n_prompt == 0 the first token is sampled from s->logits (a previous forward).
int l2c_generate(const l2c_model *m, l2c_state *s, l2c_sampler *sp, const int32_t *prompt,
                 int64_t n_prompt, int64_t pos0, int32_t *out, int64_t max_new,
                 const int32_t *stop, int64_t n_stop, int64_t *n_out);

// Memory bandwidth probe: best of `reps` reads of a `bytes` buffer with n_threads and the best
// kernel table's widest loads; returns GB/s (or -1 if the buffer cannot be allocated).
double l2c_read_bandwidth(int64_t bytes, int reps, int n_threads);

#ifdef __cplusplus
}
#endif
#endif  // LLAMA2C_H
