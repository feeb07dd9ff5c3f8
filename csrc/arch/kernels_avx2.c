// kernels_avx2.c: the avx2 build of csrc/kernels.c (setup.py gives this file its own flags).
#define L2C_KERNELS_NAME l2c_kernels_avx2
#define L2C_KERNELS_LABEL "avx2"
#define L2C_KERNELS_ISA L2C_ISA_AVX2
#include "../kernels.c"
