// attention.c: storing keys/values into the KV pool and causal grouped-query attention over it.
// Included from csrc/kernels.c (compiled once per kernel table) after vec.h.
//
// The pool's layout and the canonical result of a query row (block partials merged in block
// order) are described in llama2c.h. Here:
//   - a block is first brought to float scratch: K^T (panels, as in the pool) and V (P, hsp)
//     (hsp = hs rounded up to 16, zero-padded) - or used in place when the pool holds floats
//     in that shape;
//   - scores: every query vector of one kv head against the block's positions, a register tile
//     of SG queries x SC vectors of positions, the query broadcast per dimension d: each key
//     vector loaded feeds SG FMAs (all query heads of a kv head share one read of K);
//   - block softmax: max, exp (vf_exp), sum, lane-wise over the positions;
//   - o = sum_p e[p] v[p]: a register tile of PG queries x PJ vectors of the head dimension;
//   - merge: the online-softmax rescaling, in block order.
// Every lane of those tiles computes its sum in the same order whatever the tile shape (the
// grouping of queries and positions), so a row's result does not depend on which other rows
// share its tile, its step or its thread: decode (split-K over blocks, then an ordered merge)
// and prefill (tiles of rows walking the blocks) give the same bits.
#include "kv.h"

#ifdef _OPENMP
#include <omp.h>
#define L2C_THREAD_ID() omp_get_thread_num()
#else
#define L2C_THREAD_ID() 0
#endif

#if defined(__AVX512F__)
#define SG 4    // scores tile: queries
#define SC 4    //              vectors of positions
#define PG 4    // values tile: queries
#define PJ 4    //              vectors of the head dimension
#elif defined(__AVX2__)   // 16 registers: 12 accumulators, 3 loads, 1 broadcast
#define SG 4
#define SC 3
#define PG 4
#define PJ 3
#else
#define SG 4
#define SC 4
#define PG 4
#define PJ 4
#endif

// ---------------------------------------------------------------------------------------------
// storing one layer's keys and values (rows of the spans) at their positions

// one key or value row x (hs) of element type t: at dst + idx(d) (idx(d) = d * step), with
// its int8 scale in *scale
static void store_vec(uint8_t *dst, int64_t step, int32_t t, const float *restrict x, int64_t hs,
                      float *scale) {
    if (t == L2C_KV_F32) {
        float *o = (float *)dst;
        for (int64_t d = 0; d < hs; d++) o[d * step] = x[d];
    } else if (t == L2C_KV_F16) {
        uint16_t *o = (uint16_t *)dst;
        int64_t d = 0;
#if VL > 1
        uint16_t buf[16];
        for (; d + VL <= hs; d += VL) {
            vf_store_f16(buf, vf_load(x + d));
            for (int j = 0; j < VL; j++) o[(d + j) * step] = buf[j];
        }
#endif
        for (; d < hs; d++) o[d * step] = l2c_f32_to_f16(x[d]);
    } else {  // int8, one scale per row: s = max|x| / 127, q = rint(x / s)
        int8_t *o = (int8_t *)dst;
        float a = 0.0f;
        for (int64_t d = 0; d < hs; d++) a = fmaxf(a, fabsf(x[d]));
        const float sc = a / 127.0f;
        *scale = sc;
        for (int64_t d = 0; d < hs; d++) o[d * step] = (int8_t)(sc > 0.0f ? rintf(x[d] / sc) : 0.0f);
    }
}

static void store_row(const l2c_kvpool *pool, int64_t layer, const int32_t *blocks, int64_t pos,
                      const float *restrict k, const float *restrict v) {
    const int64_t P = pool->block_size, hs = pool->head_size, r = pos % P;
    const int64_t k0 = l2c_kv_kidx(hs, r, 0);   // K^T element of dimension d: k0 + d*16
    const int64_t ek = l2c_kv_esize(pool->kdtype), ev = l2c_kv_esize(pool->vdtype);
    for (int64_t h = 0; h < pool->n_kv_heads; h++) {
        uint8_t *slab = l2c_kv_slab(pool, blocks[pos / P], layer, h);
        float *ks = l2c_kv_kscales(pool, slab), *vs = l2c_kv_vscales(pool, slab);
        store_vec(slab + k0 * ek, 16, pool->kdtype, k + h * hs, hs, ks ? ks + r : NULL);
        store_vec(slab + l2c_kv_v_offset(pool) + r * hs * ev, 1, pool->vdtype, v + h * hs, hs,
                  vs ? vs + r : NULL);
    }
}

static void kv_store(const l2c_kvpool *pool, int64_t layer, const l2c_span *spans,
                     int64_t n_spans, const float *restrict k, const float *restrict v,
                     int n_threads) {
    const int64_t kvd = pool->n_kv_heads * pool->head_size;
    for (int64_t i = 0; i < n_spans; i++) {
        const l2c_span *sp = &spans[i];
        const int nth = threads_for(sp->n * kvd * 8, n_threads);
        L2C_PFOR(nth, t, sp->n, store_row(pool, layer, sp->blocks, sp->pos0 + t,
                                          k + (sp->row0 + t) * kvd, v + (sp->row0 + t) * kvd));
    }
}

// ---------------------------------------------------------------------------------------------
// scores and weighted values, one register tile per element type of the keys/values read:
// float, half (converted in the load) or int8 (converted exactly; the scales are applied
// outside: scores times the key scale of each position, softmax weights times the value
// scale). A half or int8 block may also be converted once to float scratch (exact) and read as
// float: the same numbers, so the same results.

#define LOAD_F32(p) vf_load(p)
#define LOAD_F16(p) vf_load_f16(p)
#define LOAD_I8(p) vf_load_i8(p)

// The tiles may prefetch the bytes at the same offsets as the ones they read, from pf (the
// next slab a decode thread reads: that way its lines are requested one by one, 16 KB ahead,
// as the loads go; a slab prefetched at once stalls on the miss buffers), or NULL.
#define PF_LINES(pf, off, bytes)                                                                  \
    if (pf)                                                                                       \
        for (int64_t o_ = 0; o_ < (bytes); o_ += 64) __builtin_prefetch((pf) + (off) + o_, 0, 3);

// S[i][c*VL + j] = sum_d Q[i][d] * k_{p0 + c*VL + j}[d] over K^T panels (l2c_kv_kidx): each
// vector c is read down its panel, 16 elements per d (d in order, one fused chain per lane)
#define DEF_SCORES(TAG, ET, LOAD, NQ, NC)                                                         \
    static void scores_##TAG##_##NQ##_##NC(float *restrict S, int64_t sst, const float *restrict Q, \
                                           int64_t qst, const void *restrict Kv, int64_t p0, int64_t hs, \
                                           const char *pf) {                                      \
        const ET *restrict K = (const ET *)Kv;                                                    \
        int64_t off[NC];                                                                          \
        for (int c = 0; c < NC; c++) off[c] = l2c_kv_kidx(hs, p0 + c * VL, 0);                    \
        vf acc[NQ][NC];                                                                           \
        for (int i = 0; i < NQ; i++)                                                              \
            for (int c = 0; c < NC; c++) acc[i][c] = vf_zero();                                   \
        for (int64_t d = 0; d < hs; d++) {                                                        \
            vf kv[NC];                                                                            \
            if (pf && ((d * 16 * (int64_t)sizeof(ET)) & 63) == 0)                                 \
                for (int c = 0; c < NC; c++)                                                      \
                    __builtin_prefetch(pf + (off[c] + d * 16) * (int64_t)sizeof(ET), 0, 3);      \
            for (int c = 0; c < NC; c++) kv[c] = LOAD(K + off[c] + d * 16);                       \
            for (int i = 0; i < NQ; i++) {                                                        \
                const vf qb = vf_set1(Q[i * qst + d]);                                            \
                for (int c = 0; c < NC; c++) acc[i][c] = vf_fma(qb, kv[c], acc[i][c]);            \
            }                                                                                     \
        }                                                                                         \
        for (int i = 0; i < NQ; i++)                                                              \
            for (int c = 0; c < NC; c++) vf_store(S + i * sst + c * VL, acc[i][c]);               \
    }

// O[i][j] = sum_{p < nv} E[i][p] * V[p][j] (p in order, one fused chain per lane)
#define DEF_PV(TAG, ET, LOAD, NQ, NJ)                                                             \
    static void pv_##TAG##_##NQ##_##NJ(float *restrict O, int64_t ost, const float *restrict E,   \
                                       int64_t est, const void *restrict Vv, int64_t vst, int64_t nv, \
                                       const char *pf) {                                          \
        const ET *restrict V = (const ET *)Vv;                                                    \
        vf acc[NQ][NJ];                                                                           \
        for (int i = 0; i < NQ; i++)                                                              \
            for (int c = 0; c < NJ; c++) acc[i][c] = vf_zero();                                   \
        for (int64_t p = 0; p < nv; p++) {                                                        \
            vf vv[NJ];                                                                            \
            PF_LINES(pf, p * vst * (int64_t)sizeof(ET), NJ * VL * (int64_t)sizeof(ET))             \
            for (int c = 0; c < NJ; c++) vv[c] = LOAD(V + p * vst + c * VL);                      \
            for (int i = 0; i < NQ; i++) {                                                        \
                const vf eb = vf_set1(E[i * est + p]);                                            \
                for (int c = 0; c < NJ; c++) acc[i][c] = vf_fma(eb, vv[c], acc[i][c]);            \
            }                                                                                     \
        }                                                                                         \
        for (int i = 0; i < NQ; i++)                                                              \
            for (int c = 0; c < NJ; c++) vf_store(O + i * ost + c * VL, acc[i][c]);               \
    }

#define DEF_TILES(DEF, TAG, ET, LOAD)                                                             \
    DEF(TAG, ET, LOAD, 1, 1) DEF(TAG, ET, LOAD, 1, 2) DEF(TAG, ET, LOAD, 1, 3) DEF(TAG, ET, LOAD, 1, 4) \
    DEF(TAG, ET, LOAD, 2, 1) DEF(TAG, ET, LOAD, 2, 2) DEF(TAG, ET, LOAD, 2, 3) DEF(TAG, ET, LOAD, 2, 4) \
    DEF(TAG, ET, LOAD, 3, 1) DEF(TAG, ET, LOAD, 3, 2) DEF(TAG, ET, LOAD, 3, 3) DEF(TAG, ET, LOAD, 3, 4) \
    DEF(TAG, ET, LOAD, 4, 1) DEF(TAG, ET, LOAD, 4, 2) DEF(TAG, ET, LOAD, 4, 3) DEF(TAG, ET, LOAD, 4, 4)
#define TILE_TABLE(KIND, TAG)                                                                     \
    {{KIND##_##TAG##_1_1, KIND##_##TAG##_1_2, KIND##_##TAG##_1_3, KIND##_##TAG##_1_4},             \
     {KIND##_##TAG##_2_1, KIND##_##TAG##_2_2, KIND##_##TAG##_2_3, KIND##_##TAG##_2_4},             \
     {KIND##_##TAG##_3_1, KIND##_##TAG##_3_2, KIND##_##TAG##_3_3, KIND##_##TAG##_3_4},             \
     {KIND##_##TAG##_4_1, KIND##_##TAG##_4_2, KIND##_##TAG##_4_3, KIND##_##TAG##_4_4}}

DEF_TILES(DEF_SCORES, f32, float, LOAD_F32)
DEF_TILES(DEF_SCORES, f16, uint16_t, LOAD_F16)
DEF_TILES(DEF_SCORES, i8, int8_t, LOAD_I8)
DEF_TILES(DEF_PV, f32, float, LOAD_F32)
DEF_TILES(DEF_PV, f16, uint16_t, LOAD_F16)
DEF_TILES(DEF_PV, i8, int8_t, LOAD_I8)

typedef void (*scores_fn)(float *restrict, int64_t, const float *restrict, int64_t,
                          const void *restrict, int64_t, int64_t, const char *);
typedef void (*pv_fn)(float *restrict, int64_t, const float *restrict, int64_t,
                      const void *restrict, int64_t, int64_t, const char *);
// [element type: L2C_KV_F32, L2C_KV_F16, L2C_KV_Q8][queries - 1][vectors - 1]
static const scores_fn SCORES[3][4][4] = {TILE_TABLE(scores, f32), TILE_TABLE(scores, f16),
                                          TILE_TABLE(scores, i8)};
static const pv_fn PV[3][4][4] = {TILE_TABLE(pv, f32), TILE_TABLE(pv, f16), TILE_TABLE(pv, i8)};

// nq queries (rows of Q, stride qst) against the first np positions (a multiple of 16) of
// K^T panels (element type et); pf: prefetch the same bytes of the next slab, or NULL
static void scores(float *restrict S, int64_t sst, const float *restrict Q, int64_t qst,
                   int64_t nq, int et, const void *K, int64_t hs, int64_t np, const char *pf) {
    for (int64_t i = 0; i < nq; i += SG) {
        const int64_t gq = nq - i < SG ? nq - i : SG;
        for (int64_t p = 0; p < np; p += SC * VL) {
            const int64_t nc = (np - p) / VL < SC ? (np - p) / VL : SC;
            SCORES[et][gq - 1][nc - 1](S + i * sst + p, sst, Q + i * qst, qst, K, p, hs,
                                       pf && i == 0 ? pf : NULL);
        }
    }
}

// nq queries (rows of E, stride est, all with nv positions) -> O (nq, hsp); V rows of stride
// vst and element type et, hsp columns read (a multiple of 16); pf as in scores
static void weighted_values(float *restrict O, const float *restrict E, int64_t est, int64_t nq,
                            int et, const void *V, int64_t vst, int64_t hsp, int64_t nv,
                            const char *pf) {
    const int64_t es = et == L2C_KV_F32 ? 4 : et == L2C_KV_F16 ? 2 : 1;
    for (int64_t i = 0; i < nq; i += PG) {
        const int64_t gq = nq - i < PG ? nq - i : PG;
        for (int64_t j = 0; j < hsp; j += PJ * VL) {
            const int64_t nj = (hsp - j) / VL < PJ ? (hsp - j) / VL : PJ;
            PV[et][gq - 1][nj - 1](O + i * hsp + j, hsp, E + i * est, est,
                                   (const uint8_t *)V + j * es, vst, nv,
                                   pf && i == 0 ? pf + j * es : NULL);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// block softmax of one query: s (scores of positions 0..nv-1, times the key scales ks when the
// keys are int8) -> e = exp(s - m) (times the value scales vs when the values are int8) in
// place; m = max, l = sum e (lanes summed vector by vector, then across)

static inline void block_softmax(float *restrict s, int64_t nv, const float *restrict ks,
                                 const float *restrict vs, float *m_out, float *l_out) {
    vf mx = vf_set1(-INFINITY);
    for (int64_t p = 0; p < nv; p += VL) {
        vf x = vf_load(s + p);
        if (ks) {
            x = vf_mul(x, vf_load(ks + p));
            vf_store(s + p, x);
        }
        mx = vf_max(mx, vf_keep_first(x, nv - p, -INFINITY));
    }
    const float m = vf_hmax(mx);
    const vf mv = vf_set1(m);
    vf acc = vf_zero();
    for (int64_t p = 0; p < nv; p += VL) {
        vf e = vf_keep_first(vf_exp(vf_sub(vf_load(s + p), mv)), nv - p, 0.0f);
        acc = vf_add(acc, e);
        if (vs) e = vf_mul(e, vf_load(vs + p));
        vf_store(s + p, e);
    }
    *m_out = m;
    *l_out = vf_hsum(acc);
}

// ---------------------------------------------------------------------------------------------
// a block's keys and values: read in place from the pool, or converted once to float scratch
// (exactly; int8 without its scales) when many queries read them or the head size needs
// padding to 16

typedef struct {
    int ket, vet;            // element types of K and of V as read
    const void *K;           // K^T in panels (l2c_kv_kidx)
    const void *V;           // V (nv, hsp columns readable), row stride vst
    int64_t vst;
    const float *ks, *vs;    // int8 scales (P,) or NULL
} att_block;

static att_block get_block(const l2c_kvpool *pool, const uint8_t *slab, int64_t np, int64_t nv,
                           int to_float, float *restrict kf, float *restrict vfl) {
    const int64_t hs = pool->head_size, hsp = l2c_pad16(hs);
    att_block blk;
    blk.ket = pool->kdtype;
    blk.vet = pool->vdtype;
    blk.K = slab;
    blk.V = slab + l2c_kv_v_offset(pool);
    blk.vst = hs;
    blk.ks = l2c_kv_kscales(pool, slab);
    blk.vs = l2c_kv_vscales(pool, slab);
    if (hs != hsp) to_float = 1;                        // the values need padding
    if (!to_float || (blk.ket == L2C_KV_F32 && blk.vet == L2C_KV_F32 && hs == hsp)) return blk;
    // the panels of positions [0, np) are the first np*hs elements of K^T
    if (blk.ket == L2C_KV_F16) {                        // float keys are read in place
        const uint16_t *kt = (const uint16_t *)slab;
        for (int64_t i = 0; i < np * hs; i += VL) vf_store(kf + i, vf_load_f16(kt + i));
        blk.K = kf;
    } else if (blk.ket == L2C_KV_Q8) {
        const int8_t *kt = (const int8_t *)slab;
        for (int64_t i = 0; i < np * hs; i += VL) vf_store(kf + i, vf_load_i8(kt + i));
        blk.K = kf;
    }
    const uint8_t *vb = blk.V;
    for (int64_t r = 0; r < nv; r++) {
        float *o = vfl + r * hsp;
        int64_t d = 0;
        if (blk.vet == L2C_KV_F32) {
            memcpy(o, (const float *)vb + r * hs, (size_t)hs * sizeof(float));
            d = hs;
        } else if (blk.vet == L2C_KV_F16) {
            const uint16_t *src = (const uint16_t *)vb + r * hs;
            for (; d + VL <= hs; d += VL) vf_store(o + d, vf_load_f16(src + d));
            for (; d < hs; d++) o[d] = l2c_f16_to_f32(src[d]);
        } else {
            const int8_t *src = (const int8_t *)vb + r * hs;
            for (; d + VL <= hs; d += VL) vf_store(o + d, vf_load_i8(src + d));
            for (; d < hs; d++) o[d] = (float)src[d];
        }
        for (; d < hsp; d++) o[d] = 0.0f;
    }
    blk.V = vfl;
    blk.vst = hsp;
    blk.ket = blk.vet = L2C_KV_F32;   // the keys too: float in place, or converted
    return blk;
}

// ---------------------------------------------------------------------------------------------
// merge a block partial (m, l, o) into the state (M, L, O) of one query

static inline void merge_partial(float *M, float *L, float *restrict O, float m, float l,
                                 const float *restrict o, int64_t hsp) {
    const float Mn = *M > m ? *M : m;
    const float a = exp_s(*M - Mn), b = exp_s(m - Mn);
    *M = Mn;
    *L = l2c_fmaf(*L, a, l * b);
    const vf av = vf_set1(a), bv = vf_set1(b);
    for (int64_t j = 0; j < hsp; j += VL) vf_store(O + j, vf_fma(vf_load(O + j), av, vf_mul(vf_load(o + j), bv)));
}

// out (hs,) = O / L
static inline void finish(float *restrict out, const float *restrict O, float L, int64_t hs) {
    const float inv = 1.0f / L;
    for (int64_t d = 0; d < hs; d++) out[d] = O[d] * inv;
}

// ---------------------------------------------------------------------------------------------
// per-thread scratch (kv.h: l2c_att_thread_floats)

typedef struct {
    float *kf, *vf, *S, *ob, *O, *mb, *lb, *M, *L;
} att_scratch;

static inline float *carve(float **p, int64_t n) {
    float *r = *p;
    *p += (n + 15) / 16 * 16;
    return r;
}

static att_scratch scratch_for(float *base, int64_t g, int64_t hs, int64_t P) {
    const int64_t hsp = l2c_pad16(hs), rq = L2C_ATT_ROWS * g;
    att_scratch a;
    a.kf = carve(&base, hs * P);
    a.vf = carve(&base, P * hsp);
    a.S = carve(&base, rq * P);
    a.ob = carve(&base, rq * hsp);
    a.O = carve(&base, rq * hsp);
    a.mb = carve(&base, rq);
    a.lb = carve(&base, rq);
    a.M = carve(&base, rq);
    a.L = carve(&base, rq);
    return a;
}

// Qs (n_kv, rows, g, hsp) = q (rows, n_heads*hs) * (1 / sqrt(hs)), zero-padded to hsp
static void scale_queries(float *restrict Qs, const float *restrict q, int64_t rows,
                          int64_t n_heads, int64_t n_kv, int64_t hs) {
    const float scale = 1.0f / sqrtf((float)hs);
    const int64_t hsp = l2c_pad16(hs), g = n_heads / n_kv;
    for (int64_t t = 0; t < rows; t++)
        for (int64_t head = 0; head < n_heads; head++) {
            const float *src = q + (t * n_heads + head) * hs;
            float *dst = Qs + (((head / g) * rows + t) * g + head % g) * hsp;
            for (int64_t d = 0; d < hs; d++) dst[d] = src[d] * scale;
            for (int64_t d = hs; d < hsp; d++) dst[d] = 0.0f;
        }
}

// bring a slab's first `bytes` toward the cache ahead of use (the next block of a decode row)
static inline void prefetch_slab(const uint8_t *p, int64_t bytes) {
#if defined(__AVX2__) || defined(__AVX512F__)
    for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch((const char *)p + i, _MM_HINT_T0);
#else
    (void)p;
    (void)bytes;
#endif
}

// one split-K task (decode): the partial of block b for row r of a span, kv head h, into part:
// m (g), l (g), o (g, hsp); next: the slab read next (prefetched along), or NULL
static void block_task(float *restrict part, const float *restrict Q, const l2c_kvpool *pool,
                       int64_t layer, const l2c_span *sp, int64_t r, int64_t h, int64_t b,
                       int64_t n_heads, const uint8_t *next, att_scratch *a) {
    const int64_t P = pool->block_size, hs = pool->head_size, hsp = l2c_pad16(hs);
    const int64_t g = n_heads / pool->n_kv_heads, pos = sp->pos0 + r;
    const int64_t nv = pos - b * P + 1 < P ? pos - b * P + 1 : P, np = l2c_pad16(nv);
    const uint8_t *slab = l2c_kv_slab(pool, sp->blocks[b], layer, h);
    const att_block blk = get_block(pool, slab, np, nv, 0, a->kf, a->vf);
    const int in_place = blk.K == (const void *)slab;  // (a block converted is in the cache)
    const char *pk = next && in_place ? (const char *)next : NULL;
    const char *pv = next && in_place ? (const char *)next + l2c_kv_v_offset(pool) : NULL;
    scores(a->S, P, Q, hsp, g, blk.ket, blk.K, hs, np, pk);
    float *m = part, *l = part + g, *o = part + 2 * g;
    for (int64_t j = 0; j < g; j++) block_softmax(a->S + j * P, nv, blk.ks, blk.vs, &m[j], &l[j]);
    weighted_values(o, a->S, P, g, blk.vet, blk.V, blk.vst, hsp, nv, pv);
}

// the merge of a split row: partials of blocks 0..nb-1 in order, then out
static void merge_task(float *restrict out, const float *restrict parts, int64_t nb, int64_t g,
                       int64_t hs, int64_t row_off, att_scratch *a) {
    const int64_t hsp = l2c_pad16(hs), stride = l2c_att_partial_floats(g, hs);
    for (int64_t j = 0; j < g; j++) {
        const float *p0 = parts;
        float M = p0[j], L = p0[g + j];
        float *O = a->O;
        memcpy(O, p0 + 2 * g + j * hsp, (size_t)hsp * sizeof(float));
        for (int64_t b = 1; b < nb; b++) {
            const float *pb = parts + b * stride;
            merge_partial(&M, &L, O, pb[j], pb[g + j], pb + 2 * g + j * hsp, hsp);
        }
        finish(out + row_off + j * hs, O, L, hs);
    }
}

// one prefill tile: rows [r, r+nr) of a span for kv head h, walking blocks 0.. in order
static void tile_task(float *restrict out, const float *restrict Q, const l2c_kvpool *pool,
                      int64_t layer, const l2c_span *sp, int64_t r, int64_t nr, int64_t h,
                      int64_t n_heads, att_scratch *a) {
    const int64_t P = pool->block_size, hs = pool->head_size, hsp = l2c_pad16(hs);
    const int64_t g = n_heads / pool->n_kv_heads;
    const int64_t first = sp->pos0 + r, last = first + nr - 1;
    for (int64_t b = 0; b <= last / P; b++) {
        const int64_t start = b * P;
        const int64_t i0 = start > first ? start - first : 0;      // rows that see block b
        const int64_t nv_max = last - start + 1 < P ? last - start + 1 : P;
        const uint8_t *slab = l2c_kv_slab(pool, sp->blocks[b], layer, h);
        // many queries: convert the block once; a few: read it in place
        const att_block blk = get_block(pool, slab, l2c_pad16(nv_max), nv_max,
                                        (nr - i0) * g > 2 * SG, a->kf, a->vf);
        scores(a->S + i0 * g * P, P, Q + i0 * g * hsp, hsp, (nr - i0) * g, blk.ket, blk.K, hs,
               l2c_pad16(nv_max), NULL);
        // rows with the same count of visible positions share a values tile
        for (int64_t i = i0; i < nr;) {
            const int64_t nv = first + i - start + 1 < P ? first + i - start + 1 : P;
            int64_t i1 = i + 1;
            while (i1 < nr && (first + i1 - start + 1 < P ? first + i1 - start + 1 : P) == nv) i1++;
            for (int64_t qi = i * g; qi < i1 * g; qi++)
                block_softmax(a->S + qi * P, nv, blk.ks, blk.vs, &a->mb[qi], &a->lb[qi]);
            weighted_values(a->ob + i * g * hsp, a->S + i * g * P, P, (i1 - i) * g, blk.vet, blk.V,
                            blk.vst, hsp, nv, NULL);
            i = i1;
        }
        for (int64_t qi = i0 * g; qi < nr * g; qi++) {
            if (b == 0) {
                a->M[qi] = a->mb[qi];
                a->L[qi] = a->lb[qi];
                memcpy(a->O + qi * hsp, a->ob + qi * hsp, (size_t)hsp * sizeof(float));
            } else {
                merge_partial(&a->M[qi], &a->L[qi], a->O + qi * hsp, a->mb[qi], a->lb[qi],
                              a->ob + qi * hsp, hsp);
            }
        }
    }
    for (int64_t i = 0; i < nr; i++)
        for (int64_t j = 0; j < g; j++)
            finish(out + (sp->row0 + r + i) * n_heads * hs + (h * g + j) * hs,
                   a->O + (i * g + j) * hsp, a->L[i * g + j], hs);
}

// the slab a block task reads
static inline const uint8_t *item_slab(const l2c_kvpool *pool, int64_t layer, const l2c_span *spans,
                                       const l2c_att_item *it) {
    return l2c_kv_slab(pool, spans[it->span].blocks[it->block], layer, it->head);
}

// cnt more block tasks of merge mi are done; the thread that completes them merges
static void count_done(float *restrict out, l2c_att_merge *merges, int32_t mi, int32_t cnt,
                       const l2c_span *spans, const float *parts, int64_t g, int64_t hs,
                       int64_t n_heads, att_scratch *a) {
    l2c_att_merge *mg = &merges[mi];
    if (__atomic_add_fetch(&mg->done, cnt, __ATOMIC_ACQ_REL) != mg->n_blocks) return;
    const l2c_span *sp = &spans[mg->span];
    merge_task(out, parts + mg->slot, mg->n_blocks, g, hs,
               (sp->row0 + mg->row) * n_heads * hs + mg->head * g * hs, a);
}

// what the threads of one attention call share
typedef struct {
    float *out;
    const l2c_kvpool *pool;
    int64_t layer;
    const l2c_span *spans;
    int64_t n_heads;
    const l2c_att_item *items;
    l2c_att_merge *merges;
    float *parts;
    const float *Qs;
    uint8_t *base;
    const l2c_att_layout *lay;
    l2c_share *sh;
    int nth;
    int64_t n_tiles, ni;
} att_work;

// prefill tile i of the call
static void tile_item(const att_work *w, int64_t i, att_scratch *a) {
    const int64_t hsp = l2c_pad16(w->pool->head_size), g = w->n_heads / w->pool->n_kv_heads;
    const l2c_att_item *it = &w->items[i];
    const l2c_span *sp = &w->spans[it->span];
    const float *Q = w->Qs + ((it->head * w->lay->n_rows + sp->row0 + it->row) * g) * hsp;
    const int64_t nr = sp->n - it->row < L2C_ATT_ROWS ? sp->n - it->row : L2C_ATT_ROWS;
    tile_task(w->out, Q, w->pool, w->layer, sp, it->row, nr, it->head, w->n_heads, a);
}

// one thread's part of an attention call (in_team: inside its parallel region)
static void attention_work(const att_work *w, int in_team) {
    const l2c_kvpool *pool = w->pool;
    const int64_t P = pool->block_size, hs = pool->head_size, hsp = l2c_pad16(hs);
    const int64_t g = w->n_heads / pool->n_kv_heads, n_rows = w->lay->n_rows;
    const l2c_att_item *items = w->items;
    const l2c_span *spans = w->spans;
    att_scratch a = scratch_for((float *)(w->base + w->lay->thread_off + L2C_THREAD_ID() * w->lay->thread_bytes),
                                g, hs, P);
    // the prefill tiles, largest first, one at a time to whichever thread is free
    if (in_team) {
        L2C_PRAGMA(omp for schedule(dynamic, 1) nowait)
        for (int64_t i = 0; i < w->n_tiles; i++) tile_item(w, i, &a);
    } else {
        for (int64_t i = 0; i < w->n_tiles; i++) tile_item(w, i, &a);
    }
    // the block tasks: a thread's share is a run of tasks that reads one stream of memory,
    // each task prefetching the next one's slab line by line as it reads its own (the
    // first slab of a run at once); a thread counts its finished tasks per (row, kv head)
    // and adds them once per run; the thread that completes a row's partials merges them,
    // in block order
    int64_t i0, i1;
    for (int k = 0; k < w->nth; k++)
        while (take(&w->sh[(L2C_THREAD_ID() + k) % w->nth], k == 0, L2C_ATT_CLAIM, &i0, &i1)) {
            prefetch_slab(item_slab(pool, w->layer, spans, &items[i0]), pool->slab_bytes);
            int32_t cur = items[i0].merge, cnt = 0;
            for (int64_t i = i0; i < i1; i++) {
                const l2c_att_item *it = &items[i];
                const l2c_span *sp = &spans[it->span];
                const float *Q = w->Qs + ((it->head * n_rows + sp->row0 + it->row) * g) * hsp;
                // past the run too: the owner's next run goes on from there
                const uint8_t *next = i + 1 < w->ni ? item_slab(pool, w->layer, spans, &items[i + 1]) : NULL;
                block_task(w->parts + it->slot, Q, pool, w->layer, sp, it->row, it->head, it->block,
                           w->n_heads, next, &a);
                cnt++;
                if (i + 1 == i1 || items[i + 1].merge != cur) {
                    count_done(w->out, w->merges, cur, cnt, spans, w->parts, g, hs, w->n_heads, &a);
                    if (i + 1 < i1) cur = items[i + 1].merge;
                    cnt = 0;
                }
            }
        }
}

// ---------------------------------------------------------------------------------------------

// the work of a call: prefill tiles (the largest first), then the block tasks of the decode
// rows, written to items and merges when `write` (else only counted); work: multiply-adds / hs
static void att_items(l2c_att_item *items, l2c_att_merge *merges, const l2c_span *spans,
                      int64_t n_spans, const l2c_kvpool *pool, int64_t n_heads, int write,
                      int64_t *n_tiles, int64_t *n_items, int64_t *work) {
    const int64_t P = pool->block_size, nkv = pool->n_kv_heads;
    const int64_t stride = l2c_att_partial_floats(n_heads / nkv, pool->head_size);
    int64_t ni = 0, nm = 0, slot = 0, wk = 0;
    for (int64_t s = 0; s < n_spans; s++) {
        const l2c_span *sp = &spans[s];
        if (sp->n <= L2C_ATT_SPLIT_ROWS) continue;
        for (int64_t r = (sp->n - 1) / L2C_ATT_ROWS * L2C_ATT_ROWS; r >= 0; r -= L2C_ATT_ROWS)
            for (int64_t h = 0; h < nkv; h++, ni++)
                if (write) items[ni] = (l2c_att_item){(int32_t)s, (int32_t)r, (int32_t)h, -1, -1, 0, 0};
        wk += sp->n * (sp->pos0 + sp->n);
    }
    *n_tiles = ni;
    for (int64_t s = 0; s < n_spans; s++) {
        const l2c_span *sp = &spans[s];
        if (sp->n > L2C_ATT_SPLIT_ROWS) continue;
        for (int64_t r = 0; r < sp->n; r++) {
            const int64_t nb = (sp->pos0 + r) / P + 1;
            // a (row, kv head)'s tasks in block order, one after the other: a run of tasks
            // counts to one merge at a time
            for (int64_t h = 0; h < nkv; h++) {
                if (write)
                    merges[nm + h] = (l2c_att_merge){(int32_t)s, (int32_t)r, (int32_t)h, (int32_t)nb,
                                                     slot + h * nb * stride, 0, 0};
                for (int64_t b = 0; b < nb; b++, ni++)
                    if (write)
                        items[ni] = (l2c_att_item){(int32_t)s, (int32_t)r, (int32_t)h, (int32_t)b,
                                                   (int32_t)(nm + h), 0, slot + (h * nb + b) * stride};
            }
            nm += nkv;
            slot += nkv * nb * stride;
            wk += sp->pos0 + r + 1;
        }
    }
    *n_items = ni;
    *work = wk;
}

// the work of one call in workspace ws (laid out as lay): queries scaled and the items
// written by the caller that `writes` (the others only count them); sh: the shares to use
static att_work att_setup(float *restrict out, const float *restrict q, const l2c_kvpool *pool,
                          int64_t layer, const l2c_span *spans, int64_t n_spans, int64_t n_heads,
                          void *ws, const l2c_att_layout *lay, int writes, l2c_share *sh,
                          int64_t *work) {
    uint8_t *base = ws;
    att_work w = {out, pool, layer, spans, n_heads, (const l2c_att_item *)(base + lay->items_off),
                  (l2c_att_merge *)(base + lay->merges_off), (float *)(base + lay->partials_off),
                  (const float *)(base + lay->queries_off), base, lay, sh, 1, 0, 0};
    if (writes)
        scale_queries((float *)(base + lay->queries_off), q, lay->n_rows, n_heads,
                      pool->n_kv_heads, pool->head_size);
    att_items((l2c_att_item *)(base + lay->items_off), w.merges, spans, n_spans, pool, n_heads,
              writes, &w.n_tiles, &w.ni, work);
    return w;
}

// part p of nth of the block tasks [n_tiles, ni)
static void att_share_set(l2c_share *sh, const att_work *w, int64_t p, int64_t nth) {
    share_set(sh, w->n_tiles + (w->ni - w->n_tiles) * p / nth,
              w->n_tiles + (w->ni - w->n_tiles) * (p + 1) / nth);
}

static void attention(float *restrict out, const float *restrict q, const l2c_kvpool *pool,
                      int64_t layer, const l2c_span *spans, int64_t n_spans, int64_t n_heads,
                      void *ws, int n_threads) {
    const l2c_att_layout lay = l2c_att_plan(pool, spans, n_spans, n_heads, n_threads);
    l2c_share sh[n_threads > 0 ? n_threads : 1];  // the block tasks in nth runs
    int64_t work;
    att_work w = att_setup(out, q, pool, layer, spans, n_spans, n_heads, ws, &lay, 1, sh, &work);
    const int nth = threads_for(work * n_heads * pool->head_size * 2, n_threads);
    w.nth = nth;
    for (int p = 0; p < nth; p++) att_share_set(&sh[p], &w, p, nth);
    if (nth > 1) {
        L2C_PRAGMA(omp parallel num_threads(nth))
        attention_work(&w, 1);
    } else {
        attention_work(&w, 0);  // no parallel region (see L2C_PFOR)
    }
}

// A team's attention (decode rows): thread 0 writes the work while the others count it, they
// meet, then each sets its share of the block tasks and takes as above (a share seen before
// its owner set it is the last call's, left empty: see matmul_team).
static void attention_team(float *restrict out, const float *restrict q, const l2c_kvpool *pool,
                           int64_t layer, const l2c_span *spans, int64_t n_spans, int64_t n_heads,
                           void *ws, const l2c_team *tm) {
    const l2c_att_layout lay = l2c_att_plan(pool, spans, n_spans, n_heads, tm->n);
    int64_t work;
    att_work w = att_setup(out, q, pool, layer, spans, n_spans, n_heads, ws, &lay, tm->id == 0,
                           tm->st->sh, &work);
    w.nth = tm->n;
    l2c_team_barrier(tm);
    att_share_set(&tm->st->sh[tm->id], &w, tm->id, tm->n);
    attention_work(&w, 1);
}
