// kvcache.c: the KV pool (blocks of P positions on a free stack) and sequences (block tables):
// reserve, truncate, save/load as bytes. The layout of a block is described in llama2c.h.
#define _DEFAULT_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "kv.h"
#include "llama2c.h"

// ---------------------------------------------------------------------------------------------
// pool

// Zeroed memory whose pages are touched only when a block fills. On Linux, an anonymous
// mapping aligned to 2 MB and marked for transparent huge pages: decode reads every block of a
// sequence once per layer, and with 4 KB pages those scattered slabs cost a page walk each.
#define L2C_HUGE (2 << 20)

static uint8_t *pool_alloc(l2c_kvpool *p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (bytes >= L2C_HUGE) {
        const size_t len = (size_t)((bytes + 2 * L2C_HUGE - 1) / L2C_HUGE * L2C_HUGE);
        void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) return NULL;
        p->mem = m;
        p->mem_bytes = (int64_t)len;
        uint8_t *a = (uint8_t *)(((uintptr_t)m + L2C_HUGE - 1) / L2C_HUGE * L2C_HUGE);
        madvise(a, (size_t)((bytes + L2C_HUGE - 1) / L2C_HUGE * L2C_HUGE), MADV_HUGEPAGE);
        return a;
    }
#endif
    p->mem = calloc((size_t)bytes, 1);
    p->mem_bytes = 0;
    return p->mem;
}

static void pool_release(l2c_kvpool *p) {
#if defined(__linux__)
    if (p->mem && p->mem_bytes > 0) {
        munmap(p->mem, (size_t)p->mem_bytes);
        return;
    }
#endif
    free(p->mem);
}

static int kv_type_ok(int32_t t) { return t == L2C_KV_F32 || t == L2C_KV_F16 || t == L2C_KV_Q8; }

// bytes of one position of one (layer, kv head): keys and values, with their scales if int8
static int64_t kv_position_bytes(int64_t head_size, int32_t kdtype, int32_t vdtype) {
    return head_size * (l2c_kv_esize(kdtype) + l2c_kv_esize(vdtype)) +
           (kdtype == L2C_KV_Q8 ? 4 : 0) + (vdtype == L2C_KV_Q8 ? 4 : 0);
}

int64_t l2c_kv_block_bytes(int64_t n_layers, int64_t n_kv_heads, int64_t head_size,
                           int32_t kdtype, int32_t vdtype, int64_t block_size) {
    if (n_layers <= 0 || n_kv_heads <= 0 || head_size <= 0 || block_size <= 0 ||
        block_size % 16 != 0 || !kv_type_ok(kdtype) || !kv_type_ok(vdtype))
        return 0;
    return n_layers * n_kv_heads * l2c_round64(block_size * kv_position_bytes(head_size, kdtype, vdtype));
}

int l2c_kvpool_init(l2c_kvpool *p, int64_t n_layers, int64_t n_kv_heads, int64_t head_size,
                    int32_t kdtype, int32_t vdtype, int64_t block_size, int64_t n_blocks) {
    memset(p, 0, sizeof(*p));
    const int64_t bb = l2c_kv_block_bytes(n_layers, n_kv_heads, head_size, kdtype, vdtype, block_size);
    if (bb <= 0 || n_blocks <= 0 || n_blocks > INT32_MAX) return L2C_ERR_ARG;
    p->kdtype = kdtype;
    p->vdtype = vdtype;
    p->block_size = block_size;
    p->n_layers = n_layers;
    p->n_kv_heads = n_kv_heads;
    p->head_size = head_size;
    p->block_bytes = bb;
    p->slab_bytes = bb / (n_layers * n_kv_heads);
    p->data = pool_alloc(p, n_blocks * bb);
    p->free_stack = malloc((size_t)n_blocks * sizeof(int32_t));
    if (!p->data || !p->free_stack) {
        l2c_kvpool_free(p);
        return L2C_ERR_NOMEM;
    }
    p->n_blocks = n_blocks;
    // block 0 on top: a fresh pool fills from the start of its memory
    for (int64_t i = 0; i < n_blocks; i++) p->free_stack[i] = (int32_t)(n_blocks - 1 - i);
    p->n_free = n_blocks;
    return L2C_OK;
}

void l2c_kvpool_free(l2c_kvpool *p) {
    if (!p) return;
    pool_release(p);
    free(p->free_stack);
    memset(p, 0, sizeof(*p));
}

// ---------------------------------------------------------------------------------------------
// sequences

static int64_t blocks_for(const l2c_kvpool *p, int64_t n_pos) {
    return (n_pos + p->block_size - 1) / p->block_size;
}

int l2c_seq_init(l2c_seq *s, l2c_kvpool *p, int64_t max_pos) {
    memset(s, 0, sizeof(*s));
    if (!p || !p->data || max_pos <= 0) return L2C_ERR_ARG;
    s->blocks = malloc((size_t)blocks_for(p, max_pos) * sizeof(int32_t));
    if (!s->blocks) return L2C_ERR_NOMEM;
    s->pool = p;
    s->max_pos = max_pos;
    return L2C_OK;
}

static void release_blocks(l2c_seq *s, int64_t keep) {
    l2c_kvpool *p = s->pool;
    while (s->n_blocks > keep) p->free_stack[p->n_free++] = s->blocks[--s->n_blocks];
}

void l2c_seq_free(l2c_seq *s) {
    if (!s) return;
    if (s->pool && s->blocks) release_blocks(s, 0);
    free(s->blocks);
    memset(s, 0, sizeof(*s));
}

int64_t l2c_seq_blocks_needed(const l2c_seq *s, int64_t n_pos) {
    const int64_t need = blocks_for(s->pool, n_pos) - s->n_blocks;
    return need > 0 ? need : 0;
}

int l2c_seq_reserve(l2c_seq *s, int64_t n_pos) {
    if (!s || !s->pool || n_pos < 0) return L2C_ERR_ARG;
    if (n_pos > s->max_pos) return L2C_ERR_RANGE;
    l2c_kvpool *p = s->pool;
    const int64_t need = l2c_seq_blocks_needed(s, n_pos);
    if (need > p->n_free) return L2C_ERR_KVFULL;
    for (int64_t i = 0; i < need; i++) s->blocks[s->n_blocks++] = p->free_stack[--p->n_free];
    return L2C_OK;
}

int l2c_seq_truncate(l2c_seq *s, int64_t n) {
    if (!s || !s->pool || n < 0 || n > s->n_pos) return L2C_ERR_ARG;
    s->n_pos = n;
    release_blocks(s, blocks_for(s->pool, n));
    return L2C_OK;
}

// ---------------------------------------------------------------------------------------------
// save / load: positions as bytes, per (layer, kv head): K (n, hs), V (n, hs) [, ks (n,)]
// [, vs (n,)] (the scales of int8 keys, of int8 values)

int64_t l2c_seq_state_bytes(const l2c_kvpool *p, int64_t n) {
    return p->n_layers * p->n_kv_heads * n * kv_position_bytes(p->head_size, p->kdtype, p->vdtype);
}

// copy positions [0, n) between the blocks and a packed buffer (to_pool: buffer -> blocks)
static void copy_positions(const l2c_seq *s, int64_t n, uint8_t *buf, int to_pool) {
    const l2c_kvpool *p = s->pool;
    const int64_t P = p->block_size, hs = p->head_size;
    const int64_t ek = l2c_kv_esize(p->kdtype), ev = l2c_kv_esize(p->vdtype);
    const int kq8 = p->kdtype == L2C_KV_Q8, vq8 = p->vdtype == L2C_KV_Q8;
    for (int64_t l = 0; l < p->n_layers; l++)
        for (int64_t h = 0; h < p->n_kv_heads; h++) {
            uint8_t *kbuf = buf, *vbuf = buf + n * hs * ek;
            uint8_t *ksbuf = vbuf + n * hs * ev, *vsbuf = ksbuf + (kq8 ? n * 4 : 0);
            buf += n * kv_position_bytes(hs, p->kdtype, p->vdtype);
            for (int64_t pos = 0; pos < n; pos++) {
                uint8_t *slab = l2c_kv_slab(p, s->blocks[pos / P], l, h);
                const int64_t r = pos % P;
                uint8_t *kt = slab, *v = slab + l2c_kv_v_offset(p) + r * hs * ev;
                float *ks = l2c_kv_kscales(p, slab), *vs = l2c_kv_vscales(p, slab);
                for (int64_t d = 0; d < hs; d++) {   // K^T column r <-> K row pos
                    uint8_t *a = kt + l2c_kv_kidx(hs, r, d) * ek, *b = kbuf + (pos * hs + d) * ek;
                    if (to_pool) memcpy(a, b, (size_t)ek);
                    else memcpy(b, a, (size_t)ek);
                }
                if (to_pool) memcpy(v, vbuf + pos * hs * ev, (size_t)(hs * ev));
                else memcpy(vbuf + pos * hs * ev, v, (size_t)(hs * ev));
                if (kq8) {
                    if (to_pool) memcpy(&ks[r], ksbuf + pos * 4, 4);
                    else memcpy(ksbuf + pos * 4, &ks[r], 4);
                }
                if (vq8) {
                    if (to_pool) memcpy(&vs[r], vsbuf + pos * 4, 4);
                    else memcpy(vsbuf + pos * 4, &vs[r], 4);
                }
            }
        }
}

int l2c_seq_export(const l2c_seq *s, int64_t n, void *dst) {
    if (!s || !s->pool || n < 0 || n > s->n_pos || (n > 0 && !dst)) return L2C_ERR_ARG;
    copy_positions(s, n, dst, 0);
    return L2C_OK;
}

int l2c_seq_import(l2c_seq *s, int64_t n, const void *src) {
    if (!s || !s->pool || n < 0 || (n > 0 && !src)) return L2C_ERR_ARG;
    if (n > s->max_pos) return L2C_ERR_RANGE;
    // all or nothing: the blocks beyond what is kept must be available first
    const int64_t have = s->n_blocks, need = blocks_for(s->pool, n);
    if (need > have && need - have > s->pool->n_free) return L2C_ERR_KVFULL;
    s->n_pos = 0;
    release_blocks(s, need);
    int rc = l2c_seq_reserve(s, n);
    if (rc != L2C_OK) return rc;
    copy_positions(s, n, (uint8_t *)src, 1);
    s->n_pos = n;
    return L2C_OK;
}

// element i of an array of element type t (int8: times its scale)
static float kv_element(const uint8_t *a, int32_t t, int64_t i, float scale) {
    if (t == L2C_KV_F32) return ((const float *)a)[i];
    if (t == L2C_KV_F16) return l2c_f16_to_f32(((const uint16_t *)a)[i]);
    return (float)((const int8_t *)a)[i] * scale;
}

int l2c_seq_read(const l2c_seq *s, int64_t layer, int64_t head, int64_t pos, float *k, float *v) {
    if (!s || !s->pool || pos < 0 || pos >= s->n_pos || layer < 0 || head < 0 ||
        layer >= s->pool->n_layers || head >= s->pool->n_kv_heads)
        return L2C_ERR_ARG;
    const l2c_kvpool *p = s->pool;
    const int64_t P = p->block_size, hs = p->head_size, r = pos % P;
    const uint8_t *slab = l2c_kv_slab(p, s->blocks[pos / P], layer, head);
    const uint8_t *vrow = slab + l2c_kv_v_offset(p);
    const float *ks = l2c_kv_kscales(p, slab), *vs = l2c_kv_vscales(p, slab);
    for (int64_t d = 0; d < hs; d++) {
        k[d] = kv_element(slab, p->kdtype, l2c_kv_kidx(hs, r, d), ks ? ks[r] : 1.0f);
        v[d] = kv_element(vrow, p->vdtype, r * hs + d, vs ? vs[r] : 1.0f);
    }
    return L2C_OK;
}

// ---------------------------------------------------------------------------------------------

int64_t l2c_attention_ws_bytes(const l2c_kvpool *pool, const l2c_span *spans, int64_t n_spans,
                               int64_t n_heads, int n_threads) {
    return l2c_att_plan(pool, spans, n_spans, n_heads, n_threads).total;
}
