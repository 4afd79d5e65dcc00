// [note: 8-bit states] (fusedopt/quant8.py) on the CPU, a quantization block at a time: the
// absmax fold, the quantizer and the dequantizer of csrc/include/fusedopt/quant8.h over n
// contiguous fp32 values, bit for bit equal to those scalar functions (which stay the
// definition: CUDA, the scalar tails and non-AVX2 builds use them). With AVX2
// (-march=x86-64-v3, setup.py's and CMake's flags) 8 lanes at a time:
//
// - dequantize: the code's table entry from its formula (formula:: below, equal to the table
//   bit for bit), the product with the scale (the same fp32 multiply) and the sign flipped as
//   a bit (IEEE negation is exactly that).
// - absmax: a max over |x| (the sign bit cleared) and an unordered-compare mask for NaN.
// - quantize: y = x / scale (_mm256_div_ps, correctly rounded like the scalar division), and
//   |q| = the number of midpoints strictly below |y| from a guess that needs one midpoint:
//   with r = |y|^(1/power) (exact IEEE square roots) and k = floor(r * levels) clamped to
//   levels - 1, the count is k or k + 1 (the midpoint between codes k and k + 1 lies
//   inside (k, k + 1) / levels in r, at least 0.15 / levels from either end, far beyond
//   the few ulps the two roots and the product err by), so |q| = k + (mid[k] < |y|) (mid[k]
//   from its formula for the int8 codes, gathered for the uint8 ones): the scalar
//   code_magnitude's closed form (quant8.h), 8 lanes at a time. The count depends on |y|
//   alone, and csrc/tests/test_q8_block.cpp checks both against the definition (the count
//   of midpoints below |y|) on every fp32 |y| in [0, 1] (above 1 both give levels: k is
//   clamped and mid[levels - 1] < 1).
//
// Why: the scalar loops made the 8-bit states 14x slower than bf16+master on GPT-2 small
// (bench/results/memory-cpu-gpt2-2026-11-29T170539Z.md: AdamW 21,527 ms/step against 1,497,
// 3% of the CPU's bandwidth ceiling). Per element, 4M elements, 2-core VM (load ~6 from
// other builds): quantize 55.9 ns (int8 codes) / 24.5 (uint8), absmax 2.5 (both states),
// dequantize 0.43 / 0.42 with the scalar loops; 0.46 / 0.80, 0.25, 0.15 / 0.28 here (min of
// 5 runs each). The steps' times are in q8_step.h.
#pragma once

#include <cstdint>
#include <cstring>

#include "fusedopt/quant8.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fusedopt::cpu::q8_block {

/// The stored type of a state's codes: int8 for the signed (first-moment) codes, uint8 for
/// the unsigned ones.
template <bool kSigned>
using Code = std::conditional_t<kSigned, int8_t, uint8_t>;

/// The code tables as arithmetic, for the vector path: a gather of 8 table entries costs
/// 0.40 ns/element against 0.14 for an fp32 division (AVX2, 2-core VM). The signed codes
/// k^2 / 127^2 and midpoints (k^2 + k + 1/2) / 127^2 in fp32 (numerators exact, one
/// rounding); the unsigned codes k^4 / 255^4 in fp64 (numerator exact, a product with the
/// rounded reciprocal, then fp32). Each equals quant8.h's table entry bit for bit (checked
/// at compile time below for every k: the table's fp64 value and these round to the same
/// fp32), so nothing about the codes changes. The unsigned midpoints stay a gather: their
/// fp64 formula, (k^4 + (k + 1)^4) / (2 * 255^4), is as exact but made the uint8 quantizer
/// 3.6-3.9 ns/element against 0.8 with the gather.
namespace formula {

inline constexpr float kSignedDenominator = 16129.0f;  // 127^2
inline constexpr double kUnsignedReciprocal = 1.0 / (255.0 * 255.0 * 255.0 * 255.0);

constexpr float signed_code(int k) {
  const float f = static_cast<float>(k);
  return f * f / kSignedDenominator;
}
constexpr float signed_mid(int k) {
  const float f = static_cast<float>(k);
  return (f * f + f + 0.5f) / kSignedDenominator;
}
constexpr float unsigned_code(int k) {
  const double f = k;
  const double square = f * f;
  return static_cast<float>(square * square * kUnsignedReciprocal);
}

constexpr bool equals_tables() {
  for (int k = 0; k <= q8::kSignedLevels; ++k) {
    if (signed_code(k) != q8::kSignedTable.code[k]) return false;
    if (k < q8::kSignedLevels && signed_mid(k) != q8::kSignedTable.mid[k]) return false;
  }
  for (int k = 0; k <= q8::kUnsignedLevels; ++k)
    if (unsigned_code(k) != q8::kUnsignedTable.code[k]) return false;
  return true;
}
static_assert(q8::kSignedLevels == 127 && q8::kUnsignedLevels == 255 &&
              q8::kSignedPower == 2 && q8::kUnsignedPower == 4);
static_assert(equals_tables(), "the code formulas must equal quant8.h's tables bit for bit");

}  // namespace formula

#if defined(__AVX2__)

/// formula::unsigned_code of 8 lanes of k, in two halves of 4 fp64 lanes.
inline __m256 unsigned_code8(__m256i k) {
  const auto half = [](__m128i k4) {
    const __m256d f = _mm256_cvtepi32_pd(k4);
    const __m256d square = _mm256_mul_pd(f, f);
    return _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_mul_pd(square, square),
                                         _mm256_set1_pd(formula::kUnsignedReciprocal)));
  };
  return _mm256_set_m128(half(_mm256_extracti128_si256(k, 1)), half(_mm256_castsi256_si128(k)));
}

/// The code magnitudes (k in [0, levels]) of 8 lanes as fp32: quant8.h's table entries.
template <bool kSigned>
inline __m256 code8(__m256i k) {
  if constexpr (kSigned) {
    const __m256 f = _mm256_cvtepi32_ps(k);
    return _mm256_div_ps(_mm256_mul_ps(f, f), _mm256_set1_ps(formula::kSignedDenominator));
  } else {
    return unsigned_code8(k);
  }
}

/// The midpoints above code k (k in [0, levels - 1]) of 8 lanes: quant8.h's mid[k].
template <bool kSigned>
inline __m256 mid8(__m256i k) {
  if constexpr (kSigned) {
    const __m256 f = _mm256_cvtepi32_ps(k);
    const __m256 numerator =
        _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(f, f), f), _mm256_set1_ps(0.5f));
    return _mm256_div_ps(numerator, _mm256_set1_ps(formula::kSignedDenominator));
  } else {
    return _mm256_i32gather_ps(q8::kUnsignedTable.mid, k, 4);
  }
}

/// |q| of 8 lanes of |y| (sign bit clear, NaN allowed): code_magnitude per lane.
template <bool kSigned>
inline __m256i code_magnitude8(__m256 abs_y) {
  constexpr int kPower = kSigned ? q8::kSignedPower : q8::kUnsignedPower;
  constexpr int kLevels = kSigned ? q8::kSignedLevels : q8::kUnsignedLevels;
  __m256 root = _mm256_sqrt_ps(abs_y);
  if constexpr (kPower == 4) root = _mm256_sqrt_ps(root);
  // min(NaN, c) is c: a NaN lane gets a valid k, and code 0 below.
  const __m256 guess = _mm256_min_ps(_mm256_mul_ps(root, _mm256_set1_ps(kLevels)),
                                     _mm256_set1_ps(kLevels - 1));
  const __m256i k = _mm256_cvttps_epi32(guess);
  const __m256i above = _mm256_castps_si256(_mm256_cmp_ps(mid8<kSigned>(k), abs_y, _CMP_LT_OQ));
  const __m256i positive =
      _mm256_castps_si256(_mm256_cmp_ps(abs_y, _mm256_setzero_ps(), _CMP_GT_OQ));
  return _mm256_and_si256(_mm256_sub_epi32(k, above), positive);  // above is -1 where true
}

/// The codes (int32 lanes) of 8 values x in a block of usable scale `scale`.
template <bool kSigned>
inline __m256i quantize8(__m256 x, __m256 scale) {
  const __m256 y = _mm256_div_ps(x, scale);
  const __m256 abs_y = _mm256_and_ps(y, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)));
  const __m256i q = code_magnitude8<kSigned>(abs_y);
  // Negated where y's bits are negative as an int32: y < 0, and -0 and negative NaNs, whose
  // |q| is 0 anyway.
  return kSigned ? _mm256_sign_epi32(q, _mm256_castps_si256(y)) : q;
}

/// The values of 8 codes (int32 lanes) in a block of scale `scale`.
template <bool kSigned>
inline __m256 dequantize8(__m256i q, __m256 scale) {
  const __m256i magnitude = _mm256_abs_epi32(q);
  __m256 code = code8<kSigned>(magnitude);
  // An int8 code -128 (never written, but a loaded state may hold it) reads the table past
  // its 127 levels, where it is 0.
  if constexpr (kSigned)
    code = _mm256_andnot_ps(
        _mm256_castsi256_ps(_mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(q8::kSignedLevels))),
        code);
  const __m256 value = _mm256_mul_ps(code, scale);
  if constexpr (!kSigned) return value;
  const __m256i sign = _mm256_and_si256(q, _mm256_set1_epi32(INT32_MIN));
  return _mm256_xor_ps(value, _mm256_castsi256_ps(sign));
}

/// 8 codes from memory as int32 lanes.
template <bool kSigned>
inline __m256i load_codes8(const Code<kSigned>* q) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q));
  return kSigned ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes);
}

/// 32 codes (int32 lanes, each in the code type's range) to memory as bytes.
template <bool kSigned>
inline void store_codes32(Code<kSigned>* q, __m256i a, __m256i b, __m256i c, __m256i d) {
  // The packs work within 128-bit halves: bytes come out in the order of dwords 0 4 1 5 2 6
  // 3 7 of the 32-bit result; the permutation puts them back.
  const __m256i ab = _mm256_packs_epi32(a, b);
  const __m256i cd = _mm256_packs_epi32(c, d);
  const __m256i bytes = kSigned ? _mm256_packs_epi16(ab, cd) : _mm256_packus_epi16(ab, cd);
  const __m256i ordered =
      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), ordered);
}

#endif  // __AVX2__

/// values[e] = q8::dequantize<kSigned>(codes[e], scale), e < n.
template <bool kSigned>
inline void dequantize(const Code<kSigned>* codes, int64_t n, float scale, float* values) {
  int64_t e = 0;
#if defined(__AVX2__)
  const __m256 s = _mm256_set1_ps(scale);
  for (; e + 8 <= n; e += 8)
    _mm256_storeu_ps(values + e, dequantize8<kSigned>(load_codes8<kSigned>(codes + e), s));
#endif
  for (; e < n; ++e) values[e] = q8::dequantize<kSigned>(codes[e], scale);
}

/// The block scale of values[0, n): q8::canonical_absmax of q8::fold_absmax over them.
inline float absmax(const float* values, int64_t n) {
  float result = 0.0f;
  bool any_nan = false;
  int64_t e = 0;
#if defined(__AVX2__)
  const __m256 magnitude_bits = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 largest = _mm256_setzero_ps();
  __m256 nan = _mm256_setzero_ps();
  for (; e + 8 <= n; e += 8) {
    const __m256 a = _mm256_and_ps(_mm256_loadu_ps(values + e), magnitude_bits);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    largest = _mm256_max_ps(largest, a);  // a NaN lane only matters through `nan`
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, largest);
  for (const float lane : lanes) result = lane > result ? lane : result;
  any_nan = _mm256_movemask_ps(nan) != 0;
#endif
  for (; e < n; ++e) q8::fold_absmax(values[e], result, any_nan);
  return q8::canonical_absmax(result, any_nan);
}

/// codes[e] = q8::quantize<kSigned>(values[e], scale), e < n.
template <bool kSigned>
inline void quantize(const float* values, int64_t n, float scale, Code<kSigned>* codes) {
  if (!(scale > 0.0f && scale <= 3.402823466e38f)) {  // quantize's unusable scale: all 0
    std::memset(codes, 0, static_cast<size_t>(n));
    return;
  }
  int64_t e = 0;
#if defined(__AVX2__)
  const __m256 s = _mm256_set1_ps(scale);
  for (; e + 32 <= n; e += 32) {
    const float* x = values + e;
    store_codes32<kSigned>(codes + e, quantize8<kSigned>(_mm256_loadu_ps(x), s),
                           quantize8<kSigned>(_mm256_loadu_ps(x + 8), s),
                           quantize8<kSigned>(_mm256_loadu_ps(x + 16), s),
                           quantize8<kSigned>(_mm256_loadu_ps(x + 24), s));
  }
#endif
  for (; e < n; ++e)
    codes[e] = static_cast<Code<kSigned>>(q8::quantize<kSigned>(values[e], scale));
}

}  // namespace fusedopt::cpu::q8_block
