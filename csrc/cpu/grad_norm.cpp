// grad_norm on the CPU: the global L2 / inf norm of tensors / grad_scale, per-tensor norms
// and a non-finite flag. Per element: reads one storage value.
//
// Each work item yields a partial (sum of squares as a double of fp32-lane block sums, or a
// max, and a non-finite flag); partials are combined in item order, so the result has the
// same bits for every thread count ([note: fixed partition] in loop.h).
//
// [note: norm at the roofline] The pass reads each grad once and writes nothing, so it is
// bound by read bandwidth once the loop retires elements faster than memory delivers them.
// Three things kept it below that: (1) two add chains per block (16 fp32 lanes), latency
// bound; it now keeps eight ([note: lane count] in reduce.h); (2) bf16 grads were first
// converted into a stack buffer and summed from there (a store and a reload per element):
// they are now widened inside the lane loop (a shift; fp16 still goes through F16C into a
// buffer); (3) an AMP step divides by the loss scale, a vdivps per 8 elements: a power-of-two
// scale (GradScaler's) multiplies by its exact reciprocal instead, the same bits ([note:
// exact unscale]). The inf norm's max loop, which did not vectorise, now does. Blocks are
// kWideLanes * kLaneTerms elements (2048 fp32), so the per-block lane tree and finite check
// cost ~1% of the loop. One core of a Zen 4 EPYC VM, 512 KB of grads in L2, GB/s before ->
// after: L2 norm fp32 63 -> 75 (L2-bound), bf16 19 -> 30; scale 2^16: fp32 35 -> 72, bf16
// 12 -> 27; inf norm fp32 5 -> 45, bf16 2 -> 17. From memory, 30 x 4M elements, 2 threads,
// the old and the new code alternating in one process with a plain AVX2 read of the same
// bytes (the cores shared, load ~5.5: ~10 GB/s to share), old / new / read: fp32 9.0 / 9.3 /
// 10.1 GB/s; bf16 5.2 / 11.0 / 11.1; bf16 with a 2^16 scale 4.8 / 9.4 / 9.4. bench/norm.py
// measures it beside torch, and what it adds to an AMP step.
#include <cmath>
#include <vector>

#include "fusedopt/launch.h"
#include "fusedopt/math/norm.h"
#include "loop.h"
#include "reduce.h"

namespace fusedopt::cpu {
namespace {

template <typename T>
struct Partial {
  double sum = 0.0;  // L2: sum of squares
  T max = T(0);      // inf: max |x|
  bool non_finite = false;
};

/// Elements per reduction block: kWideLanes lanes of kLaneTerms ([note: lane count]).
template <typename T>
inline constexpr int64_t kNormBlock = int64_t{kWideLanes<T>} * kLaneTerms;

// [note: exact unscale] How a term divides by grad_scale. kNone: grad_scale is 1, and
// g / 1 == g, so the division is folded away. kReciprocal: grad_scale is a power of two whose
// reciprocal r is a finite T; then g * r and g / grad_scale are the same real number, and IEEE
// rounds the same real number to the same T (normal, subnormal or zero alike), so the product
// has the division's bits at a fraction of its cost. kDivide: any other scale.
enum class Unscale { kNone, kReciprocal, kDivide };

template <typename T>
struct Scale {
  T divisor;     // grad_scale
  T reciprocal;  // 1 / grad_scale, exact when the mode is kReciprocal
};

template <typename T>
Unscale unscale_mode(T grad_scale) {
  if (grad_scale == T(1)) return Unscale::kNone;
  int exponent = 0;
  const bool power_of_two =
      std::isfinite(grad_scale) && std::fabs(std::frexp(grad_scale, &exponent)) == T(0.5);
  if (power_of_two && std::isfinite(T(1) / grad_scale)) return Unscale::kReciprocal;
  return Unscale::kDivide;
}

/// The terms of the two norms (fusedopt/math/norm.h), with the unscale of mode U.
template <Unscale U, typename T>
FUSEDOPT_INLINE T l2_term(T g, Scale<T> s) {
  if constexpr (U == Unscale::kNone) return norm2_term(g, T(1));
  else if constexpr (U == Unscale::kReciprocal) return norm2_term(g * s.reciprocal, T(1));
  else return norm2_term(g, s.divisor);
}

template <Unscale U, typename T>
FUSEDOPT_INLINE T inf_term(T g, Scale<T> s) {
  if constexpr (U == Unscale::kNone) return norm_inf_term(g, T(1));
  else if constexpr (U == Unscale::kReciprocal) return norm_inf_term(g * s.reciprocal, T(1));
  else return norm_inf_term(g, s.divisor);
}

/// Adds one block of n elements, value(k) the k-th as opmath T, to the partial.
template <typename T, Unscale U, typename Value>
void add_block(Partial<T>& part, int64_t n, bool inf_norm, const Scale<T> s, const Value value) {
  // A non-finite element makes the block's sum (or max) non-finite, so a finite result
  // proves the block finite and the explicit scan runs only for the rare other blocks.
  bool suspect;
  if (inf_norm) {
    const T block = lane_max<T, kWideLanes<T>>(
        n, T(0), [=](int64_t k) { return inf_term<U>(value(k), s); });
    part.max = nan_max(block, part.max);
    suspect = !is_finite(block);
  } else {
    const double block =
        lane_sum<T, kWideLanes<T>>(n, [=](int64_t k) { return l2_term<U>(value(k), s); });
    part.sum += block;
    suspect = !is_finite(block);
  }
  if (suspect) part.non_finite |= any_non_finite(n, value);
}

/// The partial of elements [begin, end) of one tensor, read straight from storage (fp32,
/// fp64; bf16 widened in the loop) or, for fp16, through a converted buffer.
template <typename T, Unscale U>
Partial<T> norm_range(const void* base, DType d, int64_t begin, int64_t end, bool inf_norm,
                      const Scale<T>& s) {
  constexpr int64_t block = kNormBlock<T>;
  alignas(64) T buffer[block];
  Partial<T> part;
  for (int64_t off = begin; off < end; off += block) {
    const int64_t n = std::min(block, end - off);
    switch (d) {
      case DType::kFloat32: {
        const float* x = static_cast<const float*>(base) + off;
        add_block<T, U>(part, n, inf_norm, s, [x](int64_t k) { return static_cast<T>(x[k]); });
        break;
      }
      case DType::kFloat64: {
        const double* x = static_cast<const double*>(base) + off;
        add_block<T, U>(part, n, inf_norm, s, [x](int64_t k) { return static_cast<T>(x[k]); });
        break;
      }
      case DType::kBFloat16: {
        const uint16_t* x = static_cast<const uint16_t*>(base) + off;
        add_block<T, U>(part, n, inf_norm, s,
                        [x](int64_t k) { return static_cast<T>(bf16_to_float(x[k])); });
        break;
      }
      case DType::kFloat16: {
        load_values(buffer, static_cast<const uint16_t*>(base) + off, d, n);
        add_block<T, U>(part, n, inf_norm, s, [x = buffer](int64_t k) { return x[k]; });
        break;
      }
      case DType::kInt8:  // never a grad (8-bit codes: the binding refuses them here)
      case DType::kUInt8:
        break;
    }
  }
  return part;
}

template <typename T, Unscale U>
void norm_items(const GradNormCall& call, const std::vector<WorkItem>& items,
                std::vector<Partial<T>>& parts, const Scale<T>& s, const ExecContext& ctx) {
  parallel_items(items, ctx, [&](int64_t k) {
    const WorkItem& w = items[k];
    parts[k] = norm_range<T, U>(call.data[w.tensor], call.dtypes[w.tensor], w.begin, w.end,
                                call.inf_norm, s);
  });
}

template <typename T>
void grad_norm_items(const GradNormCall& call, const ExecContext& ctx) {
  const std::vector<WorkItem> items = split_work(call.num_tensors, call.numels);
  std::vector<Partial<T>> parts(items.size());
  const T grad_scale = call.grad_scale ? static_cast<T>(*call.grad_scale) : T(1);
  const Scale<T> s{grad_scale, T(1) / grad_scale};
  switch (unscale_mode(grad_scale)) {
    case Unscale::kNone: norm_items<T, Unscale::kNone>(call, items, parts, s, ctx); break;
    case Unscale::kReciprocal:
      norm_items<T, Unscale::kReciprocal>(call, items, parts, s, ctx);
      break;
    case Unscale::kDivide: norm_items<T, Unscale::kDivide>(call, items, parts, s, ctx); break;
  }
  // Combine in item order; items of one tensor are consecutive.
  std::vector<double> sums(call.num_tensors, 0.0);
  std::vector<T> maxes(call.num_tensors, T(0));
  double total_sum = 0.0;
  T total_max = T(0);
  bool non_finite = false;
  for (size_t k = 0; k < items.size(); ++k) {
    const int64_t t = items[k].tensor;
    sums[t] += parts[k].sum;
    maxes[t] = nan_max(parts[k].max, maxes[t]);
    total_sum += parts[k].sum;
    total_max = nan_max(parts[k].max, total_max);
    non_finite |= parts[k].non_finite;
  }
  T* total = static_cast<T*>(call.total_norm);
  *total = call.inf_norm ? total_max : static_cast<T>(std::sqrt(total_sum));
  if (call.per_tensor) {
    T* per = static_cast<T*>(call.per_tensor_norms);
    for (int64_t t = 0; t < call.num_tensors; ++t)
      per[t] = call.inf_norm ? maxes[t] : static_cast<T>(std::sqrt(sums[t]));
  }
  *call.found_inf = non_finite ? 1.0f : 0.0f;
}

}  // namespace

void grad_norm(const GradNormCall& call, const ExecContext& ctx) {
  if (call.out_dtype == DType::kFloat64) {
    grad_norm_items<double>(call, ctx);
  } else {
    grad_norm_items<float>(call, ctx);
  }
}

}  // namespace fusedopt::cpu
