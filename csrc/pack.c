// pack.c: weight matrices: packing into the kernels' layouts (llama2c.h), IEEE-half scales,
// row lookups from every type, and the checks of a filled-in matrix. Built for the baseline
// instruction set (no kernel table needed), parallel over blocks with OpenMP.
#include <stdint.h>
#include <string.h>

#include "kernels_common.h"
#include "llama2c.h"

#define PB L2C_PANEL

static int64_t n_blocks(int64_t rows) { return (rows + PB - 1) / PB; }

int64_t l2c_packed_size(int32_t type, int64_t rows, int64_t cols) {
    if (rows < 0 || cols < 0) return -1;
    switch (type) {
    case L2C_F32P:
    case L2C_Q8P: return n_blocks(rows) * PB * cols;  // floats / bytes
    case L2C_Q4P: return cols % 2 ? -1 : n_blocks(rows) * PB * cols / 2;
    default: return -1;
    }
}

int64_t l2c_packed_scales(int64_t rows, int64_t cols, int64_t gs) {
    if (rows < 0 || cols < 0 || gs <= 0 || cols % gs) return -1;
    return n_blocks(rows) * PB * (cols / gs);
}

// ---------------------------------------------------------------------------------------------
// IEEE halves

// h = f exactly, if f is a half (inf included, NaN not); returns 1 if so, else 0
static int half_exact(float f, uint16_t *h) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    const uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
    const int32_t exp = (int32_t)((bits >> 23) & 0xffu);
    const uint32_t man = bits & 0x7fffffu;
    if (exp == 0xff) {  // inf (a half too) or NaN (refused)
        *h = sign | 0x7c00u;
        return man == 0;
    }
    if (exp == 0) {  // zero; a float subnormal is below every half
        *h = sign;
        return man == 0;
    }
    const int32_t e = exp - 127;
    if (e > 15) return 0;
    if (e >= -14) {  // a normal half: the low 13 mantissa bits must be zero
        *h = (uint16_t)(sign | ((uint32_t)(e + 15) << 10) | (man >> 13));
        return (man & 0x1fffu) == 0;
    }
    if (e < -24) return 0;
    // a subnormal half: value = frac * 2^-24, frac = (1.man) * 2^(e + 24)
    const uint32_t full = 0x800000u | man, shift = (uint32_t)(-(e + 1));  // 14..23
    *h = (uint16_t)(sign | (full >> shift));
    return (full & ((1u << shift) - 1u)) == 0;
}

int l2c_f16_exact(const float *x, int64_t n) {
    uint16_t h;
    for (int64_t i = 0; i < n; i++)
        if (!half_exact(x[i], &h)) return 0;
    return 1;
}

static void put_scale(void *dst, int64_t i, float v, int f16) {
    if (f16) {
        uint16_t h = 0;
        half_exact(v, &h);  // exact: the caller checked l2c_f16_exact
        ((uint16_t *)dst)[i] = h;
    } else {
        ((float *)dst)[i] = v;
    }
}

// scales (and offsets) of block b, packed as (group, row): rows past the end get 0
static void pack_scales(void *sp, void *mp, const float *s, const float *m, int64_t b,
                        int64_t rows, int64_t ng, int f16) {
    for (int64_t g = 0; g < ng; g++)
        for (int64_t r = 0; r < PB; r++) {
            const int64_t row = b * PB + r, i = (b * ng + g) * PB + r;
            put_scale(sp, i, row < rows ? s[row * ng + g] : 0.0f, f16);
            if (m) put_scale(mp, i, row < rows ? m[row * ng + g] : 0.0f, f16);
        }
}

static int pack_args_ok(int64_t rows, int64_t cols, int64_t gs, int64_t mult, const void *m,
                        const void *mp) {
    if ((m == NULL) != (mp == NULL)) return 0;
    return rows >= 0 && cols > 0 && gs > 0 && gs % mult == 0 && gs <= L2C_GROUP_MAX &&
           cols % gs == 0;
}

// ---------------------------------------------------------------------------------------------
// packing

int l2c_pack_f32p(float *restrict fp, const float *restrict w, int64_t rows, int64_t cols,
                  int n_threads) {
    if (rows < 0 || cols <= 0 || n_threads < 1) return L2C_ERR_ARG;
    const int64_t np = n_blocks(rows);
    // 16 x 16 transposes: 16 rows of 64 bytes in, 1 KB out in order
    L2C_PRAGMA(omp parallel for num_threads(n_threads) schedule(static) if(n_threads > 1 && np > 1))
    for (int64_t p = 0; p < np; p++) {
        float *dst = fp + p * cols * PB;
        for (int64_t k0 = 0; k0 < cols; k0 += PB) {
            const int64_t kn = min64(PB, cols - k0);
            for (int64_t r = 0; r < PB; r++) {
                const int64_t row = p * PB + r;
                if (row < rows) {
                    const float *src = w + row * cols + k0;
                    for (int64_t k = 0; k < kn; k++) dst[(k0 + k) * PB + r] = src[k];
                } else {
                    for (int64_t k = 0; k < kn; k++) dst[(k0 + k) * PB + r] = 0.0f;
                }
            }
        }
    }
    return L2C_OK;
}

int l2c_pack_q8p(int8_t *restrict qp, void *restrict sp, void *restrict mp,
                 const int8_t *restrict q, const float *restrict s, const float *restrict m,
                 int64_t rows, int64_t cols, int64_t gs, int f16, int n_threads) {
    if (!pack_args_ok(rows, cols, gs, 4, m, mp) || n_threads < 1) return L2C_ERR_ARG;
    const int64_t nb = n_blocks(rows), ng = cols / gs;
    L2C_PRAGMA(omp parallel for num_threads(n_threads) schedule(static) if(n_threads > 1 && nb > 1))
    for (int64_t b = 0; b < nb; b++) {
        uint8_t *dst = (uint8_t *)qp + b * PB * cols;
        // qp[b*16*cols + k/4*64 + r*4 + k%4]: the groups' steps follow each other, so k runs on
        for (int64_t r = 0; r < PB; r++) {
            const int64_t row = b * PB + r;
            const int8_t *src = row < rows ? q + row * cols : NULL;
            for (int64_t k = 0; k < cols; k++)
                dst[(k >> 2) * 64 + r * 4 + (k & 3)] = (uint8_t)((src ? src[k] : 0) + 128);
        }
        pack_scales(sp, mp, s, m, b, rows, ng, f16);
    }
    return L2C_OK;
}

int l2c_pack_q4p(int8_t *restrict qp, void *restrict sp, void *restrict mp,
                 const uint8_t *restrict q, const float *restrict s, const float *restrict m,
                 int64_t rows, int64_t cols, int64_t gs, int f16, int n_threads) {
    if (!pack_args_ok(rows, cols, gs, 8, m, mp) || n_threads < 1) return L2C_ERR_ARG;
    const int64_t nb = n_blocks(rows), ng = cols / gs;
    int bad = 0;
    L2C_PRAGMA(omp parallel for num_threads(n_threads) schedule(static) reduction(| : bad) if(n_threads > 1 && nb > 1))
    for (int64_t b = 0; b < nb; b++) {
        uint8_t *dst = (uint8_t *)qp + b * PB * cols / 2;
        uint8_t seen = 0;
        // byte (k/8)*64 + r*4 + k%4 holds input k (k%8 < 4) in its low, k+4 in its high nibble
        for (int64_t r = 0; r < PB; r++) {
            const int64_t row = b * PB + r;
            if (row >= rows) {
                for (int64_t k = 0; k < cols; k += 8) memset(dst + (k >> 3) * 64 + r * 4, 0, 4);
                continue;
            }
            const uint8_t *src = q + row * cols;
            for (int64_t k = 0; k < cols; k += 8)
                for (int64_t c = 0; c < 4; c++) {
                    const uint8_t lo = src[k + c], hi = src[k + 4 + c];
                    seen |= lo | hi;
                    dst[(k >> 3) * 64 + r * 4 + c] = (uint8_t)((lo & 15u) | (hi << 4));
                }
        }
        bad |= (seen & 0xf0u) != 0;
        pack_scales(sp, mp, s, m, b, rows, ng, f16);
    }
    return bad ? L2C_ERR_ARG : L2C_OK;
}

// ---------------------------------------------------------------------------------------------
// row lookups and checks

int l2c_matrix_row(float *restrict x, const l2c_matrix *W, int64_t row) {
    if (!x || !W) return L2C_ERR_ARG;
    if (row < 0 || row >= W->rows) return L2C_ERR_RANGE;
    const int64_t n = W->cols, gs = W->group_size, b = row / PB, r = row % PB;
    switch (W->type) {
    case L2C_F32:
        memcpy(x, W->f + row * n, (size_t)n * sizeof(float));
        return L2C_OK;
    case L2C_F32P: {
        const float *p = W->f + b * n * PB + r;
        for (int64_t k = 0; k < n; k++) x[k] = p[k * PB];
        return L2C_OK;
    }
    case L2C_Q8: {  // row-major, float scales
        const int8_t *q = W->q + row * n;
        const float *s = (const float *)W->s + row * (n / gs);
        const float *m = W->m ? (const float *)W->m + row * (n / gs) : NULL;
        for (int64_t k = 0; k < n; k++) {
            const float v = (float)q[k] * s[k / gs];
            x[k] = m ? v + m[k / gs] : v;
        }
        return L2C_OK;
    }
    case L2C_Q8P:
    case L2C_Q4P: {
        const int64_t ng = n / gs;
        const uint8_t *blk = (const uint8_t *)W->q + b * PB * (W->type == L2C_Q8P ? n : n / 2);
        for (int64_t g = 0; g < ng; g++) {
            const int64_t si = (b * ng + g) * PB + r;
            const float s = l2c_scale_at(W->s, si, W->scales_f16);
            const float m = W->m ? l2c_scale_at(W->m, si, W->scales_f16) : 0.0f;
            for (int64_t k = g * gs; k < (g + 1) * gs; k++) {
                float v;
                if (W->type == L2C_Q8P)
                    v = (float)((int32_t)blk[(k >> 2) * 64 + r * 4 + (k & 3)] - 128) * s;
                else
                    v = (float)((blk[(k >> 3) * 64 + r * 4 + (k & 3)] >> ((k & 4) ? 4 : 0)) & 15u) * s;
                x[k] = W->m ? v + m : v;
            }
        }
        return L2C_OK;
    }
    default: return L2C_ERR_ARG;
    }
}

int l2c_matrix_ok(const l2c_matrix *W, int64_t rows, int64_t cols, int for_matmul) {
    if (!W || W->rows != rows || W->cols != cols || rows <= 0 || cols <= 0) return 0;
    const int64_t gs = W->group_size;
    switch (W->type) {
    case L2C_F32: return !for_matmul && W->f != NULL;
    case L2C_F32P: return W->f != NULL;
    case L2C_Q8:
        if (for_matmul) return 0;
        /* fall through */
    case L2C_Q8P:
        return W->q && W->s && gs > 0 && gs % 4 == 0 && gs <= L2C_GROUP_MAX && cols % gs == 0 &&
               (W->type == L2C_Q8P || !W->scales_f16);
    case L2C_Q4P:
        return W->q && W->s && gs > 0 && gs % 8 == 0 && gs <= L2C_GROUP_MAX && cols % gs == 0;
    default: return 0;
    }
}
