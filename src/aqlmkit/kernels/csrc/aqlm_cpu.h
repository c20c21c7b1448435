// Shared by the AQLM CPU kernels (aqlm_cpu.cpp, aqlm_cpu_packed.cpp): one LUT builder for the
// unpacked and the packed (decode) paths, so both compute identical tables.
#pragma once
#include <cstdint>

namespace aqlmkit_cpu {

// K codebooks of S = 2^B codewords over groups of g inputs; O outputs, G = in / g groups, N rows.
struct Shape {
  int64_t K, S, g, O, G, in, N;
};

// lut[n][j][k][c] = sum_d x[n, j*g + d] * cbT[k][d][c] (cbT: fp32 codebooks [K, g, S]); split
// across threads in blocks of 4 (row, group) pairs, ``grain`` blocks at least per thread.
void build_lut(const float* x, const float* cbT, float* lut, const Shape& s, int64_t grain = 4);

}  // namespace aqlmkit_cpu
