// sampler.c: the next-token sampler (llama2.c's xorshift64* RNG, greedy / multinomial /
// top-p, plus top-k).
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "llama2c.h"

static uint32_t random_u32(uint64_t *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}

float l2c_random_f32(uint64_t *state) { return (float)(random_u32(state) >> 8) / 16777216.0f; }

int l2c_sampler_init(l2c_sampler *sp, int64_t vocab_size, float temperature, float top_p,
                     int64_t top_k, uint64_t seed) {
    memset(sp, 0, sizeof(*sp));
    if (vocab_size <= 0 || !(temperature >= 0.0f) || !(top_p >= 0.0f) || top_k < 0) return L2C_ERR_ARG;
    sp->vocab_size = vocab_size;
    sp->temperature = temperature;
    sp->top_p = top_p;
    sp->top_k = top_k;
    sp->rng_state = seed ? seed : 0x9E3779B97F4A7C15ull;  // xorshift must not start at 0
    sp->probs = malloc((size_t)vocab_size * sizeof(float));
    sp->idx = malloc((size_t)vocab_size * sizeof(int32_t));
    if (!sp->probs || !sp->idx) {
        l2c_sampler_free(sp);
        return L2C_ERR_NOMEM;
    }
    return L2C_OK;
}

void l2c_sampler_free(l2c_sampler *sp) {
    if (!sp) return;
    free(sp->probs);
    free(sp->idx);
    memset(sp, 0, sizeof(*sp));
}

static int32_t argmax(const float *v, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (v[i] > v[best]) best = i;
    return (int32_t)best;
}

// sift-down for a min-heap of indices keyed by probs
static void heap_down(int32_t *h, int64_t n, int64_t i, const float *p) {
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && p[h[l]] < p[h[m]]) m = l;
        if (r < n && p[h[r]] < p[h[m]]) m = r;
        if (m == i) return;
        int32_t t = h[i]; h[i] = h[m]; h[m] = t;
        i = m;
    }
}

#if defined(__GNUC__)
#define L2C_TLS __thread
#else
#define L2C_TLS _Thread_local
#endif
static L2C_TLS const float *tls_probs;
static int cmp_desc(const void *a, const void *b) {
    const float pa = tls_probs[*(const int32_t *)a], pb = tls_probs[*(const int32_t *)b];
    return (pa < pb) - (pa > pb);
}

int32_t l2c_sample(l2c_sampler *sp, const float *logits) {
    const int64_t n = sp->vocab_size;
    if (sp->temperature == 0.0f) return argmax(logits, n);
    // probs = softmax(logits / temperature)
    float *p = sp->probs;
    for (int64_t i = 0; i < n; i++) p[i] = logits[i] / sp->temperature;
    float mx = p[0];
    for (int64_t i = 1; i < n; i++) mx = p[i] > mx ? p[i] : mx;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        p[i] = expf(p[i] - mx);
        sum += p[i];
    }
    if (!(sum > 0.0) || !isfinite(sum)) return argmax(logits, n);  // NaN logits or T too small
    for (int64_t i = 0; i < n; i++) p[i] = (float)(p[i] / sum);
    const float coin = l2c_random_f32(&sp->rng_state);

    const int use_k = sp->top_k > 0 && sp->top_k < n;
    const int use_p = sp->top_p > 0.0f && sp->top_p < 1.0f;
    if (!use_k && !use_p) {  // sample from the whole distribution
        float cdf = 0.0f;
        for (int64_t i = 0; i < n; i++) {
            cdf += p[i];
            if (coin < cdf) return (int32_t)i;
        }
        return (int32_t)(n - 1);  // rounding
    }
    // candidates: the top_k most probable (a size-k min-heap, O(n log k)), or for top-p alone
    // the tokens with p >= (1 - top_p) / (n - 1), which cannot all be outside the nucleus
    // (llama2.c's cut); only the candidates are sorted, never the whole vocabulary.
    int32_t *idx = sp->idx;
    int64_t nc = 0;
    if (use_k) {
        const int64_t kk = sp->top_k;
        for (int64_t i = 0; i < n; i++) {
            if (nc < kk) {
                idx[nc++] = (int32_t)i;
                if (nc == kk)
                    for (int64_t j = kk / 2 - 1; j >= 0; j--) heap_down(idx, kk, j, p);
            } else if (p[i] > p[idx[0]]) {
                idx[0] = (int32_t)i;
                heap_down(idx, kk, 0, p);
            }
        }
    } else {
        const float cutoff = (1.0f - sp->top_p) / (float)(n - 1);
        for (int64_t i = 0; i < n; i++)
            if (p[i] >= cutoff) idx[nc++] = (int32_t)i;
    }
    if (nc == 0) return argmax(logits, n);  // only NaN probabilities
    tls_probs = p;
    qsort(idx, (size_t)nc, sizeof(int32_t), cmp_desc);
    // mass of the candidates, then truncate to the nucleus (cumulative prob > top_p)
    float mass = 0.0f;
    for (int64_t i = 0; i < nc; i++) mass += p[idx[i]];
    int64_t last = nc - 1;
    if (use_p) {
        float cum = 0.0f;
        for (int64_t i = 0; i < nc; i++) {
            cum += p[idx[i]] / mass;
            if (cum > sp->top_p) {
                last = i;
                break;
            }
        }
    }
    float kept = 0.0f;
    for (int64_t i = 0; i <= last; i++) kept += p[idx[i]];
    const float r = coin * kept;
    float cdf = 0.0f;
    for (int64_t i = 0; i <= last; i++) {
        cdf += p[idx[i]];
        if (r < cdf) return idx[i];
    }
    return idx[last];  // rounding
}

