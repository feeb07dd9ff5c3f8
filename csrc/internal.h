// internal.h: declarations shared by the engine's C files (not part of the public API).
#ifndef LLAMA2C_INTERNAL_H
#define LLAMA2C_INTERNAL_H

#include "llama2c.h"

// ---- the input of one or more matrices ------------------------------------------------------
// A float activation x (T, n) and, for the int8 matrices that read it, x quantized once per
// group size they use (runq.c: quantize once, reuse for q/k/v and w1/w3). The forward pass
// sets an input explicitly at the stage that produces it (l2c_input_set with the matrices
// that will read it), then runs those matrices on it (l2c_linear).
// Buffers for up to max_rows rows of the model's widest matrix input.
int l2c_input_init(l2c_input *in, const l2c_model *m, int64_t max_rows);
void l2c_input_free(l2c_input *in);
// Point `in` at x (T, n) and quantize it for every quantized matrix in ws[0..nw).
// L2C_OK, or L2C_ERR_ARG (too many rows or distinct group sizes).
int l2c_input_set(const l2c_model *m, l2c_input *in, const float *x, int64_t T, int64_t n,
                  const l2c_matrix *const *ws, int nw, int n_threads);
// outs[i] (T, ws[i].rows) = x (T, ws[i].cols) @ ws[i]^T in each matrix's own element type,
// for nw <= L2C_LINEAR_MAX matrices from an input set for them, in one parallel region.
#define L2C_LINEAR_MAX 3
void l2c_linear(const l2c_model *m, float *const *outs, const l2c_input *in,
                const l2c_matrix *const *ws, int nw, int n_threads);
// the same, called by every thread of a team once the input is set (l2c_team in llama2c.h)
void l2c_linear_team(const l2c_model *m, float *const *outs, const l2c_input *in,
                     const l2c_matrix *const *ws, int nw, const l2c_team *tm);
// x (dim,) = row `token` of the embedding table (dequantized if int8)
void l2c_embed(float *restrict x, const l2c_matrix *E, int64_t token);

#endif
