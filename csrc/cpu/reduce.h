// Deterministic block reductions for the CPU loops: kLanes independent accumulators (which
// g++ keeps in vector registers), combined in a fixed order into a double. Without
// -ffast-math the compiler may not reorder a plain `sum += x` loop, so the lanes are spelled
// out; the order never depends on the thread count ([note: fixed partition] in loop.h).
#pragma once

#include <cstdint>

#include "fusedopt/math/norm.h"

namespace fusedopt::cpu {

constexpr int kLanes = 16;

/// sum over k < n of term(k), accumulated in T lanes, returned as a double.
template <typename T, typename Term>
inline double lane_sum(int64_t n, Term&& term) {
  T acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += term(k + j);
  for (int j = 0; k + j < n; ++j) acc[j] += term(k + j);
  double total = 0.0;
  for (int j = 0; j < kLanes; ++j) total += static_cast<double>(acc[j]);
  return total;
}

/// max over k < n of term(k) (NaN propagates), starting from `init`.
template <typename T, typename Term>
inline T lane_max(int64_t n, T init, Term&& term) {
  T acc[kLanes];
  for (int j = 0; j < kLanes; ++j) acc[j] = init;
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] = nan_max(term(k + j), acc[j]);
  for (int j = 0; k + j < n; ++j) acc[j] = nan_max(term(k + j), acc[j]);
  T result = init;
  for (int j = 0; j < kLanes; ++j) result = nan_max(acc[j], result);
  return result;
}

/// Whether any of x[0:n] is inf or NaN.
template <typename T>
inline bool any_non_finite(const T* x, int64_t n) {
  int bad = 0;
  for (int64_t k = 0; k < n; ++k) bad |= !is_finite(x[k]);
  return bad != 0;
}

}  // namespace fusedopt::cpu
