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
/// store passes through one of them. Round to nearest even (c10's rounding, the functions
/// below) is the default of every store; stochastic rounding ([note: stochastic rounding])
/// is the other mode, for the bf16 param store of bf16 params without master weights.
///
/// [note: stochastic rounding] (issue #15) A bf16 param without master weights loses every
/// update smaller than half its ulp under round to nearest: the param stalls. Stochastic
/// rounding (SR) rounds x up with probability (x - down) / (up - down), so the stored param
/// equals x in expectation. The construction: add 16 random bits to the fp32 bit pattern and
/// keep the high half (float_to_bf16_stochastic): the low half of the pattern is the
/// distance to the lower neighbour in units of 2^-16 of the gap, so the carry happens with
/// exactly that probability, for either sign (the bits are sign-magnitude), across binades
/// and for subnormals. Edge cases, chosen and tested (tests/test_stochastic_rounding.py,
/// csrc/tests/test_math.cpp): a NaN stores the quiet NaN 0x7FC0 (as round to nearest); an
/// infinity stays an infinity (its low half is 0: no carry); a finite x never becomes an
/// infinity where round to nearest keeps it finite (x below 0x7F7F8000 in magnitude then
/// stores the largest finite bf16, 0x7F7F: SR saturates there instead of overflowing), and
/// where round to nearest overflows SR gives the infinity or the largest finite, at random.
///
/// The random bits come from Philox4x32-10 (fusedopt/philox.h; the same words in every
/// backend: csrc/include/fusedopt/philox.h for CPU and CUDA, tl.philox in Triton, which
/// is the standard Philox4x32-10 on the Random123 vectors, fusedopt/reference/philox.py in
/// plain torch), keyed so that every backend, every split of the params into calls and
/// a state-dict resume draw the same bits: key = the 64-bit seed; counter = (element index
/// in the tensor's memory order, low and high words; the tensor's stream id; the optimizer's
/// SR step counter); the top 16 bits of the first output word. The key reaches the kernels
/// without a host sync and CUDA-graph safe as one optional trailing argument of every step
/// op, `Tensor? sr_key=None` (after master_sync, so positional callers of the older schema
/// still fit): a 1-d int64 tensor on the params' device, [seed, counter, id_0, ..., id_{N-1}],
/// read by the kernels and never written. An id's high 32 bits, when set, are the index of
/// the tensor's first element in the whole param, added to the element index (a DTensor
/// shard's offset: [note: sharded stochastic rounding] in fusedopt/optim/_plan.py), so a
/// sharded run draws the unsharded run's bits. The optimizers (group key
/// `stochastic_rounding=True`) keep the seed and counter in one int64 device tensor per
/// device, give each param the id of its index in the optimizer's param order (over all
/// groups, the order of state_dict()'s param ids: stable across backends, call splits and a
/// resume), copy [seed, counter] into each call's key before the call and advance the
/// counter on the device after the step by 1 - (found_inf != 0): a step skipped by a
/// GradScaler changes nothing, its counter included. State dicts save seed and counter
/// (the top-level entry `"stochastic_rounding"`, and `sr_seed`, `sr_counter` in each SR group
/// for DCP, which keeps only state and groups); a loaded optimizer draws the same bits.
/// A step op with sr_key applies SR to the param store of bf16 params without master
/// weights, and, for an op that declares free state dtypes, to its bf16 state stores
/// ([note: state dtype]); other ops' 16-bit states keep round to nearest.
///
/// [note: state dtype] (issue #15) An op whose spec declares `state_dtypes`
/// (fusedopt/_contract.py: adamw_, lamb_, lion_, sgd_) stores its float states (layout
/// "param", not 8-bit) as fp32, bf16 or fp16 whatever the param: fp32 params with 16-bit
/// moments, 16-bit params with fp32 (compact, Kahan) masters and 16-bit moments, or 16-bit
/// params with fp32 moments, as torch's fused AdamW and Transformer Engine's exp_avg_dtype
/// allow (LAMB: the states' storage, not the param's, decides which pass stores the moments,
/// [note: lamb passes]: fp32/fp64 ones are exact). The math is fp32
/// between a widening load and a rounding store; fp64 params keep fp64 states. One state
/// dtype per call: the dtype of the call's first float state list (fusedopt.ops splits by
/// it; the optimizers' group key `state_dtype` chooses it, None = DESIGN.md §3's rule).
/// Rounding, chosen: every 16-bit store of a step rounds stochastically when the call has
/// an sr_key (the group's stochastic_rounding), else to nearest. The reason is the stall:
/// a bf16 exp_avg_sq at beta2 = 0.999 loses every decay step below half its ulp, so to
/// nearest it never decays (0.999 * v rounds back to v; tests/test_state_dtype.py shows
/// it), and an SR step that rounded its states to nearest would keep that bias. So an SR
/// call's bf16 states round stochastically, with or without bf16 params, the default bf16
/// states of bf16 params without masters included (which changed those runs' bits from
/// the second step on, against the param-only SR before: the reference was updated first).
/// fp16 states have no stochastic rounding here (fp16 is not the top half of fp32), so an
/// sr_key beside fp16 states is refused rather than rounded to nearest in part. The bits:
/// every store of an element shares its one Philox4x32-10 evaluation (the counter of
/// [note: stochastic rounding]), each store its own 16 bits of the four 32-bit words, a
/// "stream": the param store the top half of word 0 (unchanged), state slot k of the op (in
/// spec order) stream k + 1, i.e. the top half of word k + 1 (adamw: exp_avg 1, exp_avg_sq
/// 2, max_exp_avg_sq 3; lamb: exp_avg 1, exp_avg_sq 2; lion: exp_avg 1; sgd:
/// momentum_buffer 1), streams 4..7 the low halves of words 0..3. Philox's output words
/// are independent uniform words (a bijective mix of the counter per key), so the streams
/// are as independent as separate counters would make them, at one evaluation per element
/// rather than one per store; CUDA still evaluates once per store (four times per element
/// for AMSGrad SR), the CPU once per element for all its stores ([note: vector philox] in
/// csrc/cpu/convert.h), Triton once per block (tl.philox returns the four words).
enum class Rounding : int32_t { kNearestEven = 0, kStochastic = 1 };

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

/// f rounded to bf16 stochastically with the 16 random bits `random` (0..0xFFFF):
/// ([note: stochastic rounding]) the carry of (bits + random) out of the low half, for a
/// finite f; a NaN gives 0x7FC0; never an infinity where float_to_bf16 stays finite.
FUSEDOPT_HD FUSEDOPT_INLINE uint16_t float_to_bf16_stochastic(float f, uint32_t random) {
  const uint32_t u = float_bits(f);
  const uint32_t magnitude = u & 0x7FFFFFFFu;
  const bool nan = magnitude > 0x7F800000u;
  // An infinity has a zero low half: the carry never reaches the exponent's last value.
  const uint32_t rounded = (u + (random & 0xFFFFu)) >> 16;
  // Below 0x7F7F8000 round to nearest stays finite: saturate at the largest finite there.
  const bool overflow = magnitude < 0x7F7F8000u && (rounded & 0x7FFFu) == 0x7F80u;
  const uint32_t saturated = (u >> 16 & 0x8000u) | 0x7F7Fu;
  return nan ? uint16_t{0x7FC0} : static_cast<uint16_t>(overflow ? saturated : rounded);
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
