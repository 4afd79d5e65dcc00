// Adam / AdamW per-element update (torch.optim.Adam / AdamW), over opmath registers.
//
// Per element: reads g, p, m, v (and vmax with amsgrad); writes p, m, v (and vmax). The
// order of operations is fusedopt/reference/ops.py::adamw_, one rounding per operation.
#pragma once

#include "fusedopt/macros.h"
#include "fusedopt/math/common.h"

namespace fusedopt {

/// Per-tensor scalars of one Adam/AdamW step, derived in double and rounded once to T.
template <typename T>
struct AdamWScalars {
  T decay;             // 1 - lr*wd (decoupled, wd != 0), else 1
  T l2;                // wd (Adam's g += wd*p), used only when l2_decay
  bool l2_decay;       // !decoupled && wd != 0
  T beta1, one_minus_beta1;
  T beta2, one_minus_beta2;
  T sqrt_bc2;          // sqrt(1 - beta2^t)
  T eps;
  T step_size;         // lr / (1 - beta1^t)
  bool decoupled;
};

/// `step` is the already-incremented step count t.
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE AdamWScalars<T> adamw_scalars(double lr, double beta1, double beta2,
                                                          double eps, double weight_decay,
                                                          double step, bool decoupled,
                                                          bool bias_correction) {
  const double bc1 = fusedopt::bias_correction(beta1, step, bias_correction);
  const double bc2 = fusedopt::bias_correction(beta2, step, bias_correction);
  AdamWScalars<T> s;
  // [note: zero weight decay] torch applies decay only `if weight_decay != 0`: a zero decay
  // is no decay, not p * (1 - lr*0) (NaN for lr = inf) nor g + 0*p (NaN for p = inf).
  const bool decays = weight_decay != 0.0;
  s.decay = static_cast<T>(decoupled && decays ? 1.0 - lr * weight_decay : 1.0);
  s.l2 = static_cast<T>(weight_decay);
  s.l2_decay = !decoupled && decays;
  s.beta1 = static_cast<T>(beta1);
  s.one_minus_beta1 = static_cast<T>(1.0 - beta1);
  s.beta2 = static_cast<T>(beta2);
  s.one_minus_beta2 = static_cast<T>(1.0 - beta2);
  s.sqrt_bc2 = static_cast<T>(::sqrt(bc2));
  s.eps = static_cast<T>(eps);
  s.step_size = static_cast<T>(lr / bc1);
  s.decoupled = decoupled;
  return s;
}

/// One Adam/AdamW step of one element. `g` is already loaded (load_grad). With kAmsgrad,
/// `vmax` is read and written; without it, it is not touched.
template <typename T, bool kAmsgrad>
FUSEDOPT_HD FUSEDOPT_INLINE void adamw_update(T& p, T g, T& m, T& v, T& vmax,
                                              const AdamWScalars<T>& s) {
  if (s.decoupled) {
    p = p * s.decay;  // decay is 1 for wd == 0: p * 1 == p exactly
  } else if (s.l2_decay) {
    g = g + s.l2 * p;
  }
  m = s.beta1 * m + s.one_minus_beta1 * g;
  v = s.beta2 * v + s.one_minus_beta2 * g * g;
  T v_hat = v;
  if constexpr (kAmsgrad) {
    v_hat = (vmax > v || vmax != vmax) ? vmax : v;  // torch.maximum: NaN propagates
    vmax = v_hat;
  }
  const T denom = sqrt_rn(v_hat) / s.sqrt_bc2 + s.eps;
  p = p - s.step_size * m / denom;
}

}  // namespace fusedopt
