// What every step op shares: the common grad load and the per-tensor step scalars.
//
// Per-element functions work in opmath registers T (float; double for fp64 storage). The
// per-tensor scalars (bias corrections, lr/bc1...) are derived in double from the
// hyperparameters and rounded once to T, as the reference does when torch multiplies an fp32
// tensor by a Python float.
#pragma once

#include <cmath>

#include "fusedopt/macros.h"

namespace fusedopt {

/// An explicit fused multiply-add (see [note: pinned contraction]).
FUSEDOPT_HD FUSEDOPT_INLINE float fma(float a, float b, float c) { return fmaf(a, b, c); }
FUSEDOPT_HD FUSEDOPT_INLINE double fma(double a, double b, double c) { return ::fma(a, b, c); }

FUSEDOPT_HD FUSEDOPT_INLINE float sqrt_rn(float x) { return sqrtf(x); }
FUSEDOPT_HD FUSEDOPT_INLINE double sqrt_rn(double x) { return ::sqrt(x); }

/// How a grad element is loaded: [note: common scalars] in fusedopt/_contract.py,
/// g = g / grad_scale * clip_coef, negated for maximize. Absent scalars are 1, and
/// x / 1 == x * 1 == x exactly, so an absent scalar changes no bit.
template <typename T>
struct GradLoad {
  T grad_scale = T(1);
  T clip_coef = T(1);
  bool maximize = false;
  bool divide = false;  // grad_scale != 1: a loop may drop the division otherwise
};

/// kDivide = false skips the division by grad_scale; valid only where `divide` is false
/// (grad_scale == 1, so g / 1 == g bit for bit). A division is the costliest operation of
/// the loop on a CPU (Adam: 3 of them per element), hence the choice.
template <bool kDivide = true, typename T>
FUSEDOPT_HD FUSEDOPT_INLINE T load_grad(T g, const GradLoad<T>& s) {
  if constexpr (kDivide) g = g / s.grad_scale;
  g = g * s.clip_coef;
  return s.maximize ? -g : g;
}

/// The device scalars as read once per call (pointers may be null: absent). Each points to
/// one value of type T, the opmath ([note: opmath scalars] in fusedopt/_contract.py): an fp64
/// step takes its clip coefficient in fp64, not rounded to fp32.
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE GradLoad<T> make_grad_load(const void* grad_scale,
                                                       const void* clip_coef, bool maximize) {
  GradLoad<T> s;
  if (grad_scale) s.grad_scale = *static_cast<const T*>(grad_scale);
  s.divide = s.grad_scale != T(1);
  if (clip_coef) s.clip_coef = *static_cast<const T*>(clip_coef);
  s.maximize = maximize;
  return s;
}

/// 1 - beta^t in double (fp32 `1 - 0.999**t` is off by ~1e-5 relative), or 1 when disabled.
FUSEDOPT_HD FUSEDOPT_INLINE double bias_correction(double beta, double step, bool enabled) {
  return enabled ? 1.0 - ::pow(beta, step) : 1.0;
}

/// The learning rate of tensor i: lr_tensor (1 or N fp32 values) when given, else its
/// hyperparameter row's lr.
FUSEDOPT_HD FUSEDOPT_INLINE double tensor_lr(double lr, const float* lr_tensor,
                                             long long lr_tensor_numel, long long i) {
  if (lr_tensor) return static_cast<double>(lr_tensor[lr_tensor_numel > 1 ? i : 0]);
  return lr;
}

/// sign(x) with sign(±0) = 0 and sign(NaN) = 0, as torch.sign (lion-pytorch's `sign_`, the
/// Lion anchor): both comparisons are false for NaN. Two flat selects: g++ vectorises them
/// (a nested `?:` is "control flow in loop" to it, and csrc/cpu/lion.cpp stays scalar), and
/// ptxas (CUDA 13.0) keeps the fp16 Lion kernel free of the 8-byte stack frame that
/// `(x > 0) - (x < 0)` alone gave it (tests/test_cuda_static.py).
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE T sign0(T x) {
  const T positive = x > T(0) ? T(1) : T(0);
  return x < T(0) ? T(-1) : positive;
}

}  // namespace fusedopt
