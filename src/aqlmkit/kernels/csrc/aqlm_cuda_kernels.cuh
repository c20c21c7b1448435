// AQLM CUDA kernels (out_group_size 1). Included only by the aqlm_cuda_*.cu instantiation files.
//
// gemv_kernel: batch 1..16. One warp owns R output rows; its lanes walk the input groups
// (lane-consecutive groups, so code loads coalesce and the fp32 copy of x in shared memory is read
// without bank conflicts). Each decoded codeword is reused for every batch row and each x vector for
// every one of the R rows. Codebooks that fit (2x8, 1x8: 4-8 KB) live in shared memory; 1x16
// codebooks (1-2 MiB) are gathered from L2 with ld.global.cg, U*R independent gathers in flight per
// lane because the gather latency, not bandwidth, bounds that case.
// dequant_kernel: any KxB/g; writes W[out, in] for the prefill path (then cuBLAS).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "aqlm_cuda.h"

namespace aqlmkit_cuda {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kSmemCap = 160 * 1024;  // most dynamic shared memory gemv opts into (sm_80: 163 KB)

// Dynamic shared memory gemv may use on the current device: the opt-in maximum per block, which
// is 64 KB on sm_75 and 99 KB on sm_86/89/120, capped at kSmemCap. Read once per device.
inline int smem_limit() {
  static int cached[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 48 * 1024;
  if (cached[dev] == 0) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess || v <= 0)
      v = 48 * 1024;
    cached[dev] = v < kSmemCap ? v : kSmemCap;
  }
  return cached[dev];
}

template <int DT>
struct Ty;
template <>
struct Ty<0> {
  using T = __half;
  static __device__ __forceinline__ float2 f2(uint32_t u) {
    __half2 h;
    memcpy(&h, &u, 4);
    return __half22float2(h);
  }
  static __device__ __forceinline__ float f(T v) { return __half2float(v); }
  static __device__ __forceinline__ T from(float v) { return __float2half_rn(v); }
};
template <>
struct Ty<1> {
  using T = __nv_bfloat16;
  static __device__ __forceinline__ float2 f2(uint32_t u) {
    __nv_bfloat162 h;
    memcpy(&h, &u, 4);
    return __bfloat1622float2(h);
  }
  static __device__ __forceinline__ float f(T v) { return __bfloat162float(v); }
  static __device__ __forceinline__ T from(float v) { return __float2bfloat16_rn(v); }
};

template <int LOG2NB>
using CodeT = std::conditional_t<(LOG2NB <= 8), int8_t, int16_t>;

// 8 consecutive activations (one 16-byte load) -> 8 floats.
template <int DT>
__device__ __forceinline__ void unpack8(const uint4& raw, float* out) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = Ty<DT>::f2(w[j]);
    out[2 * j] = f.x;
    out[2 * j + 1] = f.y;
  }
}

constexpr int kGpl = 8;              // consecutive groups per lane per warp step
constexpr int kStep = 32 * kGpl;     // groups per warp step

// Slot of group `grp` in the shared x copy: lane l reads groups 8l..8l+7 of each 256-group step,
// so storing group (8l + j) at slot (32j + l) makes the 16-byte reads of a warp bank-conflict free.
__device__ __forceinline__ int swz(int grp) {
  const int w = grp & (kStep - 1);
  return (grp - w) + (w & (kGpl - 1)) * 32 + (w >> 3);
}

// Copy x[:, c0:c0+clen] (native dtype, swizzled by group) into shared memory, row stride `stride`.
template <int G>
__device__ __forceinline__ void load_x(uint4* xs, const void* xv, int c0, int clen, int stride,
                                       int batch, int in) {
  constexpr int V = G / 8;
  const uint4* x = reinterpret_cast<const uint4*>(xv);
  const int n8 = clen / 8;
  for (int i = threadIdx.x; i < batch * n8; i += kThreads) {
    const int b = i / n8;
    const int e8 = i - b * n8;
    const int grp = e8 / V, v = e8 - grp * V;
    xs[(b * stride) / 8 + swz(grp) * V + v] = __ldg(x + ((size_t)b * in + c0) / 8 + e8);
  }
}

// The layer of a group this block serves (blockIdx.z); static indices keep the args in param space.
__device__ __forceinline__ GemvArgs pick(const GroupArgs& g) {
  if (blockIdx.z == 1) return g.s[1];
  if (blockIdx.z == 2) return g.s[2];
  return g.s[0];
}
__device__ __forceinline__ float* pick_part(const GroupArgs& g) {
  if (blockIdx.z == 1) return g.part[1];
  if (blockIdx.z == 2) return g.part[2];
  return g.part[0];
}

template <int DT, int K, int G, int LOG2NB, int BMAX, bool SMEM_CB>
__global__ void __launch_bounds__(kThreads)
    gemv_kernel(GroupArgs grp, int chunk, int stride) {
  const GemvArgs a = pick(grp);
  using T = typename Ty<DT>::T;
  using C = CodeT<LOG2NB>;
  constexpr int NB = 1 << LOG2NB;
  constexpr int V = G / 8;                          // 16-byte words per codeword
  constexpr int kVecBytes = kGpl * K * int(sizeof(C));  // code bytes a lane loads per step
  static_assert(G % 8 == 0, "gemv_kernel needs in_group_size % 8 == 0");
  static_assert(kVecBytes == 8 || kVecBytes == 16, "code vector must be 8 or 16 bytes");
  using CodeVec = std::conditional_t<kVecBytes == 16, uint4, uint2>;

  extern __shared__ __align__(16) unsigned char smem[];
  uint4* cbs = reinterpret_cast<uint4*>(smem);
  const uint4* cbg = reinterpret_cast<const uint4*>(a.codebooks);
  constexpr int kCbWords = SMEM_CB ? K * NB * V : 0;
  uint4* xs = cbs + kCbWords;
  if constexpr (SMEM_CB) {
    for (int i = threadIdx.x; i < kCbWords; i += kThreads) cbs[i] = __ldg(cbg + i);
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int in = a.in_features, out = a.out_features, batch = a.batch;
  const int ngroups = in / G;
  const C* codes = reinterpret_cast<const C*>(a.codes);
  const int tiles = (out + kWarps - 1) / kWarps;
  const bool vec_ok = (ngroups % kGpl == 0) && (reinterpret_cast<uintptr_t>(a.codes) % 16 == 0);
  const bool single = chunk >= in;
  if (single) load_x<G>(xs, a.x, 0, in, stride, batch, in);
  __syncthreads();

  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int row = tile * kWarps + warp;  // one output row per warp
    const bool row_ok = row < out;
    float acc[BMAX];
#pragma unroll
    for (int b = 0; b < BMAX; ++b) acc[b] = 0.f;

    for (int c0 = 0; c0 < in; c0 += chunk) {
      const int clen = min(chunk, in - c0);
      if (!single) {
        __syncthreads();
        load_x<G>(xs, a.x, c0, clen, stride, batch, in);
        __syncthreads();
      }
      const int gbase = c0 / G, ng = clen / G;
      const C* rc = codes + ((size_t)row * ngroups + gbase) * K;
      for (int s0 = 0; s0 < ng; s0 += kStep) {
        const int gl = s0 + lane * kGpl;  // this lane's first group
        // 1) codes: one 8/16-byte load per lane (coalesced), else guarded scalar loads.
        C cbuf[kGpl * K];
        if (vec_ok && row_ok && gl + kGpl <= ng) {
          const CodeVec cv = __ldcs(reinterpret_cast<const CodeVec*>(rc + (size_t)gl * K));
          memcpy(cbuf, &cv, kVecBytes);
        } else {
#pragma unroll
          for (int j = 0; j < kGpl * K; ++j)
            cbuf[j] = (row_ok && gl + j / K < ng) ? rc[(size_t)gl * K + j] : C(0);
        }
        // 2) all codeword fetches of the step, so kGpl*K*V loads are in flight at once.
        uint4 cw[kGpl][K][V];
#pragma unroll
        for (int j = 0; j < kGpl; ++j)
#pragma unroll
          for (int k = 0; k < K; ++k)
#pragma unroll
            for (int v = 0; v < V; ++v) {
              const int off = (k * NB + (int(cbuf[j * K + k]) & (NB - 1))) * V + v;
              if constexpr (SMEM_CB) cw[j][k][v] = cbs[off];
              else cw[j][k][v] = __ldcg(cbg + off);
            }
        // 3) math in fp32; each decoded codeword serves every batch row.
#pragma unroll
        for (int j = 0; j < kGpl; ++j) {
          if (gl + j >= ng) break;
          float w[G];
#pragma unroll
          for (int v = 0; v < V; ++v) unpack8<DT>(cw[j][0][v], &w[v * 8]);
#pragma unroll
          for (int k = 1; k < K; ++k)
#pragma unroll
            for (int v = 0; v < V; ++v) {
              float t[8];
              unpack8<DT>(cw[j][k][v], t);
#pragma unroll
              for (int e = 0; e < 8; ++e) w[v * 8 + e] += t[e];
            }
          const int slot = s0 + j * 32 + lane;  // == swz(gl + j)
#pragma unroll
          for (int b = 0; b < BMAX; ++b) {
            if (b >= batch) break;
            float s = 0.f;
#pragma unroll
            for (int v = 0; v < V; ++v) {
              float xv[8];
              unpack8<DT>(xs[(b * stride) / 8 + slot * V + v], xv);
#pragma unroll
              for (int e = 0; e < 8; ++e) s = fmaf(w[v * 8 + e], xv[e], s);
            }
            acc[b] += s;
          }
        }
      }
    }

    const T* scales = reinterpret_cast<const T*>(a.scales);
    const T* bias = reinterpret_cast<const T*>(a.bias);
    T* y = reinterpret_cast<T*>(a.y);
#pragma unroll
    for (int b = 0; b < BMAX; ++b) {
      float v = acc[b];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == b % 32 && b < batch && row_ok) {
        float o = v * Ty<DT>::f(scales[row]);
        if (bias != nullptr) o += Ty<DT>::f(bias[row]);
        y[(size_t)b * out + row] = Ty<DT>::from(o);
      }
    }
  }
}

template <int DT, int K, int G, int LOG2NB, int BMAX>
cudaError_t launch_gemv(const GroupArgs& g, cudaStream_t stream) {
  const GemvArgs& a = g.s[0];  // batch, in_features, num_sms: shared by the group
  constexpr int NB = 1 << LOG2NB;
  constexpr int kCbBytes = K * NB * G * 2;
  constexpr bool kSmemCb = kCbBytes <= 32 * 1024;
  auto kernel = gemv_kernel<DT, K, G, LOG2NB, BMAX, kSmemCb>;
  constexpr int cb_bytes = kSmemCb ? kCbBytes : 0;
  const int limit = smem_limit();
  static int occupancy = -1;  // per instantiation; set once (host calls, not stream work)
  if (occupancy < 0) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         limit);
    if (e != cudaSuccess) return e;
    int occ = 0;
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, kThreads, 32 * 1024);
    if (e != cudaSuccess) return e;
    occupancy = occ > 0 ? occ : 1;
  }
  // x lives in shared memory in its own dtype, padded to whole 256-group steps.
  const int step_elems = kStep * G;
  const int budget = (limit - cb_bytes) / (2 * a.batch);
  const int whole = (a.in_features + step_elems - 1) / step_elems * step_elems;
  int chunk, stride;
  if (whole <= budget) {
    chunk = a.in_features;
    stride = whole;
  } else {
    chunk = budget / step_elems * step_elems;
    if (chunk < step_elems) return cudaErrorInvalidValue;
    stride = chunk;
  }
  const int smem = cb_bytes + a.batch * stride * 2;
  const int tiles = (group_max_out(g) + kWarps - 1) / kWarps;
  int grid = a.num_sms * occupancy / g.n;
  grid = grid < 1 ? 1 : (grid > tiles ? tiles : grid);
  kernel<<<dim3(grid, 1, g.n), kThreads, smem, stream>>>(g, chunk, stride);
  return cudaGetLastError();
}

template <int DT>
__global__ void dequant_kernel(DequantArgs a) {
  using T = typename Ty<DT>::T;
  const int ngroups = a.in_features / a.group;
  const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= (long long)a.out_features * ngroups) return;
  const int row = int(t / ngroups), grp = int(t - (long long)row * ngroups);
  const int NB = 1 << a.nbits, G = a.group, K = a.num_codebooks;
  const T* cb = reinterpret_cast<const T*>(a.codebooks);
  T* w = reinterpret_cast<T*>(a.w) + (size_t)row * a.in_features + (size_t)grp * G;
  const float scale = Ty<DT>::f(reinterpret_cast<const T*>(a.scales)[row]);
  const size_t cbase = ((size_t)row * ngroups + grp) * K;
  auto code = [&](int k) -> int {
    const int c = a.code_bytes == 1 ? int(reinterpret_cast<const int8_t*>(a.codes)[cbase + k])
                                    : int(reinterpret_cast<const int16_t*>(a.codes)[cbase + k]);
    return c & (NB - 1);
  };
  if (G % 8 == 0) {
    for (int e0 = 0; e0 < G; e0 += 8) {
      float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int k = 0; k < K; ++k) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(cb + ((size_t)k * NB + code(k)) * G + e0));
        float f[8];
        unpack8<DT>(raw, f);
#pragma unroll
        for (int j = 0; j < 8; ++j) s[j] += f[j];
      }
      T o[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) o[j] = Ty<DT>::from(s[j] * scale);
      uint4 packed;
      memcpy(&packed, o, 16);
      *reinterpret_cast<uint4*>(w + e0) = packed;
    }
  } else {
    for (int e = 0; e < G; ++e) {
      float s = 0.f;
      for (int k = 0; k < K; ++k) s += Ty<DT>::f(cb[((size_t)k * NB + code(k)) * G + e]);
      w[e] = Ty<DT>::from(s * scale);
    }
  }
}

// Resident blocks per SM of `kernel` with `smem` bytes of dynamic shared memory (opting in above
// 48 KB), at least 1: the split-K launchers size one full wave with it. `occ` is left untouched
// when a call fails.
template <typename Kernel>
cudaError_t blocks_per_sm(Kernel kernel, int threads, int smem, int* occ) {
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  int n = 0;
  e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem);
  if (e == cudaSuccess) *occ = n > 0 ? n : 1;
  return e;
}

// Programmatic dependent launch (sm_90+): the split-K kernels let their epilogue be launched
// while they run (`pdl_trigger`, once every block is resident: they launch one wave), and the
// epilogue waits for their completion and memory (`pdl_wait`). This hides the second launch's
// latency, which matters at decode sizes (a 4096x4096 layer takes ~10 us). No-ops before sm_90.
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Split-K epilogue shared by the LUT and mma kernels: y[b, o] = scale[o] * sum_split
// part[split, b, o] + bias[o], splits summed in a fixed order (deterministic, no atomics/memset).
template <int DT>
__global__ void splitk_epilogue(GroupArgs g, int nsplits) {
  using T = typename Ty<DT>::T;
  pdl_wait();
  const GemvArgs a = pick(g);
  const float* __restrict__ part = pick_part(g);
  const int out = a.out_features;
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long long)a.batch * out) return;
  const int o = int(i % out);
  float s = 0.f;
  for (int sp = 0; sp < nsplits; ++sp) s += part[(size_t)sp * a.batch * out + i];
  float r = s * Ty<DT>::f(reinterpret_cast<const T*>(a.scales)[o]);
  if (a.bias != nullptr) r += Ty<DT>::f(reinterpret_cast<const T*>(a.bias)[o]);
  reinterpret_cast<T*>(a.y)[i] = Ty<DT>::from(r);
}

// Whether the current device runs programmatic dependent launches (compute capability >= 9).
inline bool pdl_supported() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  static int cached[64] = {0};  // 0 unknown, 1 no, 2 yes
  if (dev < 0 || dev >= 64) return false;
  if (cached[dev] == 0) {
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cached[dev] = major >= 9 ? 2 : 1;
  }
  return cached[dev] == 2;
}

template <int DT>
cudaError_t launch_splitk_epilogue(const GroupArgs& g, int nsplits, cudaStream_t stream) {
  const long long n = (long long)g.s[0].batch * group_max_out(g);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned((n + 255) / 256), 1, unsigned(g.n));
  cfg.blockDim = dim3(256);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_supported() ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, splitk_epilogue<DT>, g, nsplits);
}

}  // namespace aqlmkit_cuda

// AQLMKIT_ARCH_SWEEP (the CI compile test's per-arch sweep, never a build that runs) instantiates
// only the smallest and largest batch bound of each dtype: the code differs between them only
// in unrolling, and the full set is compiled for sm_90 and for every real build.
#ifdef AQLMKIT_ARCH_SWEEP
#define AQLMKIT_GEMV_MID(DT, K, G, LOG2NB)
#else
#define AQLMKIT_GEMV_MID(DT, K, G, LOG2NB)                                                      \
  template cudaError_t launch_gemv<DT, K, G, LOG2NB, 2>(const GroupArgs&, cudaStream_t);        \
  template cudaError_t launch_gemv<DT, K, G, LOG2NB, 4>(const GroupArgs&, cudaStream_t);        \
  template cudaError_t launch_gemv<DT, K, G, LOG2NB, 8>(const GroupArgs&, cudaStream_t);
#endif

#define AQLMKIT_INSTANTIATE_GEMV(K, G, LOG2NB)                                                  \
  namespace aqlmkit_cuda {                                                                      \
  template cudaError_t launch_gemv<0, K, G, LOG2NB, 1>(const GroupArgs&, cudaStream_t);         \
  AQLMKIT_GEMV_MID(0, K, G, LOG2NB)                                                             \
  template cudaError_t launch_gemv<0, K, G, LOG2NB, 16>(const GroupArgs&, cudaStream_t);        \
  template cudaError_t launch_gemv<1, K, G, LOG2NB, 1>(const GroupArgs&, cudaStream_t);         \
  AQLMKIT_GEMV_MID(1, K, G, LOG2NB)                                                             \
  template cudaError_t launch_gemv<1, K, G, LOG2NB, 16>(const GroupArgs&, cudaStream_t);        \
  }
