// kernels_common.h: what the kernel sources share (kernels.c, kernels_f32.c, kernels_q8.c,
// kernels_q4.c, kernels_peak.c). Each of those includes this header and is a complete
// translation unit on its own (`cc -c -mavx2 -mfma -mf16c csrc/kernels_q8.c` compiles); a
// kernel table is one object, csrc/arch/kernels_<isa>.c, that includes kernels.c, which
// includes the others, so every kernel is static and inlined into its table.
//
// Instruction-set ladder inside the kernels (set by the table's compiler flags):
//   L2C_X512   AVX-512 F/BW/VL + VNNI         (the avx512 table)
//   L2C_XVNNI  AVX2 + FMA + F16C + AVX-VNNI   (the avxvnni table: vpdpbusd on ymm)
//   L2C_X256   AVX2 + FMA + F16C              (the avx2 and avxvnni tables)
//   none       the scalar twin                (the generic table)
#ifndef LLAMA2C_KERNELS_COMMON_H
#define LLAMA2C_KERNELS_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "llama2c.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__)
#define L2C_X512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define L2C_X256 1
#if defined(__AVXVNNI__)
#define L2C_XVNNI 1
#endif
#endif

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifdef _OPENMP
#define L2C_PRAGMA(x) _Pragma(#x)
#else
#define L2C_PRAGMA(x)
#endif

#define L2C_INLINE static inline __attribute__((always_inline))
// full unrolling of the loops over a tile's rows and tokens (constant trip counts), so that
// the accumulator arrays become registers
#define L2C_UNROLL _Pragma("GCC unroll 16")

// Work below this many multiply-adds runs on the calling thread: a parallel region costs a
// few microseconds, more than a small kernel.
#define L2C_PAR_MIN_WORK 32768

static inline int threads_for(int64_t work, int n_threads) {
    return work < L2C_PAR_MIN_WORK ? 1 : (n_threads < 1 ? 1 : n_threads);
}

// for (int64_t i = 0; i < n; i++) call;  on nth threads (static schedule), and without a
// parallel region when nth is 1: libgomp makes and frees a team for every region, a team of
// one included (`if(0)` too), about 1 us a call, and a decode step makes some 240 such calls.
#define L2C_PFOR(nth, i, n, call)                                                                 \
    do {                                                                                          \
        if ((nth) > 1) {                                                                          \
            L2C_PRAGMA(omp parallel for num_threads(nth) schedule(static))                        \
            for (int64_t i = 0; i < (n); i++) call;                                               \
        } else {                                                                                  \
            for (int64_t i = 0; i < (n); i++) call;                                               \
        }                                                                                         \
    } while (0)

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Row chunks for prefill: a thread's blocks are walked in chunks of about this many weight
// bytes; for each chunk every token tile, then the chunk's blocks. So the chunk's weights stay
// in L2 while the tokens pass, and the output (T rows of d floats: megabytes for a classifier)
// is written as runs of chunk-width per token row rather than one 64-byte store per row and
// block (a new page and a write-allocate miss each: int8 at d=46080, T=64 went from 36% to
// 50% of peak; 67% when the output fits the caches).
#define L2C_CHUNK_BYTES (384 * 1024)

static inline int64_t chunk_blocks(int64_t block_bytes, int64_t rb) {
    int64_t c = L2C_CHUNK_BYTES / (block_bytes > 0 ? block_bytes : 1);
    c = c / rb * rb;
    return c < rb ? rb : c;
}

// Software prefetch of the weight streams in tiles of at most this many tokens (decode and
// small batches read each weight once per call, from memory). Measured at T = 4 and 8 (1
// thread, SmolLM2 shapes): avx512 +30-40%, avx2 +0-10%, avxvnni -4-10% (decode only there).
#if defined(L2C_XVNNI)
#define L2C_PF_NT 1
#else
#define L2C_PF_NT 8
#endif

// Decode (T = 1) reads each thread's blocks of a packed int8 or 4-bit matrix as one stream:
// every step prefetches the line L2C_STREAM_AHEAD bytes past the one it loads, and
// prefetch_head starts the first L2C_STREAM_AHEAD bytes before the first multiply (a decode
// call reads only tens of kilobytes per thread, so the opening lines matter). 1024 bytes ahead
// with 4 blocks side by side: SmolLM2 q4 decode 10-20% slower (model, 2 threads).
#define L2C_STREAM_AHEAD 4096

static inline void prefetch_head(const void *p, int64_t bytes) {
    const char *c = (const char *)p;
    for (int64_t o = 0; o < min64(bytes, L2C_STREAM_AHEAD); o += 64) __builtin_prefetch(c + o, 0, 3);
}

// ---- shares of a parallel loop, taken from both ends --------------------------------------------
// Each thread's share: the items [front, back) not yet taken (blocks of a matmul, block tasks of
// the decode attention), packed in one word so one compare-and-swap takes items from either
// end. The owner takes from the front (its items stay one stream of memory: a quarter of what
// is left at a time, at least want_min), a thread done with its own share takes want_min at a
// time from the back of another's, so a thread slowed by the machine (a noisy neighbour, an
// interrupt) no longer holds the other at the join. An item runs on one thread whichever it
// is, so results do not depend on who took what.

static inline void share_set(l2c_share *sh, int64_t front, int64_t back) {
    __atomic_store_n(&sh->fb, (uint64_t)front | ((uint64_t)back << 32), __ATOMIC_RELAXED);
}

static inline int take(l2c_share *sh, int owner, int64_t want_min, int64_t *g0, int64_t *g1) {
    uint64_t v = __atomic_load_n(&sh->fb, __ATOMIC_RELAXED);
    for (;;) {
        const int64_t f = (int64_t)(v & 0xffffffffu), b = (int64_t)(v >> 32);
        if (f >= b) return 0;
        int64_t n = owner ? (b - f) / 4 : want_min;
        if (n < want_min) n = want_min;
        if (n > b - f) n = b - f;
        const uint64_t nv = owner ? (uint64_t)(f + n) | ((uint64_t)b << 32)
                                  : (uint64_t)f | ((uint64_t)(b - n) << 32);
        if (__atomic_compare_exchange_n(&sh->fb, &v, nv, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
            *g0 = owner ? f : b - n;
            *g1 = owner ? f + n : b;
            return 1;
        }
    }
}

// Token tiles: T tokens in ceil(T / nt_max) tiles of balanced sizes (so T = 7 with tiles of
// at most 6 runs as 4 + 3, never 6 + 1: a lone token keeps too few chains in flight).
static inline int64_t tile_count(int64_t T, int64_t nt_max) { return (T + nt_max - 1) / nt_max; }
static inline int64_t tile_start(int64_t T, int64_t tiles, int64_t i) { return T * i / tiles; }

// ---- IEEE half floats (scales and offsets of packed matrices) ---------------------------------
// Exact conversion of a half to float, for the scalar paths (the SIMD ones use vcvtph2ps).
static inline float l2c_half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);           // inf, nan
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);  // normal: rebias 15 -> 127
    } else if (man == 0) {
        bits = sign;                                        // +-0
    } else {                                                // subnormal: normalize
        int e = -1;
        do {
            man <<= 1;
            e++;
        } while (!(man & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// scale (or offset) i of an array of halves (f16) or floats
static inline float l2c_scale_at(const void *s, int64_t i, int f16) {
    return f16 ? l2c_half_to_float(((const uint16_t *)s)[i]) : ((const float *)s)[i];
}

// ---- vector helpers -----------------------------------------------------------------------------
#if defined(L2C_X256)
// 8 scales (halves or floats) starting at s[i]
L2C_INLINE __m256 load8_scales(const void *s, int64_t i, int f16) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)s + i)))
               : _mm256_loadu_ps((const float *)s + i);
}
// 4 bytes at p, broadcast to every 32-bit lane
L2C_INLINE __m256i bcast4_256(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}
#endif

// acc + the u8 x s8 dot products of w and x, 4 per 32-bit lane (vpdpbusd). GCC 12 allocates
// registers badly around the intrinsic's tied accumulator (two register copies per
// instruction in a tile's loop, and repeated loads), so GCC gets the instruction as inline
// asm with an in/out operand; the ymm form is forced to the VEX (AVX-VNNI) encoding, which
// CPUs without AVX-512 run.
#if defined(L2C_X512)
L2C_INLINE __m512i dpbusd512(__m512i acc, __m512i w, __m512i x) {
#if defined(__GNUC__) && !defined(__clang__)
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
    return acc;
#else
    return _mm512_dpbusd_epi32(acc, w, x);
#endif
}
#endif
#if defined(L2C_XVNNI)
L2C_INLINE __m256i dpbusd256(__m256i acc, __m256i w, __m256i x) {
#if defined(__GNUC__) && !defined(__clang__)
    __asm__("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(w), "x"(x));
    return acc;
#else
    return _mm256_dpbusd_avx_epi32(acc, w, x);
#endif
}
#endif

// The same problem with the avx2 table's accumulations: acc + vpmaddwd(a, b) (int32 lanes)
// and acc + vpmaddubsw(u0, s0) + vpmaddubsw(u1, s1) (int16 lanes; u unsigned, s signed bytes).
#if defined(L2C_X256)
L2C_INLINE __m256i madd_acc256(__m256i acc, __m256i a, __m256i b) {
#if defined(__GNUC__) && !defined(__clang__)
    __m256i t;
    __asm__("vpmaddwd %3, %2, %1\n\tvpaddd %1, %0, %0" : "+x"(acc), "=&x"(t) : "x"(a), "x"(b));
    return acc;
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}
L2C_INLINE __m256i maddubs2_acc256(__m256i acc, __m256i u0, __m256i s0, __m256i u1, __m256i s1) {
#if defined(__GNUC__) && !defined(__clang__)
    __m256i t, v;
    __asm__("vpmaddubsw %4, %3, %1\n\tvpmaddubsw %6, %5, %2\n\tvpaddw %2, %1, %1\n\t"
            "vpaddw %1, %0, %0"
            : "+x"(acc), "=&x"(t), "=&x"(v)
            : "x"(u0), "x"(s0), "x"(u1), "x"(s1));
    return acc;
#else
    return _mm256_add_epi16(acc, _mm256_add_epi16(_mm256_maddubs_epi16(u0, s0),
                                                  _mm256_maddubs_epi16(u1, s1)));
#endif
}
#endif

#if defined(L2C_X512)
L2C_INLINE __m512 load16_scales(const void *s, int64_t i, int f16) {
    return f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)s + i)))
               : _mm512_loadu_ps((const float *)s + i);
}
L2C_INLINE __m512i bcast4_512(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}
#endif

// ---- the float terms of one group of a quantized matmul ---------------------------------------
// acc (16 rows of one token) += isum * (s * xs)   [+ m * (xs * vsum) with offsets]
// with s, m the 16 rows' scale and offset of the group (index si into W's packed scales), xs
// the token's activation scale and vsum its integer group sum. Every path of a table adds
// its groups through this one helper (avx2: group_finish_256s, with the group's scales loaded
// once for a tile's tokens), in group order: the invariant of llama2c.h.
static inline int32_t qact_vsum(const l2c_qact *a, int64_t gi) {
    return a->lo ? 128 * a->sum_hi[gi] + a->sum_lo[gi] : a->sum_hi[gi];
}

#if defined(L2C_X512)
L2C_INLINE __m512 group_finish_512(__m512 acc, __m512i isum, const l2c_matrix *W, int64_t si,
                                   float xs, int32_t vsum) {
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum),
                          _mm512_mul_ps(load16_scales(W->s, si, W->scales_f16), _mm512_set1_ps(xs)),
                          acc);
    if (W->m)
        acc = _mm512_fmadd_ps(load16_scales(W->m, si, W->scales_f16),
                              _mm512_set1_ps(xs * (float)vsum), acc);
    return acc;
}
#elif defined(L2C_X256)
// the scales and offsets of 8 rows (half h of the block's 16) in one group, loaded once for
// every token of a tile
typedef struct { __m256 s, m; int has_m; } l2c_gscales;
L2C_INLINE l2c_gscales group_scales_256(const l2c_matrix *W, int64_t si) {
    l2c_gscales g;
    g.s = load8_scales(W->s, si, W->scales_f16);
    g.has_m = W->m != NULL;
    g.m = g.has_m ? load8_scales(W->m, si, W->scales_f16) : _mm256_setzero_ps();
    return g;
}
L2C_INLINE __m256 group_finish_256s(__m256 acc, __m256i isum, l2c_gscales g, float xs,
                                    int32_t vsum) {
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(g.s, _mm256_set1_ps(xs)), acc);
    if (g.has_m) acc = _mm256_fmadd_ps(g.m, _mm256_set1_ps(xs * (float)vsum), acc);
    return acc;
}
// 8 rows (half h of the block's 16)
L2C_INLINE __m256 group_finish_256(__m256 acc, __m256i isum, const l2c_matrix *W, int64_t si,
                                   float xs, int32_t vsum) {
    return group_finish_256s(acc, isum, group_scales_256(W, si), xs, vsum);
}
#endif

// the scalar twin: multiply, then add (no FMA in the baseline build)
static inline void group_finish_scalar(float *restrict acc, const int32_t *restrict isum,
                                       const l2c_matrix *W, int64_t si, float xs, int32_t vsum) {
    const int f16 = W->scales_f16;
    const float mterm = xs * (float)vsum;
    for (int r = 0; r < L2C_PANEL; r++) {
        acc[r] += (float)isum[r] * (l2c_scale_at(W->s, si + r, f16) * xs);
        if (W->m) acc[r] += l2c_scale_at(W->m, si + r, f16) * mterm;
    }
}

// store 16 floats of one block's rows (only `valid` of them: the last block of W)
static inline void store_rows(float *restrict out, const float *restrict v16, int64_t valid) {
    if (valid == 16) memcpy(out, v16, 16 * sizeof(float));   // a constant size: inline stores
    else memcpy(out, v16, (size_t)valid * sizeof(float));
}

#endif  // LLAMA2C_KERNELS_COMMON_H
