// sample_exp.h: the sampler's exp, shared by csrc/sampler.c and the vocabulary passes of each
// kernel table (csrc/sample_ops.c), so that all of them compute the same bits.
#ifndef LLAMA2C_SAMPLE_EXP_H
#define LLAMA2C_SAMPLE_EXP_H

#include <stdint.h>

#define L2C_SAMPLER_BLOCK 512  // tokens per block of the probability sums (vocab_sum)

// exp(x) for -87 <= x <= 0 to within 2 ulp of expf (Cephes' expf: Cody-Waite reduction by
// ln 2, a degree-5 polynomial, the exponent added to the bits) in operations the compiler
// vectorizes, so that the vocabulary's exps cost a fraction of a libm loop.
static inline float exp_core(float x) {
    float k = x * 1.44269504088896341f + 12582912.0f;  // round(x / ln 2) via 1.5 * 2^23
    k -= 12582912.0f;
    float r = x - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    union { float f; int32_t i; } scale;
    scale.i = ((int32_t)k + 127) << 23;
    return y * scale.f;
}

#define EXP_MIN (-87.0f)      // exp_core's lower limit
#define EXP_ZERO (-87.3f)     // below this exp(x) is taken as 0 (expf's float range ends there)

#endif
