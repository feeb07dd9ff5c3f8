// kernels.c: the compute kernels, written once and compiled once per instruction set.
//
// This file is not compiled on its own. csrc/arch/kernels_{generic,avx2,avxvnni,avx512}.c each
// define L2C_KERNELS_NAME and include it, and setup.py compiles each of those with its own
// flags (none; -mavx2 -mfma -mf16c; the same plus -mavxvnni; -mavx512f/bw/vl/vnni), as numpy
// does with its dispatch sources. Inside, the hot loops carry an `#if defined(__AVX512F__) ...
// #elif defined(__AVX2__) ... #endif` ladder over a shared index, finished by the scalar loop,
// so the generic build is the plain scalar twin of every kernel (no -ffast-math anywhere:
// reductions in the generic build run in source order, and the SIMD builds differ from it only
// by summation order). The matrix kernels live in their own files (kernels_f32.c,
// kernels_q8.c, kernels_q4.c), each a complete translation unit included here; so do the
// row-wise kernels (ops.c) and the KV store and attention over the KV pool (attention.c).
//
// Threads: each kernel has at most one parallel region, over output rows (matmul), rows of a
// batch (rmsnorm, rope, swiglu), attention tiles and blocks (attention.c) or chunks (add).
#include "kernels_common.h"
#include "vec.h"

#ifndef L2C_KERNELS_NAME
#error "define L2C_KERNELS_NAME (see csrc/arch/)"
#endif

#include "kernels_f32.c"
#include "kernels_peak.c"
#include "kernels_q4.c"
#include "kernels_q8.c"

// ---------------------------------------------------------------------------------------------
// the matrix products of every packed type: out (T, W->rows) = X @ W^T for each job, in one
// parallel region (q, k and v of a layer, or w1 and w3, read the same input: one fork and one
// join instead of three or two; the threads' shares run across the matrices' boundaries)

// what a block (16 rows, L2C_PANEL) of W costs a thread: the bytes it reads when decoding,
// its multiply-adds otherwise
static int64_t block_cost(const l2c_matrix *W, int64_t T) {
    if (T > 1) return W->cols;
    return W->type == L2C_F32P ? 4 * W->cols : W->type == L2C_Q4P ? W->cols / 2 : W->cols;
}

static int64_t n_blocks(const l2c_matrix *W) { return (W->rows + L2C_PANEL - 1) / L2C_PANEL; }

// blocks [b0, b1) of one job
static void matmul_range(const l2c_mm *j, int64_t T, int64_t b0, int64_t b1) {
    const l2c_matrix *W = j->W;
    switch (W->type) {
    case L2C_F32P: f32_range(j->out, W->f, j->x, T, W->cols, W->rows, b0, b1); break;
    case L2C_Q8P: q8_range(j->out, W, j->a, T, b0, b1); break;
    case L2C_Q4P: q4_range(j->out, W, j->a, T, b0, b1); break;
    default: break;  // row-major types are lookups only (l2c_model_check refuses them)
    }
}

// the first block whose start cost (times the parts) reaches a: ceil(a / b), within [0, hi]
static int64_t first_block(int64_t a, int64_t b, int64_t hi) {
    const int64_t q = a <= 0 ? 0 : (a + b - 1) / b;
    return q < hi ? q : hi;
}

// blocks [g0, g1) of the jobs' blocks taken end to end
static void run_blocks(const l2c_mm *jobs, int n_jobs, int64_t T, int64_t g0, int64_t g1) {
    int64_t base = 0;
    for (int i = 0; i < n_jobs && base < g1; i++) {
        const int64_t nb = n_blocks(jobs[i].W);
        const int64_t b0 = g0 > base ? g0 - base : 0, b1 = min64(g1 - base, nb);
        if (b0 < b1) matmul_range(&jobs[i], T, b0, b1);
        base += nb;
    }
}

// The smallest share a thread takes at once: at T = 1 about this many bytes (a claim is one
// atomic on a line the owner mostly holds alone); in prefill a cache chunk, so a claim keeps its
// weights in L2 while the token tiles pass (kernels_common.h). By the jobs' mean block.
#define L2C_CLAIM_BYTES 16384

static int64_t claim_blocks(const l2c_mm *jobs, int n_jobs, int64_t T, int64_t blocks) {
    int64_t bytes = 0;
    for (int i = 0; i < n_jobs; i++) bytes += n_blocks(jobs[i].W) * L2C_PANEL * block_cost(jobs[i].W, 1);
    if (T > 1) return chunk_blocks(bytes / blocks, 2);
    const int64_t c = L2C_CLAIM_BYTES * blocks / bytes;
    return c > 1 ? c : 1;
}

// the sizes of a call: cost (block_cost summed), multiply-adds, blocks
static void matmul_sizes(const l2c_mm *jobs, int n_jobs, int64_t T, int64_t *cost, int64_t *work,
                         int64_t *blocks) {
    *cost = *work = *blocks = 0;
    for (int i = 0; i < n_jobs; i++) {
        const int64_t nb = n_blocks(jobs[i].W);
        *cost += nb * block_cost(jobs[i].W, T);
        *work += T * jobs[i].W->rows * jobs[i].W->cols;
        *blocks += nb;
    }
}

// part p of nth starts with the blocks whose start cost falls in [cost * p / nth, cost * (p + 1) / nth)
static void part_set(l2c_share *sh, const l2c_mm *jobs, int n_jobs, int64_t T, int64_t cost,
                     int64_t p, int64_t nth) {
    int64_t g[2] = {0, 0}, base = 0;  // its first and end block, end to end over the jobs
    for (int i = 0; i < n_jobs; i++) {
        const int64_t nb = n_blocks(jobs[i].W), c = block_cost(jobs[i].W, T);
        for (int e = 0; e < 2; e++) g[e] += first_block(cost * (p + e) - base * nth, c * nth, nb);
        base += nb * c;
    }
    share_set(sh, g[0], g[1]);
}

// thread `part`'s work: its own share, then what is left of the others' in turn
static void take_blocks(l2c_share *sh, int64_t nth, int64_t part, const l2c_mm *jobs, int n_jobs,
                        int64_t T, int64_t want) {
    int64_t g0, g1;
    for (int64_t k = 0; k < nth; k++)
        while (take(&sh[(part + k) % nth], k == 0, want, &g0, &g1)) run_blocks(jobs, n_jobs, T, g0, g1);
}

static void matmul(const l2c_mm *jobs, int n_jobs, int64_t T, int n_threads) {
    if (T <= 0 || n_jobs <= 0) return;
    int64_t cost, work, blocks;
    matmul_sizes(jobs, n_jobs, T, &cost, &work, &blocks);
    const int64_t nth = min64(threads_for(work, n_threads), blocks);
    if (nth <= 1) {
        run_blocks(jobs, n_jobs, T, 0, blocks);
        return;
    }
    const int64_t want = claim_blocks(jobs, n_jobs, T, blocks);
    l2c_share sh[nth];
    for (int64_t p = 0; p < nth; p++) part_set(&sh[p], jobs, n_jobs, T, cost, p, nth);
    L2C_PRAGMA(omp parallel for num_threads(nth) schedule(static))
    for (int64_t part = 0; part < nth; part++) take_blocks(sh, nth, part, jobs, n_jobs, T, want);
}

// A team's matmul: each thread sets its own share, then takes as above. A thread may look at
// another's share before its owner has set it for this call: it then sees the last call's,
// which every thread left empty, and takes nothing from it (so results stay per block).
static void matmul_team(const l2c_mm *jobs, int n_jobs, int64_t T, const l2c_team *tm) {
    if (T <= 0 || n_jobs <= 0) return;
    int64_t cost, work, blocks;
    matmul_sizes(jobs, n_jobs, T, &cost, &work, &blocks);
    (void)work;
    part_set(&tm->st->sh[tm->id], jobs, n_jobs, T, cost, tm->id, tm->n);
    take_blocks(tm->st->sh, tm->n, tm->id, jobs, n_jobs, T, claim_blocks(jobs, n_jobs, T, blocks));
}

// ---------------------------------------------------------------------------------------------
// row-wise kernels (RMSNorm, RoPE, SwiGLU, add, softmax, the read probe), the KV store, the
// attention over the KV pool and the sampler's vocabulary passes
#include "ops.c"
#include "attention.c"
// the sampler's passes over the vocabulary (last: it turns floating-point contraction off)
#include "sample_ops.c"

// ---------------------------------------------------------------------------------------------

const l2c_kernels L2C_KERNELS_NAME = {
    .name = L2C_KERNELS_LABEL,
    .isa = L2C_KERNELS_ISA,
    .quantize = quantize,
    .matmul = matmul,
    .matmul_team = matmul_team,
    .rmsnorm = rmsnorm,
    .softmax = softmax,
    .rope = rope,
    .swiglu = swiglu,
    .add = add,
    .kv_store = kv_store,
    .attention = attention,
    .attention_team = attention_team,
    .read_sum = read_sum,
    .peak = peak,
    .vocab_max = vocab_max,
    .vocab_exp = vocab_exp,
    .vocab_sum = vocab_sum,
    .vocab_select = vocab_select,
};
