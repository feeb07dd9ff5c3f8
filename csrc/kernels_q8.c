// kernels_q8.c: group quantization of activations, and the int8 matmul (L2C_Q8P weights).
//
// Formats: see llama2c.h (weights: L2C_Q8P blocks of 16 rows; activations: l2c_qact, 8-bit or
// two planes). With v the integer activation (hi, or 128 * hi + lo), an output element is
//     out[t, i] = sum_g (sum_{k in g} v[t,k] * wq[i,k]) * (ws[i,g] * xs[t,g])
//               [ + wm[i,g] * (xs[t,g] * sum_{k in g} v[t,k])     when W has offsets ]
// with the inner sums exact int32 (|v| <= 16256, |q| <= 127: no overflow for gs <= 256) and
// the outer sum a float32 in group order, in every path (group_finish_*): the SIMD lanes are
// weight rows, so each row adds its group terms in the same order whatever the tile.
#include "kernels_common.h"

// ---- quantize -----------------------------------------------------------------------------------

#define Q15_MAX 16256.0f  // 127 * 128: two-plane activations, hi = round(v / 128) in [-127, 127]

static float group_amax(const float *restrict x, int64_t gs) {
    float amax = 0.0f;
    int64_t j = 0;
#if defined(L2C_X512)
    __m512 vmax = _mm512_setzero_ps();
    for (; j + 16 <= gs; j += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + j)));
    amax = _mm512_reduce_max_ps(vmax);
#elif defined(L2C_X256)
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

// one group of gs values: hi (and lo), v16, scale, sums. Rounding is to nearest even throughout
// (MXCSR default in the SIMD paths, nearbyintf in the scalar one), as numpy's rint.
static void quantize_group(int8_t *restrict hi, int8_t *restrict lo, int16_t *restrict v16,
                           float *restrict s, int32_t *restrict sum_hi, int32_t *restrict sum_lo,
                           const float *restrict x, int64_t gs) {
    const float d = group_amax(x, gs) / (lo ? Q15_MAX : L2C_Q8_MAX);
    const float id = d != 0.0f ? 1.0f / d : 0.0f;  // an all-zero group gets scale 0, values 0
    *s = d;
    int32_t sh = 0, sl = 0;
    int64_t j = 0;
#if defined(L2C_X512)
    const __m512 vid = _mm512_set1_ps(id), inv128 = _mm512_set1_ps(1.0f / 128.0f);
    __m512i vsh = _mm512_setzero_si512(), vsl = _mm512_setzero_si512();
    for (; j + 16 <= gs; j += 16) {
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + j), vid));
        _mm256_storeu_si256((__m256i *)(v16 + j), _mm512_cvtepi32_epi16(v));
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
#elif defined(L2C_X256)
    const __m256 vid = _mm256_set1_ps(id), inv128 = _mm256_set1_ps(1.0f / 128.0f);
    __m256i vsh = _mm256_setzero_si256(), vsl = _mm256_setzero_si256();
    for (; j + 8 <= gs; j += 8) {
        const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j), vid));
        // int32 -> int16 (|v| <= 16256) -> int8 lanes, in order
        const __m128i v16x = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        _mm_storeu_si128((__m128i *)(v16 + j), v16x);
        if (lo) {
            const __m256i h = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_cvtepi32_ps(v), inv128));
            const __m256i l = _mm256_sub_epi32(v, _mm256_slli_epi32(h, 7));
            vsh = _mm256_add_epi32(vsh, h);
            vsl = _mm256_add_epi32(vsl, l);
            const __m128i h16 = _mm_packs_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
            const __m128i l16 = _mm_packs_epi32(_mm256_castsi256_si128(l), _mm256_extracti128_si256(l, 1));
            _mm_storel_epi64((__m128i *)(hi + j), _mm_packs_epi16(h16, h16));
            _mm_storel_epi64((__m128i *)(lo + j), _mm_packs_epi16(l16, l16));
        } else {
            vsh = _mm256_add_epi32(vsh, v);
            _mm_storel_epi64((__m128i *)(hi + j), _mm_packs_epi16(v16x, v16x));
        }
    }
    int32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, vsh);
    for (int l = 0; l < 8; l++) sh += lanes[l];
    _mm256_storeu_si256((__m256i *)lanes, vsl);
    for (int l = 0; l < 8; l++) sl += lanes[l];
#endif
    for (; j < gs; j++) {
        const float v = nearbyintf(x[j] * id);
        v16[j] = (int16_t)v;
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

static void quantize(const l2c_qact *a, const float *restrict x, int64_t T, int64_t n,
                     int64_t gs, int n_threads) {
    const int64_t groups = T * (n / gs);
    const int two = a->lo != NULL;
    const int nth = threads_for(T * n * 4, n_threads);
    L2C_PFOR(nth, g, groups,
             quantize_group(a->hi + g * gs, two ? a->lo + g * gs : NULL, a->v16 + g * gs, a->s + g,
                            a->sum_hi + g, two ? a->sum_lo + g : NULL, x + g * gs, gs));
}

// ---- out (T, d) = A (T, n) @ W (d, n)^T, W packed (L2C_Q8P) -------------------------------------
//
// A tile is RB blocks of 16 rows x NT tokens. For each group: integer accumulators per (block,
// token) start at -128 * sum(v) (taking off the weights' +128 offset), each step of 4 inputs
// loads 64 bytes per block (16 rows x 4 inputs) and broadcasts the 4 activation bytes of each
// token, so one weight load feeds NT dot instructions and one broadcast RB; at the group's end
// group_finish adds the float terms. A group's int32 sums are exact whatever the tile, so
// every tile shape gives the same bits. Decode (T = 1) walks a thread's blocks one at a time
// (one stream, prefetched: kernels_common.h; more blocks side by side spill registers).
//   avx512:  vpdpbusd zmm (u8 weight x s8 activation, 4 products per lane)
//   avxvnni: vpdpbusd ymm (two per 16 rows)
//   avx2:    no u8 x s8 dot with int32 sums: vpmaddwd of the weights widened to u16 and the
//            codes as int16 (l2c_qact.v16), 2 products per lane, pairs added at the group's end;
//            8-bit and 16-bit activations cost the same there
//   generic: the scalar twin

#define Q8B L2C_PANEL

#if defined(L2C_X512)
#define Q8_RB 2     // blocks per prefill tile
#define Q8_NT1 6    // tokens per tile, 8-bit activations: 12 int + 12 float accumulators
#define Q8_NT2 4    // two planes: 16 int + 8 float
#define Q8_RBX 2    // array bounds: Q8_RB and the most tokens
#define Q8_NTX 6

L2C_INLINE void q8_tile(float *restrict out, int64_t d, const l2c_matrix *W, const l2c_qact *a,
                        int64_t t0, int64_t b0, const int RB, const int NT, const int TWO) {
    const int64_t n = W->cols, gs = W->group_size, ng = n / gs, steps = gs / 4;
    const int64_t bs = Q8B * n;  // bytes per block
    const uint8_t *wq = (const uint8_t *)W->q + b0 * bs;
    __m512 acc[Q8_RBX][Q8_NTX];  // fixed sizes (not [RB][NT]: a VLA stays in memory)
    L2C_UNROLL for (int b = 0; b < RB; b++)
        L2C_UNROLL for (int t = 0; t < NT; t++) acc[b][t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m512i ih[Q8_RBX][Q8_NTX], il[Q8_RBX][Q8_NTX];
        L2C_UNROLL for (int t = 0; t < NT; t++) {
            const int64_t gi = (t0 + t) * ng + g;
            const __m512i ch = _mm512_set1_epi32(-128 * a->sum_hi[gi]);
            L2C_UNROLL for (int b = 0; b < RB; b++) ih[b][t] = ch;
            if (TWO) {
                const __m512i cl = _mm512_set1_epi32(-128 * a->sum_lo[gi]);
                L2C_UNROLL for (int b = 0; b < RB; b++) il[b][t] = cl;
            }
        }
        const uint8_t *wg = wq + g * gs * Q8B;
        const int8_t *xh = a->hi + t0 * n + g * gs, *xl = TWO ? a->lo + t0 * n + g * gs : NULL;
        for (int64_t j = 0; j < steps; j++) {
            __m512i w[Q8_RBX];
            L2C_UNROLL for (int b = 0; b < RB; b++) w[b] = _mm512_loadu_si512(wg + b * bs + j * 64);
            if (NT <= L2C_PF_NT)
                L2C_UNROLL for (int b = 0; b < RB; b++)
                    _mm_prefetch((const char *)(wg + b * bs + j * 64 + L2C_STREAM_AHEAD), _MM_HINT_T0);
            L2C_UNROLL for (int t = 0; t < NT; t++) {
                const __m512i xb = bcast4_512(xh + t * n + 4 * j);
                L2C_UNROLL for (int b = 0; b < RB; b++) ih[b][t] = dpbusd512(ih[b][t], w[b], xb);
                if (TWO) {
                    const __m512i xc = bcast4_512(xl + t * n + 4 * j);
                    L2C_UNROLL for (int b = 0; b < RB; b++) il[b][t] = dpbusd512(il[b][t], w[b], xc);
                }
            }
        }
        L2C_UNROLL for (int t = 0; t < NT; t++) {
            const int64_t gi = (t0 + t) * ng + g;
            const float xs = a->s[gi];
            const int32_t vs = qact_vsum(a, gi);
            L2C_UNROLL for (int b = 0; b < RB; b++) {
                const __m512i isum = TWO ? _mm512_add_epi32(_mm512_slli_epi32(ih[b][t], 7), il[b][t])
                                         : ih[b][t];
                acc[b][t] = group_finish_512(acc[b][t], isum, W, ((b0 + b) * ng + g) * Q8B, xs, vs);
            }
        }
    }
    L2C_UNROLL for (int b = 0; b < RB; b++) {
        const int64_t r0 = (b0 + b) * Q8B, valid = min64(Q8B, d - r0);
        const __mmask16 mk = (__mmask16)(valid >= 16 ? 0xffffu : (1u << valid) - 1u);
        L2C_UNROLL for (int t = 0; t < NT; t++) _mm512_mask_storeu_ps(out + (t0 + t) * d + r0, mk, acc[b][t]);
    }
}

#elif defined(L2C_XVNNI)
#define Q8_RB 1
#define Q8_NT1 3    // 6 int + 6 float accumulators (16 ymm registers)
#define Q8_NT2 2    // 8 int + 4 float
#define Q8_RBX 1
#define Q8_NTX 3

L2C_INLINE void q8_tile(float *restrict out, int64_t d, const l2c_matrix *W, const l2c_qact *a,
                        int64_t t0, int64_t b0, const int RB, const int NT, const int TWO) {
    const int64_t n = W->cols, gs = W->group_size, ng = n / gs, steps = gs / 4;
    const int64_t bs = Q8B * n;
    const uint8_t *wq = (const uint8_t *)W->q + b0 * bs;
    __m256 acc[Q8_RBX][Q8_NTX][2];  // fixed sizes (not [RB][NT]: a VLA stays in memory)
    for (int b = 0; b < RB; b++)
        for (int t = 0; t < NT; t++) acc[b][t][0] = acc[b][t][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m256i ih[Q8_RBX][Q8_NTX][2], il[Q8_RBX][Q8_NTX][2];
        for (int t = 0; t < NT; t++) {
            const int64_t gi = (t0 + t) * ng + g;
            const __m256i ch = _mm256_set1_epi32(-128 * a->sum_hi[gi]);
            const __m256i cl = TWO ? _mm256_set1_epi32(-128 * a->sum_lo[gi]) : ch;
            for (int b = 0; b < RB; b++) ih[b][t][0] = ih[b][t][1] = ch, il[b][t][0] = il[b][t][1] = cl;
        }
        const uint8_t *wg = wq + g * gs * Q8B;
        const int8_t *xh = a->hi + t0 * n + g * gs, *xl = TWO ? a->lo + t0 * n + g * gs : NULL;
        for (int64_t j = 0; j < steps; j++) {
            __m256i w[Q8_RBX][2];
            for (int b = 0; b < RB; b++) {
                w[b][0] = _mm256_loadu_si256((const __m256i *)(wg + b * bs + j * 64));
                w[b][1] = _mm256_loadu_si256((const __m256i *)(wg + b * bs + j * 64 + 32));
            }
            if (NT <= L2C_PF_NT)
                for (int b = 0; b < RB; b++)
                    _mm_prefetch((const char *)(wg + b * bs + j * 64 + L2C_STREAM_AHEAD), _MM_HINT_T0);
            for (int t = 0; t < NT; t++) {
                const __m256i xb = bcast4_256(xh + t * n + 4 * j);
                for (int b = 0; b < RB; b++)
                    for (int h = 0; h < 2; h++) ih[b][t][h] = dpbusd256(ih[b][t][h], w[b][h], xb);
                if (TWO) {
                    const __m256i xc = bcast4_256(xl + t * n + 4 * j);
                    for (int b = 0; b < RB; b++)
                        for (int h = 0; h < 2; h++)
                            il[b][t][h] = dpbusd256(il[b][t][h], w[b][h], xc);
                }
            }
        }
        for (int t = 0; t < NT; t++) {
            const int64_t gi = (t0 + t) * ng + g;
            const float xs = a->s[gi];
            const int32_t vs = qact_vsum(a, gi);
            for (int b = 0; b < RB; b++)
                for (int h = 0; h < 2; h++) {
                    const __m256i isum = TWO ? _mm256_add_epi32(_mm256_slli_epi32(ih[b][t][h], 7), il[b][t][h])
                                             : ih[b][t][h];
                    acc[b][t][h] = group_finish_256(acc[b][t][h], isum, W, ((b0 + b) * ng + g) * Q8B + 8 * h,
                                                    xs, vs);
                }
        }
    }
    for (int b = 0; b < RB; b++) {
        const int64_t r0 = (b0 + b) * Q8B, valid = min64(Q8B, d - r0);
        for (int t = 0; t < NT; t++) {
            float tmp[Q8B];
            _mm256_storeu_ps(tmp, acc[b][t][0]);
            _mm256_storeu_ps(tmp + 8, acc[b][t][1]);
            store_rows(out + (t0 + t) * d + r0, tmp, valid);
        }
    }
}

#elif defined(L2C_X256)
#define Q8_RB 1
#define Q8_NT1 2    // 8 int + 4 float accumulators (3 tokens spill: slower on Zen 3)
#define Q8_NT2 2
#define Q8_RBX 1
#define Q8_NTX 2

// 8 int32 row sums (rows 4q..4q+7 of two (row, pair) accumulators) in row order
L2C_INLINE __m256i pairs_to_rows(__m256i a0, __m256i a1) {
    return _mm256_permute4x64_epi64(_mm256_hadd_epi32(a0, a1), 0xD8);
}

L2C_INLINE void q8_tile(float *restrict out, int64_t d, const l2c_matrix *W, const l2c_qact *a,
                        int64_t t0, int64_t b0, const int RB, const int NT, const int TWO) {
    (void)TWO;  // v16 holds either kind of code
    const int64_t n = W->cols, gs = W->group_size, ng = n / gs, steps = gs / 4;
    const int64_t bs = Q8B * n;
    const uint8_t *wq = (const uint8_t *)W->q + b0 * bs;
    __m256 acc[Q8_RBX][Q8_NTX][2];  // fixed sizes (not [RB][NT]: a VLA stays in memory)
    for (int b = 0; b < RB; b++)
        for (int t = 0; t < NT; t++) acc[b][t][0] = acc[b][t][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        // lanes (row, pair of inputs) of rows 0-3, 4-7, 8-11, 12-15; each starts at -64 * the
        // group's code sum, so a row's two lanes take off the weights' +128 offset
        __m256i ia[Q8_RBX][Q8_NTX][4];
        for (int t = 0; t < NT; t++) {
            const __m256i off = _mm256_set1_epi32(-64 * qact_vsum(a, (t0 + t) * ng + g));
            for (int b = 0; b < RB; b++)
                for (int q = 0; q < 4; q++) ia[b][t][q] = off;
        }
        const uint8_t *wg = wq + g * gs * Q8B;
        const int16_t *xv = a->v16 + t0 * n + g * gs;
        for (int64_t j = 0; j < steps; j++) {
            if (NT <= L2C_PF_NT)
                for (int b = 0; b < RB; b++)
                    _mm_prefetch((const char *)(wg + b * bs + j * 64 + L2C_STREAM_AHEAD), _MM_HINT_T0);
            __m256i xb[Q8_NTX];
            for (int t = 0; t < NT; t++) {
                int64_t v4;
                memcpy(&v4, xv + t * n + 4 * j, 8);
                xb[t] = _mm256_set1_epi64x(v4);
            }
            for (int b = 0; b < RB; b++)
                for (int q = 0; q < 4; q++) {
                    const __m256i w16 = _mm256_cvtepu8_epi16(
                        _mm_loadu_si128((const __m128i *)(wg + b * bs + j * 64 + 16 * q)));
                    for (int t = 0; t < NT; t++)
                        ia[b][t][q] = madd_acc256(ia[b][t][q], w16, xb[t]);
                }
        }
        for (int b = 0; b < RB; b++)
            for (int h = 0; h < 2; h++) {
                const l2c_gscales gsc = group_scales_256(W, ((b0 + b) * ng + g) * Q8B + 8 * h);
                for (int t = 0; t < NT; t++) {
                    const int64_t gi = (t0 + t) * ng + g;
                    const __m256i isum = pairs_to_rows(ia[b][t][2 * h], ia[b][t][2 * h + 1]);
                    acc[b][t][h] = group_finish_256s(acc[b][t][h], isum, gsc, a->s[gi], qact_vsum(a, gi));
                }
            }
    }
    for (int b = 0; b < RB; b++) {
        const int64_t r0 = (b0 + b) * Q8B, valid = min64(Q8B, d - r0);
        for (int t = 0; t < NT; t++) {
            float tmp[Q8B];
            _mm256_storeu_ps(tmp, acc[b][t][0]);
            _mm256_storeu_ps(tmp + 8, acc[b][t][1]);
            store_rows(out + (t0 + t) * d + r0, tmp, valid);
        }
    }
}

#else
#define Q8_RB 1
#define Q8_NT1 1
#define Q8_NT2 1

// the scalar twin: one block x one token
L2C_INLINE void q8_tile(float *restrict out, int64_t d, const l2c_matrix *W, const l2c_qact *a,
                        int64_t t0, int64_t b0, const int RB, const int NT, const int TWO) {
    (void)RB, (void)NT, (void)TWO;
    const int64_t n = W->cols, gs = W->group_size, ng = n / gs, steps = gs / 4;
    const uint8_t *wb = (const uint8_t *)W->q + b0 * Q8B * n;
    const int16_t *xv = a->v16 + t0 * n;
    float acc[Q8B] = {0};
    for (int64_t g = 0; g < ng; g++) {
        int32_t isum[Q8B] = {0};
        for (int64_t j = 0; j < steps; j++, wb += 4 * Q8B)
            for (int c = 0; c < 4; c++) {
                const int32_t v = xv[g * gs + 4 * j + c];
                for (int r = 0; r < Q8B; r++) isum[r] += v * ((int32_t)wb[4 * r + c] - 128);
            }
        const int64_t gi = t0 * ng + g;
        group_finish_scalar(acc, isum, W, (b0 * ng + g) * Q8B, a->s[gi], qact_vsum(a, gi));
    }
    store_rows(out + t0 * d + b0 * Q8B, acc, min64(Q8B, d - b0 * Q8B));
}
#endif

// a tile of RB_ blocks (a constant) from block B_ x nt tokens from t0 (1..NTMAX_; the cases
// above NTMAX_ never run and only keep the switch from instantiating them)
#define Q_NT_(k, NTMAX_) ((k) <= (NTMAX_) ? (k) : 1)
#define Q8_TILE(RB_, B_, nt, NTMAX_, TWO_)                                                        \
    switch (nt) {                                                                                 \
    case 1: q8_tile(out, d, W, a, t0, B_, RB_, 1, TWO_); break;                                   \
    case 2: q8_tile(out, d, W, a, t0, B_, RB_, Q_NT_(2, NTMAX_), TWO_); break;                    \
    case 3: q8_tile(out, d, W, a, t0, B_, RB_, Q_NT_(3, NTMAX_), TWO_); break;                    \
    case 4: q8_tile(out, d, W, a, t0, B_, RB_, Q_NT_(4, NTMAX_), TWO_); break;                    \
    case 5: q8_tile(out, d, W, a, t0, B_, RB_, Q_NT_(5, NTMAX_), TWO_); break;                    \
    default: q8_tile(out, d, W, a, t0, B_, RB_, Q_NT_(6, NTMAX_), TWO_); break;                   \
    }

// blocks [b0, b1) x all T tokens: decode walks them one at a time; prefill walks the
// blocks in chunks of about L2C_CHUNK_BYTES (kept in L2) and, per chunk, every token tile
// (balanced, at most NTMAX tokens), then the chunk's blocks Q8_RB at a time.
L2C_INLINE void q8_range_(float *restrict out, const l2c_matrix *W, const l2c_qact *a, int64_t T,
                          int64_t b0, int64_t b1, const int TWO, const int64_t NTMAX) {
    const int64_t d = W->rows;
    int64_t b = b0;
    if (T == 1) {  // one block at a time: one stream (more blocks side by side spill registers)
        const int64_t bs = Q8B * W->cols;
        prefetch_head((const int8_t *)W->q + b0 * bs, (b1 - b0) * bs);
        for (; b < b1; b++) q8_tile(out, d, W, a, 0, b, 1, 1, TWO);
        return;
    }
    const int64_t tiles = tile_count(T, NTMAX), cb = chunk_blocks(Q8B * W->cols, Q8_RB);
    for (int64_t c0 = b0; c0 < b1; c0 += cb) {
        const int64_t c1 = min64(c0 + cb, b1);
        for (int64_t i = 0; i < tiles; i++) {
            const int64_t t0 = tile_start(T, tiles, i), nt = tile_start(T, tiles, i + 1) - t0;
            for (b = c0; b < c1; b += Q8_RB) {
                const int64_t rb = min64(Q8_RB, c1 - b);
                if (rb == Q8_RB) {
                    Q8_TILE(Q8_RB, b, nt, NTMAX, TWO)
                } else {  // the chunk's last blocks, one at a time
                    for (int64_t q = b; q < b + rb; q++) Q8_TILE(1, q, nt, NTMAX, TWO)
                }
            }
        }
    }
}

static void q8_range(float *restrict out, const l2c_matrix *W, const l2c_qact *a, int64_t T,
                     int64_t b0, int64_t b1) {
    if (a->lo)
        q8_range_(out, W, a, T, b0, b1, 1, Q8_NT2);
    else
        q8_range_(out, W, a, T, b0, b1, 0, Q8_NT1);
}
