// adan_ on the CPU. Per element: reads g, p, m, v, n, neg_pre_grad (+ the fp32 master),
// writes p, m, v, n, neg_pre_grad (+ master): 44 bytes for fp32.
#include <vector>

#include "fusedopt/launch.h"
#include "fusedopt/math/adan.h"
#include "step.h"

namespace fusedopt::cpu {
namespace {

template <typename T, bool kDivide>
void adan_block(T* __restrict p, const T* __restrict g, T* __restrict m, T* __restrict n2,
                T* __restrict v, T* __restrict npg, int64_t n, const AdanScalars<T> s,
                const GradLoad<T> load) {
  for (int64_t k = 0; k < n; ++k)
    adan_update(p[k], load_grad<kDivide>(g[k], load), m[k], v[k], n2[k], npg[k], s);
}

template <typename T>
void adan_items(const AdanCall& call, const ExecContext& ctx) {
  const StepLists& lists = call.lists;
  const std::vector<double> t = advance_steps(lists);
  const auto scalars = tensor_scalars(call, [&](int64_t i, double lr) {
    return adan_scalars<T>(lr, call.beta1(i), call.beta2(i), call.beta3(i), call.eps(i),
                           call.weight_decay(i), t[i], call.no_prox);
  });
  const GradLoad<T> load =
      make_grad_load<T>(lists.scalars.grad_scale, lists.scalars.clip_coef, false);
  // Schema order: exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads.
  const std::array<TensorSlot, 4> states{call.exp_avgs, call.exp_avg_sqs, call.exp_avg_diffs,
                                         call.neg_pre_grads};
  step_blocks<T>(lists, states, scalars, load.divide, ctx,
                 [&](auto divide, T* p, const T* g, auto& st, int64_t n, const auto& s) {
                   adan_block<T, divide()>(p, g, st[0], st[1], st[2], st[3], n, s, load);
                 });
}

}  // namespace

void adan(const AdanCall& call, const ExecContext& ctx) {
  if (!step_enabled(call.lists)) return;
  with_opmath(call.lists.params.dtype, [&](auto zero) { adan_items<decltype(zero)>(call, ctx); });
}

}  // namespace fusedopt::cpu
