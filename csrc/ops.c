// ops.c: the row-wise kernels of the forward pass (RMSNorm, RoPE, SwiGLU, residual add, softmax)
// and the memory read probe. Included from csrc/kernels.c (compiled once per kernel table),
// written with the float-vector layer of vec.h so the generic build is their scalar twin.
//
// Every output row depends only on its own input row (and position): the loops inside a row are
// the same whatever T and n_threads (threads split rows, never a row).

// ---------------------------------------------------------------------------------------------
// RMSNorm: o = w * (x * (1 / sqrt(mean(x^2) + eps))), per row

static float sum_squares(const float *restrict x, int64_t n) {
    vf a0 = vf_zero(), a1 = vf_zero(), a2 = vf_zero(), a3 = vf_zero();
    int64_t i = 0;
    for (; i + 4 * VL <= n; i += 4 * VL) {
        const vf x0 = vf_load(x + i), x1 = vf_load(x + i + VL);
        const vf x2 = vf_load(x + i + 2 * VL), x3 = vf_load(x + i + 3 * VL);
        a0 = vf_fma(x0, x0, a0);
        a1 = vf_fma(x1, x1, a1);
        a2 = vf_fma(x2, x2, a2);
        a3 = vf_fma(x3, x3, a3);
    }
    for (; i + VL <= n; i += VL) {
        const vf x0 = vf_load(x + i);
        a0 = vf_fma(x0, x0, a0);
    }
    float ss = vf_hsum(vf_add(vf_add(a0, a1), vf_add(a2, a3)));
    for (; i < n; i++) ss = l2c_fmaf(x[i], x[i], ss);
    return ss;
}

static inline void rmsnorm_row(float *restrict orow, const float *restrict xr,
                               const float *restrict w, int64_t n, float eps) {
    const float inv = 1.0f / sqrtf(sum_squares(xr, n) / (float)n + eps);
    const vf iv = vf_set1(inv);
    int64_t j = 0;
    for (; j + VL <= n; j += VL) vf_store(orow + j, vf_mul(vf_load(w + j), vf_mul(iv, vf_load(xr + j))));
    for (; j < n; j++) orow[j] = w[j] * (inv * xr[j]);
}

static void rmsnorm(float *restrict o, const float *restrict x, const float *restrict w,
                    int64_t T, int64_t n, float eps, int n_threads) {
    const int nth = threads_for(T * n * 8, n_threads);
    L2C_PFOR(nth, t, T, rmsnorm_row(o + t * n, x + t * n, w, n, eps));
}

// ---------------------------------------------------------------------------------------------
// softmax, in place, numerically stable (the sampler's; attention has its own online form)

static void softmax(float *x, int64_t n) {
    if (n <= 0) return;
    float max_val = x[0];
    for (int64_t i = 1; i < n; i++)
        if (x[i] > max_val) max_val = x[i];
    double sum = 0.0;  // double: a float sum over a 50k vocabulary drifts by ~1e-4
    for (int64_t i = 0; i < n; i++) {
        x[i] = expf(x[i] - max_val);
        sum += x[i];
    }
    const float inv = (float)(1.0 / sum);
    for (int64_t i = 0; i < n; i++) x[i] *= inv;
}

// ---------------------------------------------------------------------------------------------
// RoPE, interleaved pairs (llama2.c / GGUF convention):
//   (x[2i], x[2i+1]) <- (x0*cos - x1*sin, x1*cos + x0*sin), angle = pos * freq[i]
// Each output is one fused multiply-add of a rounded product (fmaddsub in the SIMD tables).

static inline void rope_head(float *restrict v, const float *restrict c, const float *restrict s,
                             int64_t half) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512i dup = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    for (; i + 8 <= half; i += 8) {
        const __m512 x = _mm512_loadu_ps(v + 2 * i);
        const __m512 cd = _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(_mm256_loadu_ps(c + i)));
        const __m512 sd = _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(_mm256_loadu_ps(s + i)));
        const __m512 sw = _mm512_permute_ps(x, 0xB1);          // (x1, x0) in each pair
        _mm512_storeu_ps(v + 2 * i, _mm512_fmaddsub_ps(x, cd, _mm512_mul_ps(sw, sd)));
    }
#elif defined(__AVX2__)
    const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    for (; i + 4 <= half; i += 4) {
        const __m256 x = _mm256_loadu_ps(v + 2 * i);
        const __m256 cd = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(c + i)), dup);
        const __m256 sd = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(s + i)), dup);
        const __m256 sw = _mm256_permute_ps(x, 0xB1);
        _mm256_storeu_ps(v + 2 * i, _mm256_fmaddsub_ps(x, cd, _mm256_mul_ps(sw, sd)));
    }
#endif
    for (; i < half; i++) {  // leftovers (all of it in the generic build)
        const float x0 = v[2 * i], x1 = v[2 * i + 1];
        v[2 * i] = l2c_fmaf(x0, c[i], -(x1 * s[i]));
        v[2 * i + 1] = l2c_fmaf(x1, c[i], x0 * s[i]);
    }
}

static inline void rope_row(float *restrict x, const float *restrict c, const float *restrict s,
                            int64_t n_heads, int64_t head_size) {
    for (int64_t h = 0; h < n_heads; h++) rope_head(x + h * head_size, c, s, head_size / 2);
}

static void rope(float *restrict x, const int64_t *restrict pos, const float *restrict cos_t,
                 const float *restrict sin_t, int64_t T, int64_t n_heads, int64_t head_size,
                 int n_threads) {
    const int64_t half = head_size / 2, width = n_heads * head_size;
    const int nth = threads_for(T * width * 16, n_threads);
    L2C_PFOR(nth, t, T, rope_row(x + t * width, cos_t + (pos ? pos[t] : t) * half,
                                 sin_t + (pos ? pos[t] : t) * half, n_heads, head_size));
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: hb = (hb * sigmoid(hb)) * hb2, sigmoid(v) = 1 / (1 + exp(-v)), per row

static inline void swiglu_row(float *restrict h, const float *restrict g, int64_t n) {
    int64_t i = 0;
#if VL > 1
    const vf one = vf_set1(1.0f), zero = vf_zero();
    for (; i + VL <= n; i += VL) {
        const vf v = vf_load(h + i);
#if defined(__AVX512F__)
        const vf sig = _mm512_div_ps(one, vf_add(one, vf_exp(vf_sub(zero, v))));
#else
        const vf sig = _mm256_div_ps(one, vf_add(one, vf_exp(vf_sub(zero, v))));
#endif
        vf_store(h + i, vf_mul(vf_mul(v, sig), vf_load(g + i)));
    }
#endif
    for (; i < n; i++) {  // leftovers (all of it in the generic build): the same lane ops
        const float v = h[i];
        h[i] = (v * (1.0f / (1.0f + exp_s(0.0f - v)))) * g[i];
    }
}

static void swiglu(float *restrict hb, const float *restrict hb2, int64_t T, int64_t n,
                   int n_threads) {
    const int nth = threads_for(T * n * 4, n_threads);
    L2C_PFOR(nth, t, T, swiglu_row(hb + t * n, hb2 + t * n, n));
}

// residual: x += y
static void add(float *restrict x, const float *restrict y, int64_t n, int n_threads) {
    const int nth = threads_for(n, n_threads);
    L2C_PFOR(nth, i, n, x[i] += y[i]);
}

// ---------------------------------------------------------------------------------------------
// memory read probe: sum of x (n,), for measuring read bandwidth (l2c_read_bandwidth)

static float read_sum(const float *restrict x, int64_t n, int n_threads) {
    float total = 0.0f;
    L2C_PRAGMA(omp parallel for num_threads(n_threads) schedule(static) reduction(+ : total))
    for (int64_t c = 0; c < (n + 16383) / 16384; c++) {  // 64 KB chunks
        const float *p = x + c * 16384;
        const int64_t len = n - c * 16384 < 16384 ? n - c * 16384 : 16384;
        int64_t i = 0;
        vf s0 = vf_zero(), s1 = vf_zero(), s2 = vf_zero(), s3 = vf_zero();
        for (; i + 4 * VL <= len; i += 4 * VL) {
            s0 = vf_add(s0, vf_load(p + i));
            s1 = vf_add(s1, vf_load(p + i + VL));
            s2 = vf_add(s2, vf_load(p + i + 2 * VL));
            s3 = vf_add(s3, vf_load(p + i + 3 * VL));
        }
        float s = vf_hsum(vf_add(vf_add(s0, s1), vf_add(s2, s3)));
        for (; i < len; i++) s += p[i];
        total += s;
    }
    return total;
}
