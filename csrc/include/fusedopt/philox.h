// Philox4x32-10 (Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3", SC11), the
// counter-based generator of stochastic rounding ([note: stochastic rounding] in
// fusedopt/dtype.h), written once for the CPU and CUDA builds (host and device), torch-free.
// Checked against Random123's published known-answer vectors in csrc/tests/test_math.cpp;
// fusedopt/reference/philox.py (torch) and fusedopt/triton_kernels/common.py (Triton's
// tl.philox) give the same words, tests/test_stochastic_rounding.py.
#pragma once

#include <cstdint>

#include "fusedopt/macros.h"

namespace fusedopt {

/// Four 32-bit words: a counter in, the random words out.
struct Philox4x32 {
  uint32_t w[4];
};

// The round multipliers and the Weyl key increments of Philox4x32 (Random123's constants).
inline constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
inline constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
inline constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
inline constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

/// Philox4x32 with 10 rounds of counter `c` under key (k0, k1): per round, with the two
/// 32x32 -> 64-bit products hi0:lo0 = M0 * c0 and hi1:lo1 = M1 * c2, the counter becomes
/// (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0), and the key is bumped by the Weyl constants
/// between rounds.
FUSEDOPT_HD FUSEDOPT_INLINE Philox4x32 philox4x32_10(Philox4x32 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c.w[0];
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c.w[2];
    c = Philox4x32{{static_cast<uint32_t>(p1 >> 32) ^ c.w[1] ^ k0, static_cast<uint32_t>(p1),
                    static_cast<uint32_t>(p0 >> 32) ^ c.w[3] ^ k1, static_cast<uint32_t>(p0)}};
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return c;
}

/// The key of a stochastically rounded store ([note: stochastic rounding] in
/// fusedopt/dtype.h): the optimizer's seed and step counter, the tensor's stream id and the
/// index of its first element in the whole param (a shard's offset, [note: sharded stochastic
/// rounding]; 0 unsharded), read once per block/work item from the op's `sr_key` = [seed,
/// counter, entry_0, ..., entry_{N-1}].
struct RoundingKey {
  uint64_t seed = 0;
  uint32_t counter = 0;
  uint32_t tensor = 0;
  uint32_t first = 0;
};

/// The key of tensor `t` of a call from its sr_key array (seed, counter, then one entry per
/// tensor: the stream id in the low 32 bits, the first element's index in the high ones),
/// int64 values taken modulo 2^64 / 2^32.
FUSEDOPT_HD FUSEDOPT_INLINE RoundingKey rounding_key(const int64_t* sr_key, int64_t t) {
  const uint64_t entry = static_cast<uint64_t>(sr_key[2 + t]);
  return RoundingKey{static_cast<uint64_t>(sr_key[0]), static_cast<uint32_t>(sr_key[1]),
                     static_cast<uint32_t>(entry), static_cast<uint32_t>(entry >> 32)};
}

/// The 16 random bits of element `element` of the tensor keyed by `key`: a half of a word of
/// Philox4x32-10 with key (seed low, seed high) and counter (element low, element high,
/// tensor id, step counter), the element counted in the whole param (`key.first + element`,
/// [note: sharded stochastic rounding]). `stream` picks the half ([note: state dtype] in
/// fusedopt/dtype.h; not the sr_key entry's stream id, which is the counter's tensor word):
/// 0 (the param store) the top half of word 0, k + 1 (state slot k) the top half of word
/// k + 1 for k < 3, 4..7 the low halves of words 0..3.
/// The stream is an argument, not a key field: a key with it gave the bf16 CUDA kernels a
/// 16-byte stack frame (nvcc 13.0, sm_90).
FUSEDOPT_HD FUSEDOPT_INLINE uint32_t rounding_bits(const RoundingKey& key, int64_t element,
                                                   uint32_t stream = 0) {
  const uint64_t e = static_cast<uint64_t>(element) + key.first;
  const Philox4x32 r = philox4x32_10(
      Philox4x32{{static_cast<uint32_t>(e), static_cast<uint32_t>(e >> 32), key.tensor,
                  key.counter}},
      static_cast<uint32_t>(key.seed), static_cast<uint32_t>(key.seed >> 32));
  const uint32_t word = r.w[stream & 3u];
  return stream < 4 ? word >> 16 : word & 0xFFFFu;
}

}  // namespace fusedopt
