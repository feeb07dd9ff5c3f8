// kernels_f32.c: fp32 matmul on panel-packed weights (L2C_F32P, layout in llama2c.h).
//
//   out (T, d) = X (T, n) @ W (d, n)^T
//
// An outer-product micro-kernel: a tile of RP panels (16 rows each) x NT tokens keeps RP*NT
// accumulator vectors (lanes = rows); per input k it loads column k of each panel (one 64-byte
// run per panel) and broadcasts x[t][k] of each token, so every weight load feeds NT FMAs and
// every broadcast RP, with no horizontal sums. Each output lane is one FMA chain over
// k = 0..n-1 in order, started from 0, in every tile shape (T = 1 decode included): the
// result of out[t][i] is the same bitwise whatever T, the tile t falls in and n_threads. The
// latency of that chain is hidden by the RP*NT independent chains of the tile.
//
// Threads split the panels into equal contiguous ranges (one parallel loop). Decode walks a
// range F32_RP1 panels at a time (that many weight streams in flight, prefetched). Prefill
// walks it in chunks of about L2C_CHUNK_BYTES of weights (kept in L2): for each chunk every
// token tile (NT rows of X, in L1), then the chunk's panels RP at a time; W is read from
// memory once, X once per chunk.
#include "kernels_common.h"

#define F32P L2C_PANEL

// ---- AVX-512: one zmm per panel column ----------------------------------------------------------
#if defined(L2C_X512)
#define F32_RP 4        // panels per tile (prefill)
#define F32_RP1 8       // panels per tile when decoding (T = 1)
#define F32_NT 6        // tokens per tile: 4 x 6 = 24 accumulators + 4 weights + broadcast

L2C_INLINE void f32_tile(float *restrict out, int64_t d, const float *restrict wp, int64_t n,
                         const float *restrict x, int64_t p0, const int RP, const int NT) {
    __m512 acc[F32_RP1][F32_NT];  // fixed sizes (not [RP][NT]: a VLA stays in memory)
    for (int p = 0; p < RP; p++)
        for (int t = 0; t < NT; t++) acc[p][t] = _mm512_setzero_ps();
    const float *w = wp + p0 * n * F32P;
    for (int64_t k = 0; k < n; k++) {
        __m512 wv[F32_RP1];
        for (int p = 0; p < RP; p++) wv[p] = _mm512_loadu_ps(w + (p * n + k) * F32P);
        if (NT <= L2C_PF_NT)
            for (int p = 0; p < RP; p++)
                _mm_prefetch((const char *)(w + (p * n + k) * F32P) + 1024, _MM_HINT_T0);
        for (int t = 0; t < NT; t++) {
            const __m512 xb = _mm512_set1_ps(x[t * n + k]);
            for (int p = 0; p < RP; p++) acc[p][t] = _mm512_fmadd_ps(wv[p], xb, acc[p][t]);
        }
    }
    for (int p = 0; p < RP; p++) {
        const int64_t r0 = (p0 + p) * F32P, valid = min64(F32P, d - r0);
        const __mmask16 mk = (__mmask16)(valid >= 16 ? 0xffffu : (1u << valid) - 1u);
        for (int t = 0; t < NT; t++) _mm512_mask_storeu_ps(out + t * d + r0, mk, acc[p][t]);
    }
}

// ---- AVX2 (and AVX-VNNI): two ymm per panel column ---------------------------------------------
#elif defined(L2C_X256)
#define F32_RP 1        // 16 rows x 6 tokens = 12 accumulators of 16 registers
#define F32_RP1 4       // decode: 4 panels = 8 chains
#define F32_RP2 2       // T = 2, 3: 2 panels x 3 tokens
#define F32_NT 6

L2C_INLINE void f32_tile(float *restrict out, int64_t d, const float *restrict wp, int64_t n,
                         const float *restrict x, int64_t p0, const int RP, const int NT) {
    __m256 acc[F32_RP1][F32_NT][2];  // fixed sizes (not [RP][NT]: a VLA stays in memory)
    for (int p = 0; p < RP; p++)
        for (int t = 0; t < NT; t++) acc[p][t][0] = acc[p][t][1] = _mm256_setzero_ps();
    const float *w = wp + p0 * n * F32P;
    for (int64_t k = 0; k < n; k++) {
        __m256 wv[F32_RP1][2];
        for (int p = 0; p < RP; p++) {
            wv[p][0] = _mm256_loadu_ps(w + (p * n + k) * F32P);
            wv[p][1] = _mm256_loadu_ps(w + (p * n + k) * F32P + 8);
        }
        if (NT <= L2C_PF_NT)
            for (int p = 0; p < RP; p++)
                _mm_prefetch((const char *)(w + (p * n + k) * F32P) + 1024, _MM_HINT_T0);
        for (int t = 0; t < NT; t++) {
            const __m256 xb = _mm256_broadcast_ss(x + t * n + k);
            for (int p = 0; p < RP; p++) {
                acc[p][t][0] = _mm256_fmadd_ps(wv[p][0], xb, acc[p][t][0]);
                acc[p][t][1] = _mm256_fmadd_ps(wv[p][1], xb, acc[p][t][1]);
            }
        }
    }
    for (int p = 0; p < RP; p++) {
        const int64_t r0 = (p0 + p) * F32P, valid = min64(F32P, d - r0);
        for (int t = 0; t < NT; t++) {
            if (valid == F32P) {
                _mm256_storeu_ps(out + t * d + r0, acc[p][t][0]);
                _mm256_storeu_ps(out + t * d + r0 + 8, acc[p][t][1]);
            } else {
                float tmp[F32P];
                _mm256_storeu_ps(tmp, acc[p][t][0]);
                _mm256_storeu_ps(tmp + 8, acc[p][t][1]);
                memcpy(out + t * d + r0, tmp, (size_t)valid * sizeof(float));
            }
        }
    }
}

// ---- scalar twin: the same chains (multiply, then add: no FMA in the baseline build) -----------
#else
#define F32_RP 1
#define F32_RP1 1
#define F32_NT 4

L2C_INLINE void f32_tile(float *restrict out, int64_t d, const float *restrict wp, int64_t n,
                         const float *restrict x, int64_t p0, const int RP, const int NT) {
    (void)RP;
    float acc[F32_NT][F32P];
    memset(acc, 0, sizeof(acc));
    const float *w = wp + p0 * n * F32P;
    for (int64_t k = 0; k < n; k++)
        for (int t = 0; t < NT; t++) {
            const float xv = x[t * n + k];
            for (int r = 0; r < F32P; r++) acc[t][r] += w[k * F32P + r] * xv;
        }
    const int64_t r0 = p0 * F32P, valid = min64(F32P, d - r0);
    for (int t = 0; t < NT; t++) memcpy(out + t * d + r0, acc[t], (size_t)valid * sizeof(float));
}
#endif

#ifndef F32_RP2
#define F32_RP2 F32_RP
#endif

// a tile of RP_ panels (a constant) from panel P_ x nt tokens (1..F32_NT)
#define F32_NT_(k) ((k) <= F32_NT ? (k) : 1)
#define F32_TILE_NT(RP_, P_, nt)                                                                  \
    switch (nt) {                                                                                 \
    case 1: f32_tile(o, d, wp, n, xt, P_, RP_, 1); break;                                         \
    case 2: f32_tile(o, d, wp, n, xt, P_, RP_, F32_NT_(2)); break;                                \
    case 3: f32_tile(o, d, wp, n, xt, P_, RP_, F32_NT_(3)); break;                                \
    case 4: f32_tile(o, d, wp, n, xt, P_, RP_, F32_NT_(4)); break;                                \
    case 5: f32_tile(o, d, wp, n, xt, P_, RP_, F32_NT_(5)); break;                                \
    default: f32_tile(o, d, wp, n, xt, P_, RP_, F32_NT_(6)); break;                               \
    }

// panels [p0, p1) x all T tokens
static void f32_range(float *restrict out, const float *restrict wp, const float *restrict x,
                      int64_t T, int64_t n, int64_t d, int64_t p0, int64_t p1) {
    int64_t p = p0;
    if (T == 1) {  // decode: F32_RP1 panel streams in flight
        const float *xt = x;
        float *o = out;
        for (; p + F32_RP1 <= p1; p += F32_RP1) f32_tile(o, d, wp, n, xt, p, F32_RP1, 1);
        for (; p < p1; p++) f32_tile(o, d, wp, n, xt, p, 1, 1);
        return;
    }
    const int64_t RP = T <= 3 ? F32_RP2 : F32_RP;
    const int64_t tiles = tile_count(T, F32_NT), cb = chunk_blocks(n * F32P * 4, RP);
    for (int64_t c0 = p0; c0 < p1; c0 += cb) {
        const int64_t c1 = min64(c0 + cb, p1);
        for (int64_t i = 0; i < tiles; i++) {
            const int64_t t0 = tile_start(T, tiles, i), nt = tile_start(T, tiles, i + 1) - t0;
            const float *xt = x + t0 * n;
            float *o = out + t0 * d;
            for (p = c0; p < c1; p += RP) {
                const int64_t rp = min64(RP, c1 - p);
                if (rp == F32_RP) {
                    F32_TILE_NT(F32_RP, p, nt)
                } else if (rp == F32_RP2) {
                    F32_TILE_NT(F32_RP2, p, nt)
                } else {  // the chunk's last panels, one at a time
                    for (int64_t q = p; q < p + rp; q++) F32_TILE_NT(1, q, nt)
                }
            }
        }
    }
}
