// adafactor_ on the CPU (torch.optim.Adafactor), as its passes adafactor_norms_ and
// adafactor_apply_ (math/adafactor.h, [note: adafactor passes]). Per element, fp32: pass 1
// reads g, p (a vector's variance is read and written too), pass 2 reads g (and p: the
// shared block walk loads it) of a factored tensor, pass 3 reads g, p and writes p. The
// factors (R + C numbers per matrix) are loaded and stored whole.
//
// Each tensor is one work item (the row and column sums need its whole extent), so the
// parallelism is across tensors; within a tensor every sum runs in one fixed order (element
// order, accumulated in double), so the results do not depend on the thread count.
#include <array>
#include <cfloat>
#include <vector>

#include "fusedopt/launch.h"
#include "fusedopt/math/adafactor.h"
#include "reduce.h"
#include "step.h"

namespace fusedopt::cpu {
namespace {

/// The eps of a storage dtype (torch.finfo(dtype).eps), for eps1 = None.
double dtype_eps(DType d) {
  switch (d) {
    case DType::kFloat64:
      return DBL_EPSILON;
    case DType::kBFloat16:
      return 0.0078125;  // 2^-7
    case DType::kFloat16:
      return 0.0009765625;  // 2^-10
    case DType::kFloat32:
    case DType::kInt8:  // (never a param: 8-bit codes)
    case DType::kUInt8:
      break;
  }
  return FLT_EPSILON;
}

/// A small state (a factor) whole, as opmath values.
template <typename T>
std::vector<T> load_state(const TensorSlot& slot, int64_t i, int64_t n) {
  std::vector<T> v(n);
  if (n > 0) load_values(v.data(), slot.data[i], slot.dtype, n);
  return v;
}

/// Stores a small state whole, then reloads it: the values as stored (rounded to the
/// state's dtype), which every pass computes u from.
template <typename T>
void store_state(const TensorSlot& slot, int64_t i, std::vector<T>& v) {
  const int64_t n = static_cast<int64_t>(v.size());
  if (n == 0) return;
  store_values(slot.data[i], slot.dtype, v.data(), n);
  load_values(v.data(), slot.data[i], slot.dtype, n);
}

/// A factored tensor's second moment as stored: its row and column factors and, per batch,
/// the floored mean of its row factor.
template <typename T>
struct Factors {
  int64_t rows, cols;
  std::vector<T> row, col, floor;

  T variance(int64_t index) const {
    const int64_t r = index / cols;         // row of every batch
    const int64_t c = index - r * cols;
    const int64_t b = r / rows;
    return adafactor_factored_variance(row[r], col[b * cols + c], floor[b]);
  }
};

template <typename T>
Factors<T> load_factors(const AdafactorCall& call, int64_t i, const AdafactorScalars<T>& s) {
  const int64_t* dims = call.lists.factor_dims + 2 * i;
  Factors<T> f{dims[0], dims[1], {}, {}, {}};
  const int64_t batches = call.lists.numels[i] / (f.rows * f.cols);
  f.row = load_state<T>(call.row_vars, i, batches * f.rows);
  f.col = load_state<T>(call.col_vars, i, batches * f.cols);
  f.floor.resize(batches);
  for (int64_t b = 0; b < batches; ++b) {
    double sum = 0.0;
    for (int64_t r = 0; r < f.rows; ++r) sum += static_cast<double>(f.row[b * f.rows + r]);
    f.floor[b] = adafactor_row_floor(static_cast<T>(sum / static_cast<double>(f.rows)), s);
  }
  return f;
}

/// Walks tensor i in blocks: f(p, g, offset, n), p the param (or master, adopted per
/// [note: master sync]) and g the grad as loaded; with kWrite p (and the master) are
/// written back after f.
template <typename T, bool kWrite, typename F>
void walk(const StepLists& lists, int64_t i, F&& f) {
  const WorkItem w{i, 0, lists.numels[i]};
  int64_t offset = 0;
  for_each_block<T, 0, kWrite>(lists, std::array<TensorSlot, 0>{}, w,
                               [&](T* p, const T* g, auto&, int64_t n) {
                                 f(p, g, offset, n);
                                 offset += n;
                               });
}

template <typename T>
struct AdafactorPlan {
  std::vector<AdafactorScalars<T>> scalars;
  GradLoad<T> load;
  std::vector<WorkItem> items;  // one per tensor

  AdafactorPlan(const AdafactorCall& call, const std::vector<double>& t)
      : scalars(call.lists.num_tensors),
        load(make_grad_load<T>(call.lists.scalars.grad_scale, call.lists.scalars.clip_coef,
                               call.maximize)) {
    const StepLists& lists = call.lists;
    // eps1 = None: the eps of the dtype the update runs on (fp32 with master weights)
    const double eps =
        dtype_eps(lists.master_params.present() ? DType::kFloat32 : lists.params.dtype);
    for (int64_t i = 0; i < lists.num_tensors; ++i) {
      scalars[i] = adafactor_scalars<T>(lr_of(lists, call.lr(i), i), call.beta2_decay(i),
                                        adafactor_eps1(call.eps1(i), eps), call.weight_decay(i),
                                        t[i]);
      items.push_back({i, 0, lists.numels[i]});
    }
  }
};

/// Passes 1 and 2 of tensor i: the new second moments, and (sum p^2, sum u^2).
template <typename T>
std::array<double, 2> norms_tensor(const AdafactorCall& call, const AdafactorPlan<T>& plan,
                                   int64_t i) {
  const StepLists& lists = call.lists;
  const AdafactorScalars<T>& s = plan.scalars[i];
  const GradLoad<T>& load = plan.load;
  double param_sq = 0.0, update_sq = 0.0;
  if (lists.numels[i] == 0) return {0.0, 0.0};  // nothing to reduce (nor a row to divide by)
  if (lists.factor_dims[2 * i] == 0) {  // a vector or scalar: its variance, in one pass
    const TensorSlot& slot = call.variances;
    walk<T, false>(lists, i, [&](T* p, const T* g, int64_t off, int64_t n) {
      alignas(64) T buffer[kBlock];
      T* v = view_block(slot.data[i], slot.dtype, off, n, buffer);
      for (int64_t e = 0; e < n; ++e) {
        const T ge = load_grad<true>(g[e], load);
        v[e] = adafactor_lerp(v[e], ge * ge, s.weight);
      }
      write_block(slot.data[i], slot.dtype, off, n, v);
      v = view_block(slot.data[i], slot.dtype, off, n, buffer);  // as stored
      param_sq += lane_sum<T>(n, [&](int64_t e) { return p[e] * p[e]; });
      for (int64_t e = 0; e < n; ++e) {
        const T u = adafactor_update(load_grad<true>(g[e], load), v[e], s);
        update_sq += static_cast<double>(u * u);
      }
    });
    return {param_sq, update_sq};
  }
  const int64_t rows = lists.factor_dims[2 * i], cols = lists.factor_dims[2 * i + 1];
  const int64_t batches = lists.numels[i] / (rows * cols);
  std::vector<double> row_sum(batches * rows, 0.0), col_sum(batches * cols, 0.0);
  walk<T, false>(lists, i, [&](T* p, const T* g, int64_t off, int64_t n) {
    param_sq += lane_sum<T>(n, [&](int64_t e) { return p[e] * p[e]; });
    for (int64_t e = 0; e < n; ++e) {
      const T ge = load_grad<true>(g[e], load);
      const double g2 = static_cast<double>(ge * ge);
      const int64_t r = (off + e) / cols;
      row_sum[r] += g2;
      col_sum[(r / rows) * cols + (off + e - r * cols)] += g2;
    }
  });
  std::vector<T> row = load_state<T>(call.row_vars, i, batches * rows);
  std::vector<T> col = load_state<T>(call.col_vars, i, batches * cols);
  for (size_t j = 0; j < row.size(); ++j)
    row[j] = adafactor_lerp(row[j], static_cast<T>(row_sum[j] / static_cast<double>(cols)),
                            s.weight);
  for (size_t j = 0; j < col.size(); ++j)
    col[j] = adafactor_lerp(col[j], static_cast<T>(col_sum[j] / static_cast<double>(rows)),
                            s.weight);
  store_state(call.row_vars, i, row);
  store_state(call.col_vars, i, col);
  const Factors<T> f = load_factors(call, i, s);
  walk<T, false>(lists, i, [&](T*, const T* g, int64_t off, int64_t n) {
    for (int64_t e = 0; e < n; ++e) {
      const T u = adafactor_update(load_grad<true>(g[e], load), f.variance(off + e), s);
      update_sq += static_cast<double>(u * u);
    }
  });
  return {param_sq, update_sq};
}

template <typename T>
void norms_items(const AdafactorCall& call, T* sq_norms, const ExecContext& ctx) {
  const AdafactorPlan<T> plan(call, advance_steps(call.lists));
  parallel_items(plan.items, ctx, [&](int64_t i) {
    const std::array<double, 2> sums = norms_tensor(call, plan, i);
    sq_norms[2 * i] = static_cast<T>(sums[0]);
    sq_norms[2 * i + 1] = static_cast<T>(sums[1]);
  });
}

template <typename T>
void apply_items(const AdafactorCall& call, const T* sq_norms, const ExecContext& ctx) {
  const StepLists& lists = call.lists;
  std::vector<double> t(lists.num_tensors);
  for (int64_t i = 0; i < lists.num_tensors; ++i) t[i] = static_cast<double>(*lists.steps[i]);
  AdafactorPlan<T> plan(call, t);
  for (int64_t i = 0; i < lists.num_tensors; ++i)
    plan.scalars[i].step_size = static_cast<T>(adafactor_step_size(
        lr_of(lists, call.lr(i), i), t[i], call.eps2(i), call.d(i),
        static_cast<double>(sq_norms[2 * i]), static_cast<double>(sq_norms[2 * i + 1]),
        lists.numels[i]));
  parallel_items(plan.items, ctx, [&](int64_t i) {
    if (lists.numels[i] == 0) return;
    const AdafactorScalars<T>& s = plan.scalars[i];
    const GradLoad<T>& load = plan.load;
    if (lists.factor_dims[2 * i] == 0) {
      const TensorSlot& slot = call.variances;
      walk<T, true>(lists, i, [&](T* p, const T* g, int64_t off, int64_t n) {
        alignas(64) T buffer[kBlock];
        const T* v = view_block(slot.data[i], slot.dtype, off, n, buffer);
        for (int64_t e = 0; e < n; ++e)
          p[e] = adafactor_apply(p[e], adafactor_update(load_grad<true>(g[e], load), v[e], s), s);
      });
      return;
    }
    const Factors<T> f = load_factors(call, i, s);
    walk<T, true>(lists, i, [&](T* p, const T* g, int64_t off, int64_t n) {
      for (int64_t e = 0; e < n; ++e)
        p[e] = adafactor_apply(
            p[e], adafactor_update(load_grad<true>(g[e], load), f.variance(off + e), s), s);
    });
  });
}

}  // namespace

void adafactor_norms(const AdafactorNormsCall& call, const ExecContext& ctx) {
  if (!step_enabled(call.step.lists)) return;  // sq_norms stay 0
  with_opmath(call.step.lists.params.dtype, [&](auto zero) {
    using T = decltype(zero);
    norms_items<T>(call.step, static_cast<T*>(call.sq_norms), ctx);
  });
}

void adafactor_apply(const AdafactorApplyCall& call, const ExecContext& ctx) {
  if (!step_enabled(call.step.lists)) return;
  with_opmath(call.step.lists.params.dtype, [&](auto zero) {
    using T = decltype(zero);
    apply_items<T>(call.step, static_cast<const T*>(call.sq_norms), ctx);
  });
}

void adafactor(const AdafactorCall& call, const ExecContext& ctx) {
  if (!step_enabled(call.lists)) return;
  with_opmath(call.lists.params.dtype, [&](auto zero) {
    using T = decltype(zero);
    std::vector<T> sq_norms(2 * call.lists.num_tensors, T(0));
    norms_items<T>(call, sq_norms.data(), ctx);
    apply_items<T>(call, sq_norms.data(), ctx);
  });
}

}  // namespace fusedopt::cpu
