// The decode op of QuantizedLinear: torch.ops.aqlmkit.cpu_lut_packed_linear (schema in aqlm_cpu.cpp).
//
// Operands are prepared once per layer on the Python side (kernels.cpu.pack): codes transposed to
// [G*K, O64] uint8 (O padded to 64, permuted inside each 64-block, see plane_pos), codebooks
// transposed to fp32 [K, g, S], scales/bias fp32 [O]. With codes transposed, 64 consecutive outputs
// read 64 contiguous code bytes of one table, so one byte permute serves 64 outputs.
//
// B = 8 with AVX-512 VBMI (the fused path): for each of the G*K tables, its 256 entries
// (x[group] . codeword) are computed in 16 registers, transposed into 4 byte planes there, and
// looked up for every output block at once, so a table never goes through memory and the next
// table's code bytes stream in while this one is built. Groups split across threads, each with its
// own partial sums. Same table values as the LUT path; tables are summed codebook-major.
// Otherwise (B < 8, or no VBMI): LUT in memory (aqlmkit_cpu::build_lut), then the lookups.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <vector>

#include "aqlm_cpu.h"

namespace {

using at::Tensor;
using aqlmkit_cpu::Shape;

// Work a second thread must get before a layer is split across threads. Waking OpenMP workers
// costs ~10-50 us (more on a busy machine), about a whole batch-1 layer of this kernel, so
// decode-sized layers of small models run on the calling thread.
constexpr int64_t kBuildFmaPerThread = int64_t(1) << 22;
constexpr int64_t kLookupsPerThread = int64_t(1) << 20;
// Fused path: estimated cycles (see fused_cycles) each thread must get before a layer is split.
// Low on purpose: back-to-back decode layers keep OpenMP's workers spinning, so a split costs a
// few us; measured on 2 cores, 2 threads: 2x8g8 decode layers 1.2-1.35x, 8x8g16 1.5x faster than
// 2^17 (which left every 2x8g8 layer on one thread).
constexpr int64_t kFusedCyclesPerThread = int64_t(1) << 14;
// Code rows fetched ahead of the table being built: a table takes ~100-300 ns, about one DRAM
// round trip, and the codes of a 2-bit model are most of what a decode step reads.
constexpr int64_t kPrefetchTables = 2;

// Scratch reused across calls: a fresh few-hundred-KiB malloc per call becomes mmap + page faults
// on glibc, which costs as much as the lookups themselves at batch 1.
float* scratch(std::vector<float>& buf, int64_t n) {
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// Output position <-> code position inside a block of 64 outputs. The byte-plane lookup below
// ends with two rounds of in-lane unpacks, which leave code position 16l+4j+m in dword 4l+m of
// result j; kernels.cpu.pack stores output 16j+4l+m at that code position, so results come out
// in natural order. The map swaps l and j, so it is its own inverse.
inline int64_t plane_pos(int64_t r) { return (r & 3) | ((r >> 4) << 2) | (((r >> 2) & 3) << 4); }

#if defined(__AVX512VBMI__) && defined(__AVX512BW__)
#define AQLMKIT_FUSED 1
// 64 fp32 table entries (4 registers) -> 4 byte planes: P[p] byte j = byte p of entry j. One
// vpermb per 16 entries gathers each plane's bytes into one 128-bit lane, then a 4x4 transpose of
// lanes (8 vshufi64x2): 12 single-uop shuffles (8 two-uop vpermt2b + 4 blends before).
inline void byte_planes64(const __m512i v_in[4], __m512i P[4]) {
  alignas(64) static const uint8_t kGroup[64] = {
      0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60,
      1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61,
      2, 6, 10, 14, 18, 22, 26, 30, 34, 38, 42, 46, 50, 54, 58, 62,
      3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 43, 47, 51, 55, 59, 63};
  const __m512i g = _mm512_load_si512(kGroup);
  __m512i v[4];
  for (int i = 0; i < 4; ++i) v[i] = _mm512_permutexvar_epi8(g, v_in[i]);
  const __m512i t0 = _mm512_shuffle_i64x2(v[0], v[1], _MM_SHUFFLE(1, 0, 1, 0));  // [A0 A1 B0 B1]
  const __m512i t1 = _mm512_shuffle_i64x2(v[0], v[1], _MM_SHUFFLE(3, 2, 3, 2));  // [A2 A3 B2 B3]
  const __m512i t2 = _mm512_shuffle_i64x2(v[2], v[3], _MM_SHUFFLE(1, 0, 1, 0));  // [C0 C1 D0 D1]
  const __m512i t3 = _mm512_shuffle_i64x2(v[2], v[3], _MM_SHUFFLE(3, 2, 3, 2));  // [C2 C3 D2 D3]
  P[0] = _mm512_shuffle_i64x2(t0, t2, _MM_SHUFFLE(2, 0, 2, 0));  // [A0 B0 C0 D0]
  P[1] = _mm512_shuffle_i64x2(t0, t2, _MM_SHUFFLE(3, 1, 3, 1));
  P[2] = _mm512_shuffle_i64x2(t1, t3, _MM_SHUFFLE(2, 0, 2, 0));
  P[3] = _mm512_shuffle_i64x2(t1, t3, _MM_SHUFFLE(3, 1, 3, 1));
}

// A 256-entry table in memory -> P[plane][chunk of 64 entries].
inline void table_planes(const float* table, __m512i P[4][4]) {
  for (int q = 0; q < 4; ++q) {
    __m512i v[4], pl[4];
    for (int i = 0; i < 4; ++i) v[i] = _mm512_castps_si512(_mm512_loadu_ps(table + 64 * q + 16 * i));
    byte_planes64(v, pl);
    for (int p = 0; p < 4; ++p) P[p][q] = pl[p];
  }
}

// The table of one (input group, codebook) straight into planes: entry c = sum_d xs[d] * cb[d][c]
// (cb: fp32 [g, 256]), FMAs in the same order as build_lut, so the values are identical.
inline void built_planes(const float* xs, const float* cb, int64_t g, __m512i P[4][4]) {
  __m512 acc[16];
  for (int c = 0; c < 16; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < g; ++d) {
    const __m512 xv = _mm512_set1_ps(xs[d]);
    const float* w = cb + d * 256;
    for (int c = 0; c < 16; ++c) acc[c] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + 16 * c), acc[c]);
  }
  for (int q = 0; q < 4; ++q) {
    const __m512i v[4] = {_mm512_castps_si512(acc[4 * q]), _mm512_castps_si512(acc[4 * q + 1]),
                          _mm512_castps_si512(acc[4 * q + 2]), _mm512_castps_si512(acc[4 * q + 3])};
    __m512i pl[4];
    byte_planes64(v, pl);
    for (int p = 0; p < 4; ++p) P[p][q] = pl[p];
  }
}

// ybuf[o] += table[codes[o]] for 64-output blocks [b, e); the table is 4 planes x 4 chunks of 64
// entries in registers, and vpermt2b looks up 64 codes per plane and 128 entries per instruction
// (~3x the rate of vgatherdps, which is bound by one load per element).
inline void lookup_blocks(const __m512i P[4][4], const uint8_t* codes, float* ybuf, int64_t b, int64_t e,
                          uint8_t mask) {
  const __m512i vmask = _mm512_set1_epi8(static_cast<char>(mask));
  for (int64_t blk = b; blk < e; ++blk) {
    __m512i c = _mm512_loadu_si512(codes + blk * 64);
    if (mask != 0xFF) c = _mm512_and_si512(c, vmask);
    const __mmask64 top = _mm512_movepi8_mask(c);
    __m512i v[4];
    for (int pl = 0; pl < 4; ++pl)
      v[pl] = _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(P[pl][0], c, P[pl][1]),
                                     _mm512_permutex2var_epi8(P[pl][2], c, P[pl][3]));
    const __m512i w0 = _mm512_unpacklo_epi8(v[0], v[1]), w1 = _mm512_unpackhi_epi8(v[0], v[1]);
    const __m512i w2 = _mm512_unpacklo_epi8(v[2], v[3]), w3 = _mm512_unpackhi_epi8(v[2], v[3]);
    float* yb = ybuf + blk * 64;
    const __m512i r[4] = {_mm512_unpacklo_epi16(w0, w2), _mm512_unpackhi_epi16(w0, w2),
                          _mm512_unpacklo_epi16(w1, w3), _mm512_unpackhi_epi16(w1, w3)};
    for (int j = 0; j < 4; ++j)
      _mm512_storeu_ps(yb + 16 * j, _mm512_add_ps(_mm512_loadu_ps(yb + 16 * j), _mm512_castsi512_ps(r[j])));
  }
}

// Groups [j0, j1) of every input row, all K codebooks, added into ybuf [N, O64]. Codebook-outer:
// one codebook (g KiB) stays in L1 across the groups (K x g KiB of them would not, for K x 8 g16);
// row-inner: a table's code bytes (row j * K + k of codes_t) are read from memory once.
void fused_tables(const float* x, const uint8_t* codesT, const float* cbT, float* ybuf, const Shape& s,
                  int64_t O64, int64_t j0, int64_t j1) {
  const int64_t nblk = O64 / 64;
  for (int64_t k = 0; k < s.K; ++k) {
    const float* cb = cbT + k * s.g * 256;
    for (int64_t j = j0; j < j1; ++j) {
      if (j + kPrefetchTables < j1) {
        const char* ahead = reinterpret_cast<const char*>(codesT + ((j + kPrefetchTables) * s.K + k) * O64);
        for (int64_t off = 0; off < O64; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T0);
      }
      const uint8_t* codes = codesT + (j * s.K + k) * O64;
      for (int64_t n = 0; n < s.N; ++n) {
        __m512i P[4][4];
        built_planes(x + n * s.in + j * s.g, cb, s.g, P);
        lookup_blocks(P, codes, ybuf + n * O64, 0, nblk, 0xFF);
      }
    }
  }
}

// Rough cycles of the fused path (build + transpose + lookups), to decide on threads.
int64_t fused_cycles(const Shape& s, int64_t O64) {
  return s.G * s.K * s.N * (8 * s.g + 48 + 20 * (O64 / 64));
}

// ybuf [N, O64] = sum over all tables; one partial buffer per chunk of tables when split.
void fused_sums(const float* x, const uint8_t* ct, const float* cbT, float* ybuf, const Shape& s, int64_t O64) {
  const int64_t len = s.N * O64;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(
      {at::get_num_threads(), fused_cycles(s, O64) / kFusedCyclesPerThread, s.G}));
  if (chunks == 1) {
    std::fill(ybuf, ybuf + len, 0.f);
    fused_tables(x, ct, cbT, ybuf, s, O64, 0, s.G);
    return;
  }
  thread_local std::vector<float> parts_buf;
  float* parts = scratch(parts_buf, chunks * len);
  std::fill(parts, parts + chunks * len, 0.f);
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c)
      fused_tables(x, ct, cbT, parts + c * len, s, O64, s.G * c / chunks, s.G * (c + 1) / chunks);
  });
  std::copy(parts, parts + len, ybuf);
  for (int64_t c = 1; c < chunks; ++c)
    for (int64_t t = 0; t < len; ++t) ybuf[t] += parts[c * len + t];
}
#endif

// LUT path, one input row: ybuf[o] = sum_i lut[i][codes_t[i][pos(o)]] over 64-output blocks [b, e).
void lut_lookup_packed(const float* lut, const uint8_t* codesT, float* ybuf, int64_t O64, int64_t GK,
                       int64_t S, uint32_t mask, int64_t b, int64_t e) {
  for (int64_t o = b * 64; o < e * 64; ++o) ybuf[o] = 0.f;
#ifdef AQLMKIT_FUSED
  alignas(64) float padded[256];
  for (int64_t i = 0; i < GK; ++i) {
    const float* t = lut + i * S;
    if (S < 256) {  // B < 8: zero-pad; masked codes never reach the padding
      for (int64_t c = 0; c < 256; ++c) padded[c] = c < S ? t[c] : 0.f;
      t = padded;
    }
    __m512i P[4][4];
    table_planes(t, P);
    lookup_blocks(P, codesT + i * O64, ybuf, b, e, static_cast<uint8_t>(mask));
  }
#else
  for (int64_t i = 0; i < GK; ++i) {
    const float* t = lut + i * S;
    const uint8_t* c = codesT + i * O64;
    for (int64_t blk = b; blk < e; ++blk)
      for (int64_t r = 0; r < 64; ++r) ybuf[blk * 64 + r] += t[c[blk * 64 + plane_pos(r)] & mask];
  }
#endif
}

// ybuf [N, O64] through a LUT in memory; output blocks split across threads.
void lut_sums(const float* x, const uint8_t* ct, const float* cbT, float* ybuf, const Shape& s, int64_t O64) {
  const int64_t GK = s.G * s.K;
  thread_local std::vector<float> lut_buf;
  float* lut = scratch(lut_buf, s.N * GK * s.S);
  const int64_t per_blk = 4 * s.K * s.S * s.g;  // ~4M FMAs per thread before a second one pays
  aqlmkit_cpu::build_lut(x, cbT, lut, s, std::max<int64_t>(1, kBuildFmaPerThread / std::max<int64_t>(1, per_blk)));
  const uint32_t mask = static_cast<uint32_t>(s.S - 1);
  const int64_t grain = std::max<int64_t>(1, kLookupsPerThread / std::max<int64_t>(1, 64 * GK * s.N));
  at::parallel_for(0, O64 / 64, grain, [&](int64_t b, int64_t e) {
    for (int64_t n = 0; n < s.N; ++n)
      lut_lookup_packed(lut + n * GK * s.S, ct, ybuf + n * O64, O64, GK, s.S, mask, b, e);
  });
}

Shape packed_shape(const Tensor& x2, const Tensor& codes_t, const Tensor& cb_t, const Tensor& scales,
                   const c10::optional<Tensor>& bias) {
  TORCH_CHECK(codes_t.dim() == 2 && codes_t.scalar_type() == at::kChar && codes_t.is_contiguous(),
              "aqlmkit cpu_lut_packed: codes_t must be contiguous int8 [G*K, O padded to 64] (kernels.cpu.pack)");
  TORCH_CHECK(cb_t.dim() == 3 && cb_t.scalar_type() == at::kFloat && cb_t.is_contiguous() && cb_t.size(2) <= 256,
              "aqlmkit cpu_lut_packed: cb_t must be contiguous fp32 [K, g, 2^B<=256]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 1,
              "aqlmkit cpu_lut_packed: scales must be contiguous fp32 [O]");
  const int64_t GK = codes_t.size(0), O64 = codes_t.size(1), O = scales.numel();
  TORCH_CHECK(O64 == (O + 63) / 64 * 64, "aqlmkit cpu_lut_packed: codes_t has ", O64,
              " columns, expected O=", O, " rounded up to 64 (kernels.cpu.pack)");
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == O,
                "aqlmkit cpu_lut_packed: bias must be contiguous fp32 [O]");
  Shape s;
  s.K = cb_t.size(0); s.g = cb_t.size(1); s.S = cb_t.size(2); s.O = O; s.N = x2.size(0); s.in = x2.size(1);
  s.G = s.in / std::max<int64_t>(1, s.g);
  TORCH_CHECK(s.G * s.g == s.in && s.G * s.K == GK, "aqlmkit cpu_lut_packed: x has ", s.in,
              " features, which does not match codes_t/cb_t");
  TORCH_CHECK((s.S & (s.S - 1)) == 0, "aqlmkit cpu_lut_packed: codebook size must be a power of two");
  return s;
}

Tensor lut_packed_op(const Tensor& x, const Tensor& codes_t, const Tensor& cb_t, const Tensor& scales,
                     const c10::optional<Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu(), "aqlmkit cpu kernels need CPU tensors");
  Tensor x2 = x.reshape({-1, x.size(-1)});
  if (x2.scalar_type() != at::kFloat) x2 = x2.to(at::kFloat);
  if (!x2.is_contiguous()) x2 = x2.contiguous();
  const Shape s = packed_shape(x2, codes_t, cb_t, scales, bias);
  const int64_t O = s.O, O64 = codes_t.size(1);
  Tensor out = at::empty({s.N, O}, x2.options());
  if (s.N > 0 && O > 0) {
    thread_local std::vector<float> ybuf_buf;
    float* ybuf = scratch(ybuf_buf, s.N * O64);
    const auto* ct = reinterpret_cast<const uint8_t*>(codes_t.data_ptr<int8_t>());
#ifdef AQLMKIT_FUSED
    if (s.S == 256)
      fused_sums(x2.data_ptr<float>(), ct, cb_t.data_ptr<float>(), ybuf, s, O64);
    else
#endif
      lut_sums(x2.data_ptr<float>(), ct, cb_t.data_ptr<float>(), ybuf, s, O64);
    const float* sc = scales.data_ptr<float>();
    const float* bp = bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
    float* y = out.data_ptr<float>();
    for (int64_t n = 0; n < s.N; ++n)
      for (int64_t o = 0; o < O; ++o) y[n * O + o] = ybuf[n * O64 + o] * sc[o] + (bp ? bp[o] : 0.f);
  }
  auto sizes = x.sizes().vec();
  sizes.back() = O;
  Tensor yv = out.view(sizes);
  return x.scalar_type() == at::kFloat ? yv : yv.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(aqlmkit, CPU, m) {
  m.impl("cpu_lut_packed_linear", &lut_packed_op);
}
