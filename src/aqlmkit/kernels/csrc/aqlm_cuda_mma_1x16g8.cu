// Instantiates the 1x16g8 tensor-core kernels (batch <= 8 and <= 16; fp16 and bf16).
#include "aqlm_cuda_mma.cuh"

AQLMKIT_INSTANTIATE_MMA(1, 16, 8)
