// internal.h: declarations shared by the engine's C files (not part of the public API).
#ifndef LLAMA2C_INTERNAL_H
#define LLAMA2C_INTERNAL_H

#include "llama2c.h"

// Quantized copy of the current matmul input (runq.c: quantize once, reuse for q/k/v, w1/w3).
typedef struct {
    const float *src;
    int64_t T, n, gs;
} qcache;

// smallest group size of any quantized matrix (activation scale buffers are sized for it)
int64_t l2c_min_group_size(const l2c_model *m);
// out (T, W.rows) = x (T, W.cols) @ W^T, in the matrix's own element type
void l2c_linear(const l2c_model *m, l2c_state *s, qcache *qc, float *out, const float *x,
                const l2c_matrix *W, int64_t T);
// x (dim,) = row `token` of the embedding table (dequantized if int8)
void l2c_embed(float *restrict x, const l2c_matrix *E, int64_t token);

#endif
