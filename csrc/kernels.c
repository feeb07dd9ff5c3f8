// kernels.c: the compute kernels, written once and compiled once per instruction set.
//
// This file is not compiled on its own. csrc/arch/kernels_{generic,avx2,avxvnni,avx512}.c each
// define L2C_KERNELS_NAME and include it, and setup.py compiles each of those with its own
// flags (none; -mavx2 -mfma -mf16c; the same plus -mavxvnni; -mavx512f/bw/vl/vnni), as numpy
// does with its dispatch sources. Inside, the hot loops carry an `#if defined(__AVX512F__) ...
// #elif defined(__AVX2__) ... #endif` ladder over a shared index, finished by the scalar loop,
// so the generic build is the plain scalar twin of every kernel (no -ffast-math anywhere:
// reductions in the generic build run in source order, and the SIMD builds differ from it only
// by summation order). The matrix kernels live in their own files (kernels_f32.c,
// kernels_q8.c, kernels_q4.c), each a complete translation unit included here; so do the
// row-wise kernels (ops.c) and the KV store and attention over the KV pool (attention.c).
//
// Threads: each kernel has at most one parallel region, over output rows (matmul), rows of a
// batch (rmsnorm, rope, swiglu), attention tiles and blocks (attention.c) or chunks (add).
#include "kernels_common.h"
#include "vec.h"

#ifndef L2C_KERNELS_NAME
#error "define L2C_KERNELS_NAME (see csrc/arch/)"
#endif

#include "kernels_f32.c"
#include "kernels_peak.c"
#include "kernels_q4.c"
#include "kernels_q8.c"

// ---------------------------------------------------------------------------------------------
// the matrix product of every packed type: out (T, W->rows) = X @ W^T

static void matmul(float *restrict out, const float *restrict x, const l2c_qact *a,
                   const l2c_matrix *W, int64_t T, int n_threads) {
    if (T <= 0) return;
    switch (W->type) {
    case L2C_F32P: matmul_f32p(out, x, W, T, n_threads); break;
    case L2C_Q8P: matmul_q8p(out, a, W, T, n_threads); break;
    case L2C_Q4P: matmul_q4p(out, a, W, T, n_threads); break;
    default: break;  // row-major types are lookups only (l2c_model_check refuses them)
    }
}

// ---------------------------------------------------------------------------------------------
// row-wise kernels (RMSNorm, RoPE, SwiGLU, add, softmax, the read probe), the KV store, the
// attention over the KV pool and the sampler's vocabulary passes
#include "ops.c"
#include "attention.c"
// the sampler's passes over the vocabulary (last: it turns floating-point contraction off)
#include "sample_ops.c"

// ---------------------------------------------------------------------------------------------

const l2c_kernels L2C_KERNELS_NAME = {
    .name = L2C_KERNELS_LABEL,
    .isa = L2C_KERNELS_ISA,
    .quantize = quantize,
    .matmul = matmul,
    .rmsnorm = rmsnorm,
    .softmax = softmax,
    .rope = rope,
    .swiglu = swiglu,
    .add = add,
    .kv_store = kv_store,
    .attention = attention,
    .read_sum = read_sum,
    .peak = peak,
    .vocab_max = vocab_max,
    .vocab_exp = vocab_exp,
    .vocab_sum = vocab_sum,
    .vocab_select = vocab_select,
};
