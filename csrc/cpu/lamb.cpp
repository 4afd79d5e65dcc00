// lamb_ on the CPU (timm semantics). Two passes over the list (math/lamb.h explains why):
// pass 1 reads g, p, m, v and accumulates |p|^2 and |u|^2 per work item; the per-tensor trust
// ratios follow from those in item order; pass 2 reads g, p, m, v again and writes p, m, v.
// Per element: 32 bytes read + 12 written for fp32 (a single pass when no tensor adapts).
#include <cmath>
#include <vector>

#include "fusedopt/launch.h"
#include "fusedopt/math/lamb.h"
#include "reduce.h"
#include "step.h"

namespace fusedopt::cpu {
namespace {

struct NormPartial {
  double param_sq = 0.0;
  double update_sq = 0.0;
};

template <typename T>
void lamb_items(const LambCall& call, const ExecContext& ctx) {
  const StepLists& lists = call.lists;
  const int64_t n_tensors = lists.num_tensors;
  const std::vector<double> t = advance_steps(lists);
  std::vector<LambScalars<T>> scalars(n_tensors);
  std::vector<char> adapt(n_tensors);
  bool any_adapt = false;
  for (int64_t i = 0; i < n_tensors; ++i) {
    scalars[i] = lamb_scalars<T>(lr_of(lists, call.lr, i), call.beta1[i], call.beta2[i],
                                 call.eps[i], call.weight_decay[i], t[i], call.grad_averaging,
                                 call.bias_correction);
    adapt[i] = call.weight_decay[i] != 0.0 || call.always_adapt;
    any_adapt |= adapt[i] != 0;
  }
  const GradLoad<T> load =
      make_grad_load<T>(lists.scalars.grad_scale, lists.scalars.clip_coef, false);
  const std::array<TensorSlot, 2> states{call.exp_avgs, call.exp_avg_sqs};
  const std::vector<WorkItem> items = split_work(n_tensors, lists.numels);

  // Pass 1: norms of p and u, nothing written.
  std::vector<NormPartial> parts(items.size());
  if (any_adapt) {
    parallel_items(items, ctx, [&](int64_t k) {
      const WorkItem& w = items[k];
      if (!adapt[w.tensor]) return;
      const LambScalars<T> s = scalars[w.tensor];
      NormPartial part;
      alignas(64) T u[kBlock];
      for_each_block<T, 2, false>(lists, states, w, [&](T* p, const T* g, auto& st, int64_t n) {
        for (int64_t e = 0; e < n; ++e) {
          T m = st[0][e], v = st[1][e];
          u[e] = lamb_direction(p[e], load_grad(g[e], load), m, v, s);
        }
        part.param_sq += lane_sum<T>(n, [&](int64_t e) { return p[e] * p[e]; });
        part.update_sq += lane_sum<T>(n, [&](int64_t e) { return u[e] * u[e]; });
      });
      parts[k] = part;
    });
  }
  std::vector<NormPartial> norms(n_tensors);
  for (size_t k = 0; k < items.size(); ++k) {
    norms[items[k].tensor].param_sq += parts[k].param_sq;
    norms[items[k].tensor].update_sq += parts[k].update_sq;
  }
  std::vector<T> ratio(n_tensors);
  for (int64_t i = 0; i < n_tensors; ++i)
    ratio[i] = lamb_trust_ratio(static_cast<T>(std::sqrt(norms[i].param_sq)),
                                static_cast<T>(std::sqrt(norms[i].update_sq)), adapt[i] != 0,
                                call.trust_clip);

  // Pass 2: recompute m, v, u from the old states (bit-identical to pass 1) and write.
  parallel_items(items, ctx, [&](int64_t k) {
    const WorkItem& w = items[k];
    const LambScalars<T> s = scalars[w.tensor];
    const T r = ratio[w.tensor];
    for_each_block<T, 2, true>(lists, states, w, [&](T* p, const T* g, auto& st, int64_t n) {
      T* __restrict pp = p;
      T* __restrict m = st[0];
      T* __restrict v = st[1];
      for (int64_t e = 0; e < n; ++e) {
        const T u = lamb_direction(pp[e], load_grad(g[e], load), m[e], v[e], s);
        pp[e] = lamb_apply(pp[e], u, r, s);
      }
    });
  });
}

}  // namespace

void lamb(const LambCall& call, const ExecContext& ctx) {
  if (!step_enabled(call.lists)) return;
  with_opmath(call.lists.params.dtype, [&](auto zero) { lamb_items<decltype(zero)>(call, ctx); });
}

}  // namespace fusedopt::cpu
