// sgd_ on the CPU. Per element: reads g, p (+ buf with momentum, + the fp32 master), writes
// p (+ buf, + master): 12 bytes for fp32 without momentum, 20 with.
#include <type_traits>
#include <vector>

#include "fusedopt/launch.h"
#include "fusedopt/math/sgd.h"
#include "q8_step.h"
#include "step.h"

namespace fusedopt::cpu {
namespace {

/// Runs body(flags...) with each runtime bool turned into a std::bool_constant.
template <typename F>
void with_flags(F&& body) {
  body();
}
template <typename F, typename... Rest>
void with_flags(F&& body, bool flag, Rest... rest) {
  with_flags([&](auto... done) {
    if (flag) {
      body(std::true_type{}, done...);
    } else {
      body(std::false_type{}, done...);
    }
  }, rest...);
}

// [note: sgd flags] sgd_update branches on four per-tensor bools (decay, momentum_on,
// first_step, nesterov). Read from memory at run time they kept g++ from vectorising the loop
// (a scalar loop with a test per element: GPT-2 small fp32 with momentum, 2 shared cores,
// 0.11-0.15 s a step; 0.074 s before momentum_on existed), so the loop is instantiated per
// combination, with the bools as constants in a local copy of the scalars (0.08-0.12 s);
// the math and its bits are unchanged.
template <typename T, bool kMomentum, bool kDivide>
void sgd_block(T* __restrict p, const T* __restrict g, T* __restrict buf, int64_t n,
               const SgdScalars<T> s, const GradLoad<T> load) {
  with_flags(
      [&](auto decay, auto momentum_on, auto first_step, auto nesterov) {
        SgdScalars<T> c = s;
        c.decay = decay();
        c.momentum_on = momentum_on();
        c.first_step = first_step();
        c.nesterov = nesterov();
        for (int64_t k = 0; k < n; ++k) {
          T unused = T(0);
          sgd_update<T, kMomentum>(p[k], load_grad<kDivide>(g[k], load),
                                   kMomentum ? buf[k] : unused, c);
        }
      },
      s.decay, s.momentum_on && kMomentum, s.first_step && kMomentum, s.nesterov && kMomentum);
}

template <typename T, bool kMomentum>
void sgd_items(const SgdCall& call, const ExecContext& ctx) {
  const StepLists& lists = call.lists;
  const auto scalars = tensor_scalars(call, [&](int64_t i, double lr) {
    // torch's first-step rule: buf = g when this param has no momentum history yet. The
    // count (not the buffer's contents) decides, so a skipped step or a loaded state dict
    // keeps it right. A tensor with momentum 0 keeps its count ([note: sgd momentum 0]).
    bool first_step = false;
    if (kMomentum && call.momentum(i) != 0.0) {
      first_step = *lists.steps[i] == 0.0f;
      *lists.steps[i] += 1.0f;
    }
    return sgd_scalars<T>(lr, call.momentum(i), call.dampening(i), call.weight_decay(i),
                          first_step, call.nesterov);
  });
  const GradLoad<T> load = make_grad_load<T>(lists.scalars.grad_scale, lists.scalars.clip_coef,
                                             call.maximize);
  constexpr size_t kStates = kMomentum ? 1 : 0;
  const auto block = [&](auto divide, T* p, const T* g, auto& st, int64_t n, const auto& s) {
    T* buf = nullptr;
    if constexpr (kMomentum) buf = st[0];
    sgd_block<T, kMomentum, divide()>(p, g, buf, n, s, load);
  };
  if (kMomentum && call.momentum_buffer_scales.present()) {  // [note: 8-bit states]
    std::array<Q8Slot, kStates> states{};
    if constexpr (kMomentum) states[0] = {call.momentum_buffers, call.momentum_buffer_scales};
    // [note: sgd momentum 0]: a tensor whose momentum is 0 keeps its buffer's codes as they
    // are (requantizing them need not give the same bits: an infinite scale's zero codes)
    q8_step_blocks<T>(lists, states, scalars, load.divide, ctx, block,
                      [&](int64_t i) { return call.momentum(i) != 0.0; });
    return;
  }
  std::array<TensorSlot, kStates> states{};
  if constexpr (kMomentum) states[0] = call.momentum_buffers;
  step_blocks<T>(lists, states, scalars, load.divide, ctx, block);
}

}  // namespace

void sgd(const SgdCall& call, const ExecContext& ctx) {
  if (!step_enabled(call.lists)) return;
  with_opmath(call.lists.params.dtype, [&](auto zero) {
    using T = decltype(zero);
    if (call.momentum_buffers.present()) {
      sgd_items<T, true>(call, ctx);
    } else {
      sgd_items<T, false>(call, ctx);
    }
  });
}

}  // namespace fusedopt::cpu
