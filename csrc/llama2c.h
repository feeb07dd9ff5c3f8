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
#define L2C_ERR_KVFULL (-5)   // the KV pool has too few free blocks (nothing was changed)
#define L2C_ERR_CANCELLED (-6) // l2c_forward stopped between steps (*l2c_state.cancel was set)

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

struct l2c_kvpool;
struct l2c_span;

// one product of a matmul call: out (T, W->rows) = X (T, W->cols) @ W^T for a packed W;
// L2C_F32P reads x (T, cols) float, L2C_Q8P and L2C_Q4P read a (x quantized at W's group size)
typedef struct l2c_mm {
    float *out;
    const float *x;
    const l2c_qact *a;
    const l2c_matrix *W;
} l2c_mm;

// ---- a team: the threads of one parallel region running a decode step together ----------------
// l2c_forward runs a step of decode rows (a few rows, no prefill chunk) inside one parallel
// region: thread 0 runs the row-wise steps, and every thread calls the table's matmul_team and
// attention_team with the same arguments, which split the work among the team; the threads
// meet at the team's spinning barrier (l2c_team_barrier), where a fork and join of a libgomp
// region per matrix costs about 1.5 us and wakes threads with futex calls.
#define L2C_TEAM_MAX 64
typedef struct l2c_share {
    _Alignas(64) uint64_t fb;  // the items [front, back) not taken yet: front | back << 32
} l2c_share;
typedef struct l2c_team_state {
    _Alignas(64) int arrived;  // threads at the barrier
    _Alignas(64) int gen;      // barriers passed
    l2c_share sh[L2C_TEAM_MAX];  // each thread's share of the current matmul or attention
} l2c_team_state;
typedef struct l2c_team {
    int id, n;  // this thread, the team's size
    l2c_team_state *st;
} l2c_team;
// every thread of the team waits here until all have come (spinning, then yielding the core)
void l2c_team_barrier(const l2c_team *tm);

typedef struct l2c_kernels {
    const char *name;
    int isa;
    // quantize X (T, n) row-wise into groups of gs (8-bit, or two planes when a->lo is set);
    // fills hi (lo), s, sums and v16                                    [parallel over groups]
    void (*quantize)(const l2c_qact *a, const float *restrict x, int64_t T, int64_t n,
                     int64_t gs, int n_threads);
    // the n_jobs products of jobs (see l2c_mm), each over T rows, in one parallel region: the
    // threads split the blocks of all of them, in order, by weight bytes (T == 1: decode reads
    // them as one stream per thread) or by multiply-adds. T == 1 is the decode
    // matrix-vector product.                                    [parallel over rows of all]
    void (*matmul)(const l2c_mm *jobs, int n_jobs, int64_t T, int n_threads);
    // the same, called by every thread of a team (the same arguments; the inputs ready, e.g.
    // after a barrier): each takes its share and then the others' leftovers; the outputs are
    // complete once all have returned (the caller's next barrier)
    void (*matmul_team)(const l2c_mm *jobs, int n_jobs, int64_t T, const l2c_team *tm);
    // o (T, n) = x * w / sqrt(mean(x^2) + eps), row-wise                [parallel over rows]
    void (*rmsnorm)(float *restrict o, const float *restrict x, const float *restrict w,
                    int64_t T, int64_t n, float eps, int n_threads);
    // in-place softmax of x (n,)
    void (*softmax)(float *x, int64_t n);
    // in-place rotary embedding of x (T, n_heads*head_size) at positions pos[T], using the
    // interleaved-pair convention: pairs (x[2i], x[2i+1]) of each head rotated by
    // angle pos * freq[i]; cos/sin come from tables (positions, head_size/2), row pos[t] for
    // row t, or row t itself when pos is NULL (tables of just these rows' angles).
    void (*rope)(float *restrict x, const int64_t *restrict pos, const float *restrict cos_t,
                 const float *restrict sin_t, int64_t T, int64_t n_heads, int64_t head_size,
                 int n_threads);
    // hb (T, n) = silu(hb) * hb2, row-wise                              [parallel over rows]
    void (*swiglu)(float *restrict hb, const float *restrict hb2, int64_t T, int64_t n,
                   int n_threads);
    // x += y, elementwise (residual)
    void (*add)(float *restrict x, const float *restrict y, int64_t n, int n_threads);
    // write the keys k and values v (rows of the spans, (T, n_kv_heads*head_size) each) of one
    // layer into the pool at each row's sequence position, in the pool's element type
    void (*kv_store)(const struct l2c_kvpool *pool, int64_t layer, const struct l2c_span *spans,
                     int64_t n_spans, const float *restrict k, const float *restrict v,
                     int n_threads);
    // causal grouped-query attention of the rows of the spans over their sequences' cached
    // keys and values of one layer (which already hold the rows' own positions):
    //   q, out (T, n_heads*head_size); ws: l2c_attention_ws_bytes(...) bytes, 64-byte aligned.
    // The result of a row is the canonical block-partial merge (see "attention" below), the
    // same bits whatever the other rows, the spans' split and n_threads.
    //   [parallel over (row tile, kv head) and, for decode rows, (row, kv head, block)]
    void (*attention)(float *restrict out, const float *restrict q, const struct l2c_kvpool *pool,
                      int64_t layer, const struct l2c_span *spans, int64_t n_spans,
                      int64_t n_heads, void *ws, int n_threads);
    // the same for a team of decode rows (spans of at most L2C_ATT_SPLIT_ROWS rows): every
    // thread calls it; thread 0 lays out the work, the team meets at a barrier inside, then
    // splits it; the output is complete once all have returned (the caller's next barrier)
    void (*attention_team)(float *restrict out, const float *restrict q,
                           const struct l2c_kvpool *pool, int64_t layer,
                           const struct l2c_span *spans, int64_t n_spans, int64_t n_heads,
                           void *ws, const l2c_team *tm);
    // sum of x (n,) read in 64 KB chunks shared by the threads (the bandwidth probe)
    float (*read_sum)(const float *restrict x, int64_t n, int n_threads);
    // the peak probe: `reps` rounds of independent dependency chains of the table's fp32 FMA
    // (kind L2C_PEAK_FP32) or int8 dot instruction (L2C_PEAK_INT8) on each of n_threads
    // threads; returns the operations done (the caller times it)
    double (*peak)(int kind, int64_t reps, int n_threads);
    // the sampler's passes over the vocabulary (csrc/sample_ops.c; every table computes the
    // same bits): max of v (n,) ignoring NaNs; p = exp((l - mx) * inv_t) (0 below expf's range,
    // NaN as -inf); the sum of p in float64 by blocks of L2C_SAMPLER_BLOCK (block sums into
    // block_sum, may be NULL); the ids i with p[i] >= thr, ascending, into ids (returns count)
    float (*vocab_max)(const float *restrict v, int64_t n);
    void (*vocab_exp)(float *restrict p, const float *restrict l, int64_t n, float mx,
                      float inv_t);
    double (*vocab_sum)(double *restrict block_sum, const float *restrict p, int64_t n);
    int64_t (*vocab_select)(int32_t *restrict ids, const float *restrict p, int64_t n,
                            float thr);
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
// End the calling thread's OpenMP worker threads (they are started again by its next parallel
// region). libgomp counts the workers of every thread that ever ran a parallel region, and once
// they outnumber the cores it stops spinning between regions (each region then waits for a
// wake-up: 3-4x slower decode); so a thread that hands the engine to another one releases its
// own. 1 if released, 0 if the OpenMP runtime cannot (or there is none).
int l2c_release_threads(void);

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
    int64_t seq_len;      // positions the RoPE tables cover (the most a sequence can hold)
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
    const float *bq;        // (n_heads*hs,) or NULL: q = wq(x) + bq (qwen2)
    const float *bk;        // (n_kv_heads*hs,) or NULL
    const float *bv;        // (n_kv_heads*hs,) or NULL
} l2c_layer;

typedef struct {
    l2c_config cfg;
    l2c_matrix tok_embeddings;  // (vocab_size, dim), any type (row lookups); a copy of wcls
                                //   when the classifier is tied
    const l2c_layer *layers;    // (n_layers,) owned by the caller
    const float *rms_final;     // (dim,)
    l2c_matrix wcls;            // (vocab_size, dim): the classifier, packed
    const double *rope_freq;    // (head_size/2,): pair i turns by p * rope_freq[i] at position p
                                //   (the caller computes them: theta, scaling); cos and sin
                                //   of each row's angles are computed in double per step, so
                                //   no table of the whole context is held
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

// ---------------------------------------------------------------------------------------------
// KV cache: a pool of fixed-size blocks; a sequence is a block table
//
// A block holds P = block_size consecutive positions (P a multiple of 16) of every layer and
// kv head. Position p of a sequence lives in block blocks[p / P], row r = p % P; blocks are
// aligned to absolute positions 0, P, 2P, ... (the attention's canonical partials, below).
// Inside a block, one "slab" per (layer l, kv head h), at byte offset
// (l * n_kv_heads + h) * slab_bytes, holds (hs = head_size; EK, EV = the element types of the
// keys and of the values, which may differ):
//     K^T [P/16][hs][16]  EK  keys transposed in panels of 16 rows: dimension d of the key at
//                      row r is element (r/16)*16*hs + d*16 + r%16, so the scores of 16
//                      positions are sums of (broadcast q[d]) x (one vector), and a panel
//                      is read front to back
//     V   [P][hs]  EV  values row-major: element r*hs + d
//     ks [P] float     key scales, x = q * scale (EK = L2C_KV_Q8 only)
//     vs [P] float     value scales (EV = L2C_KV_Q8 only)
// slab_bytes = hs*P*(sizeof(EK) + sizeof(EV)) (+ 4*P per Q8 half), rounded up to 64;
// block_bytes = n_layers * n_kv_heads * slab_bytes. Element types:
//   L2C_KV_F32   float
//   L2C_KV_F16   IEEE binary16, rounded to nearest even (F16C / AVX-512 conversions; the generic
//                table converts in software, bit for bit the same)
//   L2C_KV_Q8    int8 with one float scale per (position, kv head) for keys and one for values:
//                s = max|x| / 127 (0 for an all-zero row), q = round_half_even(x / s)
// The pool's memory is reserved at creation (calloc, or on Linux a mapping marked for
// transparent huge pages), so pages are touched only as blocks fill;
// free blocks sit on a stack (the most recently freed is reused first). Not thread-safe: one
// l2c_forward (or reserve/truncate) at a time per pool.
#define L2C_KV_F32 0
#define L2C_KV_F16 1
#define L2C_KV_Q8 2
#define L2C_KV_BLOCK 64          // default positions per block (decode at 4k tokens, SmolLM2:
                                 // 32 was ~15% slower, 128 no faster and wastes more per sequence)

typedef struct l2c_kvpool {
    int32_t kdtype, vdtype;      // keys', values' element type: L2C_KV_F32, L2C_KV_F16 or L2C_KV_Q8
    int64_t block_size;          // P, positions per block
    int64_t n_layers, n_kv_heads, head_size;
    int64_t slab_bytes;          // one (layer, kv head) of a block
    int64_t block_bytes;
    int64_t n_blocks;            // capacity
    int64_t n_free;              // blocks on the free stack
    uint8_t *data;               // (n_blocks, block_bytes), zeroed, touched as blocks fill
    int32_t *free_stack;         // (n_blocks,) free block ids, top at n_free - 1
    void *mem;                   // the allocation holding data (private)
    int64_t mem_bytes;           // its size if mapped, 0 if from calloc (private)
} l2c_kvpool;

typedef struct {
    l2c_kvpool *pool;
    int64_t n_pos;               // positions held (0 .. n_pos-1)
    int64_t max_pos;             // the most positions this sequence may hold
    int64_t n_blocks;            // blocks held, >= ceil(n_pos / P) (reserved ahead by forward)
    int32_t *blocks;             // (ceil(max_pos / P),) block ids
} l2c_seq;

// Bytes of one block of a pool with these dimensions (0 for bad arguments).
int64_t l2c_kv_block_bytes(int64_t n_layers, int64_t n_kv_heads, int64_t head_size,
                           int32_t kdtype, int32_t vdtype, int64_t block_size);
// A pool of n_blocks blocks. L2C_OK, L2C_ERR_ARG or L2C_ERR_NOMEM.
int l2c_kvpool_init(l2c_kvpool *p, int64_t n_layers, int64_t n_kv_heads, int64_t head_size,
                    int32_t kdtype, int32_t vdtype, int64_t block_size, int64_t n_blocks);
void l2c_kvpool_free(l2c_kvpool *p);
// An empty sequence of pool p that may grow to max_pos positions.
int l2c_seq_init(l2c_seq *s, l2c_kvpool *p, int64_t max_pos);
// Return the sequence's blocks to its pool and free its table.
void l2c_seq_free(l2c_seq *s);
// Blocks the sequence needs beyond those it holds to hold n_pos positions.
int64_t l2c_seq_blocks_needed(const l2c_seq *s, int64_t n_pos);
// Hold blocks for positions < n_pos (n_pos itself unchanged): all or nothing.
// L2C_OK, L2C_ERR_RANGE (n_pos > max_pos) or L2C_ERR_KVFULL.
int l2c_seq_reserve(l2c_seq *s, int64_t n_pos);
// Keep positions < n (n <= n_pos); blocks wholly beyond go back to the pool.
int l2c_seq_truncate(l2c_seq *s, int64_t n);
// The first n positions as bytes, independent of P: for each layer l and kv head h, in that
// order: K (n, hs) then V (n, hs) in the pool's element type, then for Q8 the key scales (n,)
// and value scales (n,) as float.
int64_t l2c_seq_state_bytes(const l2c_kvpool *p, int64_t n);
int l2c_seq_export(const l2c_seq *s, int64_t n, void *dst);
// Replace the sequence's contents by n positions in l2c_seq_export's format (all or nothing:
// L2C_ERR_RANGE, L2C_ERR_KVFULL).
int l2c_seq_import(l2c_seq *s, int64_t n, const void *src);
// Read back position pos of layer/kv head as floats (k, v: (hs,) each). For tests.
int l2c_seq_read(const l2c_seq *s, int64_t layer, int64_t head, int64_t pos, float *k, float *v);

// ---------------------------------------------------------------------------------------------
// attention
//
// Canonical result of a query row at position p, per query head (kv head h = head / (n_heads /
// n_kv_heads)): the keys/values 0..p in blocks b = 0 .. p/P; block b gives the partial
//     s_j = (q * (1/sqrt(hs))) . k_j  for the block's positions j <= p (a sum over d in order)
//     m_b = max_j s_j,  l_b = sum_j exp(s_j - m_b),  o_b = sum_j exp(s_j - m_b) v_j  (j in order)
// and the partials merge in block order: (M, L, O) = partial 0, then for b = 1, 2, ...:
//     M' = max(M, m_b), L = L exp(M - M') + l_b exp(m_b - M'), O = O exp(M - M') + o_b exp(m_b - M')
// out = O * (1 / L). With an int8 cache the dot runs over the int8 codes and is then multiplied
// by the position's key scale, and a value's weight exp(s_j - m_b) by its value scale (l_b
// sums the unscaled weights). Decode computes block partials in parallel (split-K) and merges
// them in order; prefill walks tiles of rows x blocks, merging as it goes: the same arithmetic.

// A run of n consecutive rows of q/out (from row0) that are positions pos0.. of one sequence.
typedef struct l2c_span {
    const int32_t *blocks;       // the sequence's block table
    int64_t pos0, row0, n;
} l2c_span;

// Bytes of workspace the attention kernel needs for these spans (64-byte aligned).
int64_t l2c_attention_ws_bytes(const l2c_kvpool *pool, const l2c_span *spans, int64_t n_spans,
                               int64_t n_heads, int n_threads);

// ---------------------------------------------------------------------------------------------
// forward pass

// Mutable buffers of one forward pass: activations for up to max_batch rows and scratch; no
// KV cache (that is in the pool).
typedef struct {
    int64_t max_batch;   // rows per step
    int n_threads;
    const volatile int32_t *cancel;  // optional: nonzero stops l2c_forward between steps
    int64_t dim, hidden_dim, q_dim, kv_dim, vocab_size, n_layers, n_heads;
    float *x;            // (max_batch, dim)   residual stream
    float *xb;           // (max_batch, max(dim, q_dim))
    float *xb2;          // (max_batch, dim)
    float *hb;           // (max_batch, hidden_dim)
    float *hb2;          // (max_batch, hidden_dim)
    float *q;            // (max_batch, q_dim)
    float *k;            // (max_batch, kv_dim)
    float *v;            // (max_batch, kv_dim)
    l2c_input in;        // the current matrix input, quantized (see l2c_input)
    int64_t *pos;        // (max_batch,) position of each row
    float *rope_cos;     // (max_batch, head_size/2) cos(pos[t] * rope_freq[i]), this step's rows
    float *rope_sin;     // (max_batch, head_size/2)
    int32_t *tok;        // (max_batch,) token of each row
    int64_t *wanted;     // (max_batch,) rows whose logits are computed
    l2c_span *spans;     // (max_batch,) the step's rows, one span per run
    l2c_seq **span_seq;  // (max_batch,) the sequence of each span
    void *ws;            // attention workspace (grows as needed)
    int64_t ws_bytes;
    l2c_team_state *team;  // the barrier and shares of a decode step's team (64-byte aligned)
} l2c_state;

int l2c_state_init(l2c_state *s, const l2c_model *m, int64_t max_batch, int n_threads);
void l2c_state_free(l2c_state *s);

#define L2C_LOGITS_NONE 0
#define L2C_LOGITS_LAST 1
#define L2C_LOGITS_ALL 2

// n_tokens tokens appended to seq (positions seq->n_pos ..); logits rows: none, the last
// token's, or one per token.
typedef struct {
    l2c_seq *seq;
    int64_t n_tokens;
    int32_t logits;      // L2C_LOGITS_NONE / LAST / ALL
} l2c_run;

// Run the transformer on the runs' tokens (tokens: the runs' tokens one after the other). Every
// run's sequence (of `pool`, each at most once) gets its tokens' keys and values; `logits`
// receives the wanted rows (vocab_size floats each) in run order. Blocks for all the runs are
// reserved first, all or nothing (L2C_ERR_KVFULL changes nothing). The rows go through the model
// in steps of at most s->max_batch rows (decode rows of many sequences and prefill chunks in one
// step); *s->cancel is checked before each step: L2C_ERR_CANCELLED then leaves each sequence's
// n_pos at what was done (blocks reserved beyond it are returned).
// Other errors: L2C_ERR_ARG, L2C_ERR_RANGE (beyond a sequence's max_pos or the RoPE tables),
// L2C_ERR_TOKEN (checked before anything runs), L2C_ERR_NOMEM.
int l2c_forward(const l2c_model *m, l2c_state *s, l2c_kvpool *pool, const l2c_run *runs,
                int64_t n_runs, const int32_t *tokens, float *logits);

struct l2c_sampler;
// One sequence's generation loop in one call: run prompt[0..n_prompt) (if any) appended to seq,
// then sample up to max_new tokens (each accepted into the sampler's penalty window), each fed
// back except the last, stopping after a token in stop[0..n_stop) or when seq is full.
// logits (vocab_size,): in, the logits to sample the first token from when n_prompt == 0; out,
// the last ones computed. out receives the ids, *n_out their count; rng_out (optional, max_new)
// the sampler's RNG state after each token (so that a caller that keeps only the first j tokens,
// e.g. at a stop string, can rewind the sampler). *s->cancel is checked before every forward
// step: L2C_ERR_CANCELLED then comes with the tokens sampled so far in out/*n_out (the last of
// them not fed).
int l2c_generate(const l2c_model *m, l2c_state *s, l2c_seq *seq, struct l2c_sampler *sp,
                 const int32_t *prompt, int64_t n_prompt, float *logits, int32_t *out,
                 uint64_t *rng_out, int64_t max_new, const int32_t *stop, int64_t n_stop,
                 int64_t *n_out);

// ---------------------------------------------------------------------------------------------
// sampler
//
// l2c_sample applies this chain to the logits l (vocab_size,) of the last position, each step
// on the previous one's output (the order of Hugging Face's logits processors; llama.cpp's
// default chain applies the temperature after top-k/top-p/min-p instead):
//   1. logit bias:  l[id] += bias for each (id, bias) of l2c_sampler_set_bias (-inf bans id)
//   2. penalties over the window of the last penalty_last_n accepted tokens (the caller
//      accepts the context, prompt included, then each sampled token), once per distinct
//      token t seen c > 0 times there (llama.cpp's rules; repetition as Hugging Face's):
//        l[t] = l[t] > 0 ? l[t] / repetition_penalty : l[t] * repetition_penalty
//        l[t] -= c * frequency_penalty + presence_penalty
//   3. temperature 0: return argmax l (the lowest id among equal maxima); no random draw.
//   4. temperature T: p_i = exp((l_i - max l) * (1/T)) in float (a vectorizable exp within 2 ulp;
//      0 below exp(-87.3); NaN logits count as -inf), unnormalized (max p = 1);
//      with top-k only over the k tokens of step 5.
//   5. top-k (0 < k < vocab): keep the k largest l (ties: lower id first).
//   6. top-p (< 1): scanning by descending p (ties: lower id first), keep tokens up to and
//      including the first at which the kept mass (double) reaches top_p * z, z = the mass
//      of all tokens left by step 5 (summed by id, or in descending order after top-k).
//   7. min-p (> 0): of those, keep the tokens with p >= min_p (= min_p * max p).
//   8. draw: coin = l2c_random_f32 (one per call at T > 0); return the first kept token whose
//      cumulative mass (double) exceeds coin * kept mass, scanning by descending p when any
//      of steps 5-7 is on, else by id.
// A temperature so small that 1/T overflows is greedy; greedy ignores NaN logits.

typedef struct {
    float temperature;          // 0 = greedy
    float top_p;                // in [0, 1]; 1 = off
    float min_p;                // in [0, 1]; 0 = off
    int64_t top_k;              // 0 (or >= vocab_size) = off
    float repetition_penalty;   // > 0; 1 = off
    float presence_penalty;     // 0 = off
    float frequency_penalty;    // 0 = off
    int64_t penalty_last_n;     // window of the penalties; 0 = off
} l2c_sampler_params;

typedef struct l2c_sampler {
    int64_t vocab_size;
    l2c_sampler_params p;
    uint64_t rng_state;         // xorshift64* state, never 0
    int64_t n_bias;
    int32_t *bias_ids;          // (n_bias,)
    float *bias;                // (n_bias,)
    int32_t *window;            // (penalty_last_n,) ring of accepted tokens; NULL: no penalties
    int64_t window_len, window_pos;
    int32_t *counts;            // (vocab_size,) occurrences in the window
    float *work;                // (vocab_size,) logits after steps 1-2
    float *probs;               // (vocab_size,) scratch
    int32_t *idx, *idx2;        // (vocab_size,) scratch
    double *block_sum;          // (vocab_size / 512 + 1,) scratch
    double *hist;               // (4096,) scratch
    const struct l2c_kernels *k;  // the table of the vocabulary passes (init: the best)
} l2c_sampler;

void l2c_sampler_params_default(l2c_sampler_params *p);  // every step off, temperature 1
// L2C_OK, L2C_ERR_ARG (a parameter out of range, see l2c_sampler_params) or L2C_ERR_NOMEM.
int l2c_sampler_init(l2c_sampler *sp, int64_t vocab_size, const l2c_sampler_params *p,
                     uint64_t seed);
void l2c_sampler_free(l2c_sampler *sp);
// The kernel table whose vocabulary passes the sampler runs (the same draws on every table).
void l2c_sampler_set_kernels(l2c_sampler *sp, const l2c_kernels *k);
// Replace the logit bias with n (ids[i], bias[i]) pairs (copied). L2C_ERR_TOKEN for an id out
// of range, L2C_ERR_ARG for a NaN or +inf bias.
int l2c_sampler_set_bias(l2c_sampler *sp, const int32_t *ids, const float *bias, int64_t n);
// Push a token into the penalty window (a no-op without penalties); L2C_ERR_TOKEN if out of range.
int l2c_sampler_accept(l2c_sampler *sp, int32_t token);
void l2c_sampler_reset_window(l2c_sampler *sp);
// Pick the next token from logits (vocab_size,); logits are not modified.
int32_t l2c_sample(l2c_sampler *sp, const float *logits);
float l2c_random_f32(uint64_t *state);
uint64_t l2c_seed_state(uint64_t seed);  // the xorshift state a seed starts from

// Log-softmax of logits (n,) (the model's raw distribution, before any sampler step):
// *token_lp = log p(token) (token -1: none), and the k most likely ids with their logprobs in
// descending order (ties: lower id first) into top_ids/top_lp (k,); scratch: work (n,), scratch (k,).
int l2c_logprobs(float *token_lp, int32_t *top_ids, float *top_lp, const float *logits,
                 int64_t n, int32_t token, int64_t k, float *work, int32_t *scratch);

// Memory bandwidth probe: best of `reps` reads of a `bytes` buffer with n_threads and the best
// kernel table's widest loads; returns GB/s (or -1 if the buffer cannot be allocated).
double l2c_read_bandwidth(int64_t bytes, int reps, int n_threads);

#ifdef __cplusplus
}
#endif
#endif  // LLAMA2C_H
