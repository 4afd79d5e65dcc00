// Vectorised conversions between storage dtypes and opmath for the CPU loops.
//
// Each function converts a block of n contiguous values. The bf16 loops are plain integer
// code that g++ -O3 -march=x86-64-v3 vectorises (8 lanes); fp16 uses the F16C instructions
// (vcvtph2ps / vcvtps2ph with round-to-nearest-even), which round exactly like c10 and
// fusedopt/dtype.h for every non-NaN value (csrc/tests/test_convert.cpp checks all 65536).
#pragma once

#include <array>
#include <cstdint>
#include <cstring>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "fusedopt/dtype.h"
#include "fusedopt/philox.h"

namespace fusedopt::cpu {

inline void fp16_to_float_n(float* dst, const uint16_t* src, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) dst[i] = fp16_to_float(src[i]);
}

inline void float_to_fp16_n(uint16_t* dst, const float* src, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
#endif
  for (; i < n; ++i) dst[i] = float_to_fp16(src[i]);
}

inline void bf16_to_float_n(float* dst, const uint16_t* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

inline void float_to_bf16_n(uint16_t* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
}

/// [note: vector philox] (issue #15) The CPU's stochastic rounding evaluates Philox4x32-10
/// (fusedopt/philox.h) for a block of elements at a time in AVX2 registers
/// (rounding_words_n), once per element for all of that element's stores ([note: state
/// dtype]: each store takes its 16 bits of the one evaluation; csrc/cpu/step.h's
/// for_each_block), then rounds in a loop g++ vectorises (float_to_bf16_stochastic_n). The
/// scalar evaluation per store (rounding_bits) left the bf16+SR rows of the memory table at
/// 2-6% of the CPU's bandwidth ceiling: 20 scalar 32x32 -> 64-bit products per element,
/// ~5 ns, ten times the bytes of a Lion step; and AdamW paid it three times (param and two
/// moments). AVX2 has no 32-bit high multiply, but vpmuludq multiplies the low words of its
/// four 64-bit lanes into full 64-bit products: so each of an element's four counter words
/// lives in the low half of a 64-bit lane, four elements a register, at the minimum of five
/// vpmuludq per element. The words are the scalar function's bit for bit
/// (csrc/tests/test_convert.cpp: every stream, odd lengths, element counters whose low word
/// wraps inside a vector). Measured on the shared 2-core VM (AMD EPYC, x86-64-v3 build, 1
/// thread, min of 400 runs of 64K elements): the four words of an element 2.13 ns against
/// rounding_bits' 5.13 ns (one group of 8 per iteration: 2.24 ns), the rounding loop
/// 0.33 ns. The steps (1.8x faster for Lion and SGD, 6x for AdamW): see for_each_block.

/// The four output words of Philox4x32-10 for elements first .. first + n - 1 of the tensor
/// keyed by `key`: words[j][k] = word j of element first + k's evaluation
/// ([note: stochastic rounding] in fusedopt/dtype.h: rounding_bits' evaluation).
inline void rounding_words_n(const std::array<uint32_t*, 4>& words, const RoundingKey& key,
                             int64_t first, int64_t n) {
  const uint64_t base = static_cast<uint64_t>(first) + key.first;  // element 0's index
  const uint32_t k0 = static_cast<uint32_t>(key.seed), k1 = static_cast<uint32_t>(key.seed >> 32);
  int64_t i = 0;
#if defined(__AVX2__)
  // Two lanes of 64 bits per element pair: vpmuludq multiplies the low words of 64-bit lanes
  // into full 64-bit products, so a chain holds 4 elements, each word in the low half of a
  // 64-bit lane (the high halves carry junk that no low half ever reads: the products read
  // low halves only, the shifts bring a product's true high half down, xor is bitwise).
  // Chain `even` holds elements 0, 2, 4, 6 of a group of 8, `odd` 1, 3, 5, 7, so that one
  // blend puts a word's 8 elements back in order; two groups (4 chains, 16 registers) per
  // iteration and the rounds unrolled keep the multipliers busy past one chain's latency.
  struct Chain {
    __m256i c0, c1, c2, c3;
  };
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0);
  const __m256i m1 = _mm256_set1_epi64x(kPhiloxM1);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sign = _mm256_set1_epi32(static_cast<int32_t>(0x80000000u));
  const __m256i tensor = _mm256_set1_epi32(static_cast<int32_t>(key.tensor));
  const __m256i counter = _mm256_set1_epi32(static_cast<int32_t>(key.counter));
  // The counters of elements e .. e + 7 as an (even, odd) pair of chains.
  const auto start = [&](uint64_t e, Chain& even, Chain& odd) {
    const __m256i e_lo = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(e)));
    const __m256i c0 = _mm256_add_epi32(e_lo, lanes);
    // A lane whose low word wrapped (c0 < e's low word, unsigned) carries into the high word.
    const __m256i carry =
        _mm256_cmpgt_epi32(_mm256_xor_si256(e_lo, sign), _mm256_xor_si256(c0, sign));
    const __m256i c1 = _mm256_sub_epi32(
        _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(e >> 32))), carry);
    even = Chain{c0, c1, tensor, counter};
    odd = Chain{_mm256_srli_epi64(c0, 32), _mm256_srli_epi64(c1, 32), tensor, counter};
  };
  const auto round = [&](Chain& c, __m256i r0, __m256i r1) {
    const __m256i p0 = _mm256_mul_epu32(c.c0, m0);
    const __m256i p1 = _mm256_mul_epu32(c.c2, m1);
    c = Chain{_mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), c.c1), r0), p1,
              _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), c.c3), r1), p0};
  };
  // Word j of elements 0..7 from its even and odd chain, in element order.
  const auto store = [](uint32_t* dst, __m256i even, __m256i odd) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                        _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA));
  };
  const auto finish = [&](int64_t at, const Chain& even, const Chain& odd) {
    store(words[0] + at, even.c0, odd.c0);
    store(words[1] + at, even.c1, odd.c1);
    store(words[2] + at, even.c2, odd.c2);
    store(words[3] + at, even.c3, odd.c3);
  };
  const auto keys = [&](int round_index, __m256i& r0, __m256i& r1) {
    r0 = _mm256_set1_epi32(static_cast<int32_t>(k0 + round_index * kPhiloxW0));
    r1 = _mm256_set1_epi32(static_cast<int32_t>(k1 + round_index * kPhiloxW1));
  };
  for (; i + 16 <= n; i += 16) {
    Chain c[4];
    start(base + static_cast<uint64_t>(i), c[0], c[1]);
    start(base + static_cast<uint64_t>(i) + 8, c[2], c[3]);
#pragma GCC unroll 10
    for (int r = 0; r < 10; ++r) {
      __m256i r0, r1;
      keys(r, r0, r1);
      for (Chain& chain : c) round(chain, r0, r1);
    }
    finish(i, c[0], c[1]);
    finish(i + 8, c[2], c[3]);
  }
  for (; i + 8 <= n; i += 8) {
    Chain c[2];
    start(base + static_cast<uint64_t>(i), c[0], c[1]);
#pragma GCC unroll 10
    for (int r = 0; r < 10; ++r) {
      __m256i r0, r1;
      keys(r, r0, r1);
      for (Chain& chain : c) round(chain, r0, r1);
    }
    finish(i, c[0], c[1]);
  }
#endif
  for (; i < n; ++i) {
    const uint64_t e = base + static_cast<uint64_t>(i);
    const Philox4x32 r = philox4x32_10(
        Philox4x32{{static_cast<uint32_t>(e), static_cast<uint32_t>(e >> 32), key.tensor,
                    key.counter}},
        k0, k1);
    for (int j = 0; j < 4; ++j) words[j][i] = r.w[j];
  }
}

/// The random bits of a block's stochastic stores from `stream` ([note: state dtype]):
/// element k's 16 bits are (word[k] >> shift) & 0xFFFF, as rounding_bits picks them (stream
/// 0..3 the top half of word `stream`, 4..7 the low half of word stream - 4).
struct StreamBits {
  const uint32_t* word = nullptr;
  uint32_t shift = 16;
};

inline StreamBits stream_bits(const std::array<uint32_t*, 4>& words, uint32_t stream) {
  return StreamBits{words[stream & 3u], stream < 4 ? 16u : 0u};
}

/// dst[0:n] = src[0:n] rounded to bf16 stochastically, element k with its bits of `bits`
/// ([note: stochastic rounding] in fusedopt/dtype.h). Branch-free: g++ vectorises it.
inline void float_to_bf16_stochastic_n(uint16_t* dst, const float* src, int64_t n,
                                       StreamBits bits) {
  for (int64_t i = 0; i < n; ++i)
    dst[i] = float_to_bf16_stochastic(src[i], bits.word[i] >> bits.shift);
}

/// Whether every src[k] (fp32) rounds to exactly the 16-bit storage bits[k] of dtype d (bf16
/// or fp16): the [note: master sync] check of csrc/cpu/step.h. One fused loop, rounding in
/// registers with no buffer in between. AMP AdamW step (grad_norm + adamw_, bf16 + masters)
/// on GPT-2 small, 2 threads, min of 15 on a shared 2-core VM: rounding into a buffer, then
/// comparing, 307 ms vs 250 ms without the check; this loop 183 vs 163 and 198 vs 166 ms
/// (the bytes alone would be +7%).
inline bool rounds_to(const float* src, const uint16_t* bits, DType d, int64_t n) {
  uint32_t differ = 0;
  int64_t k = 0;
  if (d == DType::kBFloat16) {
    for (; k < n; ++k) differ |= static_cast<uint32_t>(float_to_bf16(src[k]) ^ bits[k]);
    return differ == 0;
  }
#if defined(__F16C__)
  __m128i acc = _mm_setzero_si128();
  for (; k + 8 <= n; k += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + k), _MM_FROUND_TO_NEAREST_INT);
    acc = _mm_or_si128(acc, _mm_xor_si128(h, _mm_loadu_si128(
                                                 reinterpret_cast<const __m128i*>(bits + k))));
  }
  differ = _mm_testz_si128(acc, acc) ? 0u : 1u;
#endif
  for (; k < n; ++k) differ |= static_cast<uint32_t>(float_to_fp16(src[k]) ^ bits[k]);
  return differ == 0;
}

/// dst[0:n] = storage values src[0:n] of dtype d, as opmath T.
template <typename T>
inline void load_values(T* dst, const void* src, DType d, int64_t n) {
  switch (d) {
    case DType::kFloat32: {
      const float* s = static_cast<const float*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(s[i]);
      return;
    }
    case DType::kFloat64: {
      const double* s = static_cast<const double*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(s[i]);
      return;
    }
    case DType::kBFloat16:
    case DType::kFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      if constexpr (sizeof(T) == sizeof(float)) {
        if (d == DType::kBFloat16) bf16_to_float_n(dst, s, n);
        else fp16_to_float_n(dst, s, n);
      } else {  // only reached for a master-less fp64 call, which has no 16-bit slot
        for (int64_t i = 0; i < n; ++i)
          dst[i] = static_cast<T>(d == DType::kBFloat16 ? bf16_to_float(s[i])
                                                        : fp16_to_float(s[i]));
      }
      return;
    }
    case DType::kInt8:  // 8-bit codes are never loaded as values: quant8.h dequantizes
    case DType::kUInt8:
      return;
  }
}

/// Storage values dst[0:n] of dtype d = opmath src[0:n], rounded as R says ([note: store
/// rounding] in fusedopt/dtype.h). kStochastic stores fp32 values to bf16 only, element k
/// with its random bits of `bits` ([note: stochastic rounding], rounding_words_n).
template <Rounding R = Rounding::kNearestEven, typename T>
inline void store_values(void* dst, DType d, const T* src, int64_t n, StreamBits bits = {}) {
  if constexpr (R == Rounding::kStochastic) {
    static_assert(sizeof(T) == sizeof(float), "stochastic rounding stores fp32 values");
    if (d == DType::kBFloat16) {
      float_to_bf16_stochastic_n(static_cast<uint16_t*>(dst), src, n, bits);
      return;
    }
  }
  switch (d) {
    case DType::kFloat32: {
      float* o = static_cast<float*>(dst);
      for (int64_t i = 0; i < n; ++i) o[i] = static_cast<float>(src[i]);
      return;
    }
    case DType::kFloat64: {
      double* o = static_cast<double*>(dst);
      for (int64_t i = 0; i < n; ++i) o[i] = static_cast<double>(src[i]);
      return;
    }
    case DType::kBFloat16:
    case DType::kFloat16: {
      uint16_t* o = static_cast<uint16_t*>(dst);
      if constexpr (sizeof(T) == sizeof(float)) {
        if (d == DType::kBFloat16) float_to_bf16_n(o, src, n);
        else float_to_fp16_n(o, src, n);
      } else {
        for (int64_t i = 0; i < n; ++i) {
          const float f = static_cast<float>(src[i]);
          o[i] = d == DType::kBFloat16 ? float_to_bf16(f) : float_to_fp16(f);
        }
      }
      return;
    }
    case DType::kInt8:  // 8-bit codes are never stored from values: quant8.h quantizes
    case DType::kUInt8:
      return;
  }
}

}  // namespace fusedopt::cpu
