// schedulefree_adamw_ on the CPU. Per element: reads g, y, z, v (+ the fp32 master), writes y,
// z, v (+ master): 28 bytes for fp32.
#include <vector>

#include "fusedopt/launch.h"
#include "fusedopt/math/schedulefree_adamw.h"
#include "step.h"

namespace fusedopt::cpu {
namespace {

template <typename T, bool kDivide>
void schedulefree_adamw_block(T* __restrict y, const T* __restrict g, T* __restrict z,
                              T* __restrict v, int64_t n, const ScheduleFreeAdamWScalars<T> s,
                              const GradLoad<T> load) {
  for (int64_t k = 0; k < n; ++k)
    schedulefree_adamw_update(y[k], load_grad<kDivide>(g[k], load), z[k], v[k], s);
}

template <typename T>
void schedulefree_adamw_items(const ScheduleFreeAdamWCall& call, const ExecContext& ctx) {
  const StepLists& lists = call.lists;
  std::vector<ScheduleFreeAdamWScalars<T>> scalars(lists.num_tensors);
  for (int64_t i = 0; i < lists.num_tensors; ++i)
    scalars[i] = schedulefree_adamw_scalars<T>(lr_of(lists, call.lr(i), i), call.beta1(i),
                                               call.beta2(i), call.eps(i), call.weight_decay(i),
                                               call.ckp1(i), call.bias_correction2(i));
  const GradLoad<T> load =
      make_grad_load<T>(lists.scalars.grad_scale, lists.scalars.clip_coef, false);
  const std::array<TensorSlot, 2> states{call.zs, call.exp_avg_sqs};  // schema order
  step_blocks<T>(lists, states, scalars, load.divide, ctx,
                 [&](auto divide, T* y, const T* g, auto& st, int64_t n, const auto& s) {
                   schedulefree_adamw_block<T, divide()>(y, g, st[0], st[1], n, s, load);
                 });
}

}  // namespace

void schedulefree_adamw(const ScheduleFreeAdamWCall& call, const ExecContext& ctx) {
  if (!step_enabled(call.lists)) return;
  with_opmath(call.lists.params.dtype,
              [&](auto zero) { schedulefree_adamw_items<decltype(zero)>(call, ctx); });
}

}  // namespace fusedopt::cpu
