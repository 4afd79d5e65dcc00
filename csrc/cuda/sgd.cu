// sgd_: one SGD step (torch.optim.SGD: weight decay, momentum, dampening, Nesterov,
// maximize) over every tensor of the call, with the math of fusedopt/math/sgd.h. Per element:
// reads g, p (+buf with momentum, +master) and writes p (+buf, +master): fp32 with momentum
// 20 bytes, without 12. Launches: the step increment (with momentum: torch's first-step
// rule needs the count), the step kernel (plus a table upload when the table changed).
#include "fusedopt/math/sgd.h"
#include "step.cuh"

namespace fusedopt::cuda {
namespace {

// Slots, hyperparameters and StepArgs::flag indices of an sgd call, from its spec.
constexpr int kMomentumBuffer = state_slot(spec::sgd::kMomentumBuffers);
using spec::sgd::kMomentum, spec::sgd::kDampening, spec::sgd::kWeightDecay;
using spec::sgd::kNesterov, spec::sgd::kMaximize;

template <class P, class G, bool kMasterWeights, bool kWithMomentum>
struct SgdBody {
  using T = Opmath<P>;
  using S = StateOf<P, kMasterWeights>;
  static constexpr int kWidth =
      kMasterWeights ? kVecWidth<P, G, S, float> : kVecWidth<P, G, S>;

  P* p;
  const G* g;
  S* buf;
  float* master;
  bool master_sync;  // [note: master sync]
  SgdScalars<T> s;
  GradLoad<T> load_g;

  // [note: sgd momentum 0] (fusedopt/reference/ops.py): a tensor whose momentum is 0 steps
  // as momentum-free SGD even in a call with buffers; its buffer and step count stay as
  // they are (increment_steps skips a row whose momentum is 0).
  bool use_buffer;

  // The step count was incremented before this kernel: 1 now means this is the param's first
  // (unskipped) step, whatever a state dict loaded before.
  __device__ __forceinline__ SgdBody(const Row& row, int t, const StepArgs& a)
      : p(static_cast<P*>(row.slot[kParam])),
        g(static_cast<const G*>(row.slot[kGrad])),
        buf(static_cast<S*>(row.slot[kMomentumBuffer])),
        master(static_cast<float*>(row.slot[kMaster])),
        master_sync(a.master_sync),
        s(sgd_scalars<T>(step_lr(row, t, a), row.hyper[kMomentum],
                         row.hyper[kDampening], row.hyper[kWeightDecay],
                         kWithMomentum && row.step && *row.step == 1.0f, a.flag[kNesterov])),
        load_g(make_grad_load<T>(a.scalars.grad_scale, a.scalars.clip_coef,
                                 a.flag[kMaximize])),
        use_buffer(kWithMomentum && row.hyper[kMomentum] != 0.0) {}

  __device__ __forceinline__ bool aligned(int64_t start) const {
    return aligned_all(start, p, g, use_buffer ? buf : nullptr, master);
  }

  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    T pv[V], gv[V], bv[V] = {};
    load_param<V, P, T, kMasterWeights>(p, master, i, pv, master_sync);
    load<V>(g, i, gv);
    if (use_buffer) {
      // On the first step the buffer is overwritten, not read (it may hold anything).
      if (!s.first_step) load<V>(buf, i, bv);
#pragma unroll
      for (int k = 0; k < V; ++k) sgd_update<T, true>(pv[k], load_grad(gv[k], load_g), bv[k], s);
      store<V>(buf, i, bv);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) sgd_update<T, false>(pv[k], load_grad(gv[k], load_g), bv[k], s);
    }
    store_param<V, P, T, kMasterWeights>(p, master, i, pv);
  }
};

}  // namespace

void sgd(const SgdCall& call, const ExecContext& ctx) {
  const StepLists& lists = call.lists;
  if (lists.num_tensors == 0) return;
  const bool with_momentum = call.momentum_buffers.present();
  StepArgs args = step_args(lists);
  TableBuilder host = step_table(lists);
  FUSEDOPT_FILL_STEP_CALL(SGD)
  const cudaStream_t stream = stream_of(ctx);
  const Table table = host.upload(ctx);
  // [note: sgd momentum 0]: a tensor whose momentum is 0 keeps its step count.
  if (with_momentum) increment_steps(table, lists.scalars.found_inf, stream, kMomentum);
  dispatch_step_types(lists.params.dtype, lists.grads.dtype, lists.master_params.present(),
                      [&](auto p, auto g, auto master) {
                        using P = decltype(p);
                        using G = decltype(g);
                        constexpr bool kM = decltype(master)::value;
                        if (with_momentum) {
                          launch_step<SgdBody<P, G, kM, true>>(host, table, args, stream);
                        } else {
                          launch_step<SgdBody<P, G, kM, false>>(host, table, args, stream);
                        }
                      });
}

}  // namespace fusedopt::cuda
