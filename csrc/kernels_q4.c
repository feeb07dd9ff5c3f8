// kernels_q4.c: the 4-bit matmul (L2C_Q4P weights, layout in llama2c.h).
//
// Same arithmetic as the int8 matmul (kernels_q8.c): per group an exact int32 sum of
// nibble x activation code, then the group's float terms in group order (group_finish_*), so
// the same invariant holds. The nibbles Q in [0, 15] are unsigned as stored, so they are the
// u8 operand of the dot instructions directly (no +128 offset to take off). Each step loads 64
// bytes per block: 16 rows x 8 inputs, the low nibbles inputs 8j..8j+3 and the high nibbles
// 8j+4..8j+7, each half one Q8P-shaped operand after a mask (and a shift).
//   avx512:  vpdpbusd zmm, two per step
//   avxvnni: vpdpbusd ymm, four per step
//   avx2:    vpmaddubsw (nibble x s8: pairs of at most 2*15*127, added in int16 over four
//            steps without overflow), then vpmaddwd by 128 (high plane) and by 1 (low plane)
//            into one int32 sum per row
// Decode (T = 1) walks a thread's blocks one at a time: one stream, prefetched (kernels_common.h).
//   generic: the scalar twin
#include "kernels_common.h"

#define Q4B L2C_PANEL

#if defined(L2C_X512)
#define Q4_RB 2
#define Q4_NT1 6
#define Q4_NT2 4
#define Q4_RBX 2
#define Q4_NTX 6

L2C_INLINE void q4_tile(float *restrict out, int64_t d, const l2c_matrix *W, const l2c_qact *a,
                        int64_t t0, int64_t b0, const int RB, const int NT, const int TWO) {
    const int64_t n = W->cols, gs = W->group_size, ng = n / gs, steps = gs / 8;
    const int64_t bs = Q4B * n / 2;  // bytes per block
    const uint8_t *wq = (const uint8_t *)W->q + b0 * bs;
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    __m512 acc[Q4_RBX][Q4_NTX];  // fixed sizes (not [RB][NT]: a VLA stays in memory)
    for (int b = 0; b < RB; b++)
        for (int t = 0; t < NT; t++) acc[b][t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m512i ih[Q4_RBX][Q4_NTX], il[Q4_RBX][Q4_NTX];
        for (int b = 0; b < RB; b++)
            for (int t = 0; t < NT; t++) ih[b][t] = il[b][t] = _mm512_setzero_si512();
        const uint8_t *wg = wq + g * gs * (Q4B / 2);
        const int8_t *xh = a->hi + t0 * n + g * gs, *xl = TWO ? a->lo + t0 * n + g * gs : NULL;
        for (int64_t j = 0; j < steps; j++) {
            __m512i wl[Q4_RBX], wh[Q4_RBX];
            for (int b = 0; b < RB; b++) {
                const __m512i raw = _mm512_loadu_si512(wg + b * bs + j * 64);
                wl[b] = _mm512_and_si512(raw, m4);
                wh[b] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
            }
            if (NT <= L2C_PF_NT)
                for (int b = 0; b < RB; b++)
                    _mm_prefetch((const char *)(wg + b * bs + j * 64 + L2C_STREAM_AHEAD), _MM_HINT_T0);
            for (int t = 0; t < NT; t++) {
                const __m512i x0 = bcast4_512(xh + t * n + 8 * j), x1 = bcast4_512(xh + t * n + 8 * j + 4);
                for (int b = 0; b < RB; b++)
                    ih[b][t] = dpbusd512(dpbusd512(ih[b][t], wl[b], x0), wh[b], x1);
                if (TWO) {
                    const __m512i y0 = bcast4_512(xl + t * n + 8 * j), y1 = bcast4_512(xl + t * n + 8 * j + 4);
                    for (int b = 0; b < RB; b++)
                        il[b][t] = dpbusd512(dpbusd512(il[b][t], wl[b], y0), wh[b], y1);
                }
            }
        }
        for (int t = 0; t < NT; t++) {
            const int64_t gi = (t0 + t) * ng + g;
            const float xs = a->s[gi];
            const int32_t vs = qact_vsum(a, gi);
            for (int b = 0; b < RB; b++) {
                const __m512i isum = TWO ? _mm512_add_epi32(_mm512_slli_epi32(ih[b][t], 7), il[b][t])
                                         : ih[b][t];
                acc[b][t] = group_finish_512(acc[b][t], isum, W, ((b0 + b) * ng + g) * Q4B, xs, vs);
            }
        }
    }
    for (int b = 0; b < RB; b++) {
        const int64_t r0 = (b0 + b) * Q4B, valid = min64(Q4B, d - r0);
        const __mmask16 mk = (__mmask16)(valid >= 16 ? 0xffffu : (1u << valid) - 1u);
        for (int t = 0; t < NT; t++) _mm512_mask_storeu_ps(out + (t0 + t) * d + r0, mk, acc[b][t]);
    }
}

#elif defined(L2C_X256)
#define Q4_RB 1
#if defined(L2C_XVNNI)
#define Q4_NT1 3
#define Q4_NT2 2
#define Q4_NTX 3
#else
#define Q4_NT1 2
#define Q4_NT2 2
#define Q4_NTX 2
#endif
#define Q4_RBX 1

// the four Q8P-shaped operands of one 64-byte step: [half h of the rows][low/high nibbles]
L2C_INLINE void q4_unpack256(__m256i w[2][2], const uint8_t *p) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    for (int h = 0; h < 2; h++) {
        const __m256i raw = _mm256_loadu_si256((const __m256i *)(p + 32 * h));
        w[h][0] = _mm256_and_si256(raw, m4);
        w[h][1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
    }
}

L2C_INLINE void q4_tile(float *restrict out, int64_t d, const l2c_matrix *W, const l2c_qact *a,
                        int64_t t0, int64_t b0, const int RB, const int NT, const int TWO) {
    const int64_t n = W->cols, gs = W->group_size, ng = n / gs, steps = gs / 8;
    const int64_t bs = Q4B * n / 2;
    const uint8_t *wq = (const uint8_t *)W->q + b0 * bs;
    __m256 acc[Q4_RBX][Q4_NTX][2];  // fixed sizes (not [RB][NT]: a VLA stays in memory)
    for (int b = 0; b < RB; b++)
        for (int t = 0; t < NT; t++) acc[b][t][0] = acc[b][t][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m256i ih[Q4_RBX][Q4_NTX][2];  // int32 sums of rows 0-7 and 8-15 (avx2: of both planes)
        for (int b = 0; b < RB; b++)
            for (int t = 0; t < NT; t++)
                for (int h = 0; h < 2; h++) ih[b][t][h] = _mm256_setzero_si256();
        const uint8_t *wg = wq + g * gs * (Q4B / 2);
        const int8_t *xh = a->hi + t0 * n + g * gs, *xl = TWO ? a->lo + t0 * n + g * gs : NULL;
#if defined(L2C_XVNNI)
        __m256i il[Q4_RBX][Q4_NTX][2];  // the low plane's sums
        for (int b = 0; b < RB; b++)
            for (int t = 0; t < NT; t++)
                for (int h = 0; h < 2; h++) il[b][t][h] = _mm256_setzero_si256();
        for (int64_t j = 0; j < steps; j++) {
            __m256i w[Q4_RBX][2][2];
            for (int b = 0; b < RB; b++) q4_unpack256(w[b], wg + b * bs + j * 64);
            if (NT <= L2C_PF_NT)
                for (int b = 0; b < RB; b++)
                    _mm_prefetch((const char *)(wg + b * bs + j * 64 + L2C_STREAM_AHEAD), _MM_HINT_T0);
            for (int t = 0; t < NT; t++) {
                const __m256i x0 = bcast4_256(xh + t * n + 8 * j), x1 = bcast4_256(xh + t * n + 8 * j + 4);
                for (int b = 0; b < RB; b++)
                    for (int h = 0; h < 2; h++)
                        ih[b][t][h] = dpbusd256(dpbusd256(ih[b][t][h], w[b][h][0], x0),
                                                              w[b][h][1], x1);
                if (TWO) {
                    const __m256i y0 = bcast4_256(xl + t * n + 8 * j), y1 = bcast4_256(xl + t * n + 8 * j + 4);
                    for (int b = 0; b < RB; b++)
                        for (int h = 0; h < 2; h++)
                            il[b][t][h] = dpbusd256(
                                dpbusd256(il[b][t][h], w[b][h][0], y0), w[b][h][1], y1);
                }
            }
        }
#else
        const __m256i ones = _mm256_set1_epi16(1), c128 = _mm256_set1_epi16(128);
        for (int64_t j0 = 0; j0 < steps; j0 += 4) {  // int16 sums stay below 4 * 2 * 2*15*127
            __m256i sh[Q4_RBX][Q4_NTX][2], sl[Q4_RBX][Q4_NTX][2];
            for (int b = 0; b < RB; b++)
                for (int t = 0; t < NT; t++)
                    for (int h = 0; h < 2; h++) sh[b][t][h] = sl[b][t][h] = _mm256_setzero_si256();
            const int64_t j1 = min64(j0 + 4, steps);
            for (int64_t j = j0; j < j1; j++) {
                __m256i w[Q4_RBX][2][2];
                for (int b = 0; b < RB; b++) q4_unpack256(w[b], wg + b * bs + j * 64);
                if (NT <= L2C_PF_NT)
                    for (int b = 0; b < RB; b++)
                        _mm_prefetch((const char *)(wg + b * bs + j * 64 + L2C_STREAM_AHEAD), _MM_HINT_T0);
                for (int t = 0; t < NT; t++) {
                    const __m256i x0 = bcast4_256(xh + t * n + 8 * j), x1 = bcast4_256(xh + t * n + 8 * j + 4);
                    for (int b = 0; b < RB; b++)
                        for (int h = 0; h < 2; h++)
                            sh[b][t][h] = maddubs2_acc256(sh[b][t][h], w[b][h][0], x0, w[b][h][1], x1);
                    if (TWO) {
                        const __m256i y0 = bcast4_256(xl + t * n + 8 * j), y1 = bcast4_256(xl + t * n + 8 * j + 4);
                        for (int b = 0; b < RB; b++)
                            for (int h = 0; h < 2; h++)
                                sl[b][t][h] = maddubs2_acc256(sl[b][t][h], w[b][h][0], y0, w[b][h][1], y1);
                    }
                }
            }
            for (int b = 0; b < RB; b++)
                for (int t = 0; t < NT; t++)
                    for (int h = 0; h < 2; h++)  // (hi << 7) + lo in one int32 sum
                        ih[b][t][h] = _mm256_add_epi32(
                            ih[b][t][h], TWO ? _mm256_add_epi32(_mm256_madd_epi16(sh[b][t][h], c128),
                                                                _mm256_madd_epi16(sl[b][t][h], ones))
                                             : _mm256_madd_epi16(sh[b][t][h], ones));
        }
#endif
        for (int b = 0; b < RB; b++)
            for (int h = 0; h < 2; h++) {
                const l2c_gscales gsc = group_scales_256(W, ((b0 + b) * ng + g) * Q4B + 8 * h);
                for (int t = 0; t < NT; t++) {
                    const int64_t gi = (t0 + t) * ng + g;
#if defined(L2C_XVNNI)
                    const __m256i isum = TWO ? _mm256_add_epi32(_mm256_slli_epi32(ih[b][t][h], 7), il[b][t][h])
                                             : ih[b][t][h];
#else
                    const __m256i isum = ih[b][t][h];
#endif
                    acc[b][t][h] = group_finish_256s(acc[b][t][h], isum, gsc, a->s[gi], qact_vsum(a, gi));
                }
            }
    }
    for (int b = 0; b < RB; b++) {
        const int64_t r0 = (b0 + b) * Q4B, valid = min64(Q4B, d - r0);
        for (int t = 0; t < NT; t++) {
            float tmp[Q4B];
            _mm256_storeu_ps(tmp, acc[b][t][0]);
            _mm256_storeu_ps(tmp + 8, acc[b][t][1]);
            store_rows(out + (t0 + t) * d + r0, tmp, valid);
        }
    }
}

#else
#define Q4_RB 1
#define Q4_NT1 1
#define Q4_NT2 1

// the scalar twin: one block x one token
L2C_INLINE void q4_tile(float *restrict out, int64_t d, const l2c_matrix *W, const l2c_qact *a,
                        int64_t t0, int64_t b0, const int RB, const int NT, const int TWO) {
    (void)RB, (void)NT, (void)TWO;
    const int64_t n = W->cols, gs = W->group_size, ng = n / gs, steps = gs / 8;
    const uint8_t *wb = (const uint8_t *)W->q + b0 * Q4B * n / 2;
    const int16_t *xv = a->v16 + t0 * n;
    float acc[Q4B] = {0};
    for (int64_t g = 0; g < ng; g++) {
        int32_t isum[Q4B] = {0};
        for (int64_t j = 0; j < steps; j++, wb += 4 * Q4B)
            for (int c = 0; c < 4; c++) {
                const int32_t v0 = xv[g * gs + 8 * j + c], v1 = xv[g * gs + 8 * j + 4 + c];
                for (int r = 0; r < Q4B; r++)
                    isum[r] += v0 * (int32_t)(wb[4 * r + c] & 15u) + v1 * (int32_t)(wb[4 * r + c] >> 4);
            }
        const int64_t gi = t0 * ng + g;
        group_finish_scalar(acc, isum, W, (b0 * ng + g) * Q4B, a->s[gi], qact_vsum(a, gi));
    }
    store_rows(out + t0 * d + b0 * Q4B, acc, min64(Q4B, d - b0 * Q4B));
}
#endif

#define Q4_NT_(k, NTMAX_) ((k) <= (NTMAX_) ? (k) : 1)
#define Q4_TILE(RB_, B_, nt, NTMAX_, TWO_)                                                        \
    switch (nt) {                                                                                 \
    case 1: q4_tile(out, d, W, a, t0, B_, RB_, 1, TWO_); break;                                   \
    case 2: q4_tile(out, d, W, a, t0, B_, RB_, Q4_NT_(2, NTMAX_), TWO_); break;                    \
    case 3: q4_tile(out, d, W, a, t0, B_, RB_, Q4_NT_(3, NTMAX_), TWO_); break;                    \
    case 4: q4_tile(out, d, W, a, t0, B_, RB_, Q4_NT_(4, NTMAX_), TWO_); break;                    \
    case 5: q4_tile(out, d, W, a, t0, B_, RB_, Q4_NT_(5, NTMAX_), TWO_); break;                    \
    default: q4_tile(out, d, W, a, t0, B_, RB_, Q4_NT_(6, NTMAX_), TWO_); break;                   \
    }

// blocks [b0, b1) x all T tokens (as q8_range_ in kernels_q8.c)
L2C_INLINE void q4_range_(float *restrict out, const l2c_matrix *W, const l2c_qact *a, int64_t T,
                      int64_t b0, int64_t b1, const int TWO, const int64_t NTMAX) {
    const int64_t d = W->rows;
    int64_t b = b0;
    if (T == 1) {  // one block at a time: one stream (more blocks side by side spill registers)
        const int64_t bs = Q4B * W->cols / 2;
        prefetch_head((const uint8_t *)W->q + b0 * bs, (b1 - b0) * bs);
        for (; b < b1; b++) q4_tile(out, d, W, a, 0, b, 1, 1, TWO);
        return;
    }
    const int64_t tiles = tile_count(T, NTMAX), cb = chunk_blocks(Q4B * W->cols / 2, Q4_RB);
    for (int64_t c0 = b0; c0 < b1; c0 += cb) {
        const int64_t c1 = min64(c0 + cb, b1);
        for (int64_t i = 0; i < tiles; i++) {
            const int64_t t0 = tile_start(T, tiles, i), nt = tile_start(T, tiles, i + 1) - t0;
            for (b = c0; b < c1; b += Q4_RB) {
                const int64_t rb = min64(Q4_RB, c1 - b);
                if (rb == Q4_RB) {
                    Q4_TILE(Q4_RB, b, nt, NTMAX, TWO)
                } else {  // the chunk's last blocks, one at a time
                    for (int64_t q = b; q < b + rb; q++) Q4_TILE(1, q, nt, NTMAX, TWO)
                }
            }
        }
    }
}

static void q4_range(float *restrict out, const l2c_matrix *W, const l2c_qact *a, int64_t T,
                     int64_t b0, int64_t b1) {
    if (a->lo)
        q4_range_(out, W, a, T, b0, b1, 1, Q4_NT2);
    else
        q4_range_(out, W, a, T, b0, b1, 0, Q4_NT1);
}
