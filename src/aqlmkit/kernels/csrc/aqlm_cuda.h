// Host-visible declarations of the AQLM CUDA launchers (plain C++: included by the .cpp binding
// and by the .cu files that instantiate them). Keeping kernels out of this header lets g++ build
// the torch binding while nvcc only compiles light, torch-free kernel files (fast CI compiles).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace aqlmkit_cuda {

// y[b, o] = scale[o] * sum_i x[b, i] * W[o, i] + bias[o]; W from codes/codebooks (AQLM layout,
// out_group_size 1). All pointers are contiguous; dtype (fp16/bf16) is the template's DT.
struct GemvArgs {
  const void* x;          // [batch, in]
  const void* codes;      // [out, in/G, K] int8 (B<=8) or int16, two's complement
  const void* codebooks;  // [K, 2^B, 1, G]
  const void* scales;     // [out]
  const void* bias;       // [out] or nullptr
  void* y;                // [batch, out]
  int batch;
  int in_features;
  int out_features;
  int num_sms;
};

// Up to kMaxSiblings layers that share x (q/k/v, gate/up: same input, batch, in_features) in one
// launch: blockIdx.z picks the layer, each with its own codes, codebooks, scales, bias, output
// and split-K partials. A plain layer is a group of one.
constexpr int kMaxSiblings = 3;
struct GroupArgs {
  GemvArgs s[kMaxSiblings];
  float* part[kMaxSiblings];  // lut/mma: that layer's fp32 partials (nullptr for gemv)
  int n;
};

inline int group_max_out(const GroupArgs& g) {
  int m = 0;
  for (int i = 0; i < g.n; ++i) m = g.s[i].out_features > m ? g.s[i].out_features : m;
  return m;
}

struct DequantArgs {
  const void* codes;
  const void* codebooks;
  const void* scales;
  void* w;  // [out, in]
  int out_features;
  int in_features;
  int num_codebooks;
  int nbits;
  int group;
  int code_bytes;  // 1 or 2
};

// DT: 0 = fp16, 1 = bf16. Returns the cudaError_t of the launch.
template <int DT, int K, int G, int LOG2NB, int BMAX>
cudaError_t launch_gemv(const GroupArgs& g, cudaStream_t stream);

cudaError_t launch_dequant(const DequantArgs& a, int dt, cudaStream_t stream);

// Split-K LUT kernel (engineer G; aqlm_cuda_lut.cuh) for Kx8 with in_group_size 8, batch 1..4.
// Code bytes per row per split: the LUT holds slice_bytes*256 entries of BMAX floats (64 KB).
constexpr int lut_slice_bytes(int bmax) { return bmax <= 1 ? 64 : bmax <= 2 ? 32 : 16; }
constexpr int lut_bmax(int batch) { return batch <= 1 ? 1 : batch <= 2 ? 2 : 4; }
inline int lut_num_splits(int in_features, int K, int batch) {
  const int cb = lut_slice_bytes(lut_bmax(batch));
  return (in_features / 8 * K + cb - 1) / cb;
}
// g.part[i]: fp32 workspace of lut_num_splits(...) * batch * out_features(i) floats (overwritten).
template <int DT, int K, int BMAX>
cudaError_t launch_gemv_lut(const GroupArgs& g, cudaStream_t stream);

// Tensor-core kernel (aqlm_cuda_mma.cuh) for 2x8g8/1x8g8/1x16g8/1x16g16, batch 1..8*NT (NT 1, 2, 4): partials of
// mma_num_splits(in) * batch * out floats (fully overwritten), summed by the split-K epilogue.
constexpr int mma_num_splits(int in_features) { return ((in_features / 8 + 31) / 32 + 7) / 8; }
template <int DT, int K, int LOG2NB, int G, int NT>
cudaError_t launch_gemm_mma(const GroupArgs& g, cudaStream_t stream);

}  // namespace aqlmkit_cuda
