// kernels_q8.c: int8 group quantization and int8 x int8 matmul (included by kernels.c).
//
// Format (see llama2c.h): a quantized row of n values is n int8 q plus n/gs float scales;
// group g of the row is q[g*gs .. g*gs+gs) with value q * s[g]. An output element is
//     out[t, i] = sum_g (sum_{k in g} xq[t,k] * wq[i,k]) * xs[t,g] * ws[i,g]
// with the inner sum an exact int32 (|q| <= 127, so gs up to 2^17 cannot overflow), and the
// outer sum a float32 in group order. The SIMD paths compute the same int32 group sums and
// differ from the scalar twin only in how the float group terms are added up.
//
// SIMD: AVX-512 VNNI `vpdpbusd` (u8 x s8 -> s32, 64 bytes per instruction) and AVX2
// `vpmaddubsw` + `vpmaddwd`; both need one unsigned operand, so |x| is paired with w carrying
// x's sign (`vpsignb` on AVX2, a masked negate on AVX-512). Values stay within [-127, 127] so
// 2 * 127 * 127 fits the int16 pairs of maddubs.

// ---- quantize: xq (T, n), xs (T, n/gs) from x (T, n) ----------------------------------------

static void quantize_group(int8_t *restrict q, float *restrict s, const float *restrict x,
                           int64_t gs) {
    float amax = 0.0f;
    int64_t j = 0;
#if defined(__AVX512F__)
    __m512 vmax = _mm512_setzero_ps();
    for (; j + 16 <= gs; j += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + j)));
    amax = _mm512_reduce_max_ps(vmax);
#elif defined(__AVX2__)
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 vmax = _mm256_setzero_ps();
    for (; j + 8 <= gs; j += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
    float lanes[8];
    _mm256_storeu_ps(lanes, vmax);
    for (int l = 0; l < 8; l++) amax = lanes[l] > amax ? lanes[l] : amax;
#endif
    for (; j < gs; j++) {
        const float a = fabsf(x[j]);
        amax = a > amax ? a : amax;
    }
    const float d = amax / L2C_Q8_MAX;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;  // an all-zero group gets scale 0, q = 0
    *s = d;
    j = 0;
#if defined(__AVX512F__)
    const __m512 vid = _mm512_set1_ps(id);
    for (; j + 16 <= gs; j += 16) {
        // round to nearest even (MXCSR default), as nearbyintf below and numpy's rint
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + j), vid));
        _mm_storeu_si128((__m128i *)(q + j), _mm512_cvtsepi32_epi8(v));
    }
#elif defined(__AVX2__)
    const __m256 vid = _mm256_set1_ps(id);
    for (; j + 8 <= gs; j += 8) {
        __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j), vid));
        __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        _mm_storel_epi64((__m128i *)(q + j), _mm_packs_epi16(p16, p16));
    }
#endif
    for (; j < gs; j++) q[j] = (int8_t)nearbyintf(x[j] * id);
}

static void quantize_q8(int8_t *restrict xq, float *restrict xs, const float *restrict x,
                        int64_t T, int64_t n, int64_t gs, int n_threads) {
    const int64_t groups = T * (n / gs);
    int nth = threads_for(T * n * 4, n_threads);
    L2C_PRAGMA(omp parallel for num_threads(nth) schedule(static) if(nth > 1))
    for (int64_t g = 0; g < groups; g++) quantize_group(xq + g * gs, xs + g, x + g * gs, gs);
}

// ---- dot product of one quantized row with one quantized activation row ---------------------

static inline float dot_q8(const int8_t *restrict w, const float *restrict ws,
                           const int8_t *restrict x, const float *restrict xs, int64_t n,
                           int64_t gs) {
    const int64_t ng = n / gs;
    int64_t g = 0;
    float sum = 0.0f;
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (gs % 64 == 0) {
        __m512 acc = _mm512_setzero_ps();
        for (; g < ng; g++) {
            __m512i isum = _mm512_setzero_si512();
            for (int64_t k = g * gs; k < g * gs + gs; k += 64) {
                const __m512i xv = _mm512_loadu_si512((const void *)(x + k));
                const __m512i wv = _mm512_loadu_si512((const void *)(w + k));
                const __mmask64 neg = _mm512_movepi8_mask(xv);  // lanes where x < 0
                const __m512i sw = _mm512_mask_sub_epi8(wv, neg, _mm512_setzero_si512(), wv);
                isum = _mm512_dpbusd_epi32(isum, _mm512_abs_epi8(xv), sw);
            }
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(ws[g] * xs[g]), acc);
        }
        sum = _mm512_reduce_add_ps(acc);
    } else if (gs % 32 == 0) {
        __m256 acc = _mm256_setzero_ps();
        for (; g < ng; g++) {
            __m256i isum = _mm256_setzero_si256();
            for (int64_t k = g * gs; k < g * gs + gs; k += 32) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + k));
                const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + k));
                isum = _mm256_dpbusd_epi32(isum, _mm256_abs_epi8(xv), _mm256_sign_epi8(wv, xv));
            }
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(ws[g] * xs[g]), acc);
        }
        __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
        sum = _mm_cvtss_f32(_mm_add_ss(lo, _mm_movehdup_ps(lo)));
    }
#elif defined(__AVX2__)
    if (gs % 32 == 0) {
        const __m256i ones = _mm256_set1_epi16(1);
        __m256 acc = _mm256_setzero_ps();
        for (; g < ng; g++) {
            __m256i isum = _mm256_setzero_si256();
            for (int64_t k = g * gs; k < g * gs + gs; k += 32) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + k));
                const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + k));
                const __m256i p16 = _mm256_maddubs_epi16(_mm256_abs_epi8(xv), _mm256_sign_epi8(wv, xv));
                isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p16, ones));
            }
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(ws[g] * xs[g]), acc);
        }
        sum = hsum256(acc);
    }
#endif
    for (; g < ng; g++) {  // scalar twin (and group sizes the SIMD paths do not take)
        int32_t isum = 0;
        for (int64_t k = g * gs; k < g * gs + gs; k++) isum += (int32_t)x[k] * (int32_t)w[k];
        sum += (float)isum * (ws[g] * xs[g]);
    }
    return sum;
}

// ---- out (T, d) = Xq (T, n) @ Wq (d, n)^T ---------------------------------------------------
// Parallel over weight rows; for T > 1 each row (n bytes, in L1) meets every token before the
// next row is read, so the weights stream from memory once per call.

static void matmul_q8(float *restrict out, const int8_t *restrict xq, const float *restrict xs,
                      const int8_t *restrict wq, const float *restrict ws, int64_t T, int64_t n,
                      int64_t d, int64_t gs, int n_threads) {
    const int64_t ng = n / gs;
    int nth = threads_for(T * n * d, n_threads);
    L2C_PRAGMA(omp parallel for num_threads(nth) schedule(static) if(nth > 1))
    for (int64_t i = 0; i < d; i++)
        for (int64_t t = 0; t < T; t++)
            out[t * d + i] = dot_q8(wq + i * n, ws + i * ng, xq + t * n, xs + t * ng, n, gs);
}
