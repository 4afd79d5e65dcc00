// grad_norm and scale_ per-element math, over opmath registers.
#pragma once

#include "fusedopt/macros.h"
#include "fusedopt/math/common.h"

namespace fusedopt {

/// Whether x is finite (neither inf nor NaN); written so that it vectorises.
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE bool is_finite(T x) {
  return x - x == T(0);  // inf - inf and NaN - NaN are NaN
}

/// The element of grad_norm's sum: (g / grad_scale)^2.
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE T norm2_term(T g, T grad_scale) {
  const T x = g / grad_scale;
  return x * x;
}

/// The element of grad_norm's max: |g / grad_scale|.
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE T norm_inf_term(T g, T grad_scale) {
  const T x = g / grad_scale;
  return x < T(0) ? -x : x;
}

/// max that propagates NaN (torch.max over the per-tensor norms does).
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

/// scale_'s element: x * scale.
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE T scale_element(T x, T scale) {
  return x * scale;
}

}  // namespace fusedopt
