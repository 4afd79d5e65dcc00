// adamw_: one Adam (decoupled=false) / AdamW step over every tensor of the call, with the
// math of fusedopt/math/adamw.h. Per element: reads g, p, m, v (+vmax with amsgrad, +master)
// and writes p, m, v (+vmax, +master): bf16 params and states without masters 14 bytes,
// fp32 28, bf16 params with fp32 grads and masters 30. Launches: the step increment, the
// step kernel (plus a table upload when the table changed).
#include "fusedopt/math/adamw.h"
#include "step.cuh"

namespace fusedopt::cuda {
namespace {

// Slots, hyperparameters and StepArgs::flag indices of an adamw call, from its spec.
constexpr int kExpAvg = state_slot(spec::adamw::kExpAvgs);
constexpr int kExpAvgSq = state_slot(spec::adamw::kExpAvgSqs);
constexpr int kMaxExpAvgSq = state_slot(spec::adamw::kMaxExpAvgSqs);
using spec::adamw::kBeta1, spec::adamw::kBeta2, spec::adamw::kEps,
    spec::adamw::kWeightDecay;
using spec::adamw::kDecoupled, spec::adamw::kMaximize, spec::adamw::kBiasCorrection;

template <class P, class G, bool kMasterWeights, bool kAmsgrad>
struct AdamWBody {
  using T = Opmath<P>;
  using S = StateOf<P, kMasterWeights>;
  static constexpr int kWidth =
      kMasterWeights ? kVecWidth<P, G, S, float> : kVecWidth<P, G, S>;

  P* p;
  const G* g;
  S* m;
  S* v;
  S* vmax;
  float* master;
  bool master_sync;  // [note: master sync]
  AdamWScalars<T> s;
  GradLoad<T> load_g;

  __device__ __forceinline__ AdamWBody(const Row& row, int t, const StepArgs& a)
      : p(static_cast<P*>(row.slot[kParam])),
        g(static_cast<const G*>(row.slot[kGrad])),
        m(static_cast<S*>(row.slot[kExpAvg])),
        v(static_cast<S*>(row.slot[kExpAvgSq])),
        vmax(static_cast<S*>(row.slot[kMaxExpAvgSq])),
        master(static_cast<float*>(row.slot[kMaster])),
        master_sync(a.master_sync),
        s(adamw_scalars<T>(step_lr(row, t, a), row.hyper[kBeta1], row.hyper[kBeta2],
                           row.hyper[kEps], row.hyper[kWeightDecay],
                           static_cast<double>(*row.step), a.flag[kDecoupled],
                           a.flag[kBiasCorrection])),
        load_g(make_grad_load<T>(a.scalars.grad_scale, a.scalars.clip_coef,
                                 a.flag[kMaximize])) {}

  __device__ __forceinline__ bool aligned(int64_t start) const {
    return aligned_all(start, p, g, m, v, vmax, master);
  }

  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    T pv[V], gv[V], mv[V], vv[V], xv[V];
    load_param<V, P, T, kMasterWeights>(p, master, i, pv, master_sync);
    load<V>(g, i, gv);
    load<V>(m, i, mv);
    load<V>(v, i, vv);
    if constexpr (kAmsgrad) load<V>(vmax, i, xv);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      adamw_update<T, kAmsgrad>(pv[k], load_grad(gv[k], load_g), mv[k], vv[k], xv[k], s);
    }
    store_param<V, P, T, kMasterWeights>(p, master, i, pv);
    store<V>(m, i, mv);
    store<V>(v, i, vv);
    if constexpr (kAmsgrad) store<V>(vmax, i, xv);
  }
};

}  // namespace

void adamw(const AdamWCall& call, const ExecContext& ctx) {
  const StepLists& lists = call.lists;
  if (lists.num_tensors == 0) return;
  StepArgs args = step_args(lists);
  TableBuilder host = step_table(lists);
  FUSEDOPT_FILL_STEP_CALL(ADAMW)
  const cudaStream_t stream = stream_of(ctx);
  const Table table = host.upload(ctx);
  increment_steps(table, lists.scalars.found_inf, stream);
  dispatch_step_types(lists.params.dtype, lists.grads.dtype, lists.master_params.present(),
                      [&](auto p, auto g, auto master) {
                        using P = decltype(p);
                        using G = decltype(g);
                        constexpr bool kM = decltype(master)::value;
                        if (call.amsgrad) {
                          launch_step<AdamWBody<P, G, kM, true>>(host, table, args, stream);
                        } else {
                          launch_step<AdamWBody<P, G, kM, false>>(host, table, args, stream);
                        }
                      });
}

}  // namespace fusedopt::cuda
