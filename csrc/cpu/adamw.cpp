// adamw_ on the CPU (Adam with decoupled=false). Per element: reads g, p, m, v (+ vmax with
// amsgrad, + the fp32 master), writes p, m, v (+ vmax, + master): 28 bytes for fp32.
#include <vector>

#include "fusedopt/launch.h"
#include "fusedopt/math/adamw.h"
#include "q8_step.h"
#include "step.h"

namespace fusedopt::cpu {
namespace {

template <typename T, bool kAmsgrad, bool kDivide>
void adamw_block(T* __restrict p, const T* __restrict g, T* __restrict m, T* __restrict v,
                 T* __restrict vmax, int64_t n, const AdamWScalars<T> s, const GradLoad<T> load) {
  for (int64_t k = 0; k < n; ++k) {
    T unused = T(0);
    adamw_update<T, kAmsgrad>(p[k], load_grad<kDivide>(g[k], load), m[k], v[k],
                              kAmsgrad ? vmax[k] : unused, s);
  }
}

template <typename T, bool kAmsgrad>
void adamw_items(const AdamWCall& call, const ExecContext& ctx) {
  const StepLists& lists = call.lists;
  const std::vector<double> t = advance_steps(lists);
  const auto scalars = tensor_scalars(call, [&](int64_t i, double lr) {
    return adamw_scalars<T>(lr, call.beta1(i), call.beta2(i), call.eps(i), call.weight_decay(i),
                            t[i], call.decoupled, call.bias_correction);
  });
  const GradLoad<T> load = make_grad_load<T>(lists.scalars.grad_scale, lists.scalars.clip_coef,
                                             call.maximize);
  constexpr size_t kStates = kAmsgrad ? 3 : 2;
  std::array<TensorSlot, kStates> states;
  states[0] = call.exp_avgs;
  states[1] = call.exp_avg_sqs;
  if constexpr (kAmsgrad) states[2] = call.max_exp_avg_sqs;
  step_blocks<T>(lists, states, scalars, load.divide, ctx,
                 [&](auto divide, T* p, const T* g, auto& st, int64_t n, const auto& s) {
                   T* vmax = kAmsgrad ? st[kStates - 1] : nullptr;
                   adamw_block<T, kAmsgrad, divide()>(p, g, st[0], st[1], vmax, n, s, load);
                 });
}

/// [note: 8-bit states] (fusedopt/quant8.py): the moments dequantized per quantization
/// block, stepped by the same adamw_block (no amsgrad), requantized (q8_step.h).
/// Per element: reads g, p, m, v (1 B each), writes p, m, v, + 8 B per block of scales.
void adamw_q8(const AdamWCall& call, const ExecContext& ctx) {
  const StepLists& lists = call.lists;
  const std::vector<double> t = advance_steps(lists);
  const auto scalars = tensor_scalars(call, [&](int64_t i, double lr) {
    return adamw_scalars<float>(lr, call.beta1(i), call.beta2(i), call.eps(i),
                                call.weight_decay(i), t[i], call.decoupled,
                                call.bias_correction);
  });
  const GradLoad<float> load = make_grad_load<float>(lists.scalars.grad_scale,
                                                     lists.scalars.clip_coef, call.maximize);
  const std::array<Q8Slot, 2> states{Q8Slot{call.exp_avgs, call.exp_avg_scales},
                                     Q8Slot{call.exp_avg_sqs, call.exp_avg_sq_scales}};
  q8_step_blocks<float>(lists, states, scalars, load.divide, ctx,
                        [&](auto divide, float* p, const float* g, auto& st, int64_t n,
                            const auto& s) {
                          adamw_block<float, false, divide()>(p, g, st[0], st[1], nullptr, n, s,
                                                              load);
                        });
}

}  // namespace

void adamw(const AdamWCall& call, const ExecContext& ctx) {
  if (!step_enabled(call.lists)) return;
  if (call.exp_avg_scales.present()) {  // [note: 8-bit states]: fp32/bf16/fp16 params only
    adamw_q8(call, ctx);
    return;
  }
  with_opmath(call.lists.params.dtype, [&](auto zero) {
    using T = decltype(zero);
    if (call.amsgrad) {
      adamw_items<T, true>(call, ctx);
    } else {
      adamw_items<T, false>(call, ctx);
    }
  });
}

}  // namespace fusedopt::cpu
