// linear.c: the model's matrices: checks, int8 packing, the linear layer (quantize the input
// once, then the matmul kernel of the matrix's type) and embedding lookups.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "llama2c.h"

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
        if (!q->hi || !q->s || !q->sum_hi || (two && (!q->lo || !q->sum_lo))) {
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
        free(in->q[i].sum_lo);
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
        if (ws[i]->type == L2C_F32) continue;
        const int64_t gs = ws[i]->group_size;
        int seen = 0;
        for (int v = 0; v < in->n_variants; v++) seen |= in->gs[v] == gs;
        if (seen) continue;
        if (in->n_variants == L2C_INPUT_VARIANTS) return L2C_ERR_ARG;
        in->gs[in->n_variants] = gs;
        m->k->quantize_q8(&in->q[in->n_variants], x, T, n, gs, n_threads);
        in->n_variants++;
    }
    return L2C_OK;
}

void l2c_linear(const l2c_model *m, float *out, const l2c_input *in, const l2c_matrix *W,
                int n_threads) {
    const l2c_kernels *k = m->k;
    if (W->type == L2C_F32) {
        k->matmul_f32(out, in->x, W->f, in->T, W->cols, W->rows, n_threads);
        return;
    }
    for (int v = 0; v < in->n_variants; v++)
        if (in->gs[v] == W->group_size) {
            k->matmul_q8(out, &in->q[v], W, in->T, n_threads);
            return;
        }
}

// x (dim,) = row `token` of the embedding table (dequantized if int8)
void l2c_embed(float *restrict x, const l2c_matrix *E, int64_t token) {
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
