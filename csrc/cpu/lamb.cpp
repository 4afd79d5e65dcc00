// lamb_ on the CPU (timm semantics), as its two passes lamb_direction_ and lamb_apply_
// (math/lamb.h, [note: lamb passes]): lamb_direction_ reads g, p, m, v of each tensor that
// adapts, sums |p|^2 and |u|^2 per work item (folded per tensor in item order, in double)
// and stores m, v where the states are exact; lamb_apply_ turns the sums into trust ratios
// and writes p (from the stored m, v) or p, m, v (from g and the old m, v).
// Per element, fp32: 16 + 8 written, then 12 + 4 written (40 B); bf16 states: 8, then 8 + 6.
#include <cmath>
#include <optional>
#include <vector>

#include "fusedopt/launch.h"
#include "fusedopt/math/lamb.h"
#include "q8_step.h"
#include "reduce.h"
#include "step.h"

namespace fusedopt::cpu {
namespace {

// [note: lamb divisions] Each pass is bound by its divisions (g / grad_scale, m / bc1,
// sqrt(v) / sqrt_bc2 and the quotient of those: four vdivps and a vsqrtps per 8 floats; perf
// puts pass 1's time on them), so both passes drop g / grad_scale when grad_scale is 1
// (load_grad<kDivide>, the same bits). GPT-2 small's first 26.8M params, fp32, 2 shared
// cores: 101-120 ms -> 88-99 ms a step, i.e. from 2.4x to 2.0x AdamW's time (measured before
// the passes became two ops).

/// lamb_direction_ over one block: |p|^2 and |u|^2 of its elements; with kStore the new m, v
/// are stored (m, v then point into exact fp32/fp64 storage: view_block's own memory).
template <typename T, bool kDivide, bool kStore>
NormPartial lamb_norm_block(const T* __restrict p, const T* __restrict g, T* __restrict m,
                            T* __restrict v, int64_t n, const LambScalars<T> s,
                            const GradLoad<T> load) {
  alignas(64) T u[kBlock];
  for (int64_t e = 0; e < n; ++e) {
    T m_e = m[e], v_e = v[e];
    u[e] = lamb_direction(p[e], load_grad<kDivide>(g[e], load), m_e, v_e, s);
    if constexpr (kStore) {
      m[e] = m_e;
      v[e] = v_e;
    }
  }
  NormPartial part;
  part.param_sq = lane_sum<T>(n, [&](int64_t e) { return p[e] * p[e]; });
  part.update_sq = lane_sum<T>(n, [&](int64_t e) { return u[e] * u[e]; });
  return part;
}

/// lamb_apply_ over one block of a one-pass tensor: m, v, u from g and the old m, v, then
/// p -= lr * (u * ratio).
template <typename T, bool kDivide>
void lamb_block(T* __restrict p, const T* __restrict g, T* __restrict m, T* __restrict v,
                int64_t n, const LambScalars<T> s, const T ratio, const GradLoad<T> load) {
  for (int64_t e = 0; e < n; ++e) {
    const T u = lamb_direction(p[e], load_grad<kDivide>(g[e], load), m[e], v[e], s);
    p[e] = lamb_apply(p[e], u, ratio, s);
  }
}

/// lamb_apply_ over one block of a two-pass tensor: u from the stored new m, v.
template <typename T>
void lamb_block_stored(T* __restrict p, const T* __restrict m, const T* __restrict v, int64_t n,
                       const LambScalars<T> s, const T ratio) {
  for (int64_t e = 0; e < n; ++e)
    p[e] = lamb_apply(p[e], lamb_update(p[e], m[e], v[e], s), ratio, s);
}

/// What both passes take from a call: per-tensor scalars at step t, which tensors adapt,
/// the grad load, the state slots and the work items. 8-bit moments ([note: 8-bit states] in
/// fusedopt/quant8.py, given with their block scales) are never exact: pass 1 reads them,
/// pass 2 recomputes and writes them once, over whole quantization blocks (q8_step.h).
template <typename T>
struct LambPlan {
  std::vector<LambScalars<T>> scalars;
  std::vector<char> adapt;
  bool states_exact;  // fp32/fp64 states (or master weights): they hold opmath values
  GradLoad<T> load;
  std::array<TensorSlot, 2> states;
  std::vector<WorkItem> items;
  std::array<Q8Slot, 2> q8_states;
  std::optional<Q8Work> q8;

  LambPlan(const LambCall& call, const std::vector<double>& t)
      : scalars(tensor_scalars(call,
                               [&](int64_t i, double lr) {
                                 return lamb_scalars<T>(lr, call.beta1(i), call.beta2(i),
                                                        call.eps(i), call.weight_decay(i), t[i],
                                                        call.grad_averaging,
                                                        call.bias_correction);
                               })),
        adapt(call.lists.num_tensors),
        states_exact(call.exp_avgs.dtype == OpmathDType<T>::value),
        load(make_grad_load<T>(call.lists.scalars.grad_scale, call.lists.scalars.clip_coef,
                               false)),
        states{call.exp_avgs, call.exp_avg_sqs},
        q8_states{Q8Slot{call.exp_avgs, call.exp_avg_scales},
                  Q8Slot{call.exp_avg_sqs, call.exp_avg_sq_scales}} {
    const StepLists& lists = call.lists;
    if (call.exp_avg_scales.present()) {
      q8.emplace(lists);
    } else {
      items = split_work(lists.num_tensors, lists.numels);
    }
    for (int64_t i = 0; i < lists.num_tensors; ++i)
      adapt[i] = call.weight_decay(i) != 0.0 || call.always_adapt;
  }
  bool two_pass(int64_t i) const { return lamb_two_pass(adapt[i] != 0, states_exact); }
  const std::vector<WorkItem>& work() const { return q8 ? q8->items : items; }
  /// for_each_block over work item w, or for_each_q8_block for 8-bit moments.
  template <bool kWrite, bool kReadGrad = true, typename F>
  void walk(const StepLists& lists, const WorkItem& w, F&& f) const {
    if (q8) {
      for_each_q8_block<T, 2, kWrite, kReadGrad>(lists, *q8, q8_states, w, true, f);
    } else {
      for_each_block<T, 2, kWrite, kReadGrad>(lists, states, w, f);
    }
  }
};

template <typename T>
void direction_items(const LambCall& call, T* sq_norms, const ExecContext& ctx) {
  const StepLists& lists = call.lists;
  const LambPlan<T> plan(call, advance_steps(lists));
  const std::vector<WorkItem>& items = plan.work();
  std::vector<NormPartial> parts(items.size());
  parallel_items(items, ctx, [&](int64_t k) {
    const WorkItem& w = items[k];
    if (!plan.adapt[w.tensor]) return;
    const LambScalars<T> s = plan.scalars[w.tensor];
    NormPartial part;
    plan.template walk<false>(lists, w, [&](T* p, const T* g, auto& st, int64_t n) {
      with_divide(plan.load.divide, [&](auto divide) {
        const NormPartial b =
            plan.states_exact
                ? lamb_norm_block<T, divide(), true>(p, g, st[0], st[1], n, s, plan.load)
                : lamb_norm_block<T, divide(), false>(p, g, st[0], st[1], n, s, plan.load);
        part.param_sq += b.param_sq;
        part.update_sq += b.update_sq;
      });
    });
    parts[k] = part;
  });
  std::vector<NormPartial> norms(lists.num_tensors);
  add_partials(norms, items, parts);
  store_sq_norms(norms, sq_norms);
}

template <typename T>
void apply_items(const LambCall& call, const T* sq_norms, const ExecContext& ctx) {
  const StepLists& lists = call.lists;
  const LambPlan<T> plan(call, step_counts(lists));
  std::vector<T> ratio(lists.num_tensors);
  for (int64_t i = 0; i < lists.num_tensors; ++i)
    ratio[i] = lamb_trust_ratio_sq(sq_norms[2 * i], sq_norms[2 * i + 1], plan.adapt[i] != 0,
                                   call.trust_clip);
  const std::vector<WorkItem>& items = plan.work();
  parallel_items(items, ctx, [&](int64_t k) {
    const WorkItem& w = items[k];
    const LambScalars<T> s = plan.scalars[w.tensor];
    const T r = ratio[w.tensor];
    if (plan.two_pass(w.tensor)) {
      plan.template walk<true, false>(lists, w, [&](T* p, const T*, auto& st, int64_t n) {
        lamb_block_stored(p, st[0], st[1], n, s, r);
      });
      return;
    }
    plan.template walk<true>(lists, w, [&](T* p, const T* g, auto& st, int64_t n) {
      with_divide(plan.load.divide, [&](auto divide) {
        lamb_block<T, divide()>(p, g, st[0], st[1], n, s, r, plan.load);
      });
    });
  });
}

}  // namespace

FUSEDOPT_CPU_TWO_PASS_LAUNCHERS(lamb, Lamb, lamb_direction, direction_items, lamb_apply,
                                apply_items)

}  // namespace fusedopt::cpu
