// Schedule-Free AdamW per-element update (Defazio et al. 2024, "The Road Less Scheduled"; the
// schedulefree package's AdamWScheduleFree), over opmath registers.
//
// Per element: reads g, y (the param), z, v; writes y, z, v. The order of operations is
// fusedopt/reference/ops.py::schedulefree_adamw_, one rounding per operation (no
// contraction). The step's group scalars (lr with the warmup applied, ckp1, the bias
// correction of v) arrive from the host, computed there in double as the anchor does.
#pragma once

#include "fusedopt/macros.h"
#include "fusedopt/math/common.h"

namespace fusedopt {

/// Per-tensor scalars of one Schedule-Free AdamW step, derived in double and rounded once to T.
template <typename T>
struct ScheduleFreeAdamWScalars {
  T beta2, one_minus_beta2;
  T bias_correction2;  // 1 - beta2^k: v is divided by it, as the anchor's v.div(bc2)
  T eps;
  T weight_decay;  // applied at y where nonzero ([note: zero weight decay])
  bool decays;
  // y = lerp(y, z, ckp1) in torch's form: from y where |ckp1| < 0.5, else from z.
  bool lerp_from_y;
  T ckp1, one_minus_ckp1;
  T y_step;  // lr * (beta1 * (1 - ckp1) - 1): y's step along the normalized grad
  T lr;      // z's step
};

/// `lr` is the step's lr (warmup applied); `ckp1` = weight / weight_sum of the step.
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE ScheduleFreeAdamWScalars<T> schedulefree_adamw_scalars(
    double lr, double beta1, double beta2, double eps, double weight_decay, double ckp1,
    double bias_correction2) {
  ScheduleFreeAdamWScalars<T> s;
  s.beta2 = static_cast<T>(beta2);
  s.one_minus_beta2 = static_cast<T>(1.0 - beta2);
  s.bias_correction2 = static_cast<T>(bias_correction2);
  s.eps = static_cast<T>(eps);
  s.weight_decay = static_cast<T>(weight_decay);
  s.decays = weight_decay != 0.0;
  s.lerp_from_y = ::fabs(ckp1) < 0.5;
  s.ckp1 = static_cast<T>(ckp1);
  s.one_minus_ckp1 = static_cast<T>(1.0 - ckp1);
  s.y_step = static_cast<T>(lr * (beta1 * (1.0 - ckp1) - 1.0));
  s.lr = static_cast<T>(lr);
  return s;
}

/// One Schedule-Free AdamW step of one element: `y` is the param (or its master), `g` the
/// loaded grad (load_grad).
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE void schedulefree_adamw_update(T& y, T g, T& z, T& v,
                                                           const ScheduleFreeAdamWScalars<T>& s) {
  v = s.beta2 * v + s.one_minus_beta2 * g * g;
  T u = g / (sqrt_rn(v / s.bias_correction2) + s.eps);
  if (s.decays) u = u + s.weight_decay * y;
  y = s.lerp_from_y ? y + s.ckp1 * (z - y) : z - (z - y) * s.one_minus_ckp1;
  y = y + s.y_step * u;
  z = z - s.lr * u;
}

}  // namespace fusedopt
