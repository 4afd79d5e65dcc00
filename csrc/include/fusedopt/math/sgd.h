// SGD per-element update (torch.optim.SGD), over opmath registers.
//
// Per element: reads g, p (and buf with momentum); writes p (and buf).
#pragma once

#include "fusedopt/macros.h"
#include "fusedopt/math/common.h"

namespace fusedopt {

template <typename T>
struct SgdScalars {
  T lr;
  T weight_decay;
  bool decay;       // weight_decay != 0 (torch adds wd*p only then)
  T momentum;
  T one_minus_dampening;
  bool first_step;  // this param's first step: buf = g
  bool nesterov;
};

template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE SgdScalars<T> sgd_scalars(double lr, double momentum,
                                                      double dampening, double weight_decay,
                                                      bool first_step, bool nesterov) {
  SgdScalars<T> s;
  s.lr = static_cast<T>(lr);
  s.weight_decay = static_cast<T>(weight_decay);
  s.decay = weight_decay != 0.0;
  s.momentum = static_cast<T>(momentum);
  s.one_minus_dampening = static_cast<T>(1.0 - dampening);
  s.first_step = first_step;
  s.nesterov = nesterov;
  return s;
}

/// One SGD step of one element. With kMomentum, `buf` is read (unless first_step) and
/// written; without, it is not touched.
template <typename T, bool kMomentum>
FUSEDOPT_HD FUSEDOPT_INLINE void sgd_update(T& p, T g, T& buf, const SgdScalars<T>& s) {
  if (s.decay) g = g + s.weight_decay * p;
  if constexpr (kMomentum) {
    buf = s.first_step ? g : s.momentum * buf + s.one_minus_dampening * g;
    g = s.nesterov ? g + s.momentum * buf : buf;
  }
  p = p - s.lr * g;
}

}  // namespace fusedopt
