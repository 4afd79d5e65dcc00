// Lion per-element update (lion-pytorch, Chen et al. 2023), over opmath registers.
//
// Per element: reads g, p, m; writes p, m.
#pragma once

#include "fusedopt/macros.h"
#include "fusedopt/math/common.h"

namespace fusedopt {

template <typename T>
struct LionScalars {
  T decay;  // 1 - lr*wd
  T lr;
  T beta1, one_minus_beta1;
  T beta2, one_minus_beta2;
};

template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE LionScalars<T> lion_scalars(double lr, double beta1, double beta2,
                                                        double weight_decay) {
  LionScalars<T> s;
  s.decay = static_cast<T>(1.0 - lr * weight_decay);
  s.lr = static_cast<T>(lr);
  s.beta1 = static_cast<T>(beta1);
  s.one_minus_beta1 = static_cast<T>(1.0 - beta1);
  s.beta2 = static_cast<T>(beta2);
  s.one_minus_beta2 = static_cast<T>(1.0 - beta2);
  return s;
}

/// p = p*(1 - lr*wd) - lr*sign(b1*m + (1-b1)*g), sign(0) = 0; m = b2*m + (1-b2)*g.
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE void lion_update(T& p, T g, T& m, const LionScalars<T>& s) {
  p = p * s.decay;
  const T c = s.beta1 * m + s.one_minus_beta1 * g;
  p = p - s.lr * sign0(c);
  m = s.beta2 * m + s.one_minus_beta2 * g;
}

}  // namespace fusedopt
