// Generic KxB dequantization (any K, B <= 16, any in_group_size) for the prefill path.
#include "aqlm_cuda_kernels.cuh"

namespace aqlmkit_cuda {

cudaError_t launch_dequant(const DequantArgs& a, int dt, cudaStream_t stream) {
  const long long n = (long long)a.out_features * (a.in_features / a.group);
  if (n == 0) return cudaSuccess;
  const int threads = 256;
  const unsigned blocks = (unsigned)((n + threads - 1) / threads);
  if (dt == 0) dequant_kernel<0><<<blocks, threads, 0, stream>>>(a);
  else dequant_kernel<1><<<blocks, threads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace aqlmkit_cuda
