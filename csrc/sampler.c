// sampler.c: the next-token sampler chain (logit bias, repetition / presence / frequency
// penalties, temperature, top-k, top-p, min-p, a seeded xorshift64* draw; greedy at temperature
// 0) and log-probabilities. The order and every rule are documented in llama2c.h; the NumPy
// twin in tests/test_sampler.py follows them operation by operation.
//
// No step sorts the vocabulary: top-k keeps a k-entry heap, top-p/min-p first drop the tokens
// that provably cannot be kept and then pop the rest from a heap in descending order, only as
// far as the kept set reaches. The passes over the whole vocabulary (max, exp, sums, the
// candidates) are the kernel table's (csrc/sample_ops.c: the same bits on every table).
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "llama2c.h"
#include "sample_exp.h"

#define HIST_MAX 4096      // buckets of the top-p histogram (see bucket_key)

// ---------------------------------------------------------------------------------------------
// random numbers (llama2.c's xorshift64*)

static uint32_t random_u32(uint64_t *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}

float l2c_random_f32(uint64_t *state) { return (float)(random_u32(state) >> 8) / 16777216.0f; }

uint64_t l2c_seed_state(uint64_t seed) { return seed ? seed : 0x9E3779B97F4A7C15ull; }

// ---------------------------------------------------------------------------------------------
// setup

static int params_ok(const l2c_sampler_params *p) {
    return p->temperature >= 0.0f && isfinite(p->temperature) && p->top_p >= 0.0f &&
           p->top_p <= 1.0f && p->min_p >= 0.0f && p->min_p <= 1.0f && p->top_k >= 0 &&
           p->repetition_penalty > 0.0f && isfinite(p->repetition_penalty) &&
           isfinite(p->presence_penalty) && isfinite(p->frequency_penalty) &&
           p->penalty_last_n >= 0;
}

void l2c_sampler_params_default(l2c_sampler_params *p) {
    p->temperature = 1.0f;
    p->top_p = 1.0f;
    p->min_p = 0.0f;
    p->top_k = 0;
    p->repetition_penalty = 1.0f;
    p->presence_penalty = 0.0f;
    p->frequency_penalty = 0.0f;
    p->penalty_last_n = 0;
}

static int penalties_on(const l2c_sampler *sp) {
    const l2c_sampler_params *p = &sp->p;
    return p->penalty_last_n > 0 && (p->repetition_penalty != 1.0f || p->presence_penalty != 0.0f ||
                                     p->frequency_penalty != 0.0f);
}

int l2c_sampler_init(l2c_sampler *sp, int64_t vocab_size, const l2c_sampler_params *p,
                     uint64_t seed) {
    memset(sp, 0, sizeof(*sp));
    if (vocab_size <= 0 || vocab_size > INT32_MAX || !p || !params_ok(p)) return L2C_ERR_ARG;
    sp->vocab_size = vocab_size;
    sp->p = *p;
    if (sp->p.top_k >= vocab_size) sp->p.top_k = 0;  // keeps everything: off
    sp->rng_state = l2c_seed_state(seed);
    sp->k = l2c_kernels_get(L2C_ISA_COUNT);
    sp->work = malloc((size_t)vocab_size * sizeof(float));
    sp->probs = malloc((size_t)vocab_size * sizeof(float));
    sp->idx = malloc((size_t)vocab_size * sizeof(int32_t));
    sp->idx2 = malloc((size_t)vocab_size * sizeof(int32_t));
    sp->block_sum = malloc((size_t)(vocab_size / L2C_SAMPLER_BLOCK + 1) * sizeof(double));
    sp->hist = malloc((size_t)HIST_MAX * sizeof(double));
    int ok = sp->work && sp->probs && sp->idx && sp->idx2 && sp->block_sum && sp->hist;
    if (ok && penalties_on(sp)) {
        sp->window = malloc((size_t)sp->p.penalty_last_n * sizeof(int32_t));
        sp->counts = calloc((size_t)vocab_size, sizeof(int32_t));
        ok = sp->window && sp->counts;
    }
    if (!ok) {
        l2c_sampler_free(sp);
        return L2C_ERR_NOMEM;
    }
    return L2C_OK;
}

void l2c_sampler_set_kernels(l2c_sampler *sp, const l2c_kernels *k) {
    if (sp && k) sp->k = k;
}

void l2c_sampler_free(l2c_sampler *sp) {
    if (!sp) return;
    free(sp->work);
    free(sp->probs);
    free(sp->idx);
    free(sp->idx2);
    free(sp->block_sum);
    free(sp->hist);
    free(sp->window);
    free(sp->counts);
    free(sp->bias_ids);
    free(sp->bias);
    memset(sp, 0, sizeof(*sp));
}

int l2c_sampler_set_bias(l2c_sampler *sp, const int32_t *ids, const float *bias, int64_t n) {
    if (n < 0 || (n > 0 && (!ids || !bias))) return L2C_ERR_ARG;
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= sp->vocab_size) return L2C_ERR_TOKEN;
        if (isnan(bias[i]) || bias[i] == INFINITY) return L2C_ERR_ARG;  // -inf bans a token
    }
    int32_t *new_ids = n ? malloc((size_t)n * sizeof(int32_t)) : NULL;
    float *new_bias = n ? malloc((size_t)n * sizeof(float)) : NULL;
    if (n && (!new_ids || !new_bias)) {
        free(new_ids);
        free(new_bias);
        return L2C_ERR_NOMEM;
    }
    if (n) {
        memcpy(new_ids, ids, (size_t)n * sizeof(int32_t));
        memcpy(new_bias, bias, (size_t)n * sizeof(float));
    }
    free(sp->bias_ids);
    free(sp->bias);
    sp->bias_ids = new_ids;
    sp->bias = new_bias;
    sp->n_bias = n;
    return L2C_OK;
}

// ---------------------------------------------------------------------------------------------
// the penalty window: a ring of the last penalty_last_n accepted tokens and their counts

void l2c_sampler_reset_window(l2c_sampler *sp) {
    if (!sp->window) return;
    for (int64_t j = 0; j < sp->window_len; j++) sp->counts[sp->window[j]] = 0;
    sp->window_len = 0;
    sp->window_pos = 0;
}

int l2c_sampler_accept(l2c_sampler *sp, int32_t token) {
    if (token < 0 || token >= sp->vocab_size) return L2C_ERR_TOKEN;
    if (!sp->window) return L2C_OK;
    const int64_t cap = sp->p.penalty_last_n;
    if (sp->window_len == cap)
        sp->counts[sp->window[sp->window_pos]]--;  // the oldest token leaves the window
    else
        sp->window_len++;
    sp->window[sp->window_pos] = token;
    sp->counts[token]++;
    sp->window_pos = (sp->window_pos + 1) % cap;
    return L2C_OK;
}

// ---------------------------------------------------------------------------------------------
// steps 1-2: logit bias and penalties, into sp->work

static void apply_penalties(l2c_sampler *sp, float *l) {
    const float rep = sp->p.repetition_penalty, pres = sp->p.presence_penalty,
                freq = sp->p.frequency_penalty;
    int32_t *counts = sp->counts;
    // each distinct token once: its count is negated while it is done, then restored
    for (int64_t j = 0; j < sp->window_len; j++) {
        const int32_t t = sp->window[j];
        const int32_t c = counts[t];
        if (c <= 0) continue;
        if (rep != 1.0f) l[t] = l[t] > 0.0f ? l[t] / rep : l[t] * rep;
        l[t] -= (float)c * freq + pres;
        counts[t] = -c;
    }
    for (int64_t j = 0; j < sp->window_len; j++) {
        const int32_t t = sp->window[j];
        if (counts[t] < 0) counts[t] = -counts[t];
    }
}

static const float *adjusted_logits(l2c_sampler *sp, const float *logits) {
    const int pen = sp->window_len > 0 && penalties_on(sp);
    if (!sp->n_bias && !pen) return logits;
    float *l = sp->work;
    memcpy(l, logits, (size_t)sp->vocab_size * sizeof(float));
    for (int64_t i = 0; i < sp->n_bias; i++) l[sp->bias_ids[i]] += sp->bias[i];
    if (pen) apply_penalties(sp, l);
    return l;
}

// ---------------------------------------------------------------------------------------------
// helpers: argmax, exp of one value, heaps of token ids (the passes over the whole vocabulary
// are the kernel table's: csrc/sample_ops.c)

// the first index of the largest value (NaNs ignored; 0 if there is none)
static int32_t argmax(const l2c_kernels *k, const float *v, int64_t n) {
    const float mx = k->vocab_max(v, n);
    for (int64_t i = 0; i < n; i++)
        if (v[i] == mx) return (int32_t)i;
    return 0;
}

// exp((v - mx) * inv_t) of one value (NaN counts as -inf)
static inline float exp_shift1(float v, float mx, float inv_t) {
    const float t = (v - mx) * inv_t;
    if (!(t >= EXP_ZERO)) return 0.0f;
    return exp_core(t >= EXP_MIN ? t : EXP_MIN);
}

// "a ranks before b": larger key first, then the lower id
static inline int before(const float *key, int32_t a, int32_t b) {
    return key[a] > key[b] || (key[a] == key[b] && a < b);
}

// heap whose root is the entry that ranks LAST (a min-heap for top-k selection)
static void sift_last(int32_t *h, int64_t n, int64_t i, const float *key) {
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && before(key, h[m], h[l])) m = l;
        if (r < n && before(key, h[m], h[r])) m = r;
        if (m == i) return;
        int32_t t = h[i]; h[i] = h[m]; h[m] = t;
        i = m;
    }
}

// heap whose root is the entry that ranks FIRST (popped in descending order)
static void sift_first(int32_t *h, int64_t n, int64_t i, const float *key) {
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && before(key, h[l], h[m])) m = l;
        if (r < n && before(key, h[r], h[m])) m = r;
        if (m == i) return;
        int32_t t = h[i]; h[i] = h[m]; h[m] = t;
        i = m;
    }
}

// The k entries of key (n,) that rank first, into out[0..k) in ranking order. O(n log k).
static void top_k_ids(int32_t *out, const float *key, int64_t n, int64_t k) {
    for (int64_t i = 0; i < k; i++) out[i] = (int32_t)i;
    for (int64_t j = k / 2 - 1; j >= 0; j--) sift_last(out, k, j, key);
    for (int64_t i = k; i < n; i++) {
        if (before(key, (int32_t)i, out[0])) {
            out[0] = (int32_t)i;
            sift_last(out, k, 0, key);
        }
    }
    // pop the last-ranked to the end: out ends up in ranking order
    for (int64_t m = k - 1; m > 0; m--) {
        int32_t t = out[0]; out[0] = out[m]; out[m] = t;
        sift_last(out, m, 0, key);
    }
}

// ---------------------------------------------------------------------------------------------
// histogram buckets of probabilities in (0, 1]: ordered as the values, HIST_BITS mantissa bits

#define HIST_BITS 7      // 128 buckets per power of two; HIST_MAX of them cover 32 powers of
                         // two below 1, lower values share bucket 0

static inline int64_t bucket_key(float v) {
    union { float f; uint32_t u; } b;
    b.f = v;
    return (int64_t)(b.u >> (23 - HIST_BITS));
}

static inline int64_t bucket_of(float v, int64_t key_lo) {
    const int64_t k = bucket_key(v) - key_lo;
    return k > 0 ? k : 0;
}

// the ids of cand (nc,) whose p falls in bucket b, into out; returns their count
static int64_t bucket_members(int32_t *restrict out, const int32_t *restrict cand, int64_t nc,
                              const float *restrict p, int64_t b, int64_t key_lo) {
    int64_t m = 0;
    for (int64_t j = 0; j < nc; j++)
        if (bucket_of(p[cand[j]], key_lo) == b) out[m++] = cand[j];
    return m;
}

// Order ids (m,) by descending p (ties: lower id first) as far as needed: pop from a heap,
// adding each popped p to *mass, until *mass >= limit. The popped ids end up in ids[0..kept)
// in that order; returns kept (>= 1 when m >= 1).
static int64_t pop_desc(int32_t *ids, int64_t m, const float *p, double *mass, double limit) {
    for (int64_t j = m / 2 - 1; j >= 0; j--) sift_first(ids, m, j, p);
    // each popped id goes to the slot the shrinking heap frees
    int64_t heap_n = m, kept = 0;
    while (heap_n > 0) {
        const int32_t t = ids[0];
        ids[0] = ids[--heap_n];
        sift_first(ids, heap_n, 0, p);
        ids[m - 1 - kept] = t;
        kept++;
        *mass += p[t];
        if (*mass >= limit) break;
    }
    // ids[m-kept..m) holds them last-popped first: reverse, move to the front
    for (int64_t i = m - kept, j = m - 1; i < j; i++, j--) {
        const int32_t t = ids[i]; ids[i] = ids[j]; ids[j] = t;
    }
    memmove(ids, ids + (m - kept), (size_t)kept * sizeof(int32_t));
    return kept;
}

// ---------------------------------------------------------------------------------------------
// steps 3-8

// Draw from the kept tokens ids[0..n) (in scan order) with masses p: the first whose
// cumulative mass exceeds coin * total.
static int32_t draw(const int32_t *ids, int64_t n, const float *p, double total, float coin) {
    const double r = (double)coin * total;
    double cdf = 0.0;
    for (int64_t j = 0; j < n; j++) {
        cdf += p[ids[j]];
        if (r < cdf) return ids[j];
    }
    return ids[n - 1];  // rounding
}

int32_t l2c_sample(l2c_sampler *sp, const float *logits) {
    const int64_t n = sp->vocab_size;
    const float *l = adjusted_logits(sp, logits);                              // steps 1-2
    const l2c_sampler_params *P = &sp->p;
    if (P->temperature == 0.0f) return argmax(sp->k, l, n);                     // step 3
    const float coin = l2c_random_f32(&sp->rng_state);
    const float inv_t = 1.0f / P->temperature;
    if (!isfinite(inv_t)) return argmax(sp->k, l, n);  // a temperature so small it is greedy
    float *p = sp->probs;
    int32_t *ids = sp->idx;
    const int use_p = P->top_p < 1.0f, use_min = P->min_p > 0.0f;

    if (P->top_k > 0) {                                                         // step 5
        const int64_t k = P->top_k;
        top_k_ids(ids, l, n, k);
        const float mx = l[ids[0]];
        if (!isfinite(mx)) return argmax(sp->k, l, n);
        double z = 0.0;
        for (int64_t j = 0; j < k; j++) {                                       // step 4
            p[ids[j]] = exp_shift1(l[ids[j]], mx, inv_t);
            z += p[ids[j]];
        }
        if (!(z > 0.0) || !isfinite(z)) return argmax(sp->k, l, n);
        int64_t kept = k;
        double mass = z;
        if (use_p || use_min) {                                                 // steps 6-7
            const double limit = use_p ? (double)P->top_p * z : INFINITY;
            mass = 0.0;
            for (kept = 0; kept < k; kept++) {
                if (kept > 0 && p[ids[kept]] < P->min_p) break;
                mass += p[ids[kept]];
                if (mass >= limit) {
                    kept++;
                    break;
                }
            }
        }
        return draw(ids, kept, p, mass, coin);                                  // step 8
    }

    const float mx = sp->k->vocab_max(l, n);                                    // step 4
    if (!isfinite(mx)) return argmax(sp->k, l, n);
    double *block_sum = sp->block_sum;
    sp->k->vocab_exp(p, l, n, mx, inv_t);
    const double z = sp->k->vocab_sum(block_sum, p, n);
    if (!(z > 0.0) || !isfinite(z)) return argmax(sp->k, l, n);  // (cannot happen: p[argmax] = 1)
    if (!use_p && !use_min) {                                                   // step 8, by id
        const double r = (double)coin * z;
        double cdf = 0.0;
        int64_t b = 0;
        while (b + L2C_SAMPLER_BLOCK < n && cdf + block_sum[b / L2C_SAMPLER_BLOCK] <= r) {
            cdf += block_sum[b / L2C_SAMPLER_BLOCK];
            b += L2C_SAMPLER_BLOCK;
        }
        int64_t last = -1;
        for (int64_t i = b; i < n; i++) {
            if (p[i] > 0.0f) last = i;
            cdf += p[i];
            if (r < cdf) return (int32_t)i;
        }
        return last >= 0 ? (int32_t)last : argmax(sp->k, l, n);  // rounding
    }
    // Candidates: a kept token has p >= min_p (the largest p is 1), and a token below the top
    // can be in the nucleus only if the mass from it on, at most (n - 1) p, exceeds
    // (1 - top_p) z (llama2.c's cut; a 0.1% margin against rounding). The top token (p = 1)
    // always passes.
    float thr = use_min ? P->min_p : 0.0f;
    if (use_p && n > 1) {
        const double cut = 0.999 * (1.0 - (double)P->top_p) * z / (double)(n - 1);
        if (cut > thr) thr = cut < 1.0 ? (float)cut : 1.0f;
    }
    const int64_t nc = sp->k->vocab_select(ids, p, n, thr);
    // Steps 6-7 without sorting the candidates: a histogram of their mass by the top bits of
    // p (HIST_BITS mantissa bits: buckets ordered as p), walked from the top, finds the bucket
    // where the kept mass reaches top_p * z; only that bucket's tokens are ordered (a heap).
    const int64_t key_hi = bucket_key(1.0f);
    int64_t key_lo = bucket_key(thr);
    if (key_hi - key_lo + 1 > HIST_MAX) key_lo = key_hi - HIST_MAX + 1;
    const int64_t nb = key_hi - key_lo + 1;
    double *hm = sp->hist;
    memset(hm, 0, (size_t)nb * sizeof(double));
    for (int64_t j = 0; j < nc; j++) hm[bucket_of(p[ids[j]], key_lo)] += p[ids[j]];
    const double limit = use_p ? (double)P->top_p * z : INFINITY;
    // bb: the boundary bucket, or the lowest non-empty one if the limit is not reached;
    // above: the mass of the buckets above bb
    double above = 0.0, next = 0.0;
    int64_t bb = nb - 1;
    for (int64_t b = nb - 1; b >= 0; b--) {
        if (hm[b] == 0.0) continue;
        bb = b;
        above = next;
        if (above + hm[b] >= limit) break;
        next = above + hm[b];
    }
    // the boundary bucket's tokens in descending order, while kept: into ord[0..kept)
    int32_t *ord = sp->idx2;
    int64_t m = bucket_members(ord, ids, nc, p, bb, key_lo);
    double mass = above;
    int64_t kept = pop_desc(ord, m, p, &mass, limit);
    // step 8: the bucket holding coin * mass, then its tokens in descending order
    const double r = (double)coin * mass;
    double cdf = 0.0;
    for (int64_t b = nb - 1; b > bb; b--) {
        if (hm[b] == 0.0) continue;
        if (r < cdf + hm[b]) {  // the draw falls in bucket b: its tokens in descending order
            const int64_t mb = bucket_members(ord, ids, nc, p, b, key_lo);
            double unused = 0.0;
            const int64_t all = pop_desc(ord, mb, p, &unused, INFINITY);
            for (int64_t j = 0; j < all; j++) {
                cdf += p[ord[j]];
                if (r < cdf) return ord[j];
            }
            return ord[all - 1];  // rounding
        }
        cdf += hm[b];
    }
    for (int64_t j = 0; j < kept; j++) {
        cdf += p[ord[j]];
        if (r < cdf) return ord[j];
    }
    return ord[kept - 1];  // rounding
}

// ---------------------------------------------------------------------------------------------
// log-probabilities

int l2c_logprobs(float *restrict token_lp, int32_t *restrict top_ids, float *restrict top_lp,
                 const float *restrict logits, int64_t n, int32_t token, int64_t k,
                 float *restrict work, int32_t *restrict scratch) {
    if (n <= 0 || k < 0 || k > n || token < -1 || token >= n || !work ||
        (k > 0 && (!top_ids || !top_lp || !scratch)))
        return L2C_ERR_ARG;
    const l2c_kernels *kt = l2c_kernels_get(L2C_ISA_COUNT);
    const float mx = kt->vocab_max(logits, n);
    kt->vocab_exp(work, logits, n, mx, 1.0f);
    const double log_z = (double)mx + log(kt->vocab_sum(NULL, work, n));
    if (token >= 0 && token_lp) *token_lp = (float)((double)logits[token] - log_z);
    if (k > 0) {
        top_k_ids(scratch, logits, n, k);
        for (int64_t j = 0; j < k; j++) {
            top_ids[j] = scratch[j];
            top_lp[j] = (float)((double)logits[scratch[j]] - log_z);
        }
    }
    return L2C_OK;
}
