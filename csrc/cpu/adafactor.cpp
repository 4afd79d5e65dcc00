// adafactor_ on the CPU (torch.optim.Adafactor), as its passes adafactor_norms_ and
// adafactor_apply_ (math/adafactor.h, [note: adafactor passes]). Per element, fp32: pass 1
// reads g, p (a vector's variance is read and written too), pass 2 reads g of a factored
// tensor, pass 3 reads g, p and writes p. The factors (R + C numbers per matrix) are
// loaded and stored whole.
//
// Every pass runs over chunks on the OpenMP threads ([note: adafactor sums]): pass 1 over
// the reduction chunks (whole rows of a factored tensor: its row sums are complete in the
// chunk; its column sums are chunk partials, folded in chunk order after the pass), passes
// 2 and 3 over the work items of loop.h. A block is walked as runs of one row each, so no
// element needs an index division. GPT-2 small, the 2-core VM (bench.report, fp32 / amp):
// before, a tensor per thread and two 64-bit divisions per element in passes 2 and 3, 1,003
// / 1,082 ms a step vs torch's foreach Adafactor 423 / 547 ms (load 1.3-1.9,
// bench/results/cpu-gpt2-2026-11-29T121458Z). Chunked, back to back with the old build at
// load 3.0-4.7: 1,636 -> 324 ms (fp32) and 2,588 -> 345 ms (amp), torch's foreach 2,574-4,414
// and 5,893-5,992 ms in the same runs; process CPU time per step 1,555 -> 216 and 1,787 ->
// 342 ms (torch's 1,607-2,942 and 4,000-5,842 ms).
#include <algorithm>
#include <array>
#include <cfloat>
#include <memory>
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

static_assert(kItemElements == mt::kChunkElems, "a vector's reduction chunks are work items");

/// A small state (a factor) whole, as opmath values.
template <typename T>
std::vector<T> load_state(const TensorSlot& slot, int64_t i, int64_t n) {
  std::vector<T> v(n);
  if (n > 0) load_values(v.data(), slot.data[i], slot.dtype, n);
  return v;
}

/// Stores value as element k of tensor i's small state, and returns it as stored (rounded
/// to the state's dtype), which every pass computes u from.
template <typename T>
T store_element(const TensorSlot& slot, int64_t i, int64_t k, T value) {
  store_values(element_ptr(slot.data[i], slot.dtype, k), slot.dtype, &value, 1);
  load_values(&value, element_ptr(slot.data[i], slot.dtype, k), slot.dtype, 1);
  return value;
}

/// The factor dims of tensor i: rows == 0 for a vector or scalar.
struct Dims {
  int64_t rows, cols, batches;
};

inline Dims dims_of(const StepLists& lists, int64_t i) {
  const int64_t rows = lists.factor_dims[2 * i], cols = lists.factor_dims[2 * i + 1];
  return {rows, cols, rows > 0 && lists.numels[i] > 0 ? lists.numels[i] / (rows * cols) : 0};
}

/// A factored tensor's second moment as stored: its row and column factors and, per batch,
/// the floored mean of its row factor (the 32-lane order of [note: adafactor sums]).
template <typename T>
struct Factors {
  Dims d;
  std::vector<T> row, col, floor;
};

template <typename T>
Factors<T> load_factors(const AdafactorCall& call, int64_t i, const AdafactorScalars<T>& s) {
  Factors<T> f{dims_of(call.lists, i), {}, {}, {}};
  f.row = load_state<T>(call.row_vars, i, f.d.batches * f.d.rows);
  f.col = load_state<T>(call.col_vars, i, f.d.batches * f.d.cols);
  f.floor.resize(f.d.batches);
  for (int64_t b = 0; b < f.d.batches; ++b) {
    const T* row = f.row.data() + b * f.d.rows;
    const double sum = lane_sum<double, kAdafactorLanes>(
        f.d.rows, [&](int64_t r) { return static_cast<double>(row[r]); });
    f.floor[b] = adafactor_row_floor(static_cast<T>(sum / static_cast<double>(f.d.rows)), s);
  }
  return f;
}

/// Walks work item w in blocks: f(p, g, offset, n), p the param (or master, adopted per
/// [note: master sync]; null without kParam) and g the grad as loaded; with kWrite p (and
/// the master) are written back after f.
template <typename T, bool kWrite, bool kParam = true, typename F>
void walk(const StepLists& lists, const WorkItem& w, F&& f) {
  for_each_block<T, 0, kWrite, true, kParam>(lists, std::array<TensorSlot, 0>{}, w,
                                             [&](T* p, const T* g, auto&, int64_t n) {
                                               f(p, g, n);
                                             });
}

/// Calls f(e0, e1, r, c0) for each run [e0, e1) of the block [off, off + n) of a tensor with
/// `cols` columns that lies in one row r (counted across batches), from column c0.
template <typename F>
void for_each_row_run(int64_t off, int64_t n, int64_t cols, F&& f) {
  int64_t r = off / cols, c = off - r * cols;
  for (int64_t e = 0; e < n; ++r, c = 0) {
    const int64_t len = std::min(n - e, cols - c);
    f(e, e + len, r, c);
    e += len;
  }
}

/// What the passes share: per-tensor scalars, the grad load, and the reduction chunks of
/// pass 1 ([note: adafactor sums]) with the first column partial of each factored tensor.
template <typename T>
struct AdafactorPlan {
  std::vector<AdafactorScalars<T>> scalars;
  GradLoad<T> load;
  std::vector<WorkItem> chunks;  // pass 1: tensor and element range of each reduction chunk
  std::vector<int64_t> chunk_index;  // each one's index among its tensor's chunks
  std::vector<int64_t> first_partial;  // per tensor: its column partials' offset
  int64_t num_partials = 0;

  AdafactorPlan(const AdafactorCall& call, const std::vector<double>& t)
      : scalars(call.lists.num_tensors),
        load(make_grad_load<T>(call.lists.scalars.grad_scale, call.lists.scalars.clip_coef,
                               call.maximize)),
        first_partial(call.lists.num_tensors, 0) {
    const StepLists& lists = call.lists;
    // eps1 = None: the eps of the dtype the update runs on (fp32 with master weights)
    const double eps =
        dtype_eps(lists.master_params.present() ? DType::kFloat32 : lists.params.dtype);
    for (int64_t i = 0; i < lists.num_tensors; ++i) {
      scalars[i] = adafactor_scalars<T>(lr_of(lists, call.lr(i), i), call.beta2_decay(i),
                                        adafactor_eps1(call.eps1(i), eps), call.weight_decay(i),
                                        t[i]);
      const Dims d = dims_of(lists, i);
      const int64_t n = adafactor_reduce_chunks(lists.numels[i], d.rows, d.cols);
      for (int64_t k = 0; k < n; ++k) {
        int64_t begin = k * kItemElements, end = std::min(lists.numels[i], begin + kItemElements);
        if (d.rows > 0) {
          const AdafactorRowChunk c = adafactor_row_chunk(k, d.rows, d.cols);
          begin = c.first_row * d.cols;
          end = begin + c.num_rows * d.cols;
        }
        chunks.push_back({i, begin, end});  // the sizes parallel_items balances and counts
        chunk_index.push_back(k);
      }
      first_partial[i] = num_partials;
      if (d.rows > 0) num_partials += n * d.cols;
    }
  }
};

/// Pass 1 over reduction chunk k of a vector or scalar: its variance (stored), sum p^2 and
/// sum u^2.
template <typename T, bool kDivide>
NormPartial vector_chunk(const AdafactorCall& call, const AdafactorPlan<T>& plan, int64_t i,
                         int64_t k) {
  const AdafactorScalars<T>& s = plan.scalars[i];
  const TensorSlot& slot = call.variances;
  const WorkItem w{i, k * kItemElements,
                   std::min(call.lists.numels[i], (k + 1) * kItemElements)};
  NormPartial part;
  int64_t off = w.begin;
  walk<T, false>(call.lists, w, [&](T* p, const T* g, int64_t n) {
    alignas(64) T buffer[kBlock];
    T* v = view_block(slot.data[i], slot.dtype, off, n, buffer);
    for (int64_t e = 0; e < n; ++e) {
      const T ge = load_grad<kDivide>(g[e], plan.load);
      v[e] = adafactor_lerp(v[e], ge * ge, s.weight);
    }
    write_block(slot.data[i], slot.dtype, off, n, v);
    v = view_block(slot.data[i], slot.dtype, off, n, buffer);  // as stored
    part.param_sq += lane_sum<T>(n, [&](int64_t e) { return p[e] * p[e]; });
    part.update_sq += lane_sum<T>(n, [&](int64_t e) {
      const T u = adafactor_update(load_grad<kDivide>(g[e], plan.load), v[e], s);
      return u * u;
    });
    off += n;
  });
  return part;
}

/// Pass 1 over reduction chunk k of a factored tensor: sum p^2; each of its rows' sum of g^2
/// (32 double lanes), folded into the row factor; its column partials (rows in order).
template <typename T, bool kDivide>
NormPartial factored_chunk(const AdafactorCall& call, const AdafactorPlan<T>& plan,
                           double* partials, int64_t i, int64_t k) {
  const StepLists& lists = call.lists;
  const AdafactorScalars<T>& s = plan.scalars[i];
  const Dims d = dims_of(lists, i);
  const AdafactorRowChunk chunk = adafactor_row_chunk(k, d.rows, d.cols);
  double* col_sum = partials + plan.first_partial[i] + k * d.cols;
  std::fill(col_sum, col_sum + d.cols, 0.0);
  NormPartial part;
  for (int64_t r = chunk.first_row; r < chunk.first_row + chunk.num_rows; ++r) {
    double lanes[kAdafactorLanes] = {};
    int64_t c0 = 0;  // a block starts at a multiple of kBlock, so of 32, in its row
    walk<T, false>(lists, {i, r * d.cols, (r + 1) * d.cols}, [&](T* p, const T* g, int64_t n) {
      alignas(64) T g2[kBlock];
      for (int64_t e = 0; e < n; ++e) {
        const T ge = load_grad<kDivide>(g[e], plan.load);
        g2[e] = ge * ge;
      }
      for (int64_t e = 0; e < n; ++e) col_sum[c0 + e] += static_cast<double>(g2[e]);
      int64_t e = 0;
      for (; e + kAdafactorLanes <= n; e += kAdafactorLanes)
        for (int j = 0; j < kAdafactorLanes; ++j) lanes[j] += static_cast<double>(g2[e + j]);
      for (int j = 0; e + j < n; ++j) lanes[j] += static_cast<double>(g2[e + j]);
      part.param_sq += lane_sum<T>(n, [&](int64_t e) { return p[e] * p[e]; });
      c0 += n;
    });
    const double sum = combine_lanes<double, kAdafactorLanes>(lanes);
    T old = T(0);
    load_values(&old, element_ptr(call.row_vars.data[i], call.row_vars.dtype, r),
                call.row_vars.dtype, 1);
    store_element(call.row_vars, i, r,
                  adafactor_lerp(old, static_cast<T>(sum / static_cast<double>(d.cols)),
                                 s.weight));
  }
  return part;
}

/// The column factors of factored tensor i from its chunks' partials, in chunk order.
template <typename T>
void fold_columns(const AdafactorCall& call, const AdafactorPlan<T>& plan,
                  const double* partials, int64_t i) {
  const Dims d = dims_of(call.lists, i);
  const int64_t chunks = adafactor_chunks_per_batch(d.rows, d.cols);
  std::vector<T> col = load_state<T>(call.col_vars, i, d.batches * d.cols);
  std::vector<double> sum(d.cols);
  for (int64_t b = 0; b < d.batches; ++b) {
    const double* part = partials + plan.first_partial[i] + b * chunks * d.cols;
    std::fill(sum.begin(), sum.end(), 0.0);
    for (int64_t k = 0; k < chunks; ++k)
      for (int64_t c = 0; c < d.cols; ++c) sum[c] += part[k * d.cols + c];
    T* out = col.data() + b * d.cols;
    for (int64_t c = 0; c < d.cols; ++c)
      out[c] = adafactor_lerp(out[c], static_cast<T>(sum[c] / static_cast<double>(d.rows)),
                              plan.scalars[i].weight);
  }
  if (!col.empty()) store_values(call.col_vars.data[i], call.col_vars.dtype, col.data(),
                                 static_cast<int64_t>(col.size()));
}

/// u of a block [off, off + n) of factored tensor i into u[0, n), from the factors.
template <typename T, bool kDivide>
void factored_updates(const Factors<T>& f, const AdafactorScalars<T>& s, const GradLoad<T>& load,
                      const T* g, int64_t off, int64_t n, T* u) {
  for_each_row_run(off, n, f.d.cols, [&](int64_t e0, int64_t e1, int64_t r, int64_t c0) {
    const int64_t b = r / f.d.rows;
    const T row = f.row[r], floor = f.floor[b];
    const T* col = f.col.data() + b * f.d.cols + c0 - e0;
    for (int64_t e = e0; e < e1; ++e)
      u[e] = adafactor_update(load_grad<kDivide>(g[e], load),
                              adafactor_factored_variance(row, col[e], floor), s);
  });
}

template <typename T>
void norms_items(const AdafactorCall& call, T* sq_norms, const ExecContext& ctx) {
  const StepLists& lists = call.lists;
  const AdafactorPlan<T> plan(call, advance_steps(lists));
  // Pass 1, per reduction chunk.
  std::unique_ptr<double[]> partials(new double[std::max<int64_t>(plan.num_partials, 1)]);
  std::vector<NormPartial> chunk_parts(plan.chunks.size());
  with_divide(plan.load.divide, [&](auto divide) {
    parallel_items(plan.chunks, ctx, [&](int64_t q) {
      const int64_t i = plan.chunks[q].tensor, k = plan.chunk_index[q];
      chunk_parts[q] = lists.factor_dims[2 * i] == 0
                           ? vector_chunk<T, divide()>(call, plan, i, k)
                           : factored_chunk<T, divide()>(call, plan, partials.get(), i, k);
    });
  });
  // The column factors, then the factors as stored.
  std::vector<Factors<T>> factors(lists.num_tensors);
  for (int64_t i = 0; i < lists.num_tensors; ++i) {
    if (lists.factor_dims[2 * i] == 0 || lists.numels[i] == 0) continue;
    fold_columns(call, plan, partials.get(), i);
    factors[i] = load_factors(call, i, plan.scalars[i]);
  }
  // Pass 2, per work item of a factored tensor: sum u^2.
  std::vector<WorkItem> items;
  for (const WorkItem& w : split_work(lists.num_tensors, lists.numels))
    if (lists.factor_dims[2 * w.tensor] > 0) items.push_back(w);
  std::vector<double> item_sq(items.size(), 0.0);
  with_divide(plan.load.divide, [&](auto divide) {
    parallel_items(items, ctx, [&](int64_t q) {
      const int64_t i = items[q].tensor;
      int64_t off = items[q].begin;
      walk<T, false, false>(lists, items[q], [&](T*, const T* g, int64_t n) {
        alignas(64) T u[kBlock];
        factored_updates<T, divide()>(factors[i], plan.scalars[i], plan.load, g, off, n, u);
        item_sq[q] += lane_sum<T>(n, [&](int64_t e) { return u[e] * u[e]; });
        off += n;
      });
    });
  });
  // The fold per tensor, in chunk (item) order.
  std::vector<NormPartial> norms(lists.num_tensors);
  add_partials(norms, plan.chunks, chunk_parts);
  for (size_t q = 0; q < items.size(); ++q) norms[items[q].tensor].update_sq += item_sq[q];
  store_sq_norms(norms, sq_norms);
}

template <typename T>
void apply_items(const AdafactorCall& call, const T* sq_norms, const ExecContext& ctx) {
  const StepLists& lists = call.lists;
  const std::vector<double> t = step_counts(lists);
  AdafactorPlan<T> plan(call, t);
  std::vector<Factors<T>> factors(lists.num_tensors);
  for (int64_t i = 0; i < lists.num_tensors; ++i) {
    plan.scalars[i].step_size = static_cast<T>(adafactor_step_size(
        lr_of(lists, call.lr(i), i), t[i], call.eps2(i), call.d(i),
        static_cast<double>(sq_norms[2 * i]), static_cast<double>(sq_norms[2 * i + 1]),
        lists.numels[i]));
    if (lists.factor_dims[2 * i] > 0 && lists.numels[i] > 0)
      factors[i] = load_factors(call, i, plan.scalars[i]);
  }
  const std::vector<WorkItem> items = split_work(lists.num_tensors, lists.numels);
  with_divide(plan.load.divide, [&](auto divide) {
    parallel_items(items, ctx, [&](int64_t q) {
      const int64_t i = items[q].tensor;
      const AdafactorScalars<T>& s = plan.scalars[i];
      const TensorSlot& slot = call.variances;
      const bool factored = lists.factor_dims[2 * i] > 0;
      int64_t off = items[q].begin;
      walk<T, true>(lists, items[q], [&](T* p, const T* g, int64_t n) {
        alignas(64) T u[kBlock];
        if (factored) {
          factored_updates<T, divide()>(factors[i], s, plan.load, g, off, n, u);
        } else {
          alignas(64) T buffer[kBlock];
          const T* v = view_block(slot.data[i], slot.dtype, off, n, buffer);
          for (int64_t e = 0; e < n; ++e)
            u[e] = adafactor_update(load_grad<divide()>(g[e], plan.load), v[e], s);
        }
        for (int64_t e = 0; e < n; ++e) p[e] = adafactor_apply(p[e], u[e], s);
        off += n;
      });
    });
  });
}

}  // namespace

FUSEDOPT_CPU_TWO_PASS_LAUNCHERS(adafactor, Adafactor, adafactor_norms, norms_items,
                                adafactor_apply, apply_items)

}  // namespace fusedopt::cpu
