// dispatch.c: pick the kernel table for this CPU at run time.
//
// Each table comes from csrc/kernels.c compiled with its own flags (csrc/arch/). The baseline
// objects (this file included) are compiled for plain x86-64, so the wheel imports on any
// x86-64 CPU and only calls into an AVX table after the CPU has said it supports it.
#include "llama2c.h"

#ifdef _OPENMP
#include <omp.h>
#endif

// setup.py defines L2C_HAVE_<ISA> for each table it could compile
extern const l2c_kernels l2c_kernels_generic;
#if defined(L2C_HAVE_AVX2)
extern const l2c_kernels l2c_kernels_avx2;
#endif
#if defined(L2C_HAVE_AVXVNNI)
extern const l2c_kernels l2c_kernels_avxvnni;
#endif
#if defined(L2C_HAVE_AVX512)
extern const l2c_kernels l2c_kernels_avx512;
#endif
#if defined(L2C_HAVE_AVX2) || defined(L2C_HAVE_AVXVNNI) || defined(L2C_HAVE_AVX512)
#define L2C_HAVE_X86_KERNELS 1
#endif

int l2c_cpu_supports(int isa) {
#if defined(L2C_HAVE_X86_KERNELS) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    switch (isa) {
    case L2C_ISA_GENERIC: return 1;
    case L2C_ISA_AVX2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
    case L2C_ISA_AVXVNNI:
        return l2c_cpu_supports(L2C_ISA_AVX2) && __builtin_cpu_supports("avxvnni");
    case L2C_ISA_AVX512:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
               l2c_cpu_supports(L2C_ISA_AVX2);
    default: return 0;
    }
#else
    return isa == L2C_ISA_GENERIC;
#endif
}

const l2c_kernels *l2c_kernels_exact(int isa) {
    if (!l2c_cpu_supports(isa)) return NULL;
    switch (isa) {
    case L2C_ISA_GENERIC: return &l2c_kernels_generic;
#if defined(L2C_HAVE_AVX2)
    case L2C_ISA_AVX2: return &l2c_kernels_avx2;
#endif
#if defined(L2C_HAVE_AVXVNNI)
    case L2C_ISA_AVXVNNI: return &l2c_kernels_avxvnni;
#endif
#if defined(L2C_HAVE_AVX512)
    case L2C_ISA_AVX512: return &l2c_kernels_avx512;
#endif
    default: return NULL;
    }
}

const l2c_kernels *l2c_kernels_get(int max_isa) {
    if (max_isa >= L2C_ISA_COUNT) max_isa = L2C_ISA_COUNT - 1;
    for (int isa = max_isa; isa > L2C_ISA_GENERIC; isa--) {
        const l2c_kernels *k = l2c_kernels_exact(isa);
        if (k) return k;
    }
    return &l2c_kernels_generic;
}

int l2c_openmp_enabled(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int l2c_omp_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int l2c_release_threads(void) {
#if defined(_OPENMP) && (_OPENMP >= 201811 || (defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10))
    // (OpenMP 5.0; libgomp has it since GCC 10, whose _OPENMP still says 4.5)
    return omp_pause_resource_all(omp_pause_soft) == 0 ? 1 : 0;
#else
    return 0;
#endif
}
