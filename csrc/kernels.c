// kernels.c: the compute kernels, written once and compiled once per instruction set.
//
// This file is not compiled on its own. csrc/arch/kernels_{generic,avx2,avx512}.c each define
// L2C_KERNELS_NAME and include it, and setup.py compiles each of those with its own flags
// (none, -mavx2 -mfma, -mavx512f/bw/vl/vnni), as numpy does with its dispatch sources. Inside,
// the hot loops carry an `#if defined(__AVX512F__) ... #elif defined(__AVX2__) ... #endif`
// ladder over a shared index, finished by the scalar loop, so the generic build is the plain
// scalar twin of every kernel (no -ffast-math anywhere: reductions in the generic build run
// in source order, and the SIMD builds differ from it only by summation order).
//
// Threads: each kernel has at most one parallel region, over output rows (matmul), rows of a
// batch (rmsnorm, rope, swiglu), attention tiles and blocks (attention.c) or chunks (add).
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "llama2c.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef L2C_KERNELS_NAME
#error "define L2C_KERNELS_NAME (see csrc/arch/)"
#endif

#ifdef _OPENMP
#define L2C_PRAGMA(x) _Pragma(#x)
#else
#define L2C_PRAGMA(x)
#endif

// Work below this many multiply-adds runs on the calling thread: a parallel region costs a
// few microseconds, more than a small kernel.
#define L2C_PAR_MIN_WORK 32768

static inline int threads_for(int64_t work, int n_threads) {
    return work < L2C_PAR_MIN_WORK ? 1 : (n_threads < 1 ? 1 : n_threads);
}

// ---------------------------------------------------------------------------------------------
// horizontal helpers

#if defined(__AVX2__) && !defined(__AVX512F__)
static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    lo = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, lo);
    return _mm_cvtss_f32(_mm_add_ss(lo, sh));
}
#endif

// ---------------------------------------------------------------------------------------------
// fp32 dot product: sum_i a[i] * b[i]

static inline float dot_f32(const float *restrict a, const float *restrict b, int64_t n) {
    int64_t i = 0;
    float sum = 0.0f;
#if defined(__AVX512F__)
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    __m512 s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
    for (; i + 64 <= n; i += 64) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), s3);
    }
    for (; i + 16 <= n; i += 16)
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    if (i < n) {  // last partial vector, masked
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s1);
        i = n;
    }
    sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
#elif defined(__AVX2__)
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    __m256 s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    sum = hsum256(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
#endif
    for (; i < n; i++) sum += a[i] * b[i];  // leftovers (all of it in the generic build)
    return sum;
}

// ---------------------------------------------------------------------------------------------
// fp32 matrix-vector (decode): out (d,) = W (d, n) @ x (n,)
// Four rows at a time: four weight streams in flight keep more cache-line reads outstanding
// than one (decode is bound by memory bandwidth), and each x vector loaded feeds four FMAs.

static inline void rows4_f32(float *restrict out, const float *restrict x, const float *restrict w,
                             int64_t n) {
    const float *w0 = w, *w1 = w + n, *w2 = w + 2 * n, *w3 = w + 3 * n;
    int64_t k = 0;
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; k + 16 <= n; k += 16) {
        const __m512 xv = _mm512_loadu_ps(x + k);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + k), xv, a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + k), xv, a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + k), xv, a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + k), xv, a3);
    }
    if (k < n) {  // last partial vector, masked
        const __mmask16 m = (__mmask16)((1u << (n - k)) - 1u);
        const __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w0 + k), xv, a0);
        a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w1 + k), xv, a1);
        a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w2 + k), xv, a2);
        a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w3 + k), xv, a3);
        k = n;
    }
    s0 = _mm512_reduce_add_ps(a0);
    s1 = _mm512_reduce_add_ps(a1);
    s2 = _mm512_reduce_add_ps(a2);
    s3 = _mm512_reduce_add_ps(a3);
#elif defined(__AVX2__)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (; k + 8 <= n; k += 8) {
        const __m256 xv = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), xv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), xv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), xv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), xv, a3);
    }
    s0 = hsum256(a0);
    s1 = hsum256(a1);
    s2 = hsum256(a2);
    s3 = hsum256(a3);
#endif
    for (; k < n; k++) {  // leftovers (all of it in the generic build)
        s0 += w0[k] * x[k];
        s1 += w1[k] * x[k];
        s2 += w2[k] * x[k];
        s3 += w3[k] * x[k];
    }
    out[0] = s0;
    out[1] = s1;
    out[2] = s2;
    out[3] = s3;
}

static void matvec_f32(float *restrict out, const float *restrict x, const float *restrict w,
                       int64_t n, int64_t d, int n_threads) {
    const int64_t blocks = d / 4;
    int nth = threads_for(n * d, n_threads);
    L2C_PRAGMA(omp parallel for num_threads(nth) schedule(static) if(nth > 1))
    for (int64_t b = 0; b < blocks; b++) rows4_f32(out + 4 * b, x, w + 4 * b * n, n);
    for (int64_t i = 4 * blocks; i < d; i++) out[i] = dot_f32(w + i * n, x, n);  // leftover rows
}

// ---------------------------------------------------------------------------------------------
// fp32 matrix-matrix (prefill): out (T, d) = X (T, n) @ W (d, n)^T
//
// Register tiles of R weight rows x C tokens accumulate R*C vector dot products along n, so
// each weight vector loaded feeds C FMAs and each activation vector R FMAs. The outer
// (parallel) loop walks weight row blocks, so W streams from memory once while X (T x n, a
// few hundred KB for a prompt chunk) stays in L2.

#if defined(__AVX512F__)
#define MM_R 4
#define MM_C 4
static void tile_f32(float *restrict out, const float *restrict x, const float *restrict w,
                     int64_t n, int64_t d) {
    __m512 acc[MM_R][MM_C];
    for (int r = 0; r < MM_R; r++)
        for (int c = 0; c < MM_C; c++) acc[r][c] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
        __m512 wv[MM_R];
        for (int r = 0; r < MM_R; r++) wv[r] = _mm512_loadu_ps(w + r * n + k);
        for (int c = 0; c < MM_C; c++) {
            __m512 xv = _mm512_loadu_ps(x + c * n + k);
            for (int r = 0; r < MM_R; r++) acc[r][c] = _mm512_fmadd_ps(wv[r], xv, acc[r][c]);
        }
    }
    if (k < n) {
        __mmask16 m = (__mmask16)((1u << (n - k)) - 1u);
        __m512 wv[MM_R];
        for (int r = 0; r < MM_R; r++) wv[r] = _mm512_maskz_loadu_ps(m, w + r * n + k);
        for (int c = 0; c < MM_C; c++) {
            __m512 xv = _mm512_maskz_loadu_ps(m, x + c * n + k);
            for (int r = 0; r < MM_R; r++) acc[r][c] = _mm512_fmadd_ps(wv[r], xv, acc[r][c]);
        }
    }
    for (int c = 0; c < MM_C; c++)
        for (int r = 0; r < MM_R; r++) out[c * d + r] = _mm512_reduce_add_ps(acc[r][c]);
}
#elif defined(__AVX2__)
#define MM_R 4
#define MM_C 2
static void tile_f32(float *restrict out, const float *restrict x, const float *restrict w,
                     int64_t n, int64_t d) {
    __m256 acc[MM_R][MM_C];
    for (int r = 0; r < MM_R; r++)
        for (int c = 0; c < MM_C; c++) acc[r][c] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        __m256 wv[MM_R];
        for (int r = 0; r < MM_R; r++) wv[r] = _mm256_loadu_ps(w + r * n + k);
        for (int c = 0; c < MM_C; c++) {
            __m256 xv = _mm256_loadu_ps(x + c * n + k);
            for (int r = 0; r < MM_R; r++) acc[r][c] = _mm256_fmadd_ps(wv[r], xv, acc[r][c]);
        }
    }
    for (int c = 0; c < MM_C; c++)
        for (int r = 0; r < MM_R; r++) {
            float s = hsum256(acc[r][c]);
            for (int64_t j = k; j < n; j++) s += w[r * n + j] * x[c * n + j];  // leftovers
            out[c * d + r] = s;
        }
}
#else
#define MM_R 1
#define MM_C 1
static void tile_f32(float *restrict out, const float *restrict x, const float *restrict w,
                     int64_t n, int64_t d) {
    (void)d;
    out[0] = dot_f32(w, x, n);
}
#endif

static void matmul_f32(float *restrict out, const float *restrict x, const float *restrict w,
                       int64_t T, int64_t n, int64_t d, int n_threads) {
    if (T == 1) {
        matvec_f32(out, x, w, n, d, n_threads);
        return;
    }
    const int64_t n_blocks = (d + MM_R - 1) / MM_R;
    int nth = threads_for(T * n * d, n_threads);
    L2C_PRAGMA(omp parallel for num_threads(nth) schedule(static) if(nth > 1))
    for (int64_t b = 0; b < n_blocks; b++) {
        const int64_t i = b * MM_R;
        if (i + MM_R <= d) {
            int64_t t = 0;
            for (; t + MM_C <= T; t += MM_C) tile_f32(out + t * d + i, x + t * n, w + i * n, n, d);
            for (; t < T; t++)  // leftover tokens
                for (int64_t r = 0; r < MM_R; r++) out[t * d + i + r] = dot_f32(w + (i + r) * n, x + t * n, n);
        } else {  // leftover rows
            for (int64_t t = 0; t < T; t++)
                for (int64_t r = i; r < d; r++) out[t * d + r] = dot_f32(w + r * n, x + t * n, n);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// int8 group quantization of activations and int8 x int8 matmul
#include "kernels_q8.c"

// ---------------------------------------------------------------------------------------------
// row-wise kernels (RMSNorm, RoPE, SwiGLU, add, softmax, the read probe), the KV store and the
// attention over the KV pool
#include "vec.h"
#include "ops.c"
#include "attention.c"

// ---------------------------------------------------------------------------------------------

const l2c_kernels L2C_KERNELS_NAME = {
    .name = L2C_KERNELS_LABEL,
    .isa = L2C_KERNELS_ISA,
    .matvec_f32 = matvec_f32,
    .matmul_f32 = matmul_f32,
    .quantize_q8 = quantize_q8,
    .matmul_q8 = matmul_q8,
    .rmsnorm = rmsnorm,
    .softmax = softmax,
    .rope = rope,
    .swiglu = swiglu,
    .add = add,
    .kv_store = kv_store,
    .attention = attention,
    .read_sum = read_sum,
};
