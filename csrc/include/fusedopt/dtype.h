// Storage dtypes and their exact conversions to and from opmath, torch-free.
//
// bf16 and fp16 round to nearest even exactly as c10 does (c10/util/BFloat16.h,
// c10/util/Half.h), so a param written here equals `master.to(dtype)` bit for bit. These
// scalar functions are the definition; vectorised CPU loops and CUDA intrinsics must agree
// with them (csrc/tests checks the CPU ones against every bf16/fp16 value).
#pragma once

#include <cstdint>
#include <cstring>

#include "fusedopt/macros.h"

namespace fusedopt {

/// Storage dtype of a tensor slot. Values are stable: they cross the binding boundary.
/// kInt8 / kUInt8: the codes of 8-bit states only ([note: 8-bit states] in
/// fusedopt/quant8.py), never a param, grad or float state.
enum class DType : int32_t {
  kFloat32 = 0,
  kBFloat16 = 1,
  kFloat16 = 2,
  kFloat64 = 3,
  kInt8 = 4,
  kUInt8 = 5
};

/// How a store rounds an opmath value to a narrower storage dtype.
///
/// [note: store rounding] The rounding of a store is one template parameter (one
/// tl.constexpr in Triton) of each backend's store conversion: csrc/cuda/common.cuh
/// from_opmath, csrc/cpu/convert.h store_values, fusedopt/triton_kernels/common.py round_to. Every
/// store passes through one of them, so a new mode (stochastic rounding) is added in the
/// enum and in those three conversions. Round to nearest even (c10's rounding, the
/// functions below) is the only mode today, and the default of every store.
enum class Rounding : int32_t { kNearestEven = 0 };

FUSEDOPT_HD constexpr int dtype_size(DType d) {
  return d == DType::kFloat64                           ? 8
         : d == DType::kFloat32                         ? 4
         : (d == DType::kInt8 || d == DType::kUInt8)    ? 1
                                                        : 2;
}

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
    case DType::kFloat64: return "float64";
    case DType::kInt8: return "int8";
    case DType::kUInt8: return "uint8";
  }
  return "?";
}

/// The opmath dtype of a C++ opmath type: float -> kFloat32, double -> kFloat64.
template <typename T> struct OpmathDType;
template <> struct OpmathDType<float> { static constexpr DType value = DType::kFloat32; };
template <> struct OpmathDType<double> { static constexpr DType value = DType::kFloat64; };

FUSEDOPT_HD FUSEDOPT_INLINE uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

FUSEDOPT_HD FUSEDOPT_INLINE float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

FUSEDOPT_HD FUSEDOPT_INLINE float bf16_to_float(uint16_t h) {
  return bits_float(static_cast<uint32_t>(h) << 16);
}

/// Round to nearest even; every NaN becomes the quiet NaN 0x7FC0 (as c10).
FUSEDOPT_HD FUSEDOPT_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return nan ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
}

/// A compact master: a bf16 param and the int16 remainder that together are the fp32 master
/// ([note: compact master] in fusedopt/_contract.py).
struct CompactMaster {
  uint16_t param;     // bf16 bits: the master rounded to nearest, ties away from zero
  int16_t remainder;  // master bits - (param bits << 16)
};

/// The compact form of an fp32 master: param bits (u + 0x8000) >> 16 (the carry adds to the
/// magnitude, never the sign, for a non-NaN u) and the low 16 bits as signed; a NaN gives
/// float_to_bf16's NaN and remainder 0.
/// Branch-free (selects), so that the CPU loops over it vectorise.
FUSEDOPT_HD FUSEDOPT_INLINE CompactMaster split_master(float master) {
  const uint32_t u = float_bits(master);
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  const uint32_t param = nan ? 0x7FC0u : (u + 0x8000u) >> 16;
  const uint32_t low = nan ? 0u : u & 0xFFFFu;
  return {static_cast<uint16_t>(param), static_cast<int16_t>(static_cast<uint16_t>(low))};
}

/// The fp32 master of a bf16 param and its remainder: (param << 16) + remainder; a NaN
/// param, or a remainder that does not fit the param (negative beside a zero, positive
/// beside an infinity: only after a write into the param), gives the param's value.
FUSEDOPT_HD FUSEDOPT_INLINE float join_master(uint16_t param, int16_t remainder) {
  const uint32_t magnitude = param & 0x7FFFu;
  const bool misfit = magnitude > 0x7F80u || (magnitude == 0 && remainder < 0) ||
                      (magnitude == 0x7F80u && remainder > 0);
  const uint32_t joined =
      (static_cast<uint32_t>(param) << 16) + static_cast<uint32_t>(int32_t{remainder});
  return bits_float(misfit ? static_cast<uint32_t>(param) << 16 : joined);
}

FUSEDOPT_HD FUSEDOPT_INLINE float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  const uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0x1F) return bits_float(sign | 0x7F800000u | (mantissa << 13));
  if (exponent == 0) {
    // Subnormal (or zero): mantissa * 2^-24, exact in fp32.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
    return bits_float(sign | float_bits(magnitude));
  }
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

/// Round to nearest even; NaN becomes 0x7E00 with the input's sign (as c10).
FUSEDOPT_HD FUSEDOPT_INLINE uint16_t float_to_fp16(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return sign | 0x7E00u;
  if (a >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 rounds past 65504: inf
  if (a >= 0x38800000u) {                       // a normal half (>= 2^-14)
    const uint32_t r = a - (112u << 23);
    return sign | static_cast<uint16_t>((r + 0xFFFu + ((r >> 13) & 1u)) >> 13);
  }
  const uint32_t e = a >> 23;
  if (e < 102) return sign;  // below 2^-25: rounds to zero
  // A subnormal half: round (1.mantissa * 2^(e-127)) * 2^24 = mant >> (126 - e) to even.
  const uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126u - e;
  const uint32_t q = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  const uint32_t up = (rem > half || (rem == half && (q & 1u))) ? 1u : 0u;
  return sign | static_cast<uint16_t>(q + up);
}

}  // namespace fusedopt
