// lion_ on the CPU. Per element: reads g, p, m (+ the fp32 master), writes p, m (+ master):
// 20 bytes for fp32.
#include <vector>

#include "fusedopt/launch.h"
#include "fusedopt/math/lion.h"
#include "q8_step.h"
#include "step.h"

namespace fusedopt::cpu {
namespace {

template <typename T, bool kDivide>
void lion_block(T* __restrict p, const T* __restrict g, T* __restrict m, int64_t n,
                const LionScalars<T> s, const GradLoad<T> load) {
  for (int64_t k = 0; k < n; ++k) lion_update(p[k], load_grad<kDivide>(g[k], load), m[k], s);
}

template <typename T>
void lion_items(const LionCall& call, const ExecContext& ctx) {
  const StepLists& lists = call.lists;
  const auto scalars = tensor_scalars(call, [&](int64_t i, double lr) {
    return lion_scalars<T>(lr, call.beta1(i), call.beta2(i), call.weight_decay(i));
  });
  const GradLoad<T> load = make_grad_load<T>(lists.scalars.grad_scale, lists.scalars.clip_coef,
                                             call.maximize);
  const auto block = [&](auto divide, T* p, const T* g, auto& st, int64_t n, const auto& s) {
    lion_block<T, divide()>(p, g, st[0], n, s, load);
  };
  if (call.exp_avg_scales.present()) {  // [note: 8-bit states]: fp32/bf16/fp16 params only
    const std::array<Q8Slot, 1> states{Q8Slot{call.exp_avgs, call.exp_avg_scales}};
    q8_step_blocks<T>(lists, states, scalars, load.divide, ctx, block);
    return;
  }
  const std::array<TensorSlot, 1> states{call.exp_avgs};
  step_blocks<T>(lists, states, scalars, load.divide, ctx, block);
}

}  // namespace

void lion(const LionCall& call, const ExecContext& ctx) {
  if (!step_enabled(call.lists)) return;
  with_opmath(call.lists.params.dtype, [&](auto zero) { lion_items<decltype(zero)>(call, ctx); });
}

}  // namespace fusedopt::cpu
