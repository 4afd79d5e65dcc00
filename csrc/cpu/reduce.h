// Deterministic block reductions for the CPU loops. A block's terms go round-robin into L
// independent accumulators of T ([note: lane count]), which are then widened to double and
// combined by a fixed pairwise tree. Without -ffast-math the compiler may not reorder a plain
// `sum += x` loop, so the lanes are spelled out; the order never depends on the thread count
// ([note: fixed partition] in loop.h).
//
// [note: lane count] A lane is one dependent add chain. 16 fp32 lanes are two AVX2 registers:
// two chains, which the 3-cycle add latency of Zen 4 (4 on Intel cores) holds to well below
// the two adds per cycle the core can issue. kWideLanes (256 bytes: 64 fp32, 32 fp64) are
// eight registers, enough to keep both add pipes busy, but the lane tree then costs about as
// much as 8 rows, so they pay only over long blocks. One core of a Zen 4 EPYC VM, a sum of
// squares of fp32 in L1: one 4096-element block 71 GB/s with 16 lanes, 109 with 64; blocks
// of 512 (kBlock, LAMB's) 66 with 16 lanes, 50 with 64 (LAMB 4% slower). So the loops over
// kBlock blocks keep kBlockLanes and grad_norm, whose blocks are its own, takes kWideLanes
// with kLaneTerms rows. A lane adds at most kLaneTerms terms of a block, in T, which is what
// the error bounds of [note: norm tolerance] (csrc/tests/test_cuda_emulated.cpp) count.
#pragma once

#include <cstdint>

#include "fusedopt/math/norm.h"

namespace fusedopt::cpu {

/// The most terms one lane adds in a block.
inline constexpr int kLaneTerms = 32;

/// Lanes of a reduction over one kBlock (loop.h) of 512 elements: kBlock / kLaneTerms.
inline constexpr int kBlockLanes = 16;

/// Lanes for long blocks: eight AVX2 registers of T ([note: lane count]).
template <typename T>
inline constexpr int kWideLanes = 256 / static_cast<int>(sizeof(T));

/// The lanes widened to double and added in a fixed pairwise tree (log2(L) levels).
template <typename T, int L>
inline double combine_lanes(const T (&acc)[L]) {
  static_assert((L & (L - 1)) == 0, "a power-of-two lane count");
  double wide[L];
  for (int j = 0; j < L; ++j) wide[j] = static_cast<double>(acc[j]);
  for (int width = L / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) wide[j] += wide[j + width];
  return wide[0];
}

/// sum over k < n of term(k), accumulated in L lanes of T (term k in lane k % L), returned
/// as a double. n <= L * kLaneTerms keeps each lane's chain within the bound.
template <typename T, int L = kBlockLanes, typename Term>
inline double lane_sum(int64_t n, Term&& term) {
  T acc[L] = {};
  int64_t k = 0;
  for (; k + L <= n; k += L)
    for (int j = 0; j < L; ++j) acc[j] += term(k + j);
  for (int j = 0; k + j < n; ++j) acc[j] += term(k + j);
  return combine_lanes<T, L>(acc);
}

/// max over k < n of term(k) (NaN propagates), starting from `init`.
template <typename T, int L = kBlockLanes, typename Term>
inline T lane_max(int64_t n, T init, Term&& term) {
  static_assert((L & (L - 1)) == 0, "a power-of-two lane count");
  T acc[L];
  for (int j = 0; j < L; ++j) acc[j] = init;
  int64_t k = 0;
  for (; k + L <= n; k += L)
    for (int j = 0; j < L; ++j) acc[j] = nan_max(term(k + j), acc[j]);
  for (int j = 0; k + j < n; ++j) acc[j] = nan_max(term(k + j), acc[j]);
  for (int width = L / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) acc[j] = nan_max(acc[j + width], acc[j]);
  return acc[0];
}

/// Whether any of value(0), ..., value(n - 1) is inf or NaN.
template <typename Value>
inline bool any_non_finite(int64_t n, Value&& value) {
  int bad = 0;
  for (int64_t k = 0; k < n; ++k) bad |= !is_finite(value(k));
  return bad != 0;
}

}  // namespace fusedopt::cpu
