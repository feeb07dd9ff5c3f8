// kv.h: helpers shared by the KV pool (kvcache.c), the attention kernels (attention.c, one copy
// per kernel table) and the forward pass: slab addressing, fp16 conversion in software, and
// the attention's work plan and workspace layout. Not part of the public API.
#ifndef LLAMA2C_KV_H
#define LLAMA2C_KV_H

#include <stdint.h>
#include <string.h>

#include "llama2c.h"

// ---- slabs ------------------------------------------------------------------------------------

static inline int64_t l2c_kv_esize(int32_t dtype) {
    return dtype == L2C_KV_F32 ? 4 : dtype == L2C_KV_F16 ? 2 : 1;
}

// the (layer, kv head) slab of a block: K^T in panels [P/16][hs][16], V [P][hs], then ks [P]
// (int8 keys), vs [P] (int8 values)
static inline uint8_t *l2c_kv_slab(const l2c_kvpool *p, int32_t block, int64_t layer,
                                   int64_t head) {
    return p->data + (int64_t)block * p->block_bytes + (layer * p->n_kv_heads + head) * p->slab_bytes;
}
// element index of dimension d of the key at row r in a slab's K^T panels (llama2c.h)
static inline int64_t l2c_kv_kidx(int64_t hs, int64_t r, int64_t d) {
    return (r / 16) * 16 * hs + d * 16 + r % 16;
}
static inline int64_t l2c_kv_v_offset(const l2c_kvpool *p) {
    return p->head_size * p->block_size * l2c_kv_esize(p->kdtype);
}
// the scales of int8 keys (ks) and of int8 values (vs) in a slab (after V), or NULL
static inline float *l2c_kv_scales(const l2c_kvpool *p, const uint8_t *slab) {
    return (float *)(slab + l2c_kv_v_offset(p) + p->head_size * p->block_size * l2c_kv_esize(p->vdtype));
}
static inline float *l2c_kv_kscales(const l2c_kvpool *p, const uint8_t *slab) {
    return p->kdtype == L2C_KV_Q8 ? l2c_kv_scales(p, slab) : NULL;
}
static inline float *l2c_kv_vscales(const l2c_kvpool *p, const uint8_t *slab) {
    if (p->vdtype != L2C_KV_Q8) return NULL;
    return l2c_kv_scales(p, slab) + (p->kdtype == L2C_KV_Q8 ? p->block_size : 0);
}

// ---- IEEE binary16 <-> binary32 in software, round to nearest even (as F16C's vcvtps2ph with
// _MM_FROUND_TO_NEAREST_INT, so the generic table stores the same bits as the SIMD ones) ------

static inline uint16_t l2c_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
    if (a >= 0x7f800000u)                                   // inf, nan (kept quiet)
        return (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u | ((a >> 13) & 0x3ffu) : 0u));
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);   // rounds to >= 65520: inf
    if (a >= 0x38800000u) {                                  // a normal half
        uint32_t h = (a - (112u << 23)) >> 13;
        const uint32_t rem = a & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
        return (uint16_t)(sign | h);
    }
    if (a < 0x33000000u) return (uint16_t)sign;              // <= 2^-25: rounds to zero
    const uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;                          // 14 .. 24
    uint32_t h = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (h & 1u))) h++;
    return (uint16_t)(sign | h);
}

static inline float l2c_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu;
    uint32_t m = h & 0x3ffu, x;
    if (e == 0x1fu) x = sign | 0x7f800000u | (m << 13);
    else if (e) x = sign | ((e + 112u) << 23) | (m << 13);
    else if (!m) x = sign;
    else {                                                    // subnormal: normalise
        uint32_t sh = 0;
        while (!(m & 0x400u)) { m <<= 1; sh++; }
        x = sign | ((113u - sh) << 23) | ((m & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &x, 4);
    return f;
}

// ---- the attention's work plan ------------------------------------------------------------------
//
// Spans of at most L2C_ATT_SPLIT_ROWS rows (decode) are split per (row, kv head, block): each
// such task writes its block partial to a slot, and one merge per (row, kv head) folds the
// slots in block order. Longer spans (prefill) go in tiles of L2C_ATT_ROWS rows per kv head,
// each walking its blocks in order. Both give the canonical merge (llama2c.h).
#define L2C_ATT_ROWS 16
#define L2C_ATT_SPLIT_ROWS 4
#define L2C_ATT_CLAIM 4       // decode: block tasks a thread takes at least at once

typedef struct {
    int32_t span, row, head, block;  // block < 0: a tile of rows row.. (prefill)
    int32_t merge, pad;              // split task: its row's merge
    int64_t slot;                    // split task: first float of its partial
} l2c_att_item;

typedef struct {
    int32_t span, row, head, n_blocks;
    int64_t slot;                    // partials of blocks 0..n_blocks-1 at slot + b * stride
    int32_t done, pad;               // block tasks finished (the last one merges)
} l2c_att_merge;

typedef struct {
    int64_t n_items, n_merges, n_partial_floats, n_rows;
    int64_t items_off, merges_off, partials_off, queries_off, thread_off, thread_bytes, total;
} l2c_att_layout;

static inline int64_t l2c_round64(int64_t b) { return (b + 63) / 64 * 64; }
static inline int64_t l2c_pad16(int64_t n) { return (n + 15) / 16 * 16; }

// floats of one block partial of a (row, kv head): g x (m, l, o[hs padded])
static inline int64_t l2c_att_partial_floats(int64_t g, int64_t hs) {
    return g * (2 + l2c_pad16(hs));
}

// per-thread scratch floats: K^T (hs*P, panels), V (P, hsp), scores (R*g, P), block partials o
// (R*g, hsp) and state O (R*g, hsp), and m, l, M, L (R*g each)
static inline int64_t l2c_att_thread_floats(int64_t g, int64_t hs, int64_t P) {
    const int64_t hsp = l2c_pad16(hs), rq = L2C_ATT_ROWS * g;
    return hs * P + P * hsp + rq * P + 2 * rq * hsp + 4 * l2c_pad16(rq) + 4 * 16;
}

static inline l2c_att_layout l2c_att_plan(const l2c_kvpool *pool, const l2c_span *spans,
                                          int64_t n_spans, int64_t n_heads, int n_threads) {
    l2c_att_layout L;
    memset(&L, 0, sizeof(L));
    const int64_t P = pool->block_size, nkv = pool->n_kv_heads, g = n_heads / nkv;
    int64_t split_tasks = 0;
    for (int64_t i = 0; i < n_spans; i++) {
        const l2c_span *sp = &spans[i];
        if (sp->row0 + sp->n > L.n_rows) L.n_rows = sp->row0 + sp->n;
        if (sp->n <= L2C_ATT_SPLIT_ROWS) {
            for (int64_t r = 0; r < sp->n; r++) split_tasks += (sp->pos0 + r) / P + 1;
            L.n_merges += sp->n * nkv;
        } else {
            L.n_items += (sp->n + L2C_ATT_ROWS - 1) / L2C_ATT_ROWS * nkv;
        }
    }
    split_tasks *= nkv;
    L.n_items += split_tasks;
    L.n_partial_floats = split_tasks * l2c_att_partial_floats(g, pool->head_size);
    L.items_off = 0;
    L.merges_off = l2c_round64(L.n_items * (int64_t)sizeof(l2c_att_item));
    L.partials_off = L.merges_off + l2c_round64(L.n_merges * (int64_t)sizeof(l2c_att_merge));
    // the queries scaled by 1/sqrt(hs), (n_kv, rows, g, hsp): a kv head's queries at one stride
    L.queries_off = L.partials_off + l2c_round64(L.n_partial_floats * 4);
    L.thread_off = L.queries_off + l2c_round64(L.n_rows * n_heads * l2c_pad16(pool->head_size) * 4);
    L.thread_bytes = l2c_round64(l2c_att_thread_floats(g, pool->head_size, P) * 4);
    L.total = L.thread_off + (n_threads < 1 ? 1 : n_threads) * L.thread_bytes;
    return L;
}

#endif
