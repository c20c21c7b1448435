// Split-K look-up-table kernel for Kx8 codebooks with in_group_size 8 (2x8g8, 1x8g8), batch 1..4.
//
// Why: F's gemv decodes every codeword (K half->float converts, adds, 8 FMAs per group): ~5 ALU
// ops per weight, so it is instruction bound at ~0.55 TB/s of codes. Here each thread block owns a
// slice of input groups (split-K) and first tabulates lut[t][c] = x_group . codeword_c for every
// code byte position t of its slice and every codeword c (fp32, one entry per batch row). A code
// byte then costs one byte extract, one address op, one shared-memory load and BMAX adds (for
// 2x8g8: ~1 op per weight). The byte at offset t of a row's slice (slice = S groups x K codebooks,
// contiguous in the AQLM layout) is exactly table t, so no group/codebook arithmetic is needed.
// Partial sums per (split, batch row, output row) go to an fp32 workspace; a second tiny kernel
// sums the splits in a fixed order (deterministic, no memset), scales and adds the bias.
#pragma once
#include "aqlm_cuda_kernels.cuh"

namespace aqlmkit_cuda {

constexpr int kLutThreads = 256;  // == codewords per codebook: thread c tabulates codeword c
constexpr int kLutPrefetch = 4;   // 16-byte code vectors per thread in flight

template <int BP>
struct LutEntry;
template <>
struct LutEntry<1> { using T = float; };
template <>
struct LutEntry<2> { using T = float2; };
template <>
struct LutEntry<4> { using T = float4; };

__device__ __forceinline__ void add_to(float* acc, const float& v) { acc[0] += v; }
__device__ __forceinline__ void add_to(float* acc, const float2& v) { acc[0] += v.x; acc[1] += v.y; }
__device__ __forceinline__ void add_to(float* acc, const float4& v) {
  acc[0] += v.x; acc[1] += v.y; acc[2] += v.z; acc[3] += v.w;
}
template <int BP>
__device__ __forceinline__ typename LutEntry<BP>::T make_entry(const float* v) {
  if constexpr (BP == 1) return v[0];
  else if constexpr (BP == 2) return make_float2(v[0], v[1]);
  else return make_float4(v[0], v[1], v[2], v[3]);
}

// 16 code bytes of one row's slice: one streaming 16-byte load when aligned and in range, else
// guarded byte loads (bytes past the row end read as 0; their tables are all-zero, see below).
__device__ __forceinline__ uint4 load_codes(const int8_t* row_ptr, int byte0, int row_bytes,
                                            bool vec) {
  if (vec) return __ldcs(reinterpret_cast<const uint4*>(row_ptr + byte0));
  uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
  for (int j = 0; j < 16; ++j)
    if (byte0 + j < row_bytes) w[j / 4] |= uint32_t(uint8_t(row_ptr[byte0 + j])) << (8 * (j % 4));
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// One shared-memory load of a BP-float entry at byte address addr + OFF (OFF an immediate).
// Inline PTX because nvcc otherwise re-derives every address from the shared base (IMAD + LEA
// per code); with an opaque per-thread base each code costs PRMT + LEA + LDS + adds. The
// "memory" clobber keeps these reads after the __syncthreads that publishes the tables.
template <int BP, int OFF>
__device__ __forceinline__ void lds_entry(uint32_t addr, float* v) {
  if constexpr (BP == 1) {
    asm volatile("ld.shared.f32 %0, [%1+%2];" : "=f"(v[0]) : "r"(addr), "n"(OFF) : "memory");
  } else if constexpr (BP == 2) {
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2+%3];" : "=f"(v[0]), "=f"(v[1]) : "r"(addr), "n"(OFF)
                 : "memory");
  } else {
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4+%5];"
                 : "=f"(v[0]), "=f"(v[1]), "=f"(v[2]), "=f"(v[3]) : "r"(addr), "n"(OFF)
                 : "memory");
  }
}

// Code byte T of a 16-byte vector: table T, entry c; two add chains (even/odd T).
template <int BP, int T>
__device__ __forceinline__ void lookup_from(uint32_t tb, const uint32_t* w, float* a0, float* a1) {
  if constexpr (T < 16) {
    const uint32_t c = __byte_perm(w[T / 4], 0u, 0x4440u | uint32_t(T % 4));
    float v[BP];
    lds_entry<BP, T * 256 * 4 * BP>(tb + c * (4 * BP), v);
    float* acc = T % 2 ? a1 : a0;
#pragma unroll
    for (int b = 0; b < BP; ++b) acc[b] += v[b];
    lookup_from<BP, T + 1>(tb, w, a0, a1);
  }
}

// Sum the 16 looked-up entries of one code vector; tb: shared byte address of this thread's
// first table.
template <int BP>
__device__ __forceinline__ void lookup16(uint32_t tb, const uint4& cv, float* out) {
  float a0[BP], a1[BP];
#pragma unroll
  for (int b = 0; b < BP; ++b) a0[b] = a1[b] = 0.f;
  const uint32_t w[4] = {cv.x, cv.y, cv.z, cv.w};
  lookup_from<BP, 0>(tb, w, a0, a1);
#pragma unroll
  for (int b = 0; b < BP; ++b) out[b] = a0[b] + a1[b];
}

// grid (nsplits, row_tiles); block: kLutThreads. CB code bytes (= tables) per row per slice.
template <int DT, int K, int BMAX, int CB>
__global__ void __launch_bounds__(kLutThreads)
    lut_kernel(GroupArgs grp, int passes) {
  const GemvArgs a = pick(grp);
  float* __restrict__ part = pick_part(grp);
  constexpr int BP = BMAX;
  constexpr int TPR = CB / 16;                 // threads per row (one 16-byte vector each)
  constexpr int RPP = kLutThreads / TPR;       // rows per pass
  constexpr int S = CB / K;                    // groups per slice
  static_assert(CB % 16 == 0 && CB % K == 0 && 32 % TPR == 0, "bad LUT slice");
  using E = typename LutEntry<BP>::T;
  extern __shared__ __align__(16) unsigned char smem[];
  E* lut = reinterpret_cast<E*>(smem);

  const int tid = threadIdx.x, split = blockIdx.x;
  const int out = a.out_features, batch = a.batch;
  const int ngroups = a.in_features / 8;
  const int row_bytes = ngroups * K;
  const int g0 = split * S;
  const int q = tid % TPR, rsub = tid / TPR;
  const int byte0 = split * CB + q * 16;
  const bool vec = ((row_bytes & 15) == 0) && ((reinterpret_cast<uintptr_t>(a.codes) & 15) == 0) &&
                   byte0 + 16 <= row_bytes;
  const int8_t* codes = reinterpret_cast<const int8_t*>(a.codes);
  const int row0 = blockIdx.y * passes * RPP + rsub;

  // 1) first code vectors in flight before the table build hides their latency.
  uint4 buf[kLutPrefetch];
#pragma unroll
  for (int u = 0; u < kLutPrefetch; ++u) {
    const int row = row0 + u * RPP;
    buf[u] = (u < passes && row < out)
                 ? load_codes(codes + (size_t)row * row_bytes, byte0, row_bytes, vec)
                 : make_uint4(0, 0, 0, 0);
  }

  // 2) the slice of x (S groups x batch rows) into shared memory once, so the table build below
  //    reads it at shared-memory latency instead of one dependent L2 round trip per group.
  uint4* xs = reinterpret_cast<uint4*>(smem + CB * 256 * sizeof(E));  // [BP][S]
  {
    const uint4* xg = reinterpret_cast<const uint4*>(a.x);
    for (int i = tid; i < BP * S; i += kLutThreads) {
      const int b = i / S, g = g0 + i % S;
      xs[i] = (b < batch && g < ngroups) ? __ldg(xg + (size_t)b * ngroups + g) : make_uint4(0, 0, 0, 0);
    }
  }
  __syncthreads();

  // 3) tables: thread c computes entry c of every table of the slice (conflict-free stores).
  //    Groups past the row end have all-zero x, hence all-zero tables: any code adds 0 there.
  {
    const int c = tid;
    const uint4* cbg = reinterpret_cast<const uint4*>(a.codebooks);
    float cw[K][8];
#pragma unroll
    for (int k = 0; k < K; ++k) unpack8<DT>(__ldg(cbg + k * 256 + c), cw[k]);
#pragma unroll 4
    for (int s = 0; s < S; ++s) {
      float v[K][BP];
#pragma unroll
      for (int b = 0; b < BP; ++b) {
        float xv[8];
        unpack8<DT>(xs[b * S + s], xv);  // same address for the whole warp: broadcast
#pragma unroll
        for (int k = 0; k < K; ++k) {
          float d = 0.f;
#pragma unroll
          for (int e = 0; e < 8; ++e) d = fmaf(xv[e], cw[k][e], d);
          v[k][b] = d;
        }
      }
#pragma unroll
      for (int k = 0; k < K; ++k) lut[(s * K + k) * 256 + c] = make_entry<BP>(v[k]);
    }
  }
  __syncthreads();

  pdl_trigger();  // the epilogue may be launched now; it waits for this grid to finish

  // 4) stream this block's rows: lookups, reduce the TPR threads of a row, write the partial.
  uint32_t tb = uint32_t(__cvta_generic_to_shared(lut)) + uint32_t(q * 16 * 256 * sizeof(E));
  asm volatile("" : "+r"(tb));  // opaque: keeps the per-code address at one LEA
  for (int p0 = 0; p0 < passes; p0 += kLutPrefetch) {
    uint4 cur[kLutPrefetch];
#pragma unroll
    for (int u = 0; u < kLutPrefetch; ++u) {
      cur[u] = buf[u];
      const int p = p0 + kLutPrefetch + u, row = row0 + p * RPP;
      buf[u] = (p < passes && row < out)
                   ? load_codes(codes + (size_t)row * row_bytes, byte0, row_bytes, vec)
                   : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kLutPrefetch; ++u) {
      if (p0 + u >= passes) break;  // uniform across the block
      float s[BP];
      lookup16<BP>(tb, cur[u], s);
#pragma unroll
      for (int b = 0; b < BP; ++b)
#pragma unroll
        for (int off = 1; off < TPR; off <<= 1) s[b] += __shfl_xor_sync(0xffffffffu, s[b], off);
      const int row = row0 + (p0 + u) * RPP;
      if (q == 0 && row < out) {
#pragma unroll
        for (int b = 0; b < BP; ++b)
          if (b < batch) part[((size_t)split * batch + b) * out + row] = s[b];
      }
    }
  }
}

template <int DT, int K, int BMAX>
cudaError_t launch_gemv_lut(const GroupArgs& g, cudaStream_t stream) {
  const GemvArgs& a = g.s[0];  // batch, in_features, num_sms: shared by the group
  constexpr int CB = lut_slice_bytes(BMAX);
  constexpr int RPP = kLutThreads / (CB / 16);
  constexpr int smem = CB * 256 * BMAX * 4 + BMAX * (CB / K) * 16;  // tables + x slice
  auto kernel = lut_kernel<DT, K, BMAX, CB>;
  static int occupancy = -1;  // per instantiation; host-side setup once (outside stream work)
  if (occupancy < 0) {
    const cudaError_t e = blocks_per_sm(kernel, kLutThreads, smem, &occupancy);
    if (e != cudaSuccess) return e;
  }
  if (lut_bmax(a.batch) != BMAX || a.in_features % 8 != 0) return cudaErrorInvalidValue;
  const int nsplits = lut_num_splits(a.in_features, K, a.batch);
  const int tiles = (group_max_out(g) + RPP - 1) / RPP;
  // One full wave: as many row tiles as resident blocks allow; each tile walks `passes` passes.
  int row_tiles = a.num_sms * occupancy / (nsplits * g.n);
  row_tiles = row_tiles < 1 ? 1 : (row_tiles > tiles ? tiles : row_tiles);
  const int passes = (tiles + row_tiles - 1) / row_tiles;
  row_tiles = (tiles + passes - 1) / passes;
  if (row_tiles > 65535) return cudaErrorInvalidValue;
  kernel<<<dim3(nsplits, row_tiles, g.n), kLutThreads, smem, stream>>>(g, passes);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  return launch_splitk_epilogue<DT>(g, nsplits, stream);
}

}  // namespace aqlmkit_cuda

#ifdef AQLMKIT_ARCH_SWEEP  // see aqlm_cuda_kernels.cuh: smallest and largest batch bound only
#define AQLMKIT_LUT_MID(DT, K)
#else
#define AQLMKIT_LUT_MID(DT, K) \
  template cudaError_t launch_gemv_lut<DT, K, 2>(const GroupArgs&, cudaStream_t);
#endif

#define AQLMKIT_INSTANTIATE_LUT(K)                                                              \
  namespace aqlmkit_cuda {                                                                      \
  template cudaError_t launch_gemv_lut<0, K, 1>(const GroupArgs&, cudaStream_t);                \
  AQLMKIT_LUT_MID(0, K)                                                                         \
  template cudaError_t launch_gemv_lut<0, K, 4>(const GroupArgs&, cudaStream_t);                \
  template cudaError_t launch_gemv_lut<1, K, 1>(const GroupArgs&, cudaStream_t);                \
  AQLMKIT_LUT_MID(1, K)                                                                         \
  template cudaError_t launch_gemv_lut<1, K, 4>(const GroupArgs&, cudaStream_t);                \
  }
