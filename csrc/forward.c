// forward.c: the transformer forward pass over the KV pool, and its per-call state.
//
// Reads like llama2.c's run.c: one comment per stage, quoting the PyTorch line it mirrors.
// A step is a batch of T rows: decode rows of many sequences and prefill chunks of others,
// each row at its own position in its own sequence. Every kernel takes a row count T and
// computes each row on its own, so a row's numbers do not depend on the step it ran in.
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <sched.h>
#include <string.h>
#include <time.h>

#include "llama2c.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#include "internal.h"
#include "kv.h"

// ---------------------------------------------------------------------------------------------
// state

static int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }

int l2c_state_init(l2c_state *s, const l2c_model *m, int64_t max_batch, int n_threads) {
    memset(s, 0, sizeof(*s));
    int rc = l2c_model_check(m);
    if (rc != L2C_OK) return rc;
    const l2c_config *c = &m->cfg;
    if (max_batch <= 0 || n_threads <= 0) return L2C_ERR_ARG;
    s->max_batch = max_batch;
    s->n_threads = n_threads;
    s->dim = c->dim;
    s->hidden_dim = c->hidden_dim;
    s->q_dim = c->n_heads * c->head_size;
    s->kv_dim = c->n_kv_heads * c->head_size;
    s->vocab_size = c->vocab_size;
    s->n_layers = c->n_layers;
    s->n_heads = c->n_heads;
    const int64_t B = max_batch, wide = max_i64(c->dim, s->q_dim);
    s->x = calloc((size_t)(B * c->dim), sizeof(float));
    s->xb = calloc((size_t)(B * wide), sizeof(float));
    s->xb2 = calloc((size_t)(B * c->dim), sizeof(float));
    s->hb = calloc((size_t)(B * c->hidden_dim), sizeof(float));
    s->hb2 = calloc((size_t)(B * c->hidden_dim), sizeof(float));
    s->q = calloc((size_t)(B * s->q_dim), sizeof(float));
    s->k = calloc((size_t)(B * s->kv_dim), sizeof(float));
    s->v = calloc((size_t)(B * s->kv_dim), sizeof(float));
    s->pos = malloc((size_t)B * sizeof(int64_t));
    s->rope_cos = malloc((size_t)(B * (c->head_size / 2)) * sizeof(float));
    s->rope_sin = malloc((size_t)(B * (c->head_size / 2)) * sizeof(float));
    s->tok = malloc((size_t)B * sizeof(int32_t));
    s->wanted = malloc((size_t)B * sizeof(int64_t));
    s->spans = malloc((size_t)B * sizeof(l2c_span));
    s->span_seq = malloc((size_t)B * sizeof(l2c_seq *));
    s->team = aligned_alloc(64, sizeof(l2c_team_state));
    if (s->team) memset(s->team, 0, sizeof(l2c_team_state));
    if (!s->team || !s->span_seq || !s->x || !s->xb || !s->xb2 || !s->hb || !s->hb2 || !s->q || !s->k || !s->v || !s->pos ||
        !s->rope_cos || !s->rope_sin ||
        !s->tok || !s->wanted || !s->spans || l2c_input_init(&s->in, m, B) != L2C_OK) {
        l2c_state_free(s);
        return L2C_ERR_NOMEM;
    }
    return L2C_OK;
}

void l2c_state_free(l2c_state *s) {
    if (!s) return;
    free(s->x); free(s->xb); free(s->xb2); free(s->hb); free(s->hb2); free(s->q); free(s->k);
    free(s->v); free(s->pos); free(s->rope_cos); free(s->rope_sin);
    free(s->tok); free(s->wanted); free(s->spans); free(s->span_seq);
    free(s->ws);
    free(s->team);
    l2c_input_free(&s->in);
    memset(s, 0, sizeof(*s));
}

// the attention workspace for this step's spans, grown when needed
static int reserve_ws(l2c_state *s, const l2c_model *m, const l2c_kvpool *pool, int64_t n_spans) {
    const int64_t need = l2c_attention_ws_bytes(pool, s->spans, n_spans, m->cfg.n_heads, s->n_threads);
    if (need <= s->ws_bytes) return L2C_OK;
    free(s->ws);
    const int64_t bytes = need + need / 4;      // room to grow with the context
    s->ws = aligned_alloc(64, (size_t)l2c_round64(bytes));
    s->ws_bytes = s->ws ? l2c_round64(bytes) : 0;
    return s->ws ? L2C_OK : L2C_ERR_NOMEM;
}

// x[t] += b for each of T rows of width n
static void add_bias(float *restrict x, const float *restrict b, int64_t T, int64_t n) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < n; i++) x[t * n + i] += b[i];
}

// ---------------------------------------------------------------------------------------------
// the team of a decode step (llama2c.h): a barrier of our own, spinning (a libgomp barrier
// wakes its waiters with a futex call each time), then yielding the core after a while, so
// that a loaded machine does not spin a descheduled thread's partner for its whole time slice

#define L2C_TEAM_SPINS 4000

void l2c_team_barrier(const l2c_team *tm) {
    if (!tm || tm->n <= 1) return;
    l2c_team_state *st = tm->st;
    const int gen = __atomic_load_n(&st->gen, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&st->arrived, 1, __ATOMIC_ACQ_REL) == tm->n) {
        __atomic_store_n(&st->arrived, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&st->gen, gen + 1, __ATOMIC_RELEASE);  // (after the reset, in order)
        return;
    }
    for (int spins = 0; __atomic_load_n(&st->gen, __ATOMIC_ACQUIRE) == gen; spins++) {
        if (spins < L2C_TEAM_SPINS) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        } else {
            sched_yield();
        }
    }
}

// Steps of decode rows only, few of them, run as a team (one parallel region for the step);
// prefill chunks keep a region per kernel (their kernels split rows, tiles and blocks finely).
#define L2C_TEAM_ROWS 8

static int team_step(const l2c_state *s, int64_t T, int64_t n_spans) {
    if (s->n_threads <= 1 || s->n_threads > L2C_TEAM_MAX || T > L2C_TEAM_ROWS) return 0;
    for (int64_t i = 0; i < n_spans; i++)
        if (s->spans[i].n > L2C_ATT_SPLIT_ROWS) return 0;
    return 1;
}

// the linear layer: on its own (tm NULL), or by every thread of the team once the lead has
// set the input (a barrier before: the input ready; after: the outputs)
static void linear(const l2c_model *m, float *const *outs, const l2c_input *in,
                   const l2c_matrix *const *ws, int nw, int nth, const l2c_team *tm) {
    if (!tm) {
        l2c_linear(m, outs, in, ws, nw, nth);
        return;
    }
    l2c_team_barrier(tm);
    l2c_linear_team(m, outs, in, ws, nw, tm);
    l2c_team_barrier(tm);
}

// cos and sin of the RoPE angles of the step's rows: angle pos * freq in double, rounded once
// to float (as the NumPy reference computes its tables)
static void rope_angles(const l2c_model *m, l2c_state *s, int64_t T) {
    const int64_t half = m->cfg.head_size / 2;
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < half; i++) {
            const double a = (double)s->pos[t] * m->rope_freq[i];
            s->rope_cos[t * half + i] = (float)cos(a);
            s->rope_sin[t * half + i] = (float)sin(a);
        }
}

// ---------------------------------------------------------------------------------------------
// one step: T rows (s->tok, s->pos) in n_spans spans; logits of the n_wanted rows s->wanted.
// tm: NULL, or the team running it (thread 0, the lead, runs the row-wise steps; every thread
// runs the matrices and the attention).

static void forward_step(const l2c_model *m, l2c_state *s, const l2c_kvpool *pool, int64_t T,
                         int64_t n_spans, int64_t n_wanted, float *logits, const l2c_team *tm) {
    const l2c_config *c = &m->cfg;
    const l2c_kernels *k = m->k;
    const int64_t dim = c->dim, hidden = c->hidden_dim, hs = c->head_size;
    const int64_t q_dim = s->q_dim, kv_dim = s->kv_dim;
    const int nth = tm ? 1 : s->n_threads;  // the row-wise steps: on the lead alone in a team
    const int lead = !tm || tm->id == 0;

    // x = tok_embeddings(tokens)
    if (lead) {
        for (int64_t t = 0; t < T; t++) l2c_embed(s->x + t * dim, &m->tok_embeddings, s->tok[t]);
        rope_angles(m, s, T);
    }

    for (int64_t l = 0; l < c->n_layers; l++) {
        const l2c_layer *L = &m->layers[l];
        const l2c_matrix *qkv[3] = {&L->wq, &L->wk, &L->wv};
        const l2c_matrix *o[1] = {&L->wo};
        const l2c_matrix *up[2] = {&L->w1, &L->w3}, *down[1] = {&L->w2};
        float *qkv_out[3] = {s->q, s->k, s->v}, *up_out[2] = {s->hb, s->hb2};

        // xb = attention_norm(x)
        if (lead) {
            k->rmsnorm(s->xb, s->x, L->rms_att, T, dim, c->norm_eps, nth);
            l2c_input_set(m, &s->in, s->xb, T, dim, qkv, 3, nth);
        }
        // xq, xk, xv = wq(xb), wk(xb), wv(xb)    (nn.Linear(..., bias=True) in qwen2)
        linear(m, qkv_out, &s->in, qkv, 3, nth, tm);
        if (lead) {
            if (L->bq) add_bias(s->q, L->bq, T, q_dim);
            if (L->bk) add_bias(s->k, L->bk, T, kv_dim);
            if (L->bv) add_bias(s->v, L->bv, T, kv_dim);
            // xq, xk = apply_rotary_emb(xq, xk, freqs_cis), each row at its own position
            k->rope(s->q, NULL, s->rope_cos, s->rope_sin, T, c->n_heads, hs, nth);
            k->rope(s->k, NULL, s->rope_cos, s->rope_sin, T, c->n_kv_heads, hs, nth);
            // cache_k[seq, pos] = xk; cache_v[seq, pos] = xv   (each row into its own sequence)
            k->kv_store(pool, l, s->spans, n_spans, s->k, s->v, nth);
        }
        // xb = softmax(xq @ keys^T / sqrt(hs) + causal mask) @ values, per sequence (GQA)
        if (tm) {
            l2c_team_barrier(tm);  // q and the cache ready
            k->attention_team(s->xb, s->q, pool, l, s->spans, n_spans, c->n_heads, s->ws, tm);
            l2c_team_barrier(tm);
        } else {
            k->attention(s->xb, s->q, pool, l, s->spans, n_spans, c->n_heads, s->ws, nth);
        }
        // x = x + wo(xb)
        if (lead) l2c_input_set(m, &s->in, s->xb, T, q_dim, o, 1, nth);
        linear(m, &s->xb2, &s->in, o, 1, nth, tm);
        if (lead) {
            k->add(s->x, s->xb2, T * dim, nth);
            // xb = ffn_norm(x)
            k->rmsnorm(s->xb, s->x, L->rms_ffn, T, dim, c->norm_eps, nth);
            l2c_input_set(m, &s->in, s->xb, T, dim, up, 2, nth);
        }
        // x = x + w2(F.silu(w1(xb)) * w3(xb))
        linear(m, up_out, &s->in, up, 2, nth, tm);
        if (lead) {
            k->swiglu(s->hb, s->hb2, T, hidden, nth);
            l2c_input_set(m, &s->in, s->hb, T, hidden, down, 1, nth);
        }
        linear(m, &s->xb2, &s->in, down, 1, nth, tm);
        if (lead) k->add(s->x, s->xb2, T * dim, nth);
    }

    // logits = output(norm(x)), only for the rows whose logits are wanted
    if (n_wanted == 0) return;
    const l2c_matrix *cls[1] = {&m->wcls};
    if (lead) {
        for (int64_t j = 0; j < n_wanted; j++)
            k->rmsnorm(s->xb + j * dim, s->x + s->wanted[j] * dim, m->rms_final, 1, dim, c->norm_eps, nth);
        l2c_input_set(m, &s->in, s->xb, n_wanted, dim, cls, 1, nth);
    }
    linear(m, &logits, &s->in, cls, 1, nth, tm);
}

// a step on its own, or as a team of the state's threads
static void run_step(const l2c_model *m, l2c_state *s, const l2c_kvpool *pool, int64_t T,
                     int64_t n_spans, int64_t n_wanted, float *logits) {
#ifdef _OPENMP
    if (team_step(s, T, n_spans)) {
        memset(s->team, 0, sizeof(*s->team));
#pragma omp parallel num_threads(s->n_threads)
        {
            const l2c_team tm = {omp_get_thread_num(), omp_get_num_threads(), s->team};
            forward_step(m, s, pool, T, n_spans, n_wanted, logits, &tm);
        }
        return;
    }
#endif
    forward_step(m, s, pool, T, n_spans, n_wanted, logits, NULL);
}

// ---------------------------------------------------------------------------------------------
// the runs: checks, reservation, steps

static void give_back(const l2c_run *runs, int64_t n_runs) {
    for (int64_t i = 0; i < n_runs; i++)
        if (runs[i].seq) l2c_seq_truncate(runs[i].seq, runs[i].seq->n_pos);
}

int l2c_forward(const l2c_model *m, l2c_state *s, l2c_kvpool *pool, const l2c_run *runs,
                int64_t n_runs, const int32_t *tokens, float *logits) {
    if (!m || !s || !s->x || !pool || n_runs < 0 || (n_runs > 0 && !runs)) return L2C_ERR_ARG;
    const l2c_config *c = &m->cfg;
    if (pool->n_layers != c->n_layers || pool->n_kv_heads != c->n_kv_heads ||
        pool->head_size != c->head_size)
        return L2C_ERR_ARG;
    int64_t total = 0, n_logits = 0;
    for (int64_t i = 0; i < n_runs; i++) {
        const l2c_run *r = &runs[i];
        if (!r->seq || r->seq->pool != pool || r->n_tokens < 0 ||
            (r->logits != L2C_LOGITS_NONE && r->logits != L2C_LOGITS_LAST && r->logits != L2C_LOGITS_ALL))
            return L2C_ERR_ARG;
        for (int64_t j = 0; j < i; j++)
            if (runs[j].seq == r->seq) return L2C_ERR_ARG;   // one run per sequence
        const int64_t end = r->seq->n_pos + r->n_tokens;
        if (end > r->seq->max_pos || end > c->seq_len) return L2C_ERR_RANGE;
        total += r->n_tokens;
        n_logits += r->logits == L2C_LOGITS_ALL ? r->n_tokens : (r->logits == L2C_LOGITS_LAST && r->n_tokens > 0);
    }
    if ((total > 0 && !tokens) || (n_logits > 0 && !logits)) return L2C_ERR_ARG;
    for (int64_t i = 0; i < total; i++)
        if (tokens[i] < 0 || tokens[i] >= c->vocab_size) return L2C_ERR_TOKEN;

    // reserve the blocks of every run up front, all or nothing
    int64_t need = 0;
    for (int64_t i = 0; i < n_runs; i++)
        need += l2c_seq_blocks_needed(runs[i].seq, runs[i].seq->n_pos + runs[i].n_tokens);
    if (need > pool->n_free) return L2C_ERR_KVFULL;
    for (int64_t i = 0; i < n_runs; i++) l2c_seq_reserve(runs[i].seq, runs[i].seq->n_pos + runs[i].n_tokens);

    // steps of at most max_batch rows, taking the runs' tokens in order
    int64_t ri = 0, done_in_run = 0, tok_off = 0, logit_row = 0;
    while (tok_off < total) {
        if (s->cancel && *s->cancel) {
            give_back(runs, n_runs);
            return L2C_ERR_CANCELLED;
        }
        int64_t T = 0, n_spans = 0, n_wanted = 0;
        while (T < s->max_batch && ri < n_runs) {
            const l2c_run *r = &runs[ri];
            const int64_t n = r->n_tokens - done_in_run < s->max_batch - T ? r->n_tokens - done_in_run
                                                                           : s->max_batch - T;
            if (n > 0) {
                const int64_t pos0 = r->seq->n_pos;     // n_pos advances after each step
                s->span_seq[n_spans] = r->seq;
                s->spans[n_spans++] = (l2c_span){r->seq->blocks, pos0, T, n};
                for (int64_t i = 0; i < n; i++) {
                    s->tok[T + i] = tokens[tok_off + i];
                    s->pos[T + i] = pos0 + i;
                    if (r->logits == L2C_LOGITS_ALL ||
                        (r->logits == L2C_LOGITS_LAST && done_in_run + i == r->n_tokens - 1))
                        s->wanted[n_wanted++] = T + i;
                }
                T += n;
                tok_off += n;
                done_in_run += n;
            }
            if (done_in_run == r->n_tokens) {
                ri++;
                done_in_run = 0;
            }
        }
        if (reserve_ws(s, m, pool, n_spans) != L2C_OK) {
            give_back(runs, n_runs);
            return L2C_ERR_NOMEM;
        }
        run_step(m, s, pool, T, n_spans, n_wanted, n_wanted ? logits + logit_row * c->vocab_size : NULL);
        logit_row += n_wanted;
        // the rows of this step are in their sequences now
        for (int64_t i = 0; i < n_spans; i++) s->span_seq[i]->n_pos += s->spans[i].n;
    }
    return L2C_OK;
}

// ---------------------------------------------------------------------------------------------
// generation loop: prefill, then sample -> feed back, all in C (the caller releases the GIL)

int l2c_generate(const l2c_model *m, l2c_state *s, l2c_seq *seq, struct l2c_sampler *sp,
                 const int32_t *prompt, int64_t n_prompt, float *logits, int32_t *out,
                 uint64_t *rng_out, int64_t max_new, const int32_t *stop, int64_t n_stop,
                 int64_t *n_out) {
    *n_out = 0;
    if (!seq || !logits || max_new < 0 || n_prompt < 0 || (max_new > 0 && !out)) return L2C_ERR_ARG;
    int rc;
    l2c_run run = {seq, n_prompt, L2C_LOGITS_LAST};
    if (n_prompt > 0 && (rc = l2c_forward(m, s, seq->pool, &run, 1, prompt, logits)) != L2C_OK) return rc;
    for (int64_t i = 0; i < max_new; i++) {
        const int32_t tok = l2c_sample(sp, logits);
        if ((rc = l2c_sampler_accept(sp, tok)) != L2C_OK) return rc;
        out[i] = tok;
        if (rng_out) rng_out[i] = sp->rng_state;
        *n_out = i + 1;
        for (int64_t j = 0; j < n_stop; j++)
            if (tok == stop[j]) return L2C_OK;
        // the last token is returned, not fed: the caller feeds it first on the next call
        if (i == max_new - 1 || seq->n_pos >= seq->max_pos || seq->n_pos >= m->cfg.seq_len) return L2C_OK;
        run.n_tokens = 1;
        if ((rc = l2c_forward(m, s, seq->pool, &run, 1, &tok, logits)) != L2C_OK) return rc;
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
