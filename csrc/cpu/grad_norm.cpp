// grad_norm on the CPU: the global L2 / inf norm of tensors / grad_scale, per-tensor norms
// and a non-finite flag. Per element: reads one storage value.
//
// Each work item yields a partial (sum of squares as a double of fp32-lane block sums, or a
// max, and a non-finite flag); partials are combined in item order, so the result has the
// same bits for every thread count ([note: fixed partition] in loop.h).
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

template <typename T>
Partial<T> norm_range(void* base, DType d, int64_t begin, int64_t end, T grad_scale,
                      bool inf_norm) {
  alignas(64) T buffer[kBlock];
  Partial<T> part;
  for (int64_t off = begin; off < end; off += kBlock) {
    const int64_t n = std::min(kBlock, end - off);
    const T* x = view_block(base, d, off, n, buffer);
    part.non_finite |= any_non_finite(x, n);
    if (inf_norm) {
      part.max = lane_max<T>(n, part.max, [&](int64_t k) { return norm_inf_term(x[k], grad_scale); });
    } else {
      part.sum += lane_sum<T>(n, [&](int64_t k) { return norm2_term(x[k], grad_scale); });
    }
  }
  return part;
}

template <typename T>
void grad_norm_items(const GradNormCall& call, const ExecContext& ctx) {
  const std::vector<WorkItem> items = split_work(call.num_tensors, call.numels);
  std::vector<Partial<T>> parts(items.size());
  const T grad_scale = call.grad_scale ? static_cast<T>(*call.grad_scale) : T(1);
  parallel_items(items, ctx, [&](int64_t k) {
    const WorkItem& w = items[k];
    parts[k] = norm_range<T>(const_cast<void*>(call.data[w.tensor]), call.dtypes[w.tensor],
                             w.begin, w.end, grad_scale, call.inf_norm);
  });
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
