// Adan per-element update (Xie et al. 2022, the official sail-sg Adan's conventions), over
// opmath registers.
//
// Per element: reads g, p, m, v, n, neg_pre_grad; writes p, m, v, n, neg_pre_grad. The order
// of operations is fusedopt/reference/ops.py::adan_, one rounding per operation (no
// contraction: every product and sum is rounded, as the reference's tensor ops round).
#pragma once

#include "fusedopt/macros.h"
#include "fusedopt/math/common.h"

namespace fusedopt {

/// Per-tensor scalars of one Adan step, derived in double and rounded once to T.
template <typename T>
struct AdanScalars {
  T decay;  // no_prox: 1 - lr*wd; 1 when wd == 0 ([note: zero weight decay])
  T prox;   // !no_prox: 1 + lr*wd, the divisor; 1 when wd == 0
  bool no_prox;
  bool first;  // t == 1: the previous grad is g itself (d = 0), as the official first step
  T beta1, one_minus_beta1;
  T beta2, one_minus_beta2;
  T beta3, one_minus_beta3;
  T sqrt_bc3;        // sqrt(1 - beta3^t)
  T eps;
  T step_size;       // lr / (1 - beta1^t)
  T step_size_diff;  // lr * beta2 / (1 - beta2^t)
};

/// `step` is the already-incremented step count t.
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE AdanScalars<T> adan_scalars(double lr, double beta1, double beta2,
                                                        double beta3, double eps,
                                                        double weight_decay, double step,
                                                        bool no_prox) {
  const double bc1 = bias_correction(beta1, step, true);
  const double bc2 = bias_correction(beta2, step, true);
  const double bc3 = bias_correction(beta3, step, true);
  const bool decays = weight_decay != 0.0;
  AdanScalars<T> s;
  s.decay = static_cast<T>(decays ? 1.0 - lr * weight_decay : 1.0);
  s.prox = static_cast<T>(decays ? 1.0 + lr * weight_decay : 1.0);
  s.no_prox = no_prox;
  s.first = step == 1.0;
  s.beta1 = static_cast<T>(beta1);
  s.one_minus_beta1 = static_cast<T>(1.0 - beta1);
  s.beta2 = static_cast<T>(beta2);
  s.one_minus_beta2 = static_cast<T>(1.0 - beta2);
  s.beta3 = static_cast<T>(beta3);
  s.one_minus_beta3 = static_cast<T>(1.0 - beta3);
  s.sqrt_bc3 = static_cast<T>(::sqrt(bc3));
  s.eps = static_cast<T>(eps);
  s.step_size = static_cast<T>(lr / bc1);
  s.step_size_diff = static_cast<T>(lr * beta2 / bc2);
  return s;
}

/// One Adan step of one element. `g` is already loaded (load_grad); `npg` holds -g_prev and
/// is left holding -g.
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE void adan_update(T& p, T g, T& m, T& v, T& n, T& npg,
                                             const AdanScalars<T>& s) {
  const T d = g + (s.first ? -g : npg);  // g - g_prev; 0 at step 1 (NaN for an infinite g)
  m = s.beta1 * m + s.one_minus_beta1 * g;
  v = s.beta2 * v + s.one_minus_beta2 * d;
  const T u = s.beta2 * d + g;
  n = s.beta3 * n + s.one_minus_beta3 * u * u;
  const T denom = sqrt_rn(n) / s.sqrt_bc3 + s.eps;
  if (s.no_prox) p = p * s.decay;
  p = p - s.step_size * (m / denom);
  p = p - s.step_size_diff * (v / denom);
  if (!s.no_prox) p = p / s.prox;
  npg = -g;
}

}  // namespace fusedopt
