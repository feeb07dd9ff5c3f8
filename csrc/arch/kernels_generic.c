// kernels_generic.c: the generic build of csrc/kernels.c (setup.py gives this file its own flags).
#define L2C_KERNELS_NAME l2c_kernels_generic
#define L2C_KERNELS_LABEL "generic"
#define L2C_KERNELS_ISA L2C_ISA_GENERIC
#include "../kernels.c"
