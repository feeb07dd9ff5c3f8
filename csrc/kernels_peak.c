// kernels_peak.c: the peak probe of a kernel table (for the roofline of the benchmarks).
//
// Each thread runs PEAK_CHAINS independent dependency chains of the table's widest fp32 FMA
// (kind L2C_PEAK_FP32) or int8 dot product (L2C_PEAK_INT8: vpdpbusd on the VNNI tables;
// vpmaddubsw + vpmaddwd + vpaddd, 32 u8 x s8 products, on avx2; scalar multiply-adds in the
// generic table), enough chains to cover the instruction's latency at full throughput. The
// return value is the operations done (2 per multiply-add); the caller times the call.
#include "kernels_common.h"
#include "vec.h"

#define PEAK_CHAINS 12

static double peak_thread(int kind, int64_t reps, int64_t seed) {
    double sink = 0.0;
    if (kind == L2C_PEAK_FP32) {
#if defined(L2C_X512)
        __m512 acc[PEAK_CHAINS];
        const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-6f);
        for (int c = 0; c < PEAK_CHAINS; c++) acc[c] = _mm512_set1_ps((float)(c + seed));
        for (int64_t i = 0; i < reps; i++)
            for (int c = 0; c < PEAK_CHAINS; c++) acc[c] = _mm512_fmadd_ps(acc[c], a, b);
        for (int c = 0; c < PEAK_CHAINS; c++) sink += _mm512_reduce_add_ps(acc[c]);
        return sink * 0.0 + (double)reps * PEAK_CHAINS * 16 * 2;
#elif defined(L2C_X256)
        __m256 acc[PEAK_CHAINS];
        const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-6f);
        for (int c = 0; c < PEAK_CHAINS; c++) acc[c] = _mm256_set1_ps((float)(c + seed));
        for (int64_t i = 0; i < reps; i++)
            for (int c = 0; c < PEAK_CHAINS; c++) acc[c] = _mm256_fmadd_ps(acc[c], a, b);
        for (int c = 0; c < PEAK_CHAINS; c++) sink += vf_hsum(acc[c]);
        return sink * 0.0 + (double)reps * PEAK_CHAINS * 8 * 2;
#else
        float acc[4 * PEAK_CHAINS];
        for (int c = 0; c < 4 * PEAK_CHAINS; c++) acc[c] = (float)(c + seed);
        for (int64_t i = 0; i < reps; i++)
            for (int c = 0; c < 4 * PEAK_CHAINS; c++) acc[c] = acc[c] * 0.999999f + 1e-6f;
        for (int c = 0; c < 4 * PEAK_CHAINS; c++) sink += acc[c];
        return sink * 0.0 + (double)reps * 4 * PEAK_CHAINS * 2;
#endif
    }
#if defined(L2C_X512)
    __m512i acc[PEAK_CHAINS];
    const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8((char)(seed - 2));
    for (int c = 0; c < PEAK_CHAINS; c++) acc[c] = _mm512_set1_epi32(c);
    for (int64_t i = 0; i < reps; i++)
        for (int c = 0; c < PEAK_CHAINS; c++) acc[c] = dpbusd512(acc[c], a, b);
    for (int c = 0; c < PEAK_CHAINS; c++) sink += _mm512_reduce_add_epi32(acc[c]);
    return sink * 0.0 + (double)reps * PEAK_CHAINS * 64 * 2;
#elif defined(L2C_XVNNI)
    __m256i acc[PEAK_CHAINS];
    const __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8((char)(seed - 2));
    for (int c = 0; c < PEAK_CHAINS; c++) acc[c] = _mm256_set1_epi32(c);
    for (int64_t i = 0; i < reps; i++)
        for (int c = 0; c < PEAK_CHAINS; c++) acc[c] = dpbusd256(acc[c], a, b);
    int32_t lanes[8];
    for (int c = 0; c < PEAK_CHAINS; c++) {
        _mm256_storeu_si256((__m256i *)lanes, acc[c]);
        sink += lanes[0];
    }
    return sink * 0.0 + (double)reps * PEAK_CHAINS * 32 * 2;
#elif defined(L2C_X256)
    __m256i acc[PEAK_CHAINS];
    const __m256i b = _mm256_set1_epi8((char)(seed - 2)), ones = _mm256_set1_epi16(1);
    for (int c = 0; c < PEAK_CHAINS; c++) acc[c] = _mm256_set1_epi32(c);
    for (int64_t i = 0; i < reps; i++)
        for (int c = 0; c < PEAK_CHAINS; c++)
            // the chain feeds its own bytes back as the u8 operand (invariant operands would be
            // hoisted out of the loop); saturation does not matter here
            acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(_mm256_maddubs_epi16(acc[c], b), ones));
    int32_t lanes[8];
    for (int c = 0; c < PEAK_CHAINS; c++) {
        _mm256_storeu_si256((__m256i *)lanes, acc[c]);
        sink += lanes[0];
    }
    return sink * 0.0 + (double)reps * PEAK_CHAINS * 32 * 2;
#else
    int32_t acc[4 * PEAK_CHAINS];
    for (int c = 0; c < 4 * PEAK_CHAINS; c++) acc[c] = c;
    const int32_t b = (int32_t)seed - 2;
    for (int64_t i = 0; i < reps; i++)
        for (int c = 0; c < 4 * PEAK_CHAINS; c++) acc[c] = acc[c] * 3 + b;
    for (int c = 0; c < 4 * PEAK_CHAINS; c++) sink += acc[c];
    return sink * 0.0 + (double)reps * 4 * PEAK_CHAINS * 2;
#endif
}

static volatile double peak_sink;

static double peak(int kind, int64_t reps, int n_threads) {
    double ops = 0.0;
    if (n_threads < 1) n_threads = 1;
    L2C_PRAGMA(omp parallel for num_threads(n_threads) schedule(static, 1) reduction(+ : ops))
    for (int i = 0; i < n_threads; i++) ops += peak_thread(kind, reps, i + 1);
    peak_sink = ops;
    return ops;
}
