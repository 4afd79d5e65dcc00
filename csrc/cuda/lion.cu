// lion_: one Lion step (lion-pytorch semantics, sign(0) = 0) over every tensor of the call,
// with the math of fusedopt/math/lion.h. Per element: reads g, p, m (+master) and writes p, m
// (+master): bf16 everything 10 bytes, fp32 20. Lion keeps no step count: one launch (plus a
// table upload when the table changed).
#include "fusedopt/math/lion.h"
#include "step.cuh"

namespace fusedopt::cuda {
namespace {

// Slots, hyperparameters and StepArgs::flag indices of a lion call, from its spec.
constexpr int kExpAvg = state_slot(spec::lion::kExpAvgs);
using spec::lion::kBeta1, spec::lion::kBeta2, spec::lion::kWeightDecay;
using spec::lion::kMaximize;

template <class P, class G, bool kMasterWeights>
struct LionBody {
  using T = Opmath<P>;
  using S = StateOf<P, kMasterWeights>;
  static constexpr int kWidth =
      kMasterWeights ? kVecWidth<P, G, S, float> : kVecWidth<P, G, S>;

  P* p;
  const G* g;
  S* m;
  float* master;
  bool master_sync;  // [note: master sync]
  LionScalars<T> s;
  GradLoad<T> load_g;

  __device__ __forceinline__ LionBody(const Row& row, int t, const StepArgs& a)
      : p(static_cast<P*>(row.slot[kParam])),
        g(static_cast<const G*>(row.slot[kGrad])),
        m(static_cast<S*>(row.slot[kExpAvg])),
        master(static_cast<float*>(row.slot[kMaster])),
        master_sync(a.master_sync),
        s(lion_scalars<T>(step_lr(row, t, a), row.hyper[kBeta1], row.hyper[kBeta2],
                          row.hyper[kWeightDecay])),
        load_g(make_grad_load<T>(a.scalars.grad_scale, a.scalars.clip_coef,
                                 a.flag[kMaximize])) {}

  __device__ __forceinline__ bool aligned(int64_t start) const {
    return aligned_all(start, p, g, m, master);
  }

  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    T pv[V], gv[V], mv[V];
    load_param<V, P, T, kMasterWeights>(p, master, i, pv, master_sync);
    load<V>(g, i, gv);
    load<V>(m, i, mv);
#pragma unroll
    for (int k = 0; k < V; ++k) lion_update(pv[k], load_grad(gv[k], load_g), mv[k], s);
    store_param<V, P, T, kMasterWeights>(p, master, i, pv);
    store<V>(m, i, mv);
  }
};

}  // namespace

void lion(const LionCall& call, const ExecContext& ctx) {
  const StepLists& lists = call.lists;
  if (lists.num_tensors == 0) return;
  StepArgs args = step_args(lists);
  TableBuilder host = step_table(lists);
  FUSEDOPT_FILL_STEP_CALL(LION)
  const cudaStream_t stream = stream_of(ctx);
  const Table table = host.upload(ctx);
  dispatch_step_types(lists.params.dtype, lists.grads.dtype, lists.master_params.present(),
                      [&](auto p, auto g, auto master) {
                        using P = decltype(p);
                        using G = decltype(g);
                        constexpr bool kM = decltype(master)::value;
                        launch_step<LionBody<P, G, kM>>(host, table, args, stream);
                      });
}

}  // namespace fusedopt::cuda
