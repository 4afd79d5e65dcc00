// Adafactor per-element math (torch.optim.Adafactor, DESIGN.md §3), over opmath registers.
//
// [note: adafactor passes] Adafactor needs, before any param can move, three reductions per
// tensor: sum p^2 (alpha = max(eps2, rms(p)) * rho), the row and column means of g^2 of a
// factored param (its second moment), and sum u^2 of the unclipped update (the clip
// max(1, rms(u)/d)), which needs the new row and column factors. So it runs as two ops
// ([note: multi-pass ops] in DESIGN.md §2; fusedopt/_contract.py PHASE_OPS), with three
// passes over memory:
//   adafactor_norms_  pass 1: reads g, p; sums p^2 per tensor, g^2 per row and per column of
//                     a factored tensor (folded into row_var, col_var with adafactor_lerp),
//                     and for a vector or scalar updates the variance and sums u^2 in the
//                     same pass;
//                     pass 2 (factored tensors only): reads g and the new factors, sums u^2;
//   adafactor_apply_  pass 3: reads g, p and the factors (or the variance), recomputes u and
//                     writes p = decay(p) - (alpha/clip) * u.
// Every reduction is deterministic (a fixed order that depends on the sizes only,
// [note: adafactor sums]). u is
// always computed from the second moments as stored (rounded to their dtype), in all three
// passes alike, so pass 3's u is the one whose norm pass 2 took.
// Bytes per element, fp32 (the factors are R + C numbers per R x C matrix: ~0 per element):
// pass 1 8 (g, p), pass 2 4 (g), pass 3 12 (g, p read, p written): 24 B; a vector: 12 + 12
// (its variance read and written in pass 1, read in pass 3) = 28 B. Master weights add the
// master (4 B read in passes 1 and 3, written in 3) and the param's 2-byte read for master_sync.
#pragma once

#include <cstdint>

#include "fusedopt/macros.h"
#include "fusedopt/math/common.h"
#include "fusedopt/multi_tensor.h"

namespace fusedopt {

// [note: adafactor sums] The reductions of adafactor_norms_ run over chunks, so that a large
// matrix is reduced by every core / SM, not one. A factored tensor's chunks are runs of
// whole rows of one batch (adafactor_rows_per_chunk rows: ~2^16 elements, at least one
// row); a vector's are the 2^16-element chunks of [note: chunks]. The factor sums are the
// same bits on the CPU and in CUDA (csrc/tests/test_cuda_emulated.cpp compares them bit for
// bit), because both add the same terms (g^2 rounded to opmath, widened to double) in the
// same order:
//   * a row sum (whole in its chunk): the term of column c goes to lane c % 32 (a lane adds
//     its terms in column order), and the 32 lanes are folded by the pairwise tree
//     lane[j] += lane[j + w], w = 16, 8, 4, 2, 1: a CUDA warp per row (lane j reads columns
//     j, j + 32, ..., then warp_reduce's shuffle-down tree), and on the CPU 32 double lanes
//     folded by combine_lanes (csrc/cpu/reduce.h), which is that tree;
//   * a column sum: per chunk, its rows in order (one CUDA thread per column; the CPU adds a
//     row at a time into the chunk's column partials), then the chunks' partials in chunk
//     order (the fold that follows the pass);
//   * the floored mean of a batch's row factor (as stored): the 32-lane order of a row sum.
// No float atomics, nothing that depends on the thread count or on timing. sum p^2 and sum
// u^2 are per-chunk partials (CPU: lanes per block, widened to double; CUDA: a thread's
// terms in opmath, then the block tree), folded per tensor in chunk order in double: the
// same on every run, but not the same bits across backends (their bound is [note: norm
// tolerance]'s). Triton sums in the same chunks with tl.sum's tree (its own bits, within the
// harness's derived tolerance).

/// Lanes of a row sum and of a floor (a CUDA warp): [note: adafactor sums].
inline constexpr int kAdafactorLanes = 32;

/// Rows of one reduction chunk of a factored tensor with `cols` columns ([note: adafactor
/// sums]): 2^16 elements' worth, at least one row.
FUSEDOPT_HD FUSEDOPT_INLINE int64_t adafactor_rows_per_chunk(int64_t cols) {
  return cols >= mt::kChunkElems ? 1 : mt::kChunkElems / cols;
}

/// Reduction chunks per batch of a factored tensor of `rows` x `cols` matrices.
FUSEDOPT_HD FUSEDOPT_INLINE int64_t adafactor_chunks_per_batch(int64_t rows, int64_t cols) {
  const int64_t per = adafactor_rows_per_chunk(cols);
  return (rows + per - 1) / per;
}

/// The reduction chunks of a tensor of `numel` elements with factor dims (rows, cols)
/// (rows == 0: a vector or scalar); none for an empty tensor.
FUSEDOPT_HD FUSEDOPT_INLINE int64_t adafactor_reduce_chunks(int64_t numel, int64_t rows,
                                                            int64_t cols) {
  if (numel <= 0) return 0;
  if (rows == 0) return mt::chunk_count(numel);
  return numel / (rows * cols) * adafactor_chunks_per_batch(rows, cols);
}

/// Reduction chunk k of a factored tensor: rows [first_row, first_row + num_rows) of the
/// tensor (batch `batch`, rows counted across batches).
struct AdafactorRowChunk {
  int64_t batch, first_row, num_rows;
};

FUSEDOPT_HD FUSEDOPT_INLINE AdafactorRowChunk adafactor_row_chunk(int64_t k, int64_t rows,
                                                                  int64_t cols) {
  const int64_t per = adafactor_rows_per_chunk(cols);
  const int64_t chunks = (rows + per - 1) / per;
  const int64_t b = k / chunks, first = (k - b * chunks) * per;
  const int64_t n = rows - first < per ? rows - first : per;
  return {b, b * rows + first, n};
}

/// The per-tensor scalars of Adafactor at step t (all passes), in opmath.
template <typename T>
struct AdafactorScalars {
  T weight;      // t**beta2_decay: the lerp weight of the new mean of g^2 (1 - beta2_t)
  T eps1;        // the floor of a factored param's row mean
  T eps1_sq;     // the floor of the variance estimate
  T decay;       // 1 - lr*wd
  bool decays;   // wd != 0 ([note: zero weight decay])
  T step_size;   // alpha / clip (pass 3 only; 0 before)
};

/// eps1 < 0 stands for torch's eps1=None: the eps of the dtype the update runs on (the
/// param's storage dtype; fp32 with master weights).
FUSEDOPT_HD FUSEDOPT_INLINE double adafactor_eps1(double eps1, double dtype_eps) {
  return eps1 < 0.0 ? dtype_eps : eps1;
}

/// The scalars the update needs (weight 0: the apply pass takes no pow, which in a CUDA
/// kernel keeps values live across a call: a stack frame).
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE AdafactorScalars<T> adafactor_update_scalars(double lr, double eps1,
                                                                         double weight_decay) {
  AdafactorScalars<T> s;
  s.weight = T(0);
  s.eps1 = static_cast<T>(eps1);
  s.eps1_sq = static_cast<T>(eps1 * eps1);
  s.decay = static_cast<T>(1.0 - lr * weight_decay);
  s.decays = weight_decay != 0.0;
  s.step_size = T(0);
  return s;
}

/// Every per-tensor scalar at step `step` but the step size: the update's and the lerp
/// weight t**beta2_decay of the second moments.
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE AdafactorScalars<T> adafactor_scalars(double lr, double beta2_decay,
                                                                  double eps1,
                                                                  double weight_decay,
                                                                  double step) {
  AdafactorScalars<T> s = adafactor_update_scalars<T>(lr, eps1, weight_decay);
  s.weight = static_cast<T>(::pow(step, beta2_decay));
  return s;
}

/// alpha / clip of a tensor of n elements, in double, from the sums of squares of pass 1
/// and 2: rho = min(lr, 1/sqrt(t)), alpha = max(eps2, sqrt(sum p^2)/sqrt(n)) * rho,
/// clip = max(1, sqrt(sum u^2)/(sqrt(n)*d)) (torch's order of operations).
FUSEDOPT_HD FUSEDOPT_INLINE double adafactor_step_size(double lr, double step, double eps2,
                                                      double d, double param_sq,
                                                      double update_sq, int64_t n) {
  const double rho = fmin(lr, 1.0 / ::sqrt(step));
  const double root_n = ::sqrt(static_cast<double>(n));
  const double param_rms = ::sqrt(param_sq) / root_n;
  const double alpha = (param_rms > eps2 ? param_rms : eps2) * rho;
  const double update_rms = ::sqrt(update_sq) / (root_n * d);
  return alpha / (update_rms > 1.0 ? update_rms : 1.0);
}

/// torch.lerp(v, x, w): v + w*(x - v) for |w| < 0.5, else x - (x - v)*(1 - w).
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE T adafactor_lerp(T v, T x, T w) {
  const T diff = x - v;
  return (w < T(0.5) && w > T(-0.5)) ? v + w * diff : x - diff * (T(1) - w);
}

/// The floor of a factored param's mean row factor: max(mean, eps1) (NaN stays NaN).
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE T adafactor_row_floor(T row_mean, const AdafactorScalars<T>& s) {
  return row_mean < s.eps1 ? s.eps1 : row_mean;
}

/// The variance estimate of a factored element: row * col / floored row mean.
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE T adafactor_factored_variance(T row, T col, T row_floor) {
  return (row * col) / row_floor;
}

/// The unclipped update u = g / sqrt(max(v, eps1^2)) (NaN stays NaN).
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE T adafactor_update(T g, T v, const AdafactorScalars<T>& s) {
  return g / sqrt_rn(v < s.eps1_sq ? s.eps1_sq : v);
}

/// The new param: p * (1 - lr*wd) (wd != 0), then - step_size * u.
template <typename T>
FUSEDOPT_HD FUSEDOPT_INLINE T adafactor_apply(T p, T u, const AdafactorScalars<T>& s) {
  if (s.decays) p = p * s.decay;
  return p - s.step_size * u;
}

}  // namespace fusedopt
