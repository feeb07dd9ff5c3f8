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
// kernels_q8.c, kernels_q4.c), each a complete translation unit included here.
//
// Threads: each kernel has at most one `#pragma omp parallel for`, over output rows (matmul),
// rows of a batch (rmsnorm, rope), (token, head) pairs (attention) or chunks (elementwise).
#include "kernels_common.h"

#ifndef L2C_KERNELS_NAME
#error "define L2C_KERNELS_NAME (see csrc/arch/)"
#endif

#include "kernels_f32.c"
#include "kernels_peak.c"
#include "kernels_q4.c"
#include "kernels_q8.c"

// ---------------------------------------------------------------------------------------------
// the matrix product of every packed type: out (T, W->rows) = X @ W^T

static void matmul(float *restrict out, const float *restrict x, const l2c_qact *a,
                   const l2c_matrix *W, int64_t T, int n_threads) {
    if (T <= 0) return;
    switch (W->type) {
    case L2C_F32P: matmul_f32p(out, x, W, T, n_threads); break;
    case L2C_Q8P: matmul_q8p(out, a, W, T, n_threads); break;
    case L2C_Q4P: matmul_q4p(out, a, W, T, n_threads); break;
    default: break;  // row-major types are lookups only (l2c_model_check refuses them)
    }
}

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
// RMSNorm: o = x * w / sqrt(mean(x^2) + eps), per row

static void rmsnorm(float *restrict o, const float *restrict x, const float *restrict w,
                    int64_t T, int64_t n, float eps, int n_threads) {
    int nth = threads_for(T * n * 8, n_threads);
    L2C_PRAGMA(omp parallel for num_threads(nth) schedule(static) if(nth > 1))
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * n;
        float *orow = o + t * n;
        float ss = dot_f32(xr, xr, n);
        ss = 1.0f / sqrtf(ss / (float)n + eps);
        for (int64_t j = 0; j < n; j++) orow[j] = w[j] * (ss * xr[j]);
    }
}

// ---------------------------------------------------------------------------------------------
// softmax, in place, numerically stable

static void softmax(float *x, int64_t n) {
    if (n <= 0) return;
    float max_val = x[0];
    for (int64_t i = 1; i < n; i++)
        if (x[i] > max_val) max_val = x[i];
    double sum = 0.0;  // double: a float sum over a 50k vocabulary drifts by ~1e-4
    for (int64_t i = 0; i < n; i++) {
        x[i] = expf(x[i] - max_val);
        sum += x[i];
    }
    const float inv = (float)(1.0 / sum);
    for (int64_t i = 0; i < n; i++) x[i] *= inv;
}

// ---------------------------------------------------------------------------------------------
// RoPE, interleaved pairs (llama2.c / GGUF convention):
//   (x[2i], x[2i+1]) <- (x0*cos - x1*sin, x0*sin + x1*cos), angle = pos * theta^(-2i/head_size)

static void rope(float *restrict x, const int64_t *restrict pos, const float *restrict cos_t,
                 const float *restrict sin_t, int64_t T, int64_t n_heads, int64_t head_size,
                 int n_threads) {
    const int64_t half = head_size / 2, width = n_heads * head_size;
    int nth = threads_for(T * width * 16, n_threads);
    L2C_PRAGMA(omp parallel for num_threads(nth) schedule(static) if(nth > 1))
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_t + pos[t] * half, *s = sin_t + pos[t] * half;
        for (int64_t h = 0; h < n_heads; h++) {
            float *v = x + t * width + h * head_size;
            for (int64_t i = 0; i < half; i++) {
                const float x0 = v[2 * i], x1 = v[2 * i + 1];
                v[2 * i] = x0 * c[i] - x1 * s[i];
                v[2 * i + 1] = x0 * s[i] + x1 * c[i];
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: hb = silu(hb) * hb2, silu(x) = x * sigmoid(x)

static void swiglu(float *restrict hb, const float *restrict hb2, int64_t n, int n_threads) {
    int nth = threads_for(n * 64, n_threads);
    L2C_PRAGMA(omp parallel for num_threads(nth) schedule(static) if(nth > 1))
    for (int64_t i = 0; i < n; i++) {
        const float v = hb[i];
        hb[i] = v * (1.0f / (1.0f + expf(-v))) * hb2[i];
    }
}

// residual: x += y
static void add(float *restrict x, const float *restrict y, int64_t n, int n_threads) {
    int nth = threads_for(n, n_threads);
    L2C_PRAGMA(omp parallel for num_threads(nth) schedule(static) if(nth > 1))
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

// ---------------------------------------------------------------------------------------------
// causal grouped-query attention over the KV cache
//   for query row t (position p = pos0 + t) and head h (kv head h / (n_heads / n_kv_heads)):
//   att[s] = softmax_s(q . k_s / sqrt(hs)) for s <= p;  out = sum_s att[s] * v_s

static void attention(float *restrict out, float *restrict att, const float *restrict q,
                      const float *restrict kc, const float *restrict vc, int64_t T, int64_t pos0,
                      int64_t n_heads, int64_t n_kv_heads, int64_t hs, int64_t att_stride,
                      int n_threads) {
    const int64_t q_dim = n_heads * hs, kv_dim = n_kv_heads * hs, kv_mul = n_heads / n_kv_heads;
    const float scale = 1.0f / sqrtf((float)hs);
    int nth = threads_for(T * n_heads * (pos0 + T) * hs * 2, n_threads);
    L2C_PRAGMA(omp parallel for num_threads(nth) schedule(dynamic, 1) if(nth > 1))
    for (int64_t th = 0; th < T * n_heads; th++) {
        const int64_t t = th / n_heads, h = th % n_heads, len = pos0 + t + 1;
        const float *qh = q + t * q_dim + h * hs;
        const int64_t koff = (h / kv_mul) * hs;
        float *a = att + th * att_stride;
        for (int64_t s = 0; s < len; s++) a[s] = dot_f32(qh, kc + s * kv_dim + koff, hs) * scale;
        softmax(a, len);
        float *o = out + t * q_dim + h * hs;
        memset(o, 0, (size_t)hs * sizeof(float));
        for (int64_t s = 0; s < len; s++) {
            const float *v = vc + s * kv_dim + koff;
            const float as = a[s];
            for (int64_t i = 0; i < hs; i++) o[i] += as * v[i];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// memory read probe: sum of x (n,), for measuring read bandwidth (l2c_read_bandwidth)

static float read_sum(const float *restrict x, int64_t n, int n_threads) {
    float total = 0.0f;
    L2C_PRAGMA(omp parallel for num_threads(n_threads) schedule(static) reduction(+ : total))
    for (int64_t c = 0; c < (n + 16383) / 16384; c++) {  // 64 KB chunks
        const float *p = x + c * 16384;
        const int64_t len = n - c * 16384 < 16384 ? n - c * 16384 : 16384;
        int64_t i = 0;
        float s = 0.0f;
#if defined(__AVX512F__)
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
        __m512 s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
        for (; i + 64 <= len; i += 64) {
            s0 = _mm512_add_ps(s0, _mm512_loadu_ps(p + i));
            s1 = _mm512_add_ps(s1, _mm512_loadu_ps(p + i + 16));
            s2 = _mm512_add_ps(s2, _mm512_loadu_ps(p + i + 32));
            s3 = _mm512_add_ps(s3, _mm512_loadu_ps(p + i + 48));
        }
        s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
#elif defined(__AVX2__)
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        for (; i + 16 <= len; i += 16) {
            s0 = _mm256_add_ps(s0, _mm256_loadu_ps(p + i));
            s1 = _mm256_add_ps(s1, _mm256_loadu_ps(p + i + 8));
        }
        s = hsum256(_mm256_add_ps(s0, s1));
#endif
        for (; i < len; i++) s += p[i];
        total += s;
    }
    return total;
}

// ---------------------------------------------------------------------------------------------

const l2c_kernels L2C_KERNELS_NAME = {
    .name = L2C_KERNELS_LABEL,
    .isa = L2C_KERNELS_ISA,
    .quantize = quantize,
    .matmul = matmul,
    .rmsnorm = rmsnorm,
    .softmax = softmax,
    .rope = rope,
    .swiglu = swiglu,
    .add = add,
    .attention = attention,
    .read_sum = read_sum,
    .peak = peak,
};
