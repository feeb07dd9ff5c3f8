// kernels_q8.c: int8 group quantization and int8 x int8 matmul (included by kernels.c).
//
// Formats: see llama2c.h (weights: L2C_Q8 row-major, L2C_Q8P packed in blocks of 16 rows;
// activations: l2c_qact, 8-bit or two planes). With v the integer activation (hi, or
// 128 * hi + lo), an output element is
//     out[t, i] = sum_g (sum_{k in g} v[t,k] * wq[i,k]) * (ws[i,g] * xs[t,g])
//               [ + wm[i,g] * xs[t,g] * sum_{k in g} v[t,k]     when W has offsets ]
// with the inner sums exact int32 (|v| <= 16256, |q| <= 127: no overflow for gs <= 256) and
// the outer sum a float32 in group order, in every build: the SIMD lanes are weight rows, so
// each row adds its group terms in the same order as the scalar twin.

// ---- quantize ----------------------------------------------------------------------------------

#define Q15_MAX 16256.0f  // 127 * 128: two-plane activations, hi = round(v / 128) in [-127, 127]

static float group_amax(const float *restrict x, int64_t gs) {
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
    return amax;
}

// one group of gs values: hi (and lo), scale, sums. Rounding is to nearest even throughout
// (MXCSR default in the SIMD paths, nearbyintf in the scalar one), as numpy's rint.
static void quantize_group(int8_t *restrict hi, int8_t *restrict lo, float *restrict s,
                           int32_t *restrict sum_hi, int32_t *restrict sum_lo,
                           const float *restrict x, int64_t gs) {
    const float d = group_amax(x, gs) / (lo ? Q15_MAX : L2C_Q8_MAX);
    const float id = d != 0.0f ? 1.0f / d : 0.0f;  // an all-zero group gets scale 0, values 0
    *s = d;
    int32_t sh = 0, sl = 0;
    int64_t j = 0;
#if defined(__AVX512F__)
    const __m512 vid = _mm512_set1_ps(id), inv128 = _mm512_set1_ps(1.0f / 128.0f);
    __m512i vsh = _mm512_setzero_si512(), vsl = _mm512_setzero_si512();
    for (; j + 16 <= gs; j += 16) {
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + j), vid));
        if (lo) {
            const __m512i h = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_cvtepi32_ps(v), inv128));
            const __m512i l = _mm512_sub_epi32(v, _mm512_slli_epi32(h, 7));
            vsh = _mm512_add_epi32(vsh, h);
            vsl = _mm512_add_epi32(vsl, l);
            _mm_storeu_si128((__m128i *)(hi + j), _mm512_cvtsepi32_epi8(h));
            _mm_storeu_si128((__m128i *)(lo + j), _mm512_cvtsepi32_epi8(l));
        } else {
            vsh = _mm512_add_epi32(vsh, v);
            _mm_storeu_si128((__m128i *)(hi + j), _mm512_cvtsepi32_epi8(v));
        }
    }
    sh = _mm512_reduce_add_epi32(vsh);
    sl = _mm512_reduce_add_epi32(vsl);
#endif
    for (; j < gs; j++) {
        const float v = nearbyintf(x[j] * id);
        if (lo) {
            const float h = nearbyintf(v * (1.0f / 128.0f));
            hi[j] = (int8_t)h;
            lo[j] = (int8_t)(v - 128.0f * h);
            sh += hi[j];
            sl += lo[j];
        } else {
            hi[j] = (int8_t)v;
            sh += hi[j];
        }
    }
    *sum_hi = sh;
    if (lo) *sum_lo = sl;
}

static void quantize_q8(const l2c_qact *a, const float *restrict x, int64_t T, int64_t n,
                        int64_t gs, int n_threads) {
    const int64_t groups = T * (n / gs);
    const int two = a->lo != NULL;
    int nth = threads_for(T * n * 4, n_threads);
    L2C_PRAGMA(omp parallel for num_threads(nth) schedule(static) if(nth > 1))
    for (int64_t g = 0; g < groups; g++)
        quantize_group(a->hi + g * gs, two ? a->lo + g * gs : NULL, a->s + g, a->sum_hi + g,
                       two ? a->sum_lo + g : NULL, x + g * gs, gs);
}

// ---- out (T, d) = A (T, n) @ W (d, n)^T, W packed (L2C_Q8P, see llama2c.h) --------------------
//
// For one block of 16 weight rows and one activation row, step j of a group broadcasts the 4
// activation bytes x[4j..4j+3] to all 16 lanes and multiplies them with the 64 packed bytes
// (16 rows x 4 inputs, offset by 128): lane r accumulates sum_c (w[r][4j+c] + 128) * x[4j+c].
// At the end of a group 128 * sum(x) comes off, the planes combine (128 * hi + lo), and the 16
// int32 sums are scaled by ws[16 rows] * xs[g] at once. On AVX-512 independent accumulators
// (over j when decoding one token, one per token when prefilling 8) hide the latency of
// vpdpbusd. AVX2 has no u8 x s8 dot with int32 sums and its int16 pair sums of maddubs would
// overflow with the offset, so there the offset comes off the weights and w takes x's sign
// (|x| <= 127 keeps 2 * 127 * 127 in int16 range). A block's weights stay in L1 while it meets
// every activation row, so W streams from memory once per call; threads split the blocks.

#define Q8R L2C_Q8_ROWS

// the group's integer activation sum sum(v) and the int32 offset correction
static inline int32_t vsum(const l2c_qact *a, int64_t i) {
    return a->lo ? 128 * a->sum_hi[i] + a->sum_lo[i] : a->sum_hi[i];
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
// Decode streams each weight byte once: software prefetch this far ahead keeps more cache-line
// reads in flight than the hardware prefetcher alone when the dot work per line grows.
#define L2C_Q8_PREFETCH 2048
static inline __m512i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

// one block x one activation row (offset ng * t0 into the activation arrays): out16 (16,)
static inline void block_q8_t1(float *restrict out16, const int8_t *restrict wb,
                               const float *restrict sb, const float *restrict mb,
                               const l2c_qact *a, int64_t row, int64_t n, int64_t ng, int64_t gs) {
    const int64_t steps = gs / 4;
    const int8_t *xh = a->hi + row * n, *xl = a->lo ? a->lo + row * n : NULL;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++, wb += steps * 64) {
        const int8_t *hg = xh + g * gs;
        __m512i h0 = _mm512_setzero_si512(), h1 = _mm512_setzero_si512();
        __m512i h2 = _mm512_setzero_si512(), h3 = _mm512_setzero_si512();
        __m512i isum;
        int64_t j = 0;
        if (xl) {
            const int8_t *lg = xl + g * gs;
            __m512i l0 = _mm512_setzero_si512(), l1 = _mm512_setzero_si512();
            __m512i l2 = _mm512_setzero_si512(), l3 = _mm512_setzero_si512();
            for (; j + 4 <= steps; j += 4) {
                for (int p = 0; p < 4; p++) _mm_prefetch((const char *)(wb + j * 64 + p * 64 + L2C_Q8_PREFETCH), _MM_HINT_T0);
                const __m512i w0 = _mm512_loadu_si512(wb + j * 64), w1 = _mm512_loadu_si512(wb + j * 64 + 64);
                const __m512i w2 = _mm512_loadu_si512(wb + j * 64 + 128), w3 = _mm512_loadu_si512(wb + j * 64 + 192);
                h0 = _mm512_dpbusd_epi32(h0, w0, bcast4(hg + 4 * j));
                l0 = _mm512_dpbusd_epi32(l0, w0, bcast4(lg + 4 * j));
                h1 = _mm512_dpbusd_epi32(h1, w1, bcast4(hg + 4 * j + 4));
                l1 = _mm512_dpbusd_epi32(l1, w1, bcast4(lg + 4 * j + 4));
                h2 = _mm512_dpbusd_epi32(h2, w2, bcast4(hg + 4 * j + 8));
                l2 = _mm512_dpbusd_epi32(l2, w2, bcast4(lg + 4 * j + 8));
                h3 = _mm512_dpbusd_epi32(h3, w3, bcast4(hg + 4 * j + 12));
                l3 = _mm512_dpbusd_epi32(l3, w3, bcast4(lg + 4 * j + 12));
            }
            for (; j < steps; j++) {
                const __m512i w0 = _mm512_loadu_si512(wb + j * 64);
                h0 = _mm512_dpbusd_epi32(h0, w0, bcast4(hg + 4 * j));
                l0 = _mm512_dpbusd_epi32(l0, w0, bcast4(lg + 4 * j));
            }
            const __m512i hs = _mm512_add_epi32(_mm512_add_epi32(h0, h1), _mm512_add_epi32(h2, h3));
            const __m512i ls = _mm512_add_epi32(_mm512_add_epi32(l0, l1), _mm512_add_epi32(l2, l3));
            isum = _mm512_add_epi32(_mm512_slli_epi32(hs, 7), ls);
        } else {
            for (; j + 4 <= steps; j += 4) {
                for (int p = 0; p < 4; p++) _mm_prefetch((const char *)(wb + j * 64 + p * 64 + L2C_Q8_PREFETCH), _MM_HINT_T0);
                h0 = _mm512_dpbusd_epi32(h0, _mm512_loadu_si512(wb + j * 64), bcast4(hg + 4 * j));
                h1 = _mm512_dpbusd_epi32(h1, _mm512_loadu_si512(wb + j * 64 + 64), bcast4(hg + 4 * j + 4));
                h2 = _mm512_dpbusd_epi32(h2, _mm512_loadu_si512(wb + j * 64 + 128), bcast4(hg + 4 * j + 8));
                h3 = _mm512_dpbusd_epi32(h3, _mm512_loadu_si512(wb + j * 64 + 192), bcast4(hg + 4 * j + 12));
            }
            for (; j < steps; j++)
                h0 = _mm512_dpbusd_epi32(h0, _mm512_loadu_si512(wb + j * 64), bcast4(hg + 4 * j));
            isum = _mm512_add_epi32(_mm512_add_epi32(h0, h1), _mm512_add_epi32(h2, h3));
        }
        const int32_t vs = vsum(a, row * ng + g);
        const float xs = a->s[row * ng + g];
        isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(128 * vs));  // the weights' +128 offset
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum),
                              _mm512_mul_ps(_mm512_loadu_ps(sb + g * Q8R), _mm512_set1_ps(xs)), acc);
        if (mb) acc = _mm512_fmadd_ps(_mm512_loadu_ps(mb + g * Q8R), _mm512_set1_ps(xs * (float)vs), acc);
    }
    _mm512_storeu_ps(out16, acc);
}

// one block x 8 activation rows row0..row0+7: out + t*d (16 each, `rows` of them valid)
#define Q8_NT 8
static void block_q8_t8(float *restrict out, int64_t d, const int8_t *restrict wb,
                        const float *restrict sb, const float *restrict mb, const l2c_qact *a,
                        int64_t row0, int64_t n, int64_t ng, int64_t gs, int64_t rows) {
    const int64_t steps = gs / 4;
    const int8_t *xh = a->hi + row0 * n, *xl = a->lo ? a->lo + row0 * n : NULL;
    __m512 acc[Q8_NT];
    for (int t = 0; t < Q8_NT; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++, wb += steps * 64) {
        __m512i h[Q8_NT], l[Q8_NT];
        for (int t = 0; t < Q8_NT; t++) h[t] = l[t] = _mm512_setzero_si512();
        if (xl) {
            for (int64_t j = 0; j < steps; j++) {
                const __m512i w = _mm512_loadu_si512(wb + j * 64);
                for (int t = 0; t < Q8_NT; t++) {
                    h[t] = _mm512_dpbusd_epi32(h[t], w, bcast4(xh + t * n + g * gs + 4 * j));
                    l[t] = _mm512_dpbusd_epi32(l[t], w, bcast4(xl + t * n + g * gs + 4 * j));
                }
            }
            for (int t = 0; t < Q8_NT; t++) h[t] = _mm512_add_epi32(_mm512_slli_epi32(h[t], 7), l[t]);
        } else {
            for (int64_t j = 0; j < steps; j++) {
                const __m512i w = _mm512_loadu_si512(wb + j * 64);
                for (int t = 0; t < Q8_NT; t++)
                    h[t] = _mm512_dpbusd_epi32(h[t], w, bcast4(xh + t * n + g * gs + 4 * j));
            }
        }
        const __m512 sv = _mm512_loadu_ps(sb + g * Q8R);
        for (int t = 0; t < Q8_NT; t++) {
            const int64_t i = (row0 + t) * ng + g;
            const int32_t vs = vsum(a, i);
            const __m512i isum = _mm512_sub_epi32(h[t], _mm512_set1_epi32(128 * vs));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(sv, _mm512_set1_ps(a->s[i])),
                                     acc[t]);
            if (mb)
                acc[t] = _mm512_fmadd_ps(_mm512_loadu_ps(mb + g * Q8R),
                                         _mm512_set1_ps(a->s[i] * (float)vs), acc[t]);
        }
    }
    const __mmask16 m = (__mmask16)((1u << rows) - 1u);
    for (int t = 0; t < Q8_NT; t++) _mm512_mask_storeu_ps(out + t * d, m, acc[t]);
}
#else
// one block x one activation row: out16 (16,)
static inline void block_q8_t1(float *restrict out16, const int8_t *restrict wb,
                               const float *restrict sb, const float *restrict mb,
                               const l2c_qact *a, int64_t row, int64_t n, int64_t ng, int64_t gs) {
    const int64_t steps = gs / 4;
    const int8_t *xh = a->hi + row * n, *xl = a->lo ? a->lo + row * n : NULL;
#if defined(__AVX2__)
    const __m256i ones = _mm256_set1_epi16(1), offset = _mm256_set1_epi8((char)0x80);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++, wb += steps * 64) {
        __m256i s[2][2] = {{_mm256_setzero_si256(), _mm256_setzero_si256()},
                           {_mm256_setzero_si256(), _mm256_setzero_si256()}};  // [plane][half]
        for (int64_t j = 0; j < steps; j++) {
            const __m256i w0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wb + j * 64)), offset);
            const __m256i w1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wb + j * 64 + 32)), offset);
            for (int p = 0; p < (xl ? 2 : 1); p++) {
                int32_t x4;
                memcpy(&x4, (p ? xl : xh) + g * gs + 4 * j, 4);
                const __m256i xb = _mm256_set1_epi32(x4), xa = _mm256_abs_epi8(xb);
                s[p][0] = _mm256_add_epi32(s[p][0], _mm256_madd_epi16(_mm256_maddubs_epi16(xa, _mm256_sign_epi8(w0, xb)), ones));
                s[p][1] = _mm256_add_epi32(s[p][1], _mm256_madd_epi16(_mm256_maddubs_epi16(xa, _mm256_sign_epi8(w1, xb)), ones));
            }
        }
        if (xl) {
            s[0][0] = _mm256_add_epi32(_mm256_slli_epi32(s[0][0], 7), s[1][0]);
            s[0][1] = _mm256_add_epi32(_mm256_slli_epi32(s[0][1], 7), s[1][1]);
        }
        const float xs = a->s[row * ng + g];
        const __m256 xsv = _mm256_set1_ps(xs);
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[0][0]), _mm256_mul_ps(_mm256_loadu_ps(sb + g * Q8R), xsv), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[0][1]), _mm256_mul_ps(_mm256_loadu_ps(sb + g * Q8R + 8), xsv), acc1);
        if (mb) {
            const __m256 mv = _mm256_set1_ps(xs * (float)vsum(a, row * ng + g));
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(mb + g * Q8R), mv, acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(mb + g * Q8R + 8), mv, acc1);
        }
    }
    _mm256_storeu_ps(out16, acc0);
    _mm256_storeu_ps(out16 + 8, acc1);
#else
    float acc[Q8R] = {0};
    for (int64_t g = 0; g < ng; g++) {
        int32_t isum[Q8R] = {0};
        for (int64_t j = 0; j < steps; j++, wb += 4 * Q8R)
            for (int c = 0; c < 4; c++) {
                const int64_t k = g * gs + 4 * j + c;
                const int32_t v = xl ? 128 * (int32_t)xh[k] + (int32_t)xl[k] : (int32_t)xh[k];
                for (int r = 0; r < Q8R; r++)
                    isum[r] += v * (int32_t)(int8_t)((uint8_t)wb[4 * r + c] ^ 0x80u);
            }
        const float xs = a->s[row * ng + g];
        const float mterm = mb ? xs * (float)vsum(a, row * ng + g) : 0.0f;
        for (int r = 0; r < Q8R; r++) {
            acc[r] += (float)isum[r] * (sb[g * Q8R + r] * xs);
            if (mb) acc[r] += mb[g * Q8R + r] * mterm;
        }
    }
    memcpy(out16, acc, sizeof(acc));
#endif
}
#endif

static void matmul_q8(float *restrict out, const l2c_qact *a, const l2c_matrix *W, int64_t T,
                      int n_threads) {
    const int64_t n = W->cols, d = W->rows, gs = W->group_size;
    const int64_t ng = n / gs, n_blocks = (d + Q8R - 1) / Q8R;
    int nth = threads_for(T * n * d, n_threads);
    L2C_PRAGMA(omp parallel for num_threads(nth) schedule(static) if(nth > 1))
    for (int64_t b = 0; b < n_blocks; b++) {
        const int8_t *wb = W->q + b * Q8R * n;
        const float *sb = W->s + b * Q8R * ng, *mb = W->m ? W->m + b * Q8R * ng : NULL;
        const int64_t rows = d - b * Q8R < Q8R ? d - b * Q8R : Q8R;
        int64_t t = 0;
#ifdef Q8_NT
        for (; t + Q8_NT <= T; t += Q8_NT)
            block_q8_t8(out + t * d + b * Q8R, d, wb, sb, mb, a, t, n, ng, gs, rows);
#endif
        for (; t < T; t++) {
            float o16[Q8R];
            block_q8_t1(o16, wb, sb, mb, a, t, n, ng, gs);
            memcpy(out + t * d + b * Q8R, o16, (size_t)rows * sizeof(float));
        }
    }
}
