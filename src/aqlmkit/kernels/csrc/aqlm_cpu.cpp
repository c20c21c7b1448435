// AQLM CPU kernels registered as torch.ops.aqlmkit.* (TORCH_LIBRARY_FRAGMENT, CPU impls; the
// packed decode op's implementation lives in aqlm_cpu_packed.cpp).
//
// Three paths, all computing y = x @ (scales * sum_k codebooks[k, codes[..., k]])^T + bias in fp32:
//   lut     Kx{B<=8}, small batch: per input group, the dot products of x with every codeword
//           (LUT [rows, groups*K, 2^B]) are built once, then each output row is a sum of
//           G*K looked-up floats. Cost per row ~ G*K loads instead of in_features FMAs + decode.
//   gather  any K, B (used for 1x16): per output row, decode each codeword from the codebook in
//           its stored dtype (fp16 via F16C) and FMA it with the input slice; the 2^16 x g
//           codebook stays in L2, so nothing is dequantized up front.
//   dequant prefill: dequantize tiles of output rows into an fp32 buffer and call at::mm, so
//           large batches run at GEMM speed without materializing a big layer at once.
//   lut_packed  the decode path of QuantizedLinear: same math as lut on operands packed once per
//           layer (kernels.cpu.pack); lookups via AVX-512 VBMI byte permutes (aqlm_cpu_packed.cpp).
//   half    dense GEMV over fp16/bf16-stored weights with fp32 activations and accumulation.
// Codes arrive as int8/int16 two's complement; they are masked to [0, 2^B) everywhere.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <cstdint>
#include <vector>

#include "aqlm_cpu.h"

namespace {

using at::Tensor;

using aqlmkit_cpu::Shape;
using aqlmkit_cpu::build_lut;

Shape shape_of(const Tensor& x2, const Tensor& codes, const Tensor& codebooks) {
  TORCH_CHECK(codebooks.dim() == 4 && codebooks.size(2) == 1,
              "aqlmkit cpu: codebooks must be [K, 2^B, 1, g] (out_group_size 1)");
  TORCH_CHECK(codes.dim() == 3, "aqlmkit cpu: codes must be [out, in/g, K]");
  Shape s;
  s.K = codebooks.size(0);
  s.S = codebooks.size(1);
  s.g = codebooks.size(3);
  s.O = codes.size(0);
  s.G = codes.size(1);
  s.in = x2.size(1);
  s.N = x2.size(0);
  TORCH_CHECK(codes.size(2) == s.K, "aqlmkit cpu: codes.shape[2] != num_codebooks");
  TORCH_CHECK(s.G * s.g == s.in, "aqlmkit cpu: in_features != groups * in_group_size");
  TORCH_CHECK((s.S & (s.S - 1)) == 0 && s.S <= 65536, "aqlmkit cpu: codebook size must be 2^B, B<=16");
  return s;
}

// Load 8 codebook entries as fp32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const c10::BFloat16* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

inline float hsum8(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// Elementwise fp32 view of a small float tensor (scales, bias, codebooks) without ATen ops:
// at decode time these calls run ~200 times per token, so a few us of dispatch each matters.
template <typename F>
void for_each_f32(const Tensor& t, F&& f) {
  Tensor c = t.is_contiguous() ? t : t.contiguous();
  const int64_t n = c.numel();
  switch (c.scalar_type()) {
    case at::kFloat: { const float* p = c.data_ptr<float>(); for (int64_t i = 0; i < n; ++i) f(i, p[i]); break; }
    case at::kHalf: { const c10::Half* p = c.data_ptr<c10::Half>(); for (int64_t i = 0; i < n; ++i) f(i, static_cast<float>(p[i])); break; }
    case at::kBFloat16: { const c10::BFloat16* p = c.data_ptr<c10::BFloat16>(); for (int64_t i = 0; i < n; ++i) f(i, static_cast<float>(p[i])); break; }
    default: TORCH_CHECK(false, "aqlmkit cpu: scales/bias/codebooks must be float32, float16 or bfloat16");
  }
}

// Per output row fp32 scale (scales may be fp16/bf16/fp32, [O,1,1,1]) and bias.
std::vector<float> to_f32(const c10::optional<Tensor>& t, int64_t n, float fill) {
  std::vector<float> v(n, fill);
  if (t.has_value() && t->defined()) {
    TORCH_CHECK(t->numel() == n, "aqlmkit cpu: scales/bias have ", t->numel(), " entries, expected ", n);
    for_each_f32(*t, [&](int64_t i, float x) { v[i] = x; });
  }
  return v;
}

// ---------------------------------------------------------------- lut path (B <= 8)

// cbT[k][d][c] in fp32: transposed so the LUT build is a broadcast-x FMA over 2^B contiguous codes.
template <typename T>
void transpose_into(const T* src, float* o, int64_t K, int64_t S, int64_t g) {
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < S; ++c)
      for (int64_t d = 0; d < g; ++d) o[(k * g + d) * S + c] = static_cast<float>(src[(k * S + c) * g + d]);
}

Tensor transposed_codebooks(const Tensor& codebooks) {
  const int64_t K = codebooks.size(0), S = codebooks.size(1), g = codebooks.size(3);
  Tensor cb = codebooks.is_contiguous() ? codebooks : codebooks.contiguous();
  Tensor out = at::empty({K, g, S}, codebooks.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  switch (cb.scalar_type()) {
    case at::kFloat: transpose_into(cb.data_ptr<float>(), o, K, S, g); break;
    case at::kHalf: transpose_into(cb.data_ptr<c10::Half>(), o, K, S, g); break;
    case at::kBFloat16: transpose_into(cb.data_ptr<c10::BFloat16>(), o, K, S, g); break;
    default: TORCH_CHECK(false, "aqlmkit cpu: codebooks must be float32, float16 or bfloat16");
  }
  return out;
}

// One (row, group, codebook) block of the LUT: out[c] = sum_d xs[d] * cb[d*S + c]. With S a
// multiple of 64 the 64-wide accumulators stay in registers across d (1 store per 16 codes
// instead of one per FMA); otherwise a plain loop the compiler vectorizes.
inline void lut_block(const float* xs, const float* cb, float* out, int64_t g, int64_t S) {
#if defined(__AVX512F__)
  if (S % 64 == 0) {
    for (int64_t c0 = 0; c0 < S; c0 += 64) {
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t d = 0; d < g; ++d) {
        const __m512 xv = _mm512_set1_ps(xs[d]);
        const float* w = cb + d * S + c0;
        a0 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w), a0);
        a1 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + 16), a1);
        a2 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + 32), a2);
        a3 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + 48), a3);
      }
      _mm512_storeu_ps(out + c0, a0);
      _mm512_storeu_ps(out + c0 + 16, a1);
      _mm512_storeu_ps(out + c0 + 32, a2);
      _mm512_storeu_ps(out + c0 + 48, a3);
    }
    return;
  }
#endif
  for (int64_t c = 0; c < S; ++c) out[c] = xs[0] * cb[c];
  for (int64_t d = 1; d < g; ++d) {
    const float xv = xs[d];
    const float* cbd = cb + d * S;
#pragma omp simd
    for (int64_t c = 0; c < S; ++c) out[c] += xv * cbd[c];
  }
}

#if defined(__AVX512F__)
// Four input groups at once against 64 codes: each codebook load feeds 4 FMAs, so the build is
// FMA-bound instead of L2-bandwidth-bound (it is a [4, g] x [g, 64] GEMM micro-tile).
inline void lut_block4(const float* const xs[4], const float* cb, float* const out[4], int64_t g,
                       int64_t S) {
  for (int64_t c0 = 0; c0 < S; c0 += 64) {
    __m512 a[4][4];
    for (int r = 0; r < 4; ++r)
      for (int q = 0; q < 4; ++q) a[r][q] = _mm512_setzero_ps();
    for (int64_t d = 0; d < g; ++d) {
      const float* w = cb + d * S + c0;
      const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16);
      const __m512 w2 = _mm512_loadu_ps(w + 32), w3 = _mm512_loadu_ps(w + 48);
      for (int r = 0; r < 4; ++r) {
        const __m512 xv = _mm512_set1_ps(xs[r][d]);
        a[r][0] = _mm512_fmadd_ps(xv, w0, a[r][0]);
        a[r][1] = _mm512_fmadd_ps(xv, w1, a[r][1]);
        a[r][2] = _mm512_fmadd_ps(xv, w2, a[r][2]);
        a[r][3] = _mm512_fmadd_ps(xv, w3, a[r][3]);
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int q = 0; q < 4; ++q) _mm512_storeu_ps(out[r] + c0 + 16 * q, a[r][q]);
  }
}
#endif

}  // namespace

// Declared in aqlm_cpu.h: the packed decode path (aqlm_cpu_packed.cpp) builds its tables here too.
void aqlmkit_cpu::build_lut(const float* x, const float* cbT, float* lut, const Shape& s, int64_t grain) {
  // lut[n][j][k][c] = sum_d x[n, j*g + d] * cbT[k][d][c]; t = n*G + j indexes (row, group) pairs.
  const int64_t rowsz = s.G * s.K * s.S, T = s.N * s.G;
  // Input slice and first table of pair t. Hoisted out of the codebook loop: 64-bit divisions
  // there cost as much as a tenth of the FMAs for K = 8.
  auto locate = [&](int64_t t, const float*& xs, float*& out) {
    const int64_t n = t / s.G, j = t - n * s.G;
    xs = x + n * s.in + j * s.g;
    out = lut + n * rowsz + j * s.K * s.S;
  };
  at::parallel_for(0, (T + 3) / 4, grain, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t t0 = blk * 4, nt = std::min<int64_t>(4, T - t0);
      const float* xs[4];
      float* base[4];
      for (int64_t r = 0; r < nt; ++r) locate(t0 + r, xs[r], base[r]);
      for (int64_t k = 0; k < s.K; ++k) {
        const float* cbk = cbT + k * s.g * s.S;
#if defined(__AVX512F__)
        if (nt == 4 && s.S % 64 == 0) {
          float* out[4] = {base[0] + k * s.S, base[1] + k * s.S, base[2] + k * s.S, base[3] + k * s.S};
          lut_block4(xs, cbk, out, s.g, s.S);
          continue;
        }
#endif
        for (int64_t r = 0; r < nt; ++r) lut_block(xs[r], cbk, base[r] + k * s.S, s.g, s.S);
      }
    }
  });
}

namespace {

// Sum of lut[i*S + code[i]] over i in [0, GK): the inner loop of every output row.
inline float lut_row_sum(const uint8_t* code, const float* lut, int64_t GK, int64_t S, uint32_t mask) {
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  const __m512i base = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int>(S)));
  const __m512i vmask = _mm512_set1_epi32(static_cast<int>(mask));
  for (; i + 32 <= GK; i += 32) {
    __m512i c0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(code + i)));
    __m512i c1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(code + i + 16)));
    c0 = _mm512_add_epi32(_mm512_and_si512(c0, vmask), base);
    c1 = _mm512_add_epi32(_mm512_and_si512(c1, vmask), base);
    acc0 = _mm512_add_ps(acc0, _mm512_i32gather_ps(c0, lut + i * S, 4));
    acc1 = _mm512_add_ps(acc1, _mm512_i32gather_ps(c1, lut + (i + 16) * S, 4));
  }
  float r = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#else
  float r = 0.f;
#endif
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
  for (; i + 4 <= GK; i += 4) {
    a0 += lut[i * S + (code[i] & mask)];
    a1 += lut[(i + 1) * S + (code[i + 1] & mask)];
    a2 += lut[(i + 2) * S + (code[i + 2] & mask)];
    a3 += lut[(i + 3) * S + (code[i + 3] & mask)];
  }
  for (; i < GK; ++i) a0 += lut[i * S + (code[i] & mask)];
  return r + ((a0 + a1) + (a2 + a3));
}

void lut_matmul(const float* x, const uint8_t* codes, const float* cbT, const float* scales,
                const float* bias, float* y, const Shape& s) {
  const int64_t GK = s.G * s.K, rowsz = GK * s.S;
  Tensor lut_t = at::empty({s.N * rowsz}, at::kFloat);
  float* lut = lut_t.data_ptr<float>();
  build_lut(x, cbT, lut, s);
  const uint32_t mask = static_cast<uint32_t>(s.S - 1);
  at::parallel_for(0, s.O, 8, [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) {
      const uint8_t* code = codes + o * GK;
      for (int64_t n = 0; n < s.N; ++n) {
        const float v = lut_row_sum(code, lut + n * rowsz, GK, s.S, mask);
        y[n * s.O + o] = v * scales[o] + bias[o];
      }
    }
  });
}

// ---------------------------------------------------------------- gather path (any B, e.g. 1x16)

template <typename CB, typename CODE>
void gather_matmul(const float* x, const CODE* codes, const CB* cb, const float* scales,
                   const float* bias, float* y, const Shape& s) {
  const uint32_t mask = static_cast<uint32_t>(s.S - 1);
  const int64_t GK = s.G * s.K;
  constexpr int64_t MAXN = 8;
  at::parallel_for(0, s.O, 8, [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) {
      const CODE* code = codes + o * GK;
      for (int64_t n0 = 0; n0 < s.N; n0 += MAXN) {
        const int64_t nn = std::min(MAXN, s.N - n0);
        float out[MAXN];
        if (s.g % 8 == 0) {
          __m256 acc[MAXN];
          for (int64_t n = 0; n < nn; ++n) acc[n] = _mm256_setzero_ps();
          for (int64_t j = 0; j < s.G; ++j) {
            for (int64_t k = 0; k < s.K; ++k) {
              const uint32_t c = static_cast<uint32_t>(code[j * s.K + k]) & mask;
              const CB* w = cb + (k * s.S + c) * s.g;
              for (int64_t d = 0; d < s.g; d += 8) {
                const __m256 wv = load8(w + d);
                const float* xs = x + n0 * s.in + j * s.g + d;
                for (int64_t n = 0; n < nn; ++n)
                  acc[n] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs + n * s.in), acc[n]);
              }
            }
          }
          for (int64_t n = 0; n < nn; ++n) out[n] = hsum8(acc[n]);
        } else {
          for (int64_t n = 0; n < nn; ++n) out[n] = 0.f;
          for (int64_t j = 0; j < s.G; ++j)
            for (int64_t k = 0; k < s.K; ++k) {
              const uint32_t c = static_cast<uint32_t>(code[j * s.K + k]) & mask;
              const CB* w = cb + (k * s.S + c) * s.g;
              for (int64_t n = 0; n < nn; ++n) {
                const float* xs = x + (n0 + n) * s.in + j * s.g;
                float a = 0.f;
                for (int64_t d = 0; d < s.g; ++d) a += static_cast<float>(w[d]) * xs[d];
                out[n] += a;
              }
            }
        }
        for (int64_t n = 0; n < nn; ++n) y[(n0 + n) * s.O + o] = out[n] * scales[o] + bias[o];
      }
    }
  });
}

// ---------------------------------------------------------------- dequant + GEMM path (prefill)

template <typename CODE>
void dequant_rows(const CODE* codes, const float* cb, const float* scales, float* w, int64_t o0,
                  int64_t rows, const Shape& s) {
  const uint32_t mask = static_cast<uint32_t>(s.S - 1);
  const int64_t GK = s.G * s.K;
  at::parallel_for(0, rows, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const CODE* code = codes + (o0 + r) * GK;
      float* wr = w + r * s.in;
      const float sc = scales[o0 + r];
      if (s.g % 8 == 0) {  // codewords as 8-float vectors: K loads + adds, one scaled store
        const __m256 vs = _mm256_set1_ps(sc);
        for (int64_t j = 0; j < s.G; ++j) {
          const CODE* cj = code + j * s.K;
          for (int64_t d = 0; d < s.g; d += 8) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t k = 0; k < s.K; ++k)
              acc = _mm256_add_ps(acc, _mm256_loadu_ps(cb + (k * s.S + (static_cast<uint32_t>(cj[k]) & mask)) * s.g + d));
            _mm256_storeu_ps(wr + j * s.g + d, _mm256_mul_ps(acc, vs));
          }
        }
        continue;
      }
      for (int64_t j = 0; j < s.G; ++j) {
        float* wj = wr + j * s.g;
        for (int64_t d = 0; d < s.g; ++d) wj[d] = 0.f;
        for (int64_t k = 0; k < s.K; ++k) {
          const float* cw = cb + (k * s.S + (static_cast<uint32_t>(code[j * s.K + k]) & mask)) * s.g;
#pragma omp simd
          for (int64_t d = 0; d < s.g; ++d) wj[d] += cw[d];
        }
#pragma omp simd
        for (int64_t d = 0; d < s.g; ++d) wj[d] *= sc;
      }
    }
  });
}

// ---------------------------------------------------------------- op entry points

struct Prepared {
  Tensor x2, out;
  Shape s;
  std::vector<float> scales, bias;
};

Prepared prepare(const Tensor& x, const Tensor& codes, const Tensor& codebooks, const Tensor& scales,
                 const c10::optional<Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && codes.device().is_cpu() && codebooks.device().is_cpu(),
              "aqlmkit cpu kernels need CPU tensors");
  Prepared p;
  p.x2 = x.reshape({-1, x.size(-1)});
  if (p.x2.scalar_type() != at::kFloat) p.x2 = p.x2.to(at::kFloat);
  if (!p.x2.is_contiguous()) p.x2 = p.x2.contiguous();
  p.s = shape_of(p.x2, codes, codebooks);
  p.scales = to_f32(scales, p.s.O, 1.f);
  p.bias = to_f32(bias, p.s.O, 0.f);
  p.out = at::empty({p.s.N, p.s.O}, p.x2.options());
  return p;
}

Tensor finish(const Tensor& x, Prepared& p) {
  auto sizes = x.sizes().vec();
  sizes.back() = p.s.O;
  Tensor y = x.scalar_type() == at::kFloat ? p.out : p.out.to(x.scalar_type());
  return y.view(sizes);
}

Tensor lut_op(const Tensor& x, const Tensor& codes, const Tensor& codebooks, const Tensor& scales,
              const c10::optional<Tensor>& bias) {
  Prepared p = prepare(x, codes, codebooks, scales, bias);
  TORCH_CHECK(codes.scalar_type() == at::kChar && p.s.S <= 256, "aqlmkit lut kernel needs int8 codes, B<=8");
  Tensor c = codes.contiguous(), cbT = transposed_codebooks(codebooks);
  if (p.s.N > 0)
    lut_matmul(p.x2.data_ptr<float>(), reinterpret_cast<const uint8_t*>(c.data_ptr<int8_t>()),
               cbT.data_ptr<float>(), p.scales.data(), p.bias.data(), p.out.data_ptr<float>(), p.s);
  return finish(x, p);
}

template <typename CODE>
void gather_dispatch(const Tensor& cb, const CODE* c, Prepared& p) {
  const float* x = p.x2.data_ptr<float>();
  float* y = p.out.data_ptr<float>();
  switch (cb.scalar_type()) {
    case at::kFloat:
      gather_matmul(x, c, cb.data_ptr<float>(), p.scales.data(), p.bias.data(), y, p.s); break;
    case at::kHalf:
      gather_matmul(x, c, cb.data_ptr<c10::Half>(), p.scales.data(), p.bias.data(), y, p.s); break;
    case at::kBFloat16:
      gather_matmul(x, c, cb.data_ptr<c10::BFloat16>(), p.scales.data(), p.bias.data(), y, p.s); break;
    default:
      TORCH_CHECK(false, "aqlmkit cpu: codebooks must be float32, float16 or bfloat16");
  }
}

Tensor gather_op(const Tensor& x, const Tensor& codes, const Tensor& codebooks, const Tensor& scales,
                 const c10::optional<Tensor>& bias) {
  Prepared p = prepare(x, codes, codebooks, scales, bias);
  Tensor c = codes.contiguous(), cb = codebooks.contiguous();
  if (p.s.N == 0) return finish(x, p);
  if (c.scalar_type() == at::kChar)
    gather_dispatch(cb, reinterpret_cast<const uint8_t*>(c.data_ptr<int8_t>()), p);
  else if (c.scalar_type() == at::kShort)
    gather_dispatch(cb, reinterpret_cast<const uint16_t*>(c.data_ptr<int16_t>()), p);
  else
    TORCH_CHECK(false, "aqlmkit cpu: codes must be int8 or int16");
  return finish(x, p);
}

Tensor dequant_op(const Tensor& x, const Tensor& codes, const Tensor& codebooks, const Tensor& scales,
                  const c10::optional<Tensor>& bias, int64_t tile_elems) {
  Prepared p = prepare(x, codes, codebooks, scales, bias);
  Tensor c = codes.contiguous(), cb = codebooks.to(at::kFloat).contiguous();
  const Shape& s = p.s;
  const int64_t tile = std::max<int64_t>(16, std::min<int64_t>(s.O, tile_elems / std::max<int64_t>(1, s.in)));
  // The tile is reused across calls: a fresh multi-MiB buffer per call is mmap + page faults.
  thread_local std::vector<float> wbuf;
  if (static_cast<int64_t>(wbuf.size()) < tile * s.in) wbuf.resize(tile * s.in);
  Tensor w = at::from_blob(wbuf.data(), {tile, s.in}, p.x2.options());
  for (int64_t o0 = 0; o0 < s.O; o0 += tile) {
    const int64_t rows = std::min(tile, s.O - o0);
    if (c.scalar_type() == at::kChar)
      dequant_rows(reinterpret_cast<const uint8_t*>(c.data_ptr<int8_t>()), cb.data_ptr<float>(),
                   p.scales.data(), w.data_ptr<float>(), o0, rows, s);
    else
      dequant_rows(reinterpret_cast<const uint16_t*>(c.data_ptr<int16_t>()), cb.data_ptr<float>(),
                   p.scales.data(), w.data_ptr<float>(), o0, rows, s);
    Tensor wt = w.narrow(0, 0, rows);
    if (rows == s.O) {
      at::mm_out(p.out, p.x2, wt.t());
    } else {
      p.out.narrow(1, o0, rows).copy_(at::mm(p.x2, wt.t()));
    }
  }
  if (bias.has_value() && bias->defined())
    p.out.add_(at::from_blob(p.bias.data(), {s.O}, at::kFloat));
  return finish(x, p);
}

// ---------------------------------------------------------------- half-weight GEMV (lm_head)
//
// y = x @ W^T + b with W stored in fp16/bf16 (how AQLM checkpoints keep their unquantized layers)
// and x, accumulation and y in fp32. At batch 1 a dense layer is bound by reading W, so 16-bit
// storage halves its time versus an fp32 copy without rounding the activations.

#if defined(__AVX512F__)
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const c10::BFloat16* p) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
#endif

// One input row, four weight rows per step: four independent FMA chains and one x load per four
// weight vectors, so the loop runs at the speed of streaming W.
template <typename W>
void half_gemv1(const float* x, const W* w, const float* bias, float* y, int64_t I, int64_t b, int64_t e) {
  int64_t o = b;
#if defined(__AVX512F__)
  for (; o + 4 <= e && I % 16 == 0; o += 4) {
    const W* w0 = w + o * I;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const char* ahead = reinterpret_cast<const char*>(w0 + 12 * I);  // 3 blocks ahead
    for (int64_t i = 0; i < I; i += 16) {
      _mm_prefetch(ahead + i * 8, _MM_HINT_T0);
      _mm_prefetch(ahead + i * 8 + 64, _MM_HINT_T0);
      const __m512 xv = _mm512_loadu_ps(x + i);
      a0 = _mm512_fmadd_ps(load16(w0 + i), xv, a0);
      a1 = _mm512_fmadd_ps(load16(w0 + I + i), xv, a1);
      a2 = _mm512_fmadd_ps(load16(w0 + 2 * I + i), xv, a2);
      a3 = _mm512_fmadd_ps(load16(w0 + 3 * I + i), xv, a3);
    }
    y[o] = _mm512_reduce_add_ps(a0) + (bias ? bias[o] : 0.f);
    y[o + 1] = _mm512_reduce_add_ps(a1) + (bias ? bias[o + 1] : 0.f);
    y[o + 2] = _mm512_reduce_add_ps(a2) + (bias ? bias[o + 2] : 0.f);
    y[o + 3] = _mm512_reduce_add_ps(a3) + (bias ? bias[o + 3] : 0.f);
  }
#endif
  for (; o < e; ++o) {
    float a = 0.f;
    for (int64_t i = 0; i < I; ++i) a += static_cast<float>(w[o * I + i]) * x[i];
    y[o] = a + (bias ? bias[o] : 0.f);
  }
}

template <typename W>
void half_gemv(const float* x, const W* w, const float* bias, float* y, int64_t N, int64_t I, int64_t O) {
  constexpr int64_t MAXN = 4;
  if (N == 1) {
    at::parallel_for(0, O, 512, [&](int64_t b, int64_t e) { half_gemv1(x, w, bias, y, I, b, e); });
    return;
  }
  at::parallel_for(0, O, 256, [&](int64_t b, int64_t e) {
    for (int64_t n0 = 0; n0 < N; n0 += MAXN) {
      const int64_t nn = std::min(MAXN, N - n0);
      for (int64_t o = b; o < e; ++o) {
        const W* wr = w + o * I;
        float out[MAXN] = {0.f, 0.f, 0.f, 0.f};
        int64_t i = 0;
#if defined(__AVX512F__)
        __m512 acc[MAXN];
        for (int64_t n = 0; n < nn; ++n) acc[n] = _mm512_setzero_ps();
        for (; i + 16 <= I; i += 16) {
          const __m512 wv = load16(wr + i);
          for (int64_t n = 0; n < nn; ++n)
            acc[n] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + (n0 + n) * I + i), acc[n]);
        }
        for (int64_t n = 0; n < nn; ++n) out[n] = _mm512_reduce_add_ps(acc[n]);
#endif
        for (; i < I; ++i)
          for (int64_t n = 0; n < nn; ++n) out[n] += static_cast<float>(wr[i]) * x[(n0 + n) * I + i];
        for (int64_t n = 0; n < nn; ++n) y[(n0 + n) * O + o] = out[n] + (bias ? bias[o] : 0.f);
      }
    }
  });
}

Tensor half_linear_op(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "aqlmkit cpu kernels need CPU tensors");
  TORCH_CHECK(weight.dim() == 2 && (weight.scalar_type() == at::kHalf || weight.scalar_type() == at::kBFloat16),
              "aqlmkit cpu_half_linear: weight must be fp16/bf16 [out, in]");
  const int64_t O = weight.size(0), I = weight.size(1);
  TORCH_CHECK(x.size(-1) == I, "aqlmkit cpu_half_linear: x has ", x.size(-1), " features, weight ", I);
  Tensor x2 = x.reshape({-1, I});
  if (x2.scalar_type() != at::kFloat) x2 = x2.to(at::kFloat);
  if (!x2.is_contiguous()) x2 = x2.contiguous();
  const int64_t N = x2.size(0);
  Tensor b32;
  if (bias.has_value() && bias->defined()) b32 = bias->to(at::kFloat).contiguous();
  Tensor out;
  if (N > 16) {  // prefill: GEMM speed matters more than bytes; convert in row tiles
    out = at::empty({N, O}, x2.options());
    const int64_t tile = std::max<int64_t>(64, (1 << 20) / std::max<int64_t>(1, I));
    for (int64_t o0 = 0; o0 < O; o0 += tile) {
      const int64_t r = std::min(tile, O - o0);
      out.narrow(1, o0, r).copy_(at::mm(x2, weight.narrow(0, o0, r).to(at::kFloat).t()));
    }
    if (b32.defined()) out.add_(b32);
  } else {
    Tensor wc = weight.is_contiguous() ? weight : weight.contiguous();
    out = at::empty({N, O}, x2.options());
    const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
    if (N > 0) {
      if (wc.scalar_type() == at::kHalf)
        half_gemv(x2.data_ptr<float>(), wc.data_ptr<c10::Half>(), bp, out.data_ptr<float>(), N, I, O);
      else
        half_gemv(x2.data_ptr<float>(), wc.data_ptr<c10::BFloat16>(), bp, out.data_ptr<float>(), N, I, O);
    }
  }
  auto sizes = x.sizes().vec();
  sizes.back() = O;
  Tensor yv = out.view(sizes);
  return x.scalar_type() == at::kFloat ? yv : yv.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(aqlmkit, m) {
  m.def("cpu_lut_linear(Tensor x, Tensor codes, Tensor codebooks, Tensor scales, Tensor? bias) -> Tensor");
  m.def("cpu_lut_packed_linear(Tensor x, Tensor codes_t, Tensor cb_t, Tensor scales, Tensor? bias) -> Tensor");
  m.def("cpu_half_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("cpu_gather_linear(Tensor x, Tensor codes, Tensor codebooks, Tensor scales, Tensor? bias) -> Tensor");
  m.def("cpu_dequant_linear(Tensor x, Tensor codes, Tensor codebooks, Tensor scales, Tensor? bias, "
        "int tile_elems) -> Tensor");
}

TORCH_LIBRARY_IMPL(aqlmkit, CPU, m) {
  m.impl("cpu_lut_linear", &lut_op);
  m.impl("cpu_half_linear", &half_linear_op);
  m.impl("cpu_gather_linear", &gather_op);
  m.impl("cpu_dequant_linear", &dequant_op);
}
