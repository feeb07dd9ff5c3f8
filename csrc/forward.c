// forward.c: the transformer forward pass, the per-session state and the generation loop.
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

#include "internal.h"

// ---------------------------------------------------------------------------------------------
// state

static int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }

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
    s->pos = malloc((size_t)B * sizeof(int64_t));
    if (!s->x || !s->xb || !s->xb2 || !s->hb || !s->hb2 || !s->q || !s->att || !s->logits ||
        !s->key_cache || !s->value_cache || !s->pos ||
        l2c_input_init(&s->in, m, B) != L2C_OK) {
        l2c_state_free(s);
        return L2C_ERR_NOMEM;
    }
    return L2C_OK;
}

void l2c_state_free(l2c_state *s) {
    if (!s) return;
    free(s->x); free(s->xb); free(s->xb2); free(s->hb); free(s->hb2); free(s->q); free(s->att);
    free(s->logits); free(s->key_cache); free(s->value_cache);
    l2c_input_free(&s->in);
    free(s->pos);
    memset(s, 0, sizeof(*s));
}

static void forward_chunk(const l2c_model *m, l2c_state *s, const int32_t *tokens, int64_t T,
                          int64_t pos0, float *logits_all) {
    const l2c_config *c = &m->cfg;
    const l2c_kernels *k = m->k;
    const int64_t dim = c->dim, hidden = c->hidden_dim, hs = c->head_size;
    const int64_t kv_dim = s->kv_dim, nth = s->n_threads;

    // x = tok_embeddings(tokens)
    for (int64_t t = 0; t < T; t++) {
        l2c_embed(s->x + t * dim, &m->tok_embeddings, tokens[t]);
        s->pos[t] = pos0 + t;
    }

    for (int64_t l = 0; l < c->n_layers; l++) {
        const l2c_layer *L = &m->layers[l];
        float *kc = s->key_cache + l * s->seq_len * kv_dim;    // this layer's (seq_len, kv_dim)
        float *vc = s->value_cache + l * s->seq_len * kv_dim;

        // xb = attention_norm(x)
        k->rmsnorm(s->xb, s->x, L->rms_att, T, dim, c->norm_eps, (int)nth);
        const l2c_matrix *qkv[3] = {&L->wq, &L->wk, &L->wv};
        l2c_input_set(m, &s->in, s->xb, T, dim, qkv, 3, (int)nth);
        // q, k, v = wq(xb), wk(xb), wv(xb); k and v go straight into the cache rows pos0..
        l2c_linear(m, s->q, &s->in, &L->wq, (int)nth);
        l2c_linear(m, kc + pos0 * kv_dim, &s->in, &L->wk, (int)nth);
        l2c_linear(m, vc + pos0 * kv_dim, &s->in, &L->wv, (int)nth);
        // q, k = apply_rotary_emb(q, k, freqs_cis)
        k->rope(s->q, s->pos, m->rope_cos, m->rope_sin, T, c->n_heads, hs, (int)nth);
        k->rope(kc + pos0 * kv_dim, s->pos, m->rope_cos, m->rope_sin, T, c->n_kv_heads, hs, (int)nth);
        // xb = softmax(q @ k^T / sqrt(hs) + causal mask) @ v, heads sharing kv heads (GQA)
        k->attention(s->xb, s->att, s->q, kc, vc, T, pos0, c->n_heads, c->n_kv_heads, hs,
                     s->seq_len, (int)nth);
        // x = x + wo(xb)
        const l2c_matrix *o[1] = {&L->wo};
        l2c_input_set(m, &s->in, s->xb, T, c->n_heads * hs, o, 1, (int)nth);
        l2c_linear(m, s->xb2, &s->in, &L->wo, (int)nth);
        k->add(s->x, s->xb2, T * dim, (int)nth);

        // xb = ffn_norm(x)
        k->rmsnorm(s->xb, s->x, L->rms_ffn, T, dim, c->norm_eps, (int)nth);
        // x = x + w2(F.silu(w1(xb)) * w3(xb))
        const l2c_matrix *up[2] = {&L->w1, &L->w3}, *down[1] = {&L->w2};
        l2c_input_set(m, &s->in, s->xb, T, dim, up, 2, (int)nth);
        l2c_linear(m, s->hb, &s->in, &L->w1, (int)nth);
        l2c_linear(m, s->hb2, &s->in, &L->w3, (int)nth);
        k->swiglu(s->hb, s->hb2, T * hidden, (int)nth);
        l2c_input_set(m, &s->in, s->hb, T, hidden, down, 1, (int)nth);
        l2c_linear(m, s->xb2, &s->in, &L->w2, (int)nth);
        k->add(s->x, s->xb2, T * dim, (int)nth);
    }

    // logits = output(norm(x)): every row when asked for, else the last row only
    const int64_t first = logits_all ? 0 : T - 1, rows = T - first;
    k->rmsnorm(s->xb, s->x + first * dim, m->rms_final, rows, dim, c->norm_eps, (int)nth);
    const l2c_matrix *cls[1] = {&m->wcls};
    l2c_input_set(m, &s->in, s->xb, rows, dim, cls, 1, (int)nth);
    if (logits_all) {
        l2c_linear(m, logits_all, &s->in, &m->wcls, (int)nth);
        memcpy(s->logits, logits_all + (rows - 1) * c->vocab_size, (size_t)c->vocab_size * sizeof(float));
    } else {
        l2c_linear(m, s->logits, &s->in, &m->wcls, (int)nth);
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
