// Muon's elementwise math (torch.optim.Muon, torch 2.14), over opmath registers: the two
// passes around the Newton-Schulz iteration ([note: muon passes] in fusedopt/optim/muon.py).
// Called by csrc/cpu/muon.cpp and csrc/cuda/muon.cu; mirrored by
// fusedopt/triton_kernels/muon.py and fusedopt/reference/ops.py; tested on exact values in
// csrc/tests/test_math.cpp.
//
// Per element: muon_momentum reads g, buf; writes buf and the bf16 NS input.
//              muon_apply reads p (or its master) and the bf16 NS output; writes p.
#pragma once

#include "fusedopt/macros.h"
#include "fusedopt/math/common.h"

namespace fusedopt {

// [note: muon lerp] torch.lerp(start, end, w) as torch's vectorised CPU kernel computes it
// (aten/src/ATen/native/cpu/LerpKernel.cpp, lerp_vec): one FMA, w*(end - start) + start for
// |w| < 0.5, else (w - 1)*(end - start) + end, with w in opmath (its scalar weight is a Python
// float rounded once). Two roundings instead (its scalar fallback) would leave torch's
// momentum buffers by an ulp.
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE T torch_lerp(T start, T end, T weight) {
  const bool small = (weight < T(0) ? -weight : weight) < T(0.5);
  return fma(small ? weight : weight - T(1), end - start, small ? start : end);
}

template <typename T>
struct MuonScalars {
  T buf_weight;       // 1 - momentum (float64, then rounded, as torch's Python float)
  T nesterov_weight;  // momentum
  T decay;            // 1 - lr*wd
  T step;             // -(lr * lr_ratio)
};

template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE MuonScalars<T> muon_scalars(double lr, double momentum,
                                                        double weight_decay, double lr_ratio) {
  MuonScalars<T> s;
  s.buf_weight = static_cast<T>(1.0 - momentum);
  s.nesterov_weight = static_cast<T>(momentum);
  s.decay = static_cast<T>(1.0 - lr * weight_decay);
  s.step = static_cast<T>(-(lr * lr_ratio));
  return s;
}

/// buf = lerp(buf, g, 1 - momentum), stored (rounded to the buffer's storage by ``store``);
/// returns the Newton-Schulz input: lerp(g, buf, momentum) with Nesterov, else buf, from the
/// stored buffer (as torch reads it back).
template <typename T, bool kNesterov, typename Store>
FUSEDOPT_HD FUSEDOPT_INLINE T muon_momentum(T g, T buf, const MuonScalars<T>& s, Store store) {
  const T stored = store(torch_lerp(buf, g, s.buf_weight));
  return kNesterov ? torch_lerp(g, stored, s.nesterov_weight) : stored;
}

/// p = p*(1 - lr*wd) (rounded), then p = fma(-(lr*lr_ratio), O, p): torch's mul_ and
/// add_(alpha=), the decay applied for wd = 0 too (torch.optim.Muon: unconditionally).
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE T muon_apply(T p, T update, const MuonScalars<T>& s) {
  return fma(s.step, update, p * s.decay);
}

}  // namespace fusedopt
