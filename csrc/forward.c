// forward.c: the transformer forward pass, the sampler and the generation loop.
//
// Reads like llama2.c's run.c: one comment per stage, quoting the PyTorch line it mirrors.
// The same code runs one token (decode: matrix-vector kernels) or a chunk of T prompt tokens
// (prefill: matrix-matrix kernels), since every kernel takes a row count T.
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "llama2c.h"

#ifdef _OPENMP
#include <omp.h>
#endif

// ---------------------------------------------------------------------------------------------
// model checks

// a matrix the matmul kernels take (packed: L2C_Q8P) or, for the embedding, a row lookup (L2C_Q8)
static int matrix_ok(const l2c_matrix *w, int64_t rows, int64_t cols, int q8_type) {
    if (w->rows != rows || w->cols != cols) return 0;
    if (w->type == L2C_F32) return w->f != NULL;
    if (w->type == q8_type)
        return w->q != NULL && w->s != NULL && w->group_size > 0 && w->group_size % 4 == 0 &&
               w->group_size <= 256 && cols % w->group_size == 0;
    return 0;
}

// ---------------------------------------------------------------------------------------------
// packing of int8 matrices (layout in llama2c.h)

int64_t l2c_q8p_q_size(int64_t rows, int64_t cols) {
    return (rows + L2C_Q8_ROWS - 1) / L2C_Q8_ROWS * L2C_Q8_ROWS * cols;
}

int64_t l2c_q8p_s_size(int64_t rows, int64_t cols, int64_t gs) {
    return (rows + L2C_Q8_ROWS - 1) / L2C_Q8_ROWS * L2C_Q8_ROWS * (cols / gs);
}

int l2c_pack_q8(int8_t *restrict qp, float *restrict sp, float *restrict mp,
                const int8_t *restrict q, const float *restrict s, const float *restrict m,
                int64_t rows, int64_t cols, int64_t gs) {
    if ((m == NULL) != (mp == NULL)) return L2C_ERR_ARG;
    if (rows < 0 || cols <= 0 || gs <= 0 || gs % 4 != 0 || cols % gs != 0) return L2C_ERR_ARG;
    const int64_t R = L2C_Q8_ROWS, ng = cols / gs, steps = gs / 4;
    const int64_t n_blocks = (rows + R - 1) / R;
    for (int64_t b = 0; b < n_blocks; b++)
        for (int64_t g = 0; g < ng; g++) {
            for (int64_t r = 0; r < R; r++) {
                const int64_t row = b * R + r;
                sp[(b * ng + g) * R + r] = row < rows ? s[row * ng + g] : 0.0f;
                if (m) mp[(b * ng + g) * R + r] = row < rows ? m[row * ng + g] : 0.0f;
                for (int64_t j = 0; j < steps; j++)
                    for (int64_t c = 0; c < 4; c++)
                        qp[((b * ng + g) * steps + j) * 4 * R + r * 4 + c] = (int8_t)(
                            (uint8_t)(row < rows ? q[row * cols + g * gs + 4 * j + c] : 0) ^ 0x80u);
            }
        }
    return L2C_OK;
}

int l2c_model_check(const l2c_model *m) {
    if (!m || !m->k || !m->layers || !m->rms_final || !m->rope_cos || !m->rope_sin) return L2C_ERR_ARG;
    const l2c_config *c = &m->cfg;
    if (c->dim <= 0 || c->hidden_dim <= 0 || c->n_layers <= 0 || c->n_heads <= 0 ||
        c->n_kv_heads <= 0 || c->head_size <= 0 || c->vocab_size <= 0 || c->seq_len <= 0)
        return L2C_ERR_ARG;
    if (c->n_heads % c->n_kv_heads != 0 || c->head_size % 2 != 0) return L2C_ERR_ARG;
    if (c->act_bits != 8 && c->act_bits != 16) return L2C_ERR_ARG;
    if (!(c->norm_eps >= 0.0f)) return L2C_ERR_ARG;
    const int64_t d = c->dim, h = c->hidden_dim, qd = c->n_heads * c->head_size,
                  kvd = c->n_kv_heads * c->head_size;
    if (!matrix_ok(&m->tok_embeddings, c->vocab_size, d, L2C_Q8)) return L2C_ERR_ARG;
    if (!matrix_ok(&m->wcls, c->vocab_size, d, L2C_Q8P)) return L2C_ERR_ARG;
    for (int64_t l = 0; l < c->n_layers; l++) {
        const l2c_layer *L = &m->layers[l];
        if (!L->rms_att || !L->rms_ffn) return L2C_ERR_ARG;
        if (!matrix_ok(&L->wq, qd, d, L2C_Q8P) || !matrix_ok(&L->wk, kvd, d, L2C_Q8P) ||
            !matrix_ok(&L->wv, kvd, d, L2C_Q8P) || !matrix_ok(&L->wo, d, qd, L2C_Q8P) ||
            !matrix_ok(&L->w1, h, d, L2C_Q8P) || !matrix_ok(&L->w2, d, h, L2C_Q8P) ||
            !matrix_ok(&L->w3, h, d, L2C_Q8P))
            return L2C_ERR_ARG;
    }
    return L2C_OK;
}

// ---------------------------------------------------------------------------------------------
// state

static int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }

// smallest group size of any quantized matrix (activation scale buffers are sized for it)
static int64_t min_group_size(const l2c_model *m) {
    int64_t gs = 0;
#define TAKE(w) if ((w).type == L2C_Q8P && (gs == 0 || (w).group_size < gs)) gs = (w).group_size
    TAKE(m->wcls);
    for (int64_t l = 0; l < m->cfg.n_layers; l++) {
        const l2c_layer *L = &m->layers[l];
        TAKE(L->wq); TAKE(L->wk); TAKE(L->wv); TAKE(L->wo); TAKE(L->w1); TAKE(L->w2); TAKE(L->w3);
    }
#undef TAKE
    return gs;
}

int l2c_state_init(l2c_state *s, const l2c_model *m, int64_t max_batch, int64_t seq_len,
                   int n_threads) {
    memset(s, 0, sizeof(*s));
    int rc = l2c_model_check(m);
    if (rc != L2C_OK) return rc;
    const l2c_config *c = &m->cfg;
    if (max_batch <= 0 || seq_len <= 0 || seq_len > c->seq_len || n_threads <= 0) return L2C_ERR_ARG;
    s->max_batch = max_batch;
    s->seq_len = seq_len;
    s->n_threads = n_threads;
    s->dim = c->dim;
    s->hidden_dim = c->hidden_dim;
    s->q_dim = c->n_heads * c->head_size;
    s->kv_dim = c->n_kv_heads * c->head_size;
    s->vocab_size = c->vocab_size;
    s->n_layers = c->n_layers;
    s->n_heads = c->n_heads;
    const int64_t B = max_batch, wide = max_i64(c->dim, s->q_dim);
    const int64_t qwidth = max_i64(wide, c->hidden_dim);
    const int64_t gs = min_group_size(m);
    // calloc: large buffers (the KV cache) come as untouched zero pages, so a long context
    // costs memory only as it fills.
    s->x = calloc((size_t)(B * c->dim), sizeof(float));
    s->xb = calloc((size_t)(B * wide), sizeof(float));
    s->xb2 = calloc((size_t)(B * c->dim), sizeof(float));
    s->hb = calloc((size_t)(B * c->hidden_dim), sizeof(float));
    s->hb2 = calloc((size_t)(B * c->hidden_dim), sizeof(float));
    s->q = calloc((size_t)(B * s->q_dim), sizeof(float));
    s->att = calloc((size_t)(B * c->n_heads * seq_len), sizeof(float));
    s->logits = calloc((size_t)c->vocab_size, sizeof(float));
    s->key_cache = calloc((size_t)(c->n_layers * seq_len * s->kv_dim), sizeof(float));
    s->value_cache = calloc((size_t)(c->n_layers * seq_len * s->kv_dim), sizeof(float));
    const int64_t n_groups = B * (gs > 0 ? qwidth / gs + 1 : 1);
    const int two = m->cfg.act_bits == 16;
    s->xq.hi = calloc((size_t)(B * qwidth), 1);
    s->xq.lo = two ? calloc((size_t)(B * qwidth), 1) : NULL;
    s->xq.s = calloc((size_t)n_groups, sizeof(float));
    s->xq.sum_hi = calloc((size_t)n_groups, sizeof(int32_t));
    s->xq.sum_lo = two ? calloc((size_t)n_groups, sizeof(int32_t)) : NULL;
    s->pos = malloc((size_t)B * sizeof(int64_t));
    if (!s->x || !s->xb || !s->xb2 || !s->hb || !s->hb2 || !s->q || !s->att || !s->logits ||
        !s->key_cache || !s->value_cache || !s->xq.hi || !s->xq.s || !s->xq.sum_hi ||
        (two && (!s->xq.lo || !s->xq.sum_lo)) ||
        !s->pos) {
        l2c_state_free(s);
        return L2C_ERR_NOMEM;
    }
    return L2C_OK;
}

void l2c_state_free(l2c_state *s) {
    if (!s) return;
    free(s->x); free(s->xb); free(s->xb2); free(s->hb); free(s->hb2); free(s->q); free(s->att);
    free(s->logits); free(s->key_cache); free(s->value_cache);
    free(s->xq.hi); free(s->xq.lo); free(s->xq.s); free(s->xq.sum_hi); free(s->xq.sum_lo);
    free(s->pos);
    memset(s, 0, sizeof(*s));
}

// ---------------------------------------------------------------------------------------------
// forward

// Quantized copy of the current matmul input (runq.c: quantize once, reuse for q/k/v, w1/w3).
typedef struct {
    const float *src;
    int64_t T, n, gs;
} qcache;

// out (T, W.rows) = x (T, W.cols) @ W^T, in the matrix's own element type
static void linear(const l2c_model *m, l2c_state *s, qcache *qc, float *out, const float *x,
                   const l2c_matrix *W, int64_t T) {
    const l2c_kernels *k = m->k;
    if (W->type == L2C_F32) {
        k->matmul_f32(out, x, W->f, T, W->cols, W->rows, s->n_threads);
        return;
    }
    const int64_t gs = W->group_size;
    if (qc->src != x || qc->T != T || qc->n != W->cols || qc->gs != gs) {
        k->quantize_q8(&s->xq, x, T, W->cols, gs, s->n_threads);
        qc->src = x; qc->T = T; qc->n = W->cols; qc->gs = gs;
    }
    k->matmul_q8(out, &s->xq, W, T, s->n_threads);
}

// x (dim,) = row `token` of the embedding table (dequantized if int8)
static void embed(float *restrict x, const l2c_matrix *E, int64_t token) {
    const int64_t n = E->cols;
    if (E->type == L2C_F32) {
        memcpy(x, E->f + token * n, (size_t)n * sizeof(float));
        return;
    }
    const int8_t *q = E->q + token * n;
    const float *sc = E->s + token * (n / E->group_size);
    const float *off = E->m ? E->m + token * (n / E->group_size) : NULL;
    for (int64_t j = 0; j < n; j++)
        x[j] = (float)q[j] * sc[j / E->group_size] + (off ? off[j / E->group_size] : 0.0f);
}

// one chunk of T <= max_batch tokens at positions pos0.. ; logits of every row if logits_all
static void forward_chunk(const l2c_model *m, l2c_state *s, const int32_t *tokens, int64_t T,
                          int64_t pos0, float *logits_all) {
    const l2c_config *c = &m->cfg;
    const l2c_kernels *k = m->k;
    const int64_t dim = c->dim, hidden = c->hidden_dim, hs = c->head_size;
    const int64_t kv_dim = s->kv_dim, nth = s->n_threads;
    qcache qc = {0};

    // x = tok_embeddings(tokens)
    for (int64_t t = 0; t < T; t++) {
        embed(s->x + t * dim, &m->tok_embeddings, tokens[t]);
        s->pos[t] = pos0 + t;
    }

    for (int64_t l = 0; l < c->n_layers; l++) {
        const l2c_layer *L = &m->layers[l];
        float *kc = s->key_cache + l * s->seq_len * kv_dim;    // this layer's (seq_len, kv_dim)
        float *vc = s->value_cache + l * s->seq_len * kv_dim;

        // xb = attention_norm(x)
        k->rmsnorm(s->xb, s->x, L->rms_att, T, dim, c->norm_eps, (int)nth);
        qc.src = NULL;
        // q, k, v = wq(xb), wk(xb), wv(xb); k and v go straight into the cache rows pos0..
        linear(m, s, &qc, s->q, s->xb, &L->wq, T);
        linear(m, s, &qc, kc + pos0 * kv_dim, s->xb, &L->wk, T);
        linear(m, s, &qc, vc + pos0 * kv_dim, s->xb, &L->wv, T);
        // q, k = apply_rotary_emb(q, k, freqs_cis)
        k->rope(s->q, s->pos, m->rope_cos, m->rope_sin, T, c->n_heads, hs, (int)nth);
        k->rope(kc + pos0 * kv_dim, s->pos, m->rope_cos, m->rope_sin, T, c->n_kv_heads, hs, (int)nth);
        // xb = softmax(q @ k^T / sqrt(hs) + causal mask) @ v, heads sharing kv heads (GQA)
        k->attention(s->xb, s->att, s->q, kc, vc, T, pos0, c->n_heads, c->n_kv_heads, hs,
                     s->seq_len, (int)nth);
        qc.src = NULL;
        // x = x + wo(xb)
        linear(m, s, &qc, s->xb2, s->xb, &L->wo, T);
        k->add(s->x, s->xb2, T * dim, (int)nth);

        // xb = ffn_norm(x)
        k->rmsnorm(s->xb, s->x, L->rms_ffn, T, dim, c->norm_eps, (int)nth);
        qc.src = NULL;
        // x = x + w2(F.silu(w1(xb)) * w3(xb))
        linear(m, s, &qc, s->hb, s->xb, &L->w1, T);
        linear(m, s, &qc, s->hb2, s->xb, &L->w3, T);
        k->swiglu(s->hb, s->hb2, T * hidden, (int)nth);
        linear(m, s, &qc, s->xb2, s->hb, &L->w2, T);
        k->add(s->x, s->xb2, T * dim, (int)nth);
    }

    // logits = output(norm(x)): every row when asked for, else the last row only
    const int64_t first = logits_all ? 0 : T - 1, rows = T - first;
    k->rmsnorm(s->xb, s->x + first * dim, m->rms_final, rows, dim, c->norm_eps, (int)nth);
    qc.src = NULL;
    if (logits_all) {
        linear(m, s, &qc, logits_all, s->xb, &m->wcls, rows);
        memcpy(s->logits, logits_all + (rows - 1) * c->vocab_size, (size_t)c->vocab_size * sizeof(float));
    } else {
        linear(m, s, &qc, s->logits, s->xb, &m->wcls, 1);
    }
}

int l2c_forward(const l2c_model *m, l2c_state *s, const int32_t *tokens, int64_t n,
                int64_t pos0, float *logits_all) {
    if (!m || !s || !s->x || (n > 0 && !tokens) || n < 0) return L2C_ERR_ARG;
    if (pos0 < 0 || pos0 + n > s->seq_len) return L2C_ERR_RANGE;
    for (int64_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= m->cfg.vocab_size) return L2C_ERR_TOKEN;
    for (int64_t done = 0; done < n; done += s->max_batch) {
        const int64_t T = n - done < s->max_batch ? n - done : s->max_batch;
        forward_chunk(m, s, tokens + done, T, pos0 + done,
                      logits_all ? logits_all + done * m->cfg.vocab_size : NULL);
    }
    return L2C_OK;
}

// ---------------------------------------------------------------------------------------------
// sampler (llama2.c's: xorshift64* RNG, greedy / multinomial / top-p, plus top-k)

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

// ---------------------------------------------------------------------------------------------
// generation loop: prefill, then sample -> feed back, all in C (the caller releases the GIL)

int l2c_generate(const l2c_model *m, l2c_state *s, l2c_sampler *sp, const int32_t *prompt,
                 int64_t n_prompt, int64_t pos0, int32_t *out, int64_t max_new,
                 const int32_t *stop, int64_t n_stop, int64_t *n_out) {
    *n_out = 0;
    if (max_new < 0 || n_prompt < 0 || (max_new > 0 && !out)) return L2C_ERR_ARG;
    int rc;
    if (n_prompt > 0 && (rc = l2c_forward(m, s, prompt, n_prompt, pos0, NULL)) != L2C_OK) return rc;
    int64_t pos = pos0 + n_prompt;
    for (int64_t i = 0; i < max_new; i++) {
        const int32_t tok = l2c_sample(sp, s->logits);
        out[i] = tok;
        *n_out = i + 1;
        for (int64_t j = 0; j < n_stop; j++)
            if (tok == stop[j]) return L2C_OK;
        // the last token is returned, not fed: the caller feeds it first on the next call
        if (i == max_new - 1 || pos >= s->seq_len) return L2C_OK;
        if ((rc = l2c_forward(m, s, &tok, 1, pos, NULL)) != L2C_OK) return rc;
        pos++;
    }
    return L2C_OK;
}

// ---------------------------------------------------------------------------------------------
// memory read bandwidth probe (for `llama2c bench`: effective bandwidth vs the machine's)

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

double l2c_read_bandwidth(int64_t bytes, int reps, int n_threads) {
    const int64_t n = bytes / (int64_t)sizeof(float);
    if (n <= 0 || reps <= 0 || n_threads <= 0) return -1.0;
    float *buf = malloc((size_t)n * sizeof(float));
    if (!buf) return -1.0;
    const l2c_kernels *k = l2c_kernels_get(L2C_ISA_COUNT);
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) schedule(static)
#endif
    for (int64_t i = 0; i < n; i++) buf[i] = 1.0f;  // first touch by the threads that read
    volatile float sink = 0.0f;
    double best = 0.0;
    for (int r = 0; r < reps; r++) {
        const double t0 = now_s();
        sink += k->read_sum(buf, n, n_threads);
        const double gbs = (double)n * sizeof(float) / (now_s() - t0) / 1e9;
        if (gbs > best) best = gbs;
    }
    (void)sink;
    free(buf);
    return best;
}
