// Vectorised conversions between storage dtypes and opmath for the CPU loops.
//
// Each function converts a block of n contiguous values. The bf16 loops are plain integer
// code that g++ -O3 -march=x86-64-v3 vectorises (8 lanes); fp16 uses the F16C instructions
// (vcvtph2ps / vcvtps2ph with round-to-nearest-even), which round exactly like c10 and
// fusedopt/dtype.h for every non-NaN value (csrc/tests/test_convert.cpp checks all 65536).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__F16C__)
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

/// dst[0:n] = src[0:n] rounded to bf16 stochastically, element k with the bits of element
/// first + k of the tensor keyed by `key` ([note: stochastic rounding] in fusedopt/dtype.h),
/// from `stream` ([note: state dtype]).
inline void float_to_bf16_stochastic_n(uint16_t* dst, const float* src, int64_t n,
                                       const RoundingKey& key, int64_t first,
                                       uint32_t stream = 0) {
  for (int64_t i = 0; i < n; ++i)
    dst[i] = float_to_bf16_stochastic(src[i], rounding_bits(key, first + i, stream));
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
/// with the random bits of element first + k under `key` ([note: stochastic rounding]).
template <Rounding R = Rounding::kNearestEven, typename T>
inline void store_values(void* dst, DType d, const T* src, int64_t n, const RoundingKey& key = {},
                         int64_t first = 0, uint32_t stream = 0) {
  if constexpr (R == Rounding::kStochastic) {
    static_assert(sizeof(T) == sizeof(float), "stochastic rounding stores fp32 values");
    if (d == DType::kBFloat16) {
      float_to_bf16_stochastic_n(static_cast<uint16_t*>(dst), src, n, key, first, stream);
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
