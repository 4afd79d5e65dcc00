// LAMB per-element math (timm's Lamb, DESIGN.md §3), over opmath registers.
//
// LAMB needs two per-tensor norms (of p and of the update u) before any param can move, so a
// launcher runs two passes: pass 1 reads g, p, m, v and accumulates |p|^2 and |u|^2 (writing
// nothing); pass 2 reads g, p, m, v again, recomputes the same m, v, u bit for bit and writes
// p, m, v. Recomputing from the old states (rather than writing m, v in pass 1 and re-reading
// them) keeps u computed from unrounded m, v when states are bf16/fp16, as the reference does.
#pragma once

#include "fusedopt/macros.h"
#include "fusedopt/math/common.h"

namespace fusedopt {

template <typename T>
struct LambScalars {
  T beta1, beta3;  // beta3 = 1 - beta1 with grad averaging, else 1
  T beta2, one_minus_beta2;
  T bc1, sqrt_bc2, eps;
  T weight_decay;
  bool decay;  // weight_decay != 0
  T lr;
};

template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE LambScalars<T> lamb_scalars(double lr, double beta1, double beta2,
                                                        double eps, double weight_decay,
                                                        double step, bool grad_averaging,
                                                        bool bias_correction) {
  LambScalars<T> s;
  s.beta1 = static_cast<T>(beta1);
  s.beta3 = static_cast<T>(grad_averaging ? 1.0 - beta1 : 1.0);
  s.beta2 = static_cast<T>(beta2);
  s.one_minus_beta2 = static_cast<T>(1.0 - beta2);
  s.bc1 = static_cast<T>(fusedopt::bias_correction(beta1, step, bias_correction));
  s.sqrt_bc2 = static_cast<T>(::sqrt(fusedopt::bias_correction(beta2, step, bias_correction)));
  s.eps = static_cast<T>(eps);
  s.weight_decay = static_cast<T>(weight_decay);
  s.decay = weight_decay != 0.0;
  s.lr = static_cast<T>(lr);
  return s;
}

/// Updates m and v of one element and returns its update direction u (before the trust
/// ratio): u = (m/bc1) / (sqrt(v)/sqrt(bc2) + eps) + wd*p.
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE T lamb_direction(T p, T g, T& m, T& v, const LambScalars<T>& s) {
  m = s.beta1 * m + s.beta3 * g;
  v = s.beta2 * v + s.one_minus_beta2 * g * g;
  T u = (m / s.bc1) / (sqrt_rn(v) / s.sqrt_bc2 + s.eps);
  if (s.decay) u = u + s.weight_decay * p;
  return u;
}

/// The trust ratio |p| / |u| from the two norms: 1 where either is 0, clamped to <= 1 with
/// trust_clip; 1 when LAMB does not adapt this tensor (wd == 0 and not always_adapt).
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE T lamb_trust_ratio(T param_norm, T update_norm, bool adapt,
                                               bool trust_clip) {
  if (!adapt) return T(1);
  T ratio = (param_norm > T(0) && update_norm > T(0)) ? param_norm / update_norm : T(1);
  if (trust_clip) ratio = ratio > T(1) ? T(1) : ratio;  // torch.clamp(max=1) keeps NaN
  return ratio;
}

/// The param update p - lr * (u * ratio).
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE T lamb_apply(T p, T u, T ratio, const LambScalars<T>& s) {
  return p - s.lr * (u * ratio);
}

}  // namespace fusedopt
