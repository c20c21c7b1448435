// Tensor-core kernel for 2x8g8, 1x8g8, 1x16g8 and 1x16g16, batch 1..16: codewords are decoded
// straight into mma.sync A fragments, so no dense weight ever reaches memory.
//
// Why: gemv does BMAX fp32 FMAs per decoded weight (b16 costs ~4x b1) and dequant + cuBLAS moves
// the fp16 weight three times. Here a decoded weight costs K half2 adds per two weights plus a
// share of one m16n8k16 mma per 8 batch columns, so the cost barely grows with the batch.
//
// Fragment trick: mma sums over k in any order, so the k slots a lane owns in the A and B
// fragments (2t, 2t+1, 2t+8, 2t+9 for t = lane % 4) are mapped to 4 consecutive real columns.
// Two mmas then cover one 8-column unit per lane: each lane decodes 8 weights with one 16-byte
// gather per codebook and loads x as 16-byte vectors. Lane t of a warp owns units 8t..8t+7 of
// the warp's 256-column span (for g=16 a unit is half a codeword), so its codes for a row are one
// contiguous 8/16-byte load.
//
// Work split: warp w of block (bx, by) owns span bx*8+w (x fragments stay in registers) and walks
// 16-row tiles by, by+gridDim.y, ...; the 8 warps of a block reduce their tile through shared
// memory into one fp32 partial per block column; splitk_epilogue sums, scales and adds the bias.
#pragma once
#include "aqlm_cuda_kernels.cuh"

namespace aqlmkit_cuda {

constexpr int kMmaWarps = 8;
constexpr int kMmaThreads = 32 * kMmaWarps;
constexpr int kMmaSpanGroups = 32;  // 8-column units per warp span

// Packed 16-bit ops of dtype DT (0 fp16, 1 bf16) on raw 32-bit registers.
template <int DT>
struct MmaOps {
  using H2 = std::conditional_t<DT == 0, __half2, __nv_bfloat162>;
  static __device__ __forceinline__ uint32_t add2(uint32_t a, uint32_t b) {
    H2 x, y;
    memcpy(&x, &a, 4);
    memcpy(&y, &b, 4);
    const H2 r = __hadd2(x, y);
    uint32_t u;
    memcpy(&u, &r, 4);
    return u;
  }
  // c[16x8] += a[16x16] * b[16x8] (fp32 accumulators; fragment layouts of PTX m16n8k16).
  // m16n8k16 (f16 and bf16) exists from sm_80: older targets compile a trap, and the host side
  // (cuda.applies, gemm_mma's check) never launches this kernel there.
  static __device__ __forceinline__ void mma(float* c, uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();
#else
    if constexpr (DT == 0) {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
          "{%8,%9}, {%0,%1,%2,%3};"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    } else {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
          "{%8,%9}, {%0,%1,%2,%3};"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
#endif
  }
};

// NC codes of one row (a lane's 8 units: 8 / (G/8) groups x K codebooks): one vector load when
// aligned and whole, else guarded element loads (codes past the row end read 0; their x is 0).
template <typename C, int NC>
struct RowCodes {
  static constexpr int kBytes = NC * int(sizeof(C));
  static_assert(kBytes == 8 || kBytes == 16, "a lane's codes must be 8 or 16 bytes");
  uint32_t w[kBytes / 4];
  __device__ __forceinline__ void load(const C* p, int valid_codes, bool vec) {
    if (vec) {
      if constexpr (kBytes == 16) {
        const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
        w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
      } else {
        const uint2 v = __ldcs(reinterpret_cast<const uint2*>(p));
        w[0] = v.x, w[1] = v.y;
      }
      return;
    }
    C c[NC];
#pragma unroll
    for (int j = 0; j < NC; ++j) c[j] = j < valid_codes ? p[j] : C(0);
    memcpy(w, c, kBytes);
  }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kBytes / 4; ++i) w[i] = 0u;
  }
  // Unsigned code e (compile-time after unrolling).
  __device__ __forceinline__ uint32_t at(int e) const {
    if constexpr (sizeof(C) == 1) return (w[e / 4] >> (8 * (e % 4))) & 0xFFu;
    else return (w[e / 2] >> (16 * (e % 2))) & 0xFFFFu;
  }
};

// Decoded 8 weights (4 half2 words) of unit j of a lane's row codes; U = units per codeword.
template <int DT, int K, int NB, int U, bool SMEM_CB, typename RC>
__device__ __forceinline__ uint4 decode_unit(const RC& rc, int j, const uint4* cbs,
                                             const uint4* cbg) {
  uint4 w;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int off = (k * NB + int(rc.at((j / U) * K + k))) * U + j % U;
    const uint4 c = SMEM_CB ? cbs[off] : __ldcg(cbg + off);
    if (k == 0) {
      w = c;
    } else {
      w.x = MmaOps<DT>::add2(w.x, c.x);
      w.y = MmaOps<DT>::add2(w.y, c.y);
      w.z = MmaOps<DT>::add2(w.z, c.z);
      w.w = MmaOps<DT>::add2(w.w, c.w);
    }
  }
  return w;
}

// grid (span blocks, row groups), kMmaThreads threads; NT n-tiles of 8 batch columns.
// NT <= 2 fits 128 registers (2 blocks/SM); NT = 4 (batch 17..32) keeps 32 x fragments of 4
// registers each and runs 1 block/SM.
template <int DT, int K, int LOG2NB, int G, int NT>
__global__ void __launch_bounds__(kMmaThreads, NT >= 4 ? 1 : 2)
    mma_kernel(GroupArgs grp) {
  const GemvArgs a = pick(grp);
  float* __restrict__ part = pick_part(grp);
  using C = CodeT<LOG2NB>;
  using RC = RowCodes<C, 8 * K / (G / 8)>;
  constexpr int NB = 1 << LOG2NB;
  constexpr int U = G / 8;  // 8-column units per codeword
  constexpr bool SMEM_CB = LOG2NB <= 8;
  constexpr int NCOL = 8 * NT;
  extern __shared__ __align__(16) unsigned char smem[];
  uint4* cbs = reinterpret_cast<uint4*>(smem);
  float* red = reinterpret_cast<float*>(smem + (SMEM_CB ? K * NB * 16 : 0));  // [2][warps][16][NCOL]
  const uint4* cbg = reinterpret_cast<const uint4*>(a.codebooks);
  if constexpr (SMEM_CB) {
    for (int i = threadIdx.x; i < K * NB * U; i += kMmaThreads) cbs[i] = __ldg(cbg + i);
  }

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int in = a.in_features, out = a.out_features, batch = a.batch;
  const int ngroups = in / 8;  // 8-column units (the x layout)
  const int span = blockIdx.x * kMmaWarps + warp;
  const int grp0 = span * kMmaSpanGroups + 8 * t;  // this lane's first unit
  const int valid = max(0, min(8, ngroups - grp0));  // of its 8 units, how many exist
  const int tiles = (out + 15) / 16;
  const bool vec_ok = ((ngroups / U * K * int(sizeof(C))) % RC::kBytes == 0) &&
                      (reinterpret_cast<uintptr_t>(a.codes) % 16 == 0);
  const bool active = span * kMmaSpanGroups < ngroups;  // uniform per warp
  const bool vec = vec_ok && valid == 8;
  const int row_codes = ngroups / U * K;  // codes per row
  const int code0 = grp0 / U * K;          // this lane's first code in a row
  const int valid_codes = valid / U * K;

  // B fragments: x[n, 8*(grp0+j) .. +7] for n = nt*8 + g; zero past the batch or the row end.
  uint4 xr[NT][8];
  const uint4* xg = reinterpret_cast<const uint4*>(a.x);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int n = nt * 8 + g;
      xr[nt][j] = (n < batch && j < valid) ? __ldg(xg + (size_t)n * ngroups + grp0 + j)
                                           : make_uint4(0, 0, 0, 0);
    }
  __syncthreads();  // codebooks published
  pdl_trigger();    // the epilogue may be launched now; it waits for this grid to finish

  const C* codes = reinterpret_cast<const C*>(a.codes);
  auto load_tile = [&](int tile, RC& lo, RC& hi) {
    const int r = tile * 16 + g;
    if (active && tile < tiles && r < out)
      lo.load(codes + (size_t)r * row_codes + code0, valid_codes, vec);
    else lo.zero();
    if (active && tile < tiles && r + 8 < out)
      hi.load(codes + (size_t)(r + 8) * row_codes + code0, valid_codes, vec);
    else hi.zero();
  };

  RC lo, hi;
  int tile = blockIdx.y;
  load_tile(tile, lo, hi);
  for (int it = 0; tile < tiles; ++it, tile += gridDim.y) {
    RC nlo, nhi;
    load_tile(tile + gridDim.y, nlo, nhi);  // next tile's codes in flight during this one
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
    if (active) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const uint4 wl = decode_unit<DT, K, NB, U, SMEM_CB>(lo, j, cbs, cbg);
        const uint4 wh = decode_unit<DT, K, NB, U, SMEM_CB>(hi, j, cbs, cbg);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          MmaOps<DT>::mma(acc[nt], wl.x, wh.x, wl.y, wh.y, xr[nt][j].x, xr[nt][j].y);
          MmaOps<DT>::mma(acc[nt], wl.z, wh.z, wl.w, wh.w, xr[nt][j].z, xr[nt][j].w);
        }
      }
    }
    // Reduce the block's spans: C fragment (rows g, g+8; columns 2t, 2t+1) -> shared -> partial.
    float* rb = red + ((it & 1) * kMmaWarps + warp) * 16 * NCOL;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int c = nt * 8 + 2 * t;
      *reinterpret_cast<float2*>(rb + g * NCOL + c) = make_float2(acc[nt][0], acc[nt][1]);
      *reinterpret_cast<float2*>(rb + (g + 8) * NCOL + c) = make_float2(acc[nt][2], acc[nt][3]);
    }
    __syncthreads();  // double-buffered `red`: one barrier per tile
    for (int i = threadIdx.x; i < 16 * NCOL; i += kMmaThreads) {
      const int rl = i / NCOL, n = i % NCOL, row = tile * 16 + rl;
      if (n >= batch || row >= out) continue;
      const float* src = red + (it & 1) * kMmaWarps * 16 * NCOL + i;
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < kMmaWarps; ++w) s += src[w * 16 * NCOL];
      part[((size_t)blockIdx.x * batch + n) * out + row] = s;
    }
    lo = nlo;
    hi = nhi;
  }
}

static_assert(kMmaSpanGroups == 32 && kMmaWarps == 8, "mma_num_splits (aqlm_cuda.h) assumes these");

template <int DT, int K, int LOG2NB, int G, int NT>
cudaError_t launch_gemm_mma(const GroupArgs& g, cudaStream_t stream) {
  const GemvArgs& a = g.s[0];  // batch, in_features, num_sms: shared by the group
  constexpr int kCb = LOG2NB <= 8 ? K * (1 << LOG2NB) * G * 2 : 0;
  constexpr int smem = kCb + 2 * kMmaWarps * 16 * 8 * NT * 4;
  auto kernel = mma_kernel<DT, K, LOG2NB, G, NT>;
  static int occupancy = -1;  // per instantiation; host-side setup once (outside stream work)
  if (occupancy < 0) {
    const cudaError_t e = blocks_per_sm(kernel, kMmaThreads, smem, &occupancy);
    if (e != cudaSuccess) return e;
  }
  if (a.in_features % G != 0 || a.batch < 1 || a.batch > 8 * NT) return cudaErrorInvalidValue;
  const int nsplits = mma_num_splits(a.in_features);
  const int tiles = (group_max_out(g) + 15) / 16;
  int row_groups = a.num_sms * occupancy / (nsplits * g.n);
  row_groups = row_groups < 1 ? 1 : (row_groups > tiles ? tiles : row_groups);
  if (row_groups > 65535) row_groups = 65535;
  kernel<<<dim3(nsplits, row_groups, g.n), kMmaThreads, smem, stream>>>(g);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  return launch_splitk_epilogue<DT>(g, nsplits, stream);
}

}  // namespace aqlmkit_cuda

#ifdef AQLMKIT_ARCH_SWEEP  // see aqlm_cuda_kernels.cuh: smallest and largest batch bound only
#define AQLMKIT_MMA_MID(DT, K, LOG2NB, G)
#else
#define AQLMKIT_MMA_MID(DT, K, LOG2NB, G) \
  template cudaError_t launch_gemm_mma<DT, K, LOG2NB, G, 2>(const GroupArgs&, cudaStream_t);
#endif

#define AQLMKIT_INSTANTIATE_MMA(K, LOG2NB, G)                                                  \
  namespace aqlmkit_cuda {                                                                     \
  template cudaError_t launch_gemm_mma<0, K, LOG2NB, G, 1>(const GroupArgs&, cudaStream_t);    \
  AQLMKIT_MMA_MID(0, K, LOG2NB, G)                                                             \
  template cudaError_t launch_gemm_mma<0, K, LOG2NB, G, 4>(const GroupArgs&, cudaStream_t);    \
  template cudaError_t launch_gemm_mma<1, K, LOG2NB, G, 1>(const GroupArgs&, cudaStream_t);    \
  AQLMKIT_MMA_MID(1, K, LOG2NB, G)                                                             \
  template cudaError_t launch_gemm_mma<1, K, LOG2NB, G, 4>(const GroupArgs&, cudaStream_t);    \
  }
