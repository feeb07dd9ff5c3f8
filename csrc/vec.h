// vec.h: a thin float-vector layer for the kernels of ops.c, attention.c and the peak probe,
// one definition per kernel table (included from csrc/kernels.c, so __AVX512F__ / __AVX2__ say
// which table is being compiled). VL lanes: 16 (avx512), 8 (avx2), 1 (generic: plain C
// floats, so the generic build of a kernel written with these is its scalar twin, line for
// line).
//
// vf_fma(a, b, c) = a * b + c: fused (one rounding) in the SIMD tables, two roundings in the
// generic one. Every lane of a kernel written with these computes the same operations in the
// same order whatever the vector width, so results differ between tables only by that rounding.
#ifndef LLAMA2C_VEC_H
#define LLAMA2C_VEC_H

#include <math.h>
#include <stdint.h>

#if defined(__AVX512F__)
#define VL 16
typedef __m512 vf;
#define vf_zero() _mm512_setzero_ps()
#define vf_set1(x) _mm512_set1_ps(x)
#define vf_load(p) _mm512_loadu_ps(p)
#define vf_store(p, v) _mm512_storeu_ps(p, v)
#define vf_add(a, b) _mm512_add_ps(a, b)
#define vf_sub(a, b) _mm512_sub_ps(a, b)
#define vf_mul(a, b) _mm512_mul_ps(a, b)
#define vf_max(a, b) _mm512_max_ps(a, b)
#define vf_min(a, b) _mm512_min_ps(a, b)
#define vf_fma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vf_hsum(v) _mm512_reduce_add_ps(v)
#define vf_hmax(v) _mm512_reduce_max_ps(v)
// 16 halves / int8 at p -> floats
#define vf_load_f16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define vf_load_i8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define vf_store_f16(p, v) _mm256_storeu_si256((__m256i *)(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT))
// lanes i < n keep v, the others get `fill`
static inline vf vf_keep_first(vf v, int64_t n, float fill) {
    const __mmask16 m = n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
    return _mm512_mask_blend_ps(m, _mm512_set1_ps(fill), v);
}
#elif defined(__AVX2__)
#define VL 8
typedef __m256 vf;
#define vf_zero() _mm256_setzero_ps()
#define vf_set1(x) _mm256_set1_ps(x)
#define vf_load(p) _mm256_loadu_ps(p)
#define vf_store(p, v) _mm256_storeu_ps(p, v)
#define vf_add(a, b) _mm256_add_ps(a, b)
#define vf_sub(a, b) _mm256_sub_ps(a, b)
#define vf_mul(a, b) _mm256_mul_ps(a, b)
#define vf_max(a, b) _mm256_max_ps(a, b)
#define vf_min(a, b) _mm256_min_ps(a, b)
#define vf_fma(a, b, c) _mm256_fmadd_ps(a, b, c)
static inline float vf_hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    lo = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, lo);
    return _mm_cvtss_f32(_mm_add_ss(lo, sh));
}
static inline float vf_hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}
#define vf_load_f16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define vf_load_i8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#define vf_store_f16(p, v) _mm_storeu_si128((__m128i *)(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT))
static inline vf vf_keep_first(vf v, int64_t n, float fill) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n > 8 ? 8 : n < 0 ? 0 : n)), idx);
    return _mm256_blendv_ps(_mm256_set1_ps(fill), v, _mm256_castsi256_ps(keep));
}
#else
#define VL 1
typedef float vf;
#define vf_zero() 0.0f
#define vf_set1(x) ((float)(x))
#define vf_load(p) (*(p))
#define vf_store(p, v) (*(p) = (v))
#define vf_add(a, b) ((a) + (b))
#define vf_sub(a, b) ((a) - (b))
#define vf_mul(a, b) ((a) * (b))
#define vf_max(a, b) ((a) > (b) ? (a) : (b))
#define vf_min(a, b) ((a) < (b) ? (a) : (b))
#define vf_fma(a, b, c) ((a) * (b) + (c))
#define vf_hsum(v) (v)
#define vf_hmax(v) (v)
#define vf_load_f16(p) l2c_f16_to_f32(*(const uint16_t *)(p))
#define vf_load_i8(p) ((float)*(const int8_t *)(p))
#define vf_store_f16(p, v) (*(uint16_t *)(p) = l2c_f32_to_f16(v))
static inline vf vf_keep_first(vf v, int64_t n, float fill) { return n >= 1 ? v : fill; }
#endif

// ---- exp ----------------------------------------------------------------------------------------
// Cephes expf: n = round(x log2 e), r = x - n ln2 (in two parts), e^r by a degree-6 polynomial,
// times 2^n through the exponent bits; x clamped to [-87.3, 88.4] (about 1.5 ulp). One lane
// computes exactly what exp_s computes for the same float in the same table (fmaf there).

#define L2C_EXP_HI 88.3762626647949f
#define L2C_EXP_LO -87.3365447504f

#if defined(__AVX512F__) || defined(__AVX2__)
#define l2c_fmaf(a, b, c) fmaf(a, b, c)
#else
#define l2c_fmaf(a, b, c) ((a) * (b) + (c))
#endif

static inline float exp_s(float x) {
    if (x != x) return x;                  // nan
    x = x > L2C_EXP_HI ? L2C_EXP_HI : x;
    x = x < L2C_EXP_LO ? L2C_EXP_LO : x;   // also maps -inf to the smallest normal range
    const float n = rintf(x * 1.44269504088896341f);
    float r = l2c_fmaf(n, -0.693359375f, x);
    r = l2c_fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = l2c_fmaf(p, r, 1.3981999507e-3f);
    p = l2c_fmaf(p, r, 8.3334519073e-3f);
    p = l2c_fmaf(p, r, 4.1665795894e-2f);
    p = l2c_fmaf(p, r, 1.6666665459e-1f);
    p = l2c_fmaf(p, r, 5.0000001201e-1f);
    const float y = l2c_fmaf(p, r * r, r) + 1.0f;
    const int32_t e = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &e, 4);
    return y * two_n;
}

#if defined(__AVX512F__)
static inline vf vf_exp(vf x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(L2C_EXP_LO)), _mm512_set1_ps(L2C_EXP_HI));
    const vf n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vf r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    vf p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    const vf y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}
#elif defined(__AVX2__)
static inline vf vf_exp(vf x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(L2C_EXP_LO)), _mm256_set1_ps(L2C_EXP_HI));
    const vf n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vf r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693359375f), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
    vf p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    const vf y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#else
#define vf_exp(x) exp_s(x)
#endif

#endif
