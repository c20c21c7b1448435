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

// Compute capability as 10*major + minor (75, 80, 90, ...), cached per device.
int device_cc(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) device = 0;
  if (cached[device] == 0) {
    int major = 0, minor = 0;
    TORCH_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
                cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess,
                "aqlmkit cuda: cannot read the compute capability");
    cached[device] = 10 * major + minor;
  }
  return cached[device];
}

// The LUT and mma kernels need sm_80 (m16n8k16 mma, > 64 KB of shared memory per block).
void require_sm80(const char* op, const at::Tensor& x) {
  const int cc = device_cc(x.get_device());
  TORCH_CHECK(cc >= 80, "aqlmkit cuda ", op, " needs compute capability 8.0 or newer; this GPU is ",
              cc / 10, ".", cc % 10, " (use the gemv or dequantize path)");
}

int log2_exact(int64_t n) {
  int b = 0;
  while ((int64_t(1) << b) < n) ++b;
  TORCH_CHECK((int64_t(1) << b) == n, "aqlmkit cuda: codebook size ", n, " is not a power of two");
  return b;
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

template <int DT, int K, int G, int LOG2NB>
cudaError_t by_batch(const ac::GroupArgs& g, cudaStream_t s) {
  const int b = g.s[0].batch;
  if (b <= 1) return ac::launch_gemv<DT, K, G, LOG2NB, 1>(g, s);
  if (b <= 2) return ac::launch_gemv<DT, K, G, LOG2NB, 2>(g, s);
  if (b <= 4) return ac::launch_gemv<DT, K, G, LOG2NB, 4>(g, s);
  if (b <= 8) return ac::launch_gemv<DT, K, G, LOG2NB, 8>(g, s);
  return ac::launch_gemv<DT, K, G, LOG2NB, 16>(g, s);
}

template <int DT>
cudaError_t by_scheme(int K, int nbits, int G, const ac::GroupArgs& g, cudaStream_t s) {
  if (K == 1 && nbits == 16 && G == 8) return by_batch<DT, 1, 8, 16>(g, s);
  if (K == 1 && nbits == 16 && G == 16) return by_batch<DT, 1, 16, 16>(g, s);
  if (K == 2 && nbits == 8 && G == 8) return by_batch<DT, 2, 8, 8>(g, s);
  if (K == 1 && nbits == 8 && G == 8) return by_batch<DT, 1, 8, 8>(g, s);
  TORCH_CHECK(false, "aqlmkit cuda gemv: no kernel for ", K, "x", nbits, "g", G,
              " (use the dequantize path)");
}

template <int DT, int K>
cudaError_t lut_by_batch(const ac::GroupArgs& g, cudaStream_t s) {
  const int b = g.s[0].batch;
  if (b <= 1) return ac::launch_gemv_lut<DT, K, 1>(g, s);
  if (b <= 2) return ac::launch_gemv_lut<DT, K, 2>(g, s);
  return ac::launch_gemv_lut<DT, K, 4>(g, s);
}

template <int DT, int K, int LOG2NB, int G>
cudaError_t mma_by_batch(const ac::GroupArgs& g, cudaStream_t s) {
  if (g.s[0].batch <= 8) return ac::launch_gemm_mma<DT, K, LOG2NB, G, 1>(g, s);
  if (g.s[0].batch <= 16) return ac::launch_gemm_mma<DT, K, LOG2NB, G, 2>(g, s);
  return ac::launch_gemm_mma<DT, K, LOG2NB, G, 4>(g, s);
}

template <int DT>
cudaError_t mma_by_scheme(int K, int nbits, int G, const ac::GroupArgs& g, cudaStream_t s) {
  if (K == 2 && nbits == 8 && G == 8) return mma_by_batch<DT, 2, 8, 8>(g, s);
  if (K == 1 && nbits == 8 && G == 8) return mma_by_batch<DT, 1, 8, 8>(g, s);
  if (K == 1 && nbits == 16 && G == 8) return mma_by_batch<DT, 1, 16, 8>(g, s);
  if (K == 1 && nbits == 16 && G == 16) return mma_by_batch<DT, 1, 16, 16>(g, s);
  TORCH_CHECK(false, "aqlmkit cuda gemm_mma: no kernel for ", K, "x", nbits, "g", G, " (use gemv "
              "or the dequantize path)");
}

enum Path { kGemv = 0, kLut = 1, kMma = 2 };
const char* path_name(int path) { return path == kGemv ? "gemv" : path == kLut ? "gemv_lut" : "gemm_mma"; }

// Checks of one layer of a group against the first (same scheme and in_features: they share x and
// one template instantiation), per-path limits; fills its GemvArgs and allocates its output.
void add_layer(int path, ac::GroupArgs& g, int i, const at::Tensor& x, const at::Tensor& codes,
               const at::Tensor& codebooks, const at::Tensor& scales,
               const c10::optional<at::Tensor>& bias, std::vector<at::Tensor>& ys) {
  const char* op = path_name(path);
  void* bias_ptr = nullptr;
  check_gemv_inputs(op, x, codes, codebooks, scales, bias, &bias_ptr);
  const int64_t batch = x.size(0), in = x.size(1), out = codes.size(0);
  const int G = int(codebooks.size(3));
  TORCH_CHECK(in == codes.size(1) * G && in % 8 == 0, "aqlmkit cuda ", op, ": in_features mismatch");
  TORCH_CHECK(batch >= 1 && batch <= (path == kLut ? 4 : path == kMma ? 32 : 16), "aqlmkit cuda ", op,
              ": batch out of range, got ", batch);
  if (path != kGemv) {
    TORCH_CHECK(reinterpret_cast<uintptr_t>(codebooks.data_ptr()) % 16 == 0, "aqlmkit cuda ", op,
                ": codebooks must be 16-byte aligned");
  }
  if (path == kLut) {
    TORCH_CHECK((codebooks.size(0) == 1 || codebooks.size(0) == 2) && codebooks.size(1) == 256 &&
                G == 8 && codes.scalar_type() == at::kChar, "aqlmkit cuda gemv_lut: only 1x8g8/2x8g8 "
                "with int8 codes (use gemv or dequant)");
  }
  if (path == kMma) {
    TORCH_CHECK(G == 8 || G == 16, "aqlmkit cuda gemm_mma: in_group_size must be 8 or 16");
  }
  auto y = at::empty({batch, out}, x.options());
  ys.push_back(y);
  g.s[i] = ac::GemvArgs{x.data_ptr(), codes.data_ptr(), codebooks.data_ptr(), scales.data_ptr(),
                        bias_ptr, y.data_ptr(), int(batch), int(in), int(out), num_sms(x.get_device())};
  g.part[i] = nullptr;
}

}  // namespace

// ys[i] = x @ W_i^T * scales_i + bias_i for up to 3 layers sharing x [batch, in] (q/k/v, gate/up)
// in one launch; `path` 0 gemv (batch <= 16), 1 split-K LUT (1x8g8/2x8g8, batch <= 4), 2
// tensor-core mma (batch <= 32). Every layer has the same scheme and in_features.
std::vector<at::Tensor> group_matmul(int64_t path, const at::Tensor& x,
                                     const std::vector<at::Tensor>& codes,
                                     const std::vector<at::Tensor>& codebooks,
                                     const std::vector<at::Tensor>& scales,
                                     const std::vector<c10::optional<at::Tensor>>& bias) {
  const int n = int(codes.size());
  TORCH_CHECK(path >= 0 && path <= 2, "aqlmkit cuda: unknown path ", path);
  TORCH_CHECK(n >= 1 && n <= ac::kMaxSiblings && int(codebooks.size()) == n && int(scales.size()) == n &&
              int(bias.size()) == n, "aqlmkit cuda: a group has 1..", ac::kMaxSiblings,
              " layers, with one codes/codebooks/scales/bias entry each");
  if (path != kGemv) require_sm80(path_name(int(path)), x);
  const int K = int(codebooks[0].size(0)), G = int(codebooks[0].size(3));
  const int nbits = log2_exact(codebooks[0].size(1));
  const c10::cuda::CUDAGuard guard(x.device());
  ac::GroupArgs g{};
  g.n = n;
  std::vector<at::Tensor> ys;
  for (int i = 0; i < n; ++i) {
    TORCH_CHECK(codebooks[i].sizes() == codebooks[0].sizes() && codes[i].scalar_type() == codes[0].scalar_type()
                && codes[i].size(1) == codes[0].size(1), "aqlmkit cuda: the layers of a group must "
                "share scheme and in_features");
    add_layer(int(path), g, i, x, codes[i], codebooks[i], scales[i], bias[i], ys);
  }
  if (ac::group_max_out(g) == 0) return ys;
  at::Tensor part;
  if (path != kGemv) {
    const int batch = int(x.size(0)), in = int(x.size(1));
    const int64_t nsplits = path == kLut ? ac::lut_num_splits(in, K, batch) : ac::mma_num_splits(in);
    int64_t total = 0;
    for (int i = 0; i < n; ++i) total += nsplits * batch * g.s[i].out_features;
    part = at::empty({total}, x.options().dtype(at::kFloat));
    float* p = part.data_ptr<float>();
    for (int i = 0; i < n; ++i) {
      g.part[i] = p;
      p += nsplits * batch * g.s[i].out_features;
    }
  }
  cudaStream_t s = c10::cuda::getCurrentCUDAStream();
  const int dt = dtype_tag(x);
  cudaError_t err;
  if (path == kGemv) {
    err = dt == 0 ? by_scheme<0>(K, nbits, G, g, s) : by_scheme<1>(K, nbits, G, g, s);
  } else if (path == kLut) {
    err = dt == 0 ? (K == 2 ? lut_by_batch<0, 2>(g, s) : lut_by_batch<0, 1>(g, s))
                  : (K == 2 ? lut_by_batch<1, 2>(g, s) : lut_by_batch<1, 1>(g, s));
  } else {
    err = dt == 0 ? mma_by_scheme<0>(K, nbits, G, g, s) : mma_by_scheme<1>(K, nbits, G, g, s);
  }
  TORCH_CHECK(err == cudaSuccess, "aqlmkit cuda ", path_name(int(path)), " launch failed: ",
              cudaGetErrorString(err));
  return ys;
}

namespace {
at::Tensor single(int64_t path, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                  const at::Tensor& scales, const c10::optional<at::Tensor>& bias) {
  return group_matmul(path, x, {codes}, {codebooks}, {scales}, {bias})[0];
}
}  // namespace

// y = x @ W^T * scales + bias for x [batch <= 16, in]; codebooks/scales/bias in x's dtype.
at::Tensor gemv(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                const at::Tensor& scales, const c10::optional<at::Tensor>& bias) {
  return single(kGemv, x, codes, codebooks, scales, bias);
}

// Split-K LUT variant of gemv for 1x8g8/2x8g8, batch 1..4: same contract as gemv.
at::Tensor gemv_lut(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                    const at::Tensor& scales, const c10::optional<at::Tensor>& bias) {
  return single(kLut, x, codes, codebooks, scales, bias);
}

// Tensor-core variant (aqlm_cuda_mma.cuh) for 2x8g8, 1x8g8, 1x16g8, 1x16g16, batch 1..32: same
// contract as gemv.
at::Tensor gemm_mma(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                    const at::Tensor& scales, const c10::optional<at::Tensor>& bias) {
  return single(kMma, x, codes, codebooks, scales, bias);
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "AQLM matmul for batch 1..16 (fp16/bf16)");
  m.def("gemv_lut", &gemv_lut, "split-K LUT AQLM matmul for 1x8g8/2x8g8, batch 1..4");
  m.def("gemm_mma", &gemm_mma, "tensor-core AQLM matmul for 2x8g8/1x8g8/1x16g8/1x16g16, batch 1..16");
  m.def("dequant", &dequant, "AQLM dequantization to a dense [out, in] weight");
  m.def("group_matmul", &group_matmul, "1..3 AQLM layers sharing x in one launch (path 0 gemv, 1 lut, 2 mma)");
}
