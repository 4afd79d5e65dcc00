// 8-bit optimizer states: the block-wise quantizer of fusedopt/quant8.py, torch-free, for the
// CPU launchers and the CUDA kernels ([note: 8-bit states] in fusedopt/quant8.py has the
// format and why; the reference there is the definition and these functions equal it bit
// for bit).
//
// A block is a run of up to kQuantBlock (256) elements of one row of the param's last
// dimension; its scale is its absmax (fp32). Codes: int8 q in [-127, 127] for
// sign(q) * (|q|/127)^2 (first moments), uint8 q in [0, 255] for (q/255)^4 (second moments).
// Quantizing: y = x / absmax (one fp32 division), |q| = the number of fp32 midpoints between
// consecutive codes strictly below |y|. Dequantizing: fp32(code[|q|]) * scale.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

#include "fusedopt/macros.h"

namespace fusedopt::q8 {

inline constexpr int kSignedLevels = 127;
inline constexpr int kUnsignedLevels = 255;
inline constexpr int kSignedPower = 2;
inline constexpr int kUnsignedPower = 4;
/// The canonical NaN stored as the scale of a block that holds a NaN.
inline constexpr uint32_t kCanonicalNan = 0x7FC00000u;

/// The code magnitudes (k/levels)^power, k = 0..levels, and the midpoints between
/// neighbours, each computed in double by repeated products (exact IEEE operations, as
/// fusedopt/quant8.py code_table: the compiler's constant folding rounds as the run time
/// does) and rounded once to float.
struct CodeTable {
  float code[256] = {};
  float mid[255] = {};
  int levels = 0;
};

constexpr CodeTable make_table(int levels, int power) {
  CodeTable t;
  t.levels = levels;
  double previous = 0.0;
  for (int k = 0; k <= levels; ++k) {
    const double base = static_cast<double>(k) / levels;
    double value = base;
    for (int e = 1; e < power; ++e) value = value * base;
    t.code[k] = static_cast<float>(value);
    if (k > 0) t.mid[k - 1] = static_cast<float>((previous + value) / 2);
    previous = value;
  }
  return t;
}

// In device memory for the CUDA kernels (a host constexpr array cannot be indexed at run
// time in device code); plain constants for the CPU and the host emulation.
#if defined(__CUDACC__)
#define FUSEDOPT_Q8_TABLE static __device__ constexpr
#else
#define FUSEDOPT_Q8_TABLE inline constexpr
#endif
FUSEDOPT_Q8_TABLE CodeTable kSignedTable = make_table(kSignedLevels, kSignedPower);
FUSEDOPT_Q8_TABLE CodeTable kUnsignedTable = make_table(kUnsignedLevels, kUnsignedPower);

/// |q| for |y| in [0, 1]: the number of midpoints strictly below it (a tie goes to the
/// smaller code; NaN to 0), in closed form: with r = |y|^(1/power) (exact IEEE square
/// roots: the powers are 2 and 4) and k = floor(r * levels) clamped to levels - 1, the count
/// is k or k + 1 (the midpoint between codes k and k + 1 lies inside (k, k + 1) / levels in
/// r, at least 0.15 / levels from either end, far beyond the few ulps the roots and the
/// product err by), so |q| = k + (mid[k] < |y|): one table read. Above 1 (and inf) it gives
/// levels, as the count does. csrc/tests/test_q8_block.cpp checks it against the count on
/// every fp32 |y| in [0, 1] and near every midpoint; the CPU's AVX2 quantizer
/// (csrc/cpu/q8_block.h) is the same arithmetic 8 lanes at a time.
/// Why closed form: a binary search over the midpoints made the CPU step 80x slower than the
/// fp32 one (16 data-dependent branches per element, half of them mispredicted). The form
/// before this one, a rounded guess corrected by two loops, was as exact but left two
/// data-dependent loops per element: lanes of a CUDA warp that need different corrections
/// diverge. Here there is no branch. The H200 model cannot see the difference (its shortest
/// path counts a loop body once: 702 instructions per lane per 8 elements with the loops
/// and without them, 8-bit AdamW on fp32 params, [note: q8 warps] in
/// csrc/cuda/quant8.cuh); no GPU has measured it.
template <int kPower>
FUSEDOPT_HD FUSEDOPT_INLINE int code_magnitude(float abs_y, const float* mid, int levels) {
  static_assert(kPower == 2 || kPower == 4, "the inverse is taken by square roots");
  if (!(abs_y > 0.0f)) return 0;  // 0, -0 and NaN: code 0 (no midpoint is below 0)
  float root = sqrtf(abs_y);
  if constexpr (kPower == 4) root = sqrtf(root);
  const float top = static_cast<float>(levels - 1);
  const float guess = root * static_cast<float>(levels);
  const int k = static_cast<int>(guess < top ? guess : top);  // inf: top
  return k + (mid[k] < abs_y ? 1 : 0);
}

/// The absmax of a block as the reference takes it: NaN (canonical) if any value is NaN,
/// else the largest magnitude (inf included).
FUSEDOPT_HD FUSEDOPT_INLINE float canonical_absmax(float absmax, bool any_nan) {
  return any_nan ? std::bit_cast<float>(kCanonicalNan) : absmax;
}

/// Folds one value into a running (absmax, any_nan).
FUSEDOPT_HD FUSEDOPT_INLINE void fold_absmax(float x, float& absmax, bool& any_nan) {
  const float a = x < 0.0f ? -x : x;
  any_nan |= a != a;
  absmax = a > absmax ? a : absmax;
}

/// The code of x in a block of absmax `scale` (from canonical_absmax).
template <bool kSigned>
FUSEDOPT_HD FUSEDOPT_INLINE int quantize(float x, float scale) {
  const bool usable = scale > 0.0f && scale <= 3.402823466e38f;  // finite and non-zero
  if (!usable) return 0;
  const float y = x / scale;
  const float abs_y = y < 0.0f ? -y : y;
  const CodeTable& t = kSigned ? kSignedTable : kUnsignedTable;
  constexpr int kPower = kSigned ? kSignedPower : kUnsignedPower;
  const int q = code_magnitude<kPower>(abs_y, t.mid, t.levels);
  return kSigned && y < 0.0f ? -q : q;
}

/// The value of code q in a block of scale `scale`.
template <bool kSigned>
FUSEDOPT_HD FUSEDOPT_INLINE float dequantize(int q, float scale) {
  const CodeTable& t = kSigned ? kSignedTable : kUnsignedTable;
  const int magnitude = q < 0 ? -q : q;
  const float value = t.code[magnitude] * scale;
  return q < 0 ? -value : value;
}

/// Tensor i's block b holds elements [begin, end): blocks are runs of `row_length` elements
/// cut every kQuantBlock from each row's start.
struct BlockGrid {
  int64_t row_length;
  int64_t blocks_per_row;
  FUSEDOPT_HD int64_t begin(int64_t b, int64_t block) const {
    return (b / blocks_per_row) * row_length + (b % blocks_per_row) * block;
  }
  FUSEDOPT_HD int64_t end(int64_t b, int64_t block) const {
    const int64_t row_end = (b / blocks_per_row + 1) * row_length;
    const int64_t e = begin(b, block) + block;
    return e < row_end ? e : row_end;
  }
};

}  // namespace fusedopt::q8
