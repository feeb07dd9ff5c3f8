// kernels_q8.c: int8 group quantization and int8 x int8 matmul (included by kernels.c).
//
// Formats: see llama2c.h (L2C_Q8 row-major, L2C_Q8P packed in blocks of 16 rows). An output
// element is
//     out[t, i] = sum_g (sum_{k in g} xq[t,k] * wq[i,k]) * (ws[i,g] * xs[t,g])
// with the inner sum an exact int32 (|q| <= 127, so gs up to 2^17 cannot overflow) and the
// outer sum a float32 in group order, in every build: the SIMD lanes are weight rows, so each
// row adds its group terms in the same order as the scalar twin.

// ---- quantize: xq (T, n), xs (T, n/gs), xsum (T, n/gs) from x (T, n) ----------------------

static void quantize_group(int8_t *restrict q, float *restrict s, int32_t *restrict qsum,
                           const float *restrict x, int64_t gs) {
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
    int32_t sum = 0;
    j = 0;
#if defined(__AVX512F__)
    const __m512 vid = _mm512_set1_ps(id);
    __m512i vsum = _mm512_setzero_si512();
    for (; j + 16 <= gs; j += 16) {
        // round to nearest even (MXCSR default), as nearbyintf below and numpy's rint
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + j), vid));
        vsum = _mm512_add_epi32(vsum, v);
        _mm_storeu_si128((__m128i *)(q + j), _mm512_cvtsepi32_epi8(v));
    }
    sum = _mm512_reduce_add_epi32(vsum);
#elif defined(__AVX2__)
    const __m256 vid = _mm256_set1_ps(id);
    for (; j + 8 <= gs; j += 8) {
        const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j), vid));
        const __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        _mm_storel_epi64((__m128i *)(q + j), _mm_packs_epi16(p16, p16));
    }
    for (int64_t i = 0; i < j; i++) sum += q[i];
#endif
    for (; j < gs; j++) {
        q[j] = (int8_t)nearbyintf(x[j] * id);
        sum += q[j];
    }
    *qsum = sum;
}

static void quantize_q8(int8_t *restrict xq, float *restrict xs, int32_t *restrict xsum,
                        const float *restrict x, int64_t T, int64_t n, int64_t gs, int n_threads) {
    const int64_t groups = T * (n / gs);
    int nth = threads_for(T * n * 4, n_threads);
    L2C_PRAGMA(omp parallel for num_threads(nth) schedule(static) if(nth > 1))
    for (int64_t g = 0; g < groups; g++)
        quantize_group(xq + g * gs, xs + g, xsum + g, x + g * gs, gs);
}

// ---- out (T, d) = Xq (T, n) @ Wq (d, n)^T, Wq packed (L2C_Q8P, see llama2c.h) -----------------
//
// For one block of 16 weight rows and one activation row, step j of a group broadcasts the 4
// activation bytes x[4j..4j+3] to all 16 lanes and multiplies them with the 64 packed bytes
// (16 rows x 4 inputs, offset by 128): lane r accumulates sum_c (w[r][4j+c] + 128) * x[4j+c].
// At the end of a group 128 * sum(x) comes off, and the 16 int32 sums are scaled by
// ws[16 rows] * xs[g] at once. On AVX-512 several independent accumulators (over j when
// decoding one token, one per token when prefilling 8) hide the latency of vpdpbusd. AVX2 has
// no u8 x s8 dot with int32 sums and its int16 pair sums of maddubs would overflow with the
// offset, so there the offset comes off the weights and w takes x's sign (|x| <= 127 keeps
// 2 * 127 * 127 in int16 range). The block's weights stay in L1 while it meets every
// activation row, so the matrix streams from memory once per call; threads split the blocks.

#define Q8R L2C_Q8_ROWS

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
static inline __m512i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

// one block x one activation row: out16 (16,)
static void block_q8_t1(float *restrict out16, const int8_t *restrict wb, const float *restrict sb,
                        const int8_t *restrict x, const float *restrict xs,
                        const int32_t *restrict xsum, int64_t ng, int64_t gs) {
    const int64_t steps = gs / 4;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++, wb += steps * 64) {
        const int8_t *xg = x + g * gs;
        __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
        __m512i a2 = _mm512_setzero_si512(), a3 = _mm512_setzero_si512();
        int64_t j = 0;
        for (; j + 4 <= steps; j += 4) {
            a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(wb + j * 64), bcast4(xg + 4 * j));
            a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(wb + j * 64 + 64), bcast4(xg + 4 * j + 4));
            a2 = _mm512_dpbusd_epi32(a2, _mm512_loadu_si512(wb + j * 64 + 128), bcast4(xg + 4 * j + 8));
            a3 = _mm512_dpbusd_epi32(a3, _mm512_loadu_si512(wb + j * 64 + 192), bcast4(xg + 4 * j + 12));
        }
        for (; j < steps; j++)
            a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(wb + j * 64), bcast4(xg + 4 * j));
        __m512i isum = _mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3));
        isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(128 * xsum[g]));
        const __m512 scale = _mm512_mul_ps(_mm512_loadu_ps(sb + g * Q8R), _mm512_set1_ps(xs[g]));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc);
    }
    _mm512_storeu_ps(out16, acc);
}

// one block x 8 activation rows (rows x + t*n): out + t*d (16 each)
#define Q8_NT 8
static void block_q8_t8(float *restrict out, int64_t d, const int8_t *restrict wb,
                        const float *restrict sb, const int8_t *restrict x,
                        const float *restrict xs, const int32_t *restrict xsum, int64_t n,
                        int64_t ng, int64_t gs, int64_t rows) {
    const int64_t steps = gs / 4;
    __m512 acc[Q8_NT];
    for (int t = 0; t < Q8_NT; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++, wb += steps * 64) {
        __m512i a[Q8_NT];
        for (int t = 0; t < Q8_NT; t++) a[t] = _mm512_setzero_si512();
        for (int64_t j = 0; j < steps; j++) {
            const __m512i w = _mm512_loadu_si512(wb + j * 64);
            for (int t = 0; t < Q8_NT; t++)
                a[t] = _mm512_dpbusd_epi32(a[t], w, bcast4(x + t * n + g * gs + 4 * j));
        }
        const __m512 sv = _mm512_loadu_ps(sb + g * Q8R);
        for (int t = 0; t < Q8_NT; t++) {
            const __m512i isum = _mm512_sub_epi32(a[t], _mm512_set1_epi32(128 * xsum[t * ng + g]));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum),
                                     _mm512_mul_ps(sv, _mm512_set1_ps(xs[t * ng + g])), acc[t]);
        }
    }
    const __mmask16 m = (__mmask16)((1u << rows) - 1u);
    for (int t = 0; t < Q8_NT; t++) _mm512_mask_storeu_ps(out + t * d, m, acc[t]);
}
#else
// one block x one activation row: out16 (16,)
static void block_q8_t1(float *restrict out16, const int8_t *restrict wb, const float *restrict sb,
                        const int8_t *restrict x, const float *restrict xs,
                        const int32_t *restrict xsum, int64_t ng, int64_t gs) {
    const int64_t steps = gs / 4;
    (void)xsum;
#if defined(__AVX2__)
    const __m256i ones = _mm256_set1_epi16(1), offset = _mm256_set1_epi8((char)0x80);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++, wb += steps * 64) {
        __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
        const int8_t *xg = x + g * gs;
        for (int64_t j = 0; j < steps; j++) {
            int32_t x4;
            memcpy(&x4, xg + 4 * j, 4);
            const __m256i xb = _mm256_set1_epi32(x4), xa = _mm256_abs_epi8(xb);
            const __m256i w0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wb + j * 64)), offset);
            const __m256i w1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wb + j * 64 + 32)), offset);
            s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_maddubs_epi16(xa, _mm256_sign_epi8(w0, xb)), ones));
            s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_maddubs_epi16(xa, _mm256_sign_epi8(w1, xb)), ones));
        }
        const __m256 xsv = _mm256_set1_ps(xs[g]);
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_mul_ps(_mm256_loadu_ps(sb + g * Q8R), xsv), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_mul_ps(_mm256_loadu_ps(sb + g * Q8R + 8), xsv), acc1);
    }
    _mm256_storeu_ps(out16, acc0);
    _mm256_storeu_ps(out16 + 8, acc1);
#else
    float acc[Q8R] = {0};
    for (int64_t g = 0; g < ng; g++) {
        int32_t isum[Q8R] = {0};
        const int8_t *xg = x + g * gs;
        for (int64_t j = 0; j < steps; j++, wb += 4 * Q8R)
            for (int r = 0; r < Q8R; r++)
                for (int c = 0; c < 4; c++)
                    isum[r] += (int32_t)xg[4 * j + c] * (int32_t)(int8_t)((uint8_t)wb[4 * r + c] ^ 0x80u);
        for (int r = 0; r < Q8R; r++) acc[r] += (float)isum[r] * (sb[g * Q8R + r] * xs[g]);
    }
    memcpy(out16, acc, sizeof(acc));
#endif
}
#endif

static void matmul_q8(float *restrict out, const int8_t *restrict xq, const float *restrict xs,
                      const int32_t *restrict xsum, const int8_t *restrict wq,
                      const float *restrict ws, int64_t T, int64_t n, int64_t d, int64_t gs,
                      int n_threads) {
    const int64_t ng = n / gs, n_blocks = (d + Q8R - 1) / Q8R;
    int nth = threads_for(T * n * d, n_threads);
    L2C_PRAGMA(omp parallel for num_threads(nth) schedule(static) if(nth > 1))
    for (int64_t b = 0; b < n_blocks; b++) {
        const int8_t *wb = wq + b * Q8R * n;
        const float *sb = ws + b * Q8R * ng;
        const int64_t rows = d - b * Q8R < Q8R ? d - b * Q8R : Q8R;
        int64_t t = 0;
#ifdef Q8_NT
        for (; t + Q8_NT <= T; t += Q8_NT)
            block_q8_t8(out + t * d + b * Q8R, d, wb, sb, xq + t * n, xs + t * ng, xsum + t * ng, n,
                        ng, gs, rows);
#endif
        for (; t < T; t++) {
            float o16[Q8R];
            block_q8_t1(o16, wb, sb, xq + t * n, xs + t * ng, xsum + t * ng, ng, gs);
            memcpy(out + t * d + b * Q8R, o16, (size_t)rows * sizeof(float));
        }
    }
}
