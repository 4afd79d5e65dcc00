// muon_momentum_ and muon_apply_ on the CPU: Muon's two elementwise passes around the
// Newton-Schulz iteration ([note: muon passes] in fusedopt/optim/muon.py), with the math of
// fusedopt/math/muon.h. Per element: the momentum pass reads g, buf and writes buf and the
// bf16 Newton-Schulz input (fp32: 4 + 4 + 4 + 2 = 14 bytes; no param); the apply pass reads
// p (or its master) and the bf16 output and writes p (+master) (fp32: 4 + 2 + 4 = 10 bytes).
#include <array>

#include "fusedopt/launch.h"
#include "fusedopt/math/muon.h"
#include "step.h"

namespace fusedopt::cpu {
namespace {

/// x rounded to storage dtype d and back, as the stored buffer holds it (torch reads the
/// rounded buffer back for its Nesterov lerp).
template <typename T>
inline T stored_as(T x, DType d) {
  switch (d) {
    case DType::kBFloat16: return static_cast<T>(bf16_to_float(float_to_bf16(static_cast<float>(x))));
    case DType::kFloat16: return static_cast<T>(fp16_to_float(float_to_fp16(static_cast<float>(x))));
    default: return x;  // fp32 and fp64 buffers hold opmath values
  }
}

template <typename T>
std::vector<MuonScalars<T>> muon_tensor_scalars(const MuonCall& call) {
  return tensor_scalars(call, [&](int64_t i, double lr) {
    return muon_scalars<T>(lr, call.momentum(i), call.weight_decay(i), call.lr_ratio(i));
  });
}

template <typename T>
void muon_momentum_items(const MuonCall& call, const ExecContext& ctx) {
  const StepLists& lists = call.lists;
  const auto scalars = muon_tensor_scalars<T>(call);
  const GradLoad<T> load = make_grad_load<T>(lists.scalars.grad_scale, lists.scalars.clip_coef,
                                             /*maximize=*/false);
  const DType buf_dtype = call.momentum_buffers.dtype;
  const std::array<TensorSlot, 2> states{call.momentum_buffers, call.ns_buffers};
  // reads the grad, not the param; writes both states (the buffer and the bf16 NS input)
  step_blocks<T, 2, /*kReadGrad=*/true, /*kParam=*/false>(
      lists, states, scalars, load.divide, ctx,
      [&](auto divide, T*, const T* g, auto& st, int64_t n, const MuonScalars<T>& s) {
        T* buf = st[0];
        T* ns = st[1];
        const auto store = [&](int64_t k) {
          return [&, k](T x) { return buf[k] = stored_as(x, buf_dtype); };
        };
        for (int64_t k = 0; k < n; ++k) {
          const T gk = load_grad<divide()>(g[k], load);
          ns[k] = call.nesterov ? muon_momentum<T, true>(gk, buf[k], s, store(k))
                                : muon_momentum<T, false>(gk, buf[k], s, store(k));
        }
      });
}

template <typename T>
void muon_apply_items(const MuonCall& call, const ExecContext& ctx) {
  const auto scalars = muon_tensor_scalars<T>(call);
  const std::array<TensorSlot, 1> states{call.ns_buffers};
  // reads the param and the bf16 NS output, not the grad; writes the param only
  step_blocks<T, 1, /*kReadGrad=*/false, /*kParam=*/true, /*kWrittenStates=*/0>(
      call.lists, states, scalars, /*divide=*/false, ctx,
      [&](auto, T* p, const T*, auto& st, int64_t n, const MuonScalars<T>& s) {
        const T* ns = st[0];
        for (int64_t k = 0; k < n; ++k) p[k] = muon_apply(p[k], ns[k], s);
      });
}

}  // namespace

void muon_momentum(const MuonCall& call, const ExecContext& ctx) {
  if (!step_enabled(call.lists)) return;
  with_opmath(call.lists.params.dtype,
              [&](auto zero) { muon_momentum_items<decltype(zero)>(call, ctx); });
}

void muon_apply(const MuonCall& call, const ExecContext& ctx) {
  if (!step_enabled(call.lists)) return;
  with_opmath(call.lists.params.dtype,
              [&](auto zero) { muon_apply_items<decltype(zero)>(call, ctx); });
}

}  // namespace fusedopt::cpu
