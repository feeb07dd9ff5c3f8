// sample_ops.c: the sampler's passes over the vocabulary (max, exp, sums, the candidates of
// top-p / min-p), included from csrc/kernels.c so that each kernel table has a copy the
// vectorizer widens to its registers (4 lanes in the generic build's SSE2, 8 or 16 here).
//
// Every table computes the same bits: the loops are plain C, each lane runs the same IEEE
// operations in the same order (the partial sums are explicit arrays of 8), and floating-point
// contraction is off in this file, so no table fuses exp_core's multiply-adds. A draw is then
// the same token on every table (tests/test_sampler.py checks it).
#include "sample_exp.h"

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

// max of v (n,) ignoring NaNs (-inf when there is nothing else); 8 lanes so that the compiler
// can use vector max instructions
static float vocab_max(const float *restrict v, int64_t n) {
    float m[8] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY,
                  -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) m[j] = v[i + j] > m[j] ? v[i + j] : m[j];
    for (; i < n; i++) m[0] = v[i] > m[0] ? v[i] : m[0];
    float mx = m[0];
    for (int j = 1; j < 8; j++) mx = m[j] > mx ? m[j] : mx;
    return mx;
}

// p[i] = exp((l[i] - mx) * inv_t) for i < n (NaN as -inf); three loops that vectorize (a select
// in the same loop as exp_core's float->int conversion stops gcc's vectorizer)
static void vocab_exp(float *restrict p, const float *restrict l, int64_t n, float mx,
                      float inv_t) {
    for (int64_t i = 0; i < n; i++) {
        const float t = (l[i] - mx) * inv_t;
        p[i] = t >= EXP_MIN ? t : EXP_MIN;
    }
    for (int64_t i = 0; i < n; i++) p[i] = exp_core(p[i]);
    for (int64_t i = 0; i < n; i++) p[i] = (l[i] - mx) * inv_t >= EXP_ZERO ? p[i] : 0.0f;
}

// sum of p (n,) in float64, through 8 float partial sums per block of L2C_SAMPLER_BLOCK (512
// terms <= 1 each: float is exact enough) so that it vectorizes; block sums into block_sum[]
// (may be NULL) so that a draw can skip whole blocks
static double vocab_sum(double *restrict block_sum, const float *restrict p, int64_t n) {
    double z = 0.0;
    for (int64_t b = 0; b < n; b += L2C_SAMPLER_BLOCK) {
        const int64_t e = b + L2C_SAMPLER_BLOCK < n ? b + L2C_SAMPLER_BLOCK : n;
        float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = b;
        for (; i + 8 <= e; i += 8)
            for (int j = 0; j < 8; j++) s[j] += p[i + j];
        double zb = 0.0;
        for (; i < e; i++) zb += p[i];
        for (int j = 0; j < 8; j++) zb += s[j];
        if (block_sum) block_sum[b / L2C_SAMPLER_BLOCK] = zb;
        z += zb;
    }
    return z;
}

// the ids i < n with p[i] >= thr, ascending, into ids; returns their count. Blocks of 64 are
// tested first with a vector compare (most of a vocabulary is below a top-p cut), and the
// members of a block with any are written without a branch (ids[nc] is overwritten until
// one qualifies).
static int64_t vocab_select(int32_t *restrict ids, const float *restrict p, int64_t n,
                            float thr) {
    int64_t nc = 0;
    for (int64_t b = 0; b < n; b += 64) {
        const int64_t e = b + 64 < n ? b + 64 : n;
        int any = 0;
        for (int64_t i = b; i < e; i++) any |= p[i] >= thr;
        if (!any) continue;
        for (int64_t i = b; i < e; i++) {
            ids[nc] = (int32_t)i;
            nc += p[i] >= thr;
        }
    }
    return nc;
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
