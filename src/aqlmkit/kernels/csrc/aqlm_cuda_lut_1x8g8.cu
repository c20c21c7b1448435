// Instantiates the 1x8g8 split-K LUT kernels (batch buckets 1, 2, 4; fp16 and bf16).
#include "aqlm_cuda_lut.cuh"

AQLMKIT_INSTANTIATE_LUT(1)
