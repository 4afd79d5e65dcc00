// LAMB per-element math (timm's Lamb, DESIGN.md §3), over opmath registers.
//
// LAMB needs two per-tensor norms (of p and of the update u) before any param can move, so it
// runs as two passes, each an op of its own ([note: multi-pass ops] in DESIGN.md §2):
// lamb_direction_ reads g, p, m, v, forms the new m, v and u and sums |p|^2 and |u|^2 per
// tensor; lamb_apply_ turns the sums into the trust ratio and writes p. Where u comes from in
// the second pass is decided per tensor, the same way in every backend ([note: lamb passes]):
// * a tensor that adapts and whose states hold opmath values exactly (fp32/fp64 states:
//   those of fp32/fp64 params or master weights by default, whatever the param with
//   state_dtype=fp32, [note: state dtype] in fusedopt/dtype.h): lamb_direction_ stores the
//   new m, v; lamb_apply_ reads p, m, v and recomputes u from them (lamb_update) — the
//   stored moments are the unrounded ones, so u is bit for bit the one whose norm was
//   taken. fp32: 24 + 16 = 40 B per element;
// * else (bf16/fp16 states, or a tensor that does not adapt):
//   lamb_direction_ writes nothing (and skips a tensor that does not adapt); lamb_apply_
//   reads g, p, m, v, recomputes the moments and u from them (lamb_direction) and writes
//   p, m, v (bf16 moments of an SR call rounded stochastically). Storing rounded moments in
//   the first pass would make the second pass's u differ from the one whose norm was
//   taken. bf16: 8 + 14 = 22 B; a tensor that does not adapt
//   takes the one pass (fp32 28 B). 8-bit moments ([note: 8-bit states] in
//   fusedopt/quant8.py) are never exact: lamb_direction_ reads the codes, lamb_apply_
//   recomputes the moments and writes the codes, once per step.
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

/// The update direction u of one element (before the trust ratio) from its new moments:
/// u = (m/bc1) / (sqrt(v)/sqrt(bc2) + eps) + wd*p.
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE T lamb_update(T p, T m, T v, const LambScalars<T>& s) {
  T u = (m / s.bc1) / (sqrt_rn(v) / s.sqrt_bc2 + s.eps);
  if (s.decay) u = u + s.weight_decay * p;
  return u;
}

/// Updates m and v of one element and returns its update direction u (lamb_update).
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE T lamb_direction(T p, T g, T& m, T& v, const LambScalars<T>& s) {
  m = s.beta1 * m + s.beta3 * g;
  v = s.beta2 * v + s.one_minus_beta2 * g * g;
  return lamb_update(p, m, v, s);
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

/// The trust ratio from the sums of squares that lamb_direction_ returns (over every shard of
/// a sharded param): lamb_trust_ratio(sqrt(param_sq), sqrt(update_sq)).
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE T lamb_trust_ratio_sq(T param_sq, T update_sq, bool adapt,
                                                  bool trust_clip) {
  return lamb_trust_ratio(sqrt_rn(param_sq), sqrt_rn(update_sq), adapt, trust_clip);
}

/// [note: lamb passes] Whether a tensor takes two passes over its elements (lamb_direction_
/// stores its new moments and lamb_apply_ recomputes u from them): it adapts and its states
/// hold opmath values exactly. See this file's header.
FUSEDOPT_HD FUSEDOPT_INLINE bool lamb_two_pass(bool adapt, bool states_exact) {
  return adapt && states_exact;
}

/// The param update p - lr * (u * ratio).
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE T lamb_apply(T p, T u, T ratio, const LambScalars<T>& s) {
  return p - s.lr * (u * ratio);
}

}  // namespace fusedopt
