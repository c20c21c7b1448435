// Torch binding of the AQLM CUDA launchers: checks, dtype/scheme/batch dispatch, current stream
// (so CUDA-graph capture and torch.compile's cudagraphs see the launches on their stream).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include "aqlm_cuda.h"

namespace ac = aqlmkit_cuda;

namespace {

int dtype_tag(const at::Tensor& t) {
  if (t.scalar_type() == at::kHalf) return 0;
  if (t.scalar_type() == at::kBFloat16) return 1;
  TORCH_CHECK(false, "aqlmkit cuda: activations must be float16 or bfloat16, got ", t.scalar_type());
}

int num_sms(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) device = 0;
  if (cached[device] == 0) {
    int n = 0;
    TORCH_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) == cudaSuccess,
                "aqlmkit cuda: cannot read the multiprocessor count");
    cached[device] = n;
  }
  return cached[device];
}

int log2_exact(int64_t n) {
  int b = 0;
  while ((int64_t(1) << b) < n) ++b;
  TORCH_CHECK((int64_t(1) << b) == n, "aqlmkit cuda: codebook size ", n, " is not a power of two");
  return b;
}

template <int DT, int K, int G, int LOG2NB>
cudaError_t by_batch(const ac::GemvArgs& a, cudaStream_t s) {
  if (a.batch <= 1) return ac::launch_gemv<DT, K, G, LOG2NB, 1>(a, s);
  if (a.batch <= 2) return ac::launch_gemv<DT, K, G, LOG2NB, 2>(a, s);
  if (a.batch <= 4) return ac::launch_gemv<DT, K, G, LOG2NB, 4>(a, s);
  if (a.batch <= 8) return ac::launch_gemv<DT, K, G, LOG2NB, 8>(a, s);
  return ac::launch_gemv<DT, K, G, LOG2NB, 16>(a, s);
}

template <int DT>
cudaError_t by_scheme(int K, int nbits, int G, const ac::GemvArgs& a, cudaStream_t s) {
  if (K == 1 && nbits == 16 && G == 8) return by_batch<DT, 1, 8, 16>(a, s);
  if (K == 1 && nbits == 16 && G == 16) return by_batch<DT, 1, 16, 16>(a, s);
  if (K == 2 && nbits == 8 && G == 8) return by_batch<DT, 2, 8, 8>(a, s);
  if (K == 1 && nbits == 8 && G == 8) return by_batch<DT, 1, 8, 8>(a, s);
  TORCH_CHECK(false, "aqlmkit cuda gemv: no kernel for ", K, "x", nbits, "g", G,
              " (use the dequantize path)");
}

void check_common(const at::Tensor& codes, const at::Tensor& codebooks, const at::Tensor& scales) {
  TORCH_CHECK(codes.is_cuda() && codebooks.is_cuda() && scales.is_cuda(),
              "aqlmkit cuda: codes, codebooks and scales must be CUDA tensors");
  TORCH_CHECK(codes.dim() == 3 && codebooks.dim() == 4, "aqlmkit cuda: codes must be [O, I/g, K] "
              "and codebooks [K, 2^B, 1, g]");
  TORCH_CHECK(codebooks.size(2) == 1, "aqlmkit cuda: out_group_size must be 1");
  TORCH_CHECK(codes.scalar_type() == at::kChar || codes.scalar_type() == at::kShort,
              "aqlmkit cuda: codes must be int8 or int16");
  TORCH_CHECK(codes.size(2) == codebooks.size(0), "aqlmkit cuda: codes.shape[-1] != num_codebooks");
  TORCH_CHECK(scales.numel() == codes.size(0), "aqlmkit cuda: scales must have one entry per row");
  TORCH_CHECK(codes.is_contiguous() && codebooks.is_contiguous() && scales.is_contiguous(),
              "aqlmkit cuda: codes, codebooks and scales must be contiguous");
}

// Input checks shared by gemv and gemv_lut: x [batch, in] contiguous CUDA fp16/bf16, codebooks,
// scales and bias in x's dtype. Returns the dtype tag; `bias_ptr` is null without a bias.
int check_gemv_inputs(const char* op, const at::Tensor& x, const at::Tensor& codes,
                      const at::Tensor& codebooks, const at::Tensor& scales,
                      const c10::optional<at::Tensor>& bias, void** bias_ptr) {
  check_common(codes, codebooks, scales);
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "aqlmkit cuda ", op, ": x must be "
              "a contiguous CUDA [batch, in] tensor");
  const int dt = dtype_tag(x);
  TORCH_CHECK(codebooks.scalar_type() == x.scalar_type() && scales.scalar_type() == x.scalar_type(),
              "aqlmkit cuda ", op, ": codebooks and scales must have x's dtype");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "aqlmkit cuda ", op,
              ": x must be 16-byte aligned");
  *bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.is_cuda() && b.is_contiguous() && b.numel() == codes.size(0) &&
                b.scalar_type() == x.scalar_type(), "aqlmkit cuda ", op, ": bias must be a "
                "contiguous CUDA tensor of out_features entries in x's dtype");
    *bias_ptr = b.data_ptr();
  }
  return dt;
}

}  // namespace

// y = x @ W^T * scales + bias for x [batch <= 16, in]; codebooks/scales/bias in x's dtype.
at::Tensor gemv(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                const at::Tensor& scales, const c10::optional<at::Tensor>& bias) {
  void* bias_ptr = nullptr;
  const int dt = check_gemv_inputs("gemv", x, codes, codebooks, scales, bias, &bias_ptr);
  const int64_t batch = x.size(0), in = x.size(1), out = codes.size(0);
  const int G = int(codebooks.size(3)), K = int(codebooks.size(0));
  TORCH_CHECK(batch >= 1 && batch <= 16, "aqlmkit cuda gemv: batch must be 1..16, got ", batch);
  TORCH_CHECK(in == codes.size(1) * G && in % 8 == 0, "aqlmkit cuda gemv: in_features mismatch");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty({batch, out}, x.options());
  if (out == 0) return y;
  ac::GemvArgs a{x.data_ptr(), codes.data_ptr(), codebooks.data_ptr(), scales.data_ptr(),
                 bias_ptr, y.data_ptr(), int(batch), int(in), int(out), num_sms(x.get_device())};
  const int nbits = log2_exact(codebooks.size(1));
  cudaStream_t s = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = dt == 0 ? by_scheme<0>(K, nbits, G, a, s) : by_scheme<1>(K, nbits, G, a, s);
  TORCH_CHECK(err == cudaSuccess, "aqlmkit cuda gemv launch failed: ", cudaGetErrorString(err));
  return y;
}

// W[out, in] = scales * sum_k codebooks[k, codes[..., k]] in the codebooks' dtype (any KxB/g).
at::Tensor dequant(const at::Tensor& codes, const at::Tensor& codebooks, const at::Tensor& scales) {
  check_common(codes, codebooks, scales);
  const int dt = dtype_tag(codebooks);
  TORCH_CHECK(scales.scalar_type() == codebooks.scalar_type(), "aqlmkit cuda dequant: scales dtype");
  const int G = int(codebooks.size(3));
  const int64_t out = codes.size(0), in = codes.size(1) * G;
  const int nbits = log2_exact(codebooks.size(1));
  TORCH_CHECK(nbits <= 16, "aqlmkit cuda dequant: at most 2^16 codewords");
  const c10::cuda::CUDAGuard guard(codes.device());
  auto w = at::empty({out, in}, codebooks.options());
  ac::DequantArgs a{codes.data_ptr(), codebooks.data_ptr(), scales.data_ptr(), w.data_ptr(),
                    int(out), int(in), int(codebooks.size(0)), nbits, G,
                    int(codes.element_size())};
  const cudaError_t err = ac::launch_dequant(a, dt, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "aqlmkit cuda dequant launch failed: ", cudaGetErrorString(err));
  return w;
}

namespace {
template <int DT, int K>
cudaError_t lut_by_batch(const ac::GemvArgs& a, float* part, cudaStream_t s) {
  if (a.batch <= 1) return ac::launch_gemv_lut<DT, K, 1>(a, part, s);
  if (a.batch <= 2) return ac::launch_gemv_lut<DT, K, 2>(a, part, s);
  return ac::launch_gemv_lut<DT, K, 4>(a, part, s);
}
}  // namespace

// Split-K LUT variant of gemv (engineer G) for 1x8g8/2x8g8, batch 1..4: same contract as gemv.
at::Tensor gemv_lut(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                    const at::Tensor& scales, const c10::optional<at::Tensor>& bias) {
  void* bias_ptr = nullptr;
  const int dt = check_gemv_inputs("gemv_lut", x, codes, codebooks, scales, bias, &bias_ptr);
  const int K = int(codebooks.size(0));
  TORCH_CHECK((K == 1 || K == 2) && codebooks.size(1) == 256 && codebooks.size(3) == 8 &&
              codes.scalar_type() == at::kChar, "aqlmkit cuda gemv_lut: only 1x8g8/2x8g8 with "
              "int8 codes (use gemv or dequant)");
  const int64_t batch = x.size(0), in = x.size(1), out = codes.size(0);
  TORCH_CHECK(batch >= 1 && batch <= 4, "aqlmkit cuda gemv_lut: batch must be 1..4, got ", batch);
  TORCH_CHECK(in == codes.size(1) * 8, "aqlmkit cuda gemv_lut: in_features mismatch");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(codebooks.data_ptr()) % 16 == 0,
              "aqlmkit cuda gemv_lut: codebooks must be 16-byte aligned");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty({batch, out}, x.options());
  if (out == 0) return y;
  const int nsplits = ac::lut_num_splits(int(in), K, int(batch));
  auto part = at::empty({int64_t(nsplits) * batch * out}, x.options().dtype(at::kFloat));
  ac::GemvArgs a{x.data_ptr(), codes.data_ptr(), codebooks.data_ptr(), scales.data_ptr(),
                 bias_ptr, y.data_ptr(), int(batch), int(in), int(out), num_sms(x.get_device())};
  cudaStream_t s = c10::cuda::getCurrentCUDAStream();
  float* p = part.data_ptr<float>();
  const cudaError_t err = dt == 0 ? (K == 2 ? lut_by_batch<0, 2>(a, p, s) : lut_by_batch<0, 1>(a, p, s))
                                  : (K == 2 ? lut_by_batch<1, 2>(a, p, s) : lut_by_batch<1, 1>(a, p, s));
  TORCH_CHECK(err == cudaSuccess, "aqlmkit cuda gemv_lut launch failed: ", cudaGetErrorString(err));
  return y;
}

namespace {
template <int DT, int K, int LOG2NB, int G>
cudaError_t mma_by_batch(const ac::GemvArgs& a, float* part, cudaStream_t s) {
  if (a.batch <= 8) return ac::launch_gemm_mma<DT, K, LOG2NB, G, 1>(a, part, s);
  return ac::launch_gemm_mma<DT, K, LOG2NB, G, 2>(a, part, s);
}

template <int DT>
cudaError_t mma_by_scheme(int K, int nbits, int G, const ac::GemvArgs& a, float* part,
                          cudaStream_t s) {
  if (K == 2 && nbits == 8 && G == 8) return mma_by_batch<DT, 2, 8, 8>(a, part, s);
  if (K == 1 && nbits == 8 && G == 8) return mma_by_batch<DT, 1, 8, 8>(a, part, s);
  if (K == 1 && nbits == 16 && G == 8) return mma_by_batch<DT, 1, 16, 8>(a, part, s);
  if (K == 1 && nbits == 16 && G == 16) return mma_by_batch<DT, 1, 16, 16>(a, part, s);
  TORCH_CHECK(false, "aqlmkit cuda gemm_mma: no kernel for ", K, "x", nbits, "g", G, " (use gemv "
              "or the dequantize path)");
}
}  // namespace

// Tensor-core variant (aqlm_cuda_mma.cuh) for 2x8g8, 1x8g8, 1x16g8, 1x16g16, batch 1..16: same
// contract as gemv.
at::Tensor gemm_mma(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                    const at::Tensor& scales, const c10::optional<at::Tensor>& bias) {
  void* bias_ptr = nullptr;
  const int dt = check_gemv_inputs("gemm_mma", x, codes, codebooks, scales, bias, &bias_ptr);
  const int K = int(codebooks.size(0));
  const int G = int(codebooks.size(3));
  TORCH_CHECK(G == 8 || G == 16, "aqlmkit cuda gemm_mma: in_group_size must be 8 or 16");
  const int nbits = log2_exact(codebooks.size(1));
  const int64_t batch = x.size(0), in = x.size(1), out = codes.size(0);
  TORCH_CHECK(batch >= 1 && batch <= 16, "aqlmkit cuda gemm_mma: batch must be 1..16, got ", batch);
  TORCH_CHECK(in == codes.size(1) * G, "aqlmkit cuda gemm_mma: in_features mismatch");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(codebooks.data_ptr()) % 16 == 0,
              "aqlmkit cuda gemm_mma: codebooks must be 16-byte aligned");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty({batch, out}, x.options());
  if (out == 0) return y;
  auto part = at::empty({int64_t(ac::mma_num_splits(int(in))) * batch * out},
                        x.options().dtype(at::kFloat));
  ac::GemvArgs a{x.data_ptr(), codes.data_ptr(), codebooks.data_ptr(), scales.data_ptr(),
                 bias_ptr, y.data_ptr(), int(batch), int(in), int(out), num_sms(x.get_device())};
  cudaStream_t s = c10::cuda::getCurrentCUDAStream();
  float* p = part.data_ptr<float>();
  const cudaError_t err = dt == 0 ? mma_by_scheme<0>(K, nbits, G, a, p, s)
                                  : mma_by_scheme<1>(K, nbits, G, a, p, s);
  TORCH_CHECK(err == cudaSuccess, "aqlmkit cuda gemm_mma launch failed: ", cudaGetErrorString(err));
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "AQLM matmul for batch 1..16 (fp16/bf16)");
  m.def("gemv_lut", &gemv_lut, "split-K LUT AQLM matmul for 1x8g8/2x8g8, batch 1..4");
  m.def("gemm_mma", &gemm_mma, "tensor-core AQLM matmul for 2x8g8/1x8g8/1x16g8/1x16g16, batch 1..16");
  m.def("dequant", &dequant, "AQLM dequantization to a dense [out, in] weight");
}
