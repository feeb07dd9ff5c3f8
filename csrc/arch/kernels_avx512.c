// kernels_avx512.c: the avx512 build of csrc/kernels.c (setup.py gives this file its own flags).
#define L2C_KERNELS_NAME l2c_kernels_avx512
#define L2C_KERNELS_LABEL "avx512"
#define L2C_KERNELS_ISA L2C_ISA_AVX512
#include "../kernels.c"
