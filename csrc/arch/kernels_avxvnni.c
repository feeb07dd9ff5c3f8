// kernels_avxvnni.c: the avxvnni build of csrc/kernels.c (setup.py gives this file its own flags).
#define L2C_KERNELS_NAME l2c_kernels_avxvnni
#define L2C_KERNELS_LABEL "avxvnni"
#define L2C_KERNELS_ISA L2C_ISA_AVXVNNI
#include "../kernels.c"
