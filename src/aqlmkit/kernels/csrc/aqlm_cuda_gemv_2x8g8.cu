// Instantiates the 2x8g8 batch-1..16 kernels (one file per scheme so ninja builds them in parallel).
#include "aqlm_cuda_kernels.cuh"

AQLMKIT_INSTANTIATE_GEMV(2,8,8)
