// linear.c: the model's matrices: checks, the linear layer (quantize the input once for the
// matrices that read it, then the matmul kernel of each matrix's type) and embedding lookups.
// Packing and the layouts: pack.c and llama2c.h.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "llama2c.h"

int l2c_model_check(const l2c_model *m) {
    if (!m || !m->k || !m->layers || !m->rms_final || !m->rope_freq) return L2C_ERR_ARG;
    const l2c_config *c = &m->cfg;
    if (c->dim <= 0 || c->hidden_dim <= 0 || c->n_layers <= 0 || c->n_heads <= 0 ||
        c->n_kv_heads <= 0 || c->head_size <= 0 || c->vocab_size <= 0 || c->seq_len <= 0)
        return L2C_ERR_ARG;
    if (c->n_heads % c->n_kv_heads != 0 || c->head_size % 2 != 0) return L2C_ERR_ARG;
    if (c->act_bits != 8 && c->act_bits != 16) return L2C_ERR_ARG;
    if (!(c->norm_eps >= 0.0f)) return L2C_ERR_ARG;
    const int64_t d = c->dim, h = c->hidden_dim, qd = c->n_heads * c->head_size,
                  kvd = c->n_kv_heads * c->head_size;
    if (!l2c_matrix_ok(&m->tok_embeddings, c->vocab_size, d, 0)) return L2C_ERR_ARG;
    if (!l2c_matrix_ok(&m->wcls, c->vocab_size, d, 1)) return L2C_ERR_ARG;
    for (int64_t l = 0; l < c->n_layers; l++) {
        const l2c_layer *L = &m->layers[l];
        if (!L->rms_att || !L->rms_ffn) return L2C_ERR_ARG;
        if (!l2c_matrix_ok(&L->wq, qd, d, 1) || !l2c_matrix_ok(&L->wk, kvd, d, 1) ||
            !l2c_matrix_ok(&L->wv, kvd, d, 1) || !l2c_matrix_ok(&L->wo, d, qd, 1) ||
            !l2c_matrix_ok(&L->w1, h, d, 1) || !l2c_matrix_ok(&L->w2, d, h, 1) ||
            !l2c_matrix_ok(&L->w3, h, d, 1))
            return L2C_ERR_ARG;
    }
    return L2C_OK;
}


// ---------------------------------------------------------------------------------------------
// inputs and the linear layer

static int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }

int l2c_input_init(l2c_input *in, const l2c_model *m, int64_t max_rows) {
    memset(in, 0, sizeof(*in));
    const l2c_config *c = &m->cfg;
    const int64_t n = max_i64(max_i64(c->dim, c->hidden_dim), c->n_heads * c->head_size);
    const int two = c->act_bits == 16;
    in->max_rows = max_rows;
    in->max_n = n;
    for (int i = 0; i < L2C_INPUT_VARIANTS; i++) {
        l2c_qact *q = &in->q[i];
        // scales and sums are sized for the smallest group size the kernels take (4)
        q->hi = calloc((size_t)(max_rows * n), 1);
        q->lo = two ? calloc((size_t)(max_rows * n), 1) : NULL;
        q->s = calloc((size_t)(max_rows * n / 4), sizeof(float));
        q->sum_hi = calloc((size_t)(max_rows * n / 4), sizeof(int32_t));
        q->sum_lo = two ? calloc((size_t)(max_rows * n / 4), sizeof(int32_t)) : NULL;
        q->v16 = calloc((size_t)(max_rows * n), sizeof(int16_t));
        if (!q->hi || !q->s || !q->sum_hi || !q->v16 || (two && (!q->lo || !q->sum_lo))) {
            l2c_input_free(in);
            return L2C_ERR_NOMEM;
        }
    }
    return L2C_OK;
}

void l2c_input_free(l2c_input *in) {
    if (!in) return;
    for (int i = 0; i < L2C_INPUT_VARIANTS; i++) {
        free(in->q[i].hi); free(in->q[i].lo); free(in->q[i].s); free(in->q[i].sum_hi);
        free(in->q[i].sum_lo); free(in->q[i].v16);
    }
    memset(in, 0, sizeof(*in));
}

int l2c_input_set(const l2c_model *m, l2c_input *in, const float *x, int64_t T, int64_t n,
                  const l2c_matrix *const *ws, int nw, int n_threads) {
    if (T > in->max_rows || n > in->max_n) return L2C_ERR_ARG;
    in->x = x;
    in->T = T;
    in->n = n;
    in->n_variants = 0;
    for (int i = 0; i < nw; i++) {
        if (ws[i]->type != L2C_Q8P && ws[i]->type != L2C_Q4P) continue;  // fp32 reads x
        const int64_t gs = ws[i]->group_size;
        int seen = 0;
        for (int v = 0; v < in->n_variants; v++) seen |= in->gs[v] == gs;
        if (seen) continue;
        if (in->n_variants == L2C_INPUT_VARIANTS) return L2C_ERR_ARG;
        in->gs[in->n_variants] = gs;
        m->k->quantize(&in->q[in->n_variants], x, T, n, gs, n_threads);
        in->n_variants++;
    }
    return L2C_OK;
}

// the jobs of the matrices ws[0..nw) on an input set for them; returns their count
static int linear_jobs(l2c_mm *jobs, float *const *outs, const l2c_input *in,
                       const l2c_matrix *const *ws, int nw) {
    int n = 0;
    for (int i = 0; i < nw && n < L2C_LINEAR_MAX; i++) {
        const l2c_qact *a = NULL;  // fp32 reads x; the quantized types their group size's variant
        if (ws[i]->type != L2C_F32P) {
            for (int v = 0; v < in->n_variants && !a; v++)
                if (in->gs[v] == ws[i]->group_size) a = &in->q[v];
            if (!a) continue;  // the input was not set for this matrix (see internal.h)
        }
        jobs[n++] = (l2c_mm){.out = outs[i], .x = in->x, .a = a, .W = ws[i]};
    }
    return n;
}

void l2c_linear(const l2c_model *m, float *const *outs, const l2c_input *in,
                const l2c_matrix *const *ws, int nw, int n_threads) {
    l2c_mm jobs[L2C_LINEAR_MAX];
    const int n = linear_jobs(jobs, outs, in, ws, nw);
    m->k->matmul(jobs, n, in->T, n_threads);
}

void l2c_linear_team(const l2c_model *m, float *const *outs, const l2c_input *in,
                     const l2c_matrix *const *ws, int nw, const l2c_team *tm) {
    l2c_mm jobs[L2C_LINEAR_MAX];
    const int n = linear_jobs(jobs, outs, in, ws, nw);
    m->k->matmul_team(jobs, n, in->T, tm);
}

// x (dim,) = row `token` of the embedding table (dequantized if quantized)
void l2c_embed(float *restrict x, const l2c_matrix *E, int64_t token) {
    l2c_matrix_row(x, E, token);
}
