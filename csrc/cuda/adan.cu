// adan_: one Adan step (the official sail-sg Adan's conventions) over every tensor of the
// call, with the math of fusedopt/math/adan.h. Per element: reads g, p, m, v, n, neg_pre_grad
// (+master) and writes p, m, v, n, neg_pre_grad (+master): bf16 everything 22 bytes, fp32 44.
// Launches: the step increment, the step kernel (plus a table upload when the table changed).
#include "fusedopt/math/adan.h"
#include "step.cuh"

namespace fusedopt::cuda {
namespace {

// Slots, hyperparameters and StepArgs::flag indices of an adan call, from its spec.
constexpr int kExpAvg = state_slot(spec::adan::kExpAvgs);
constexpr int kExpAvgSq = state_slot(spec::adan::kExpAvgSqs);
constexpr int kExpAvgDiff = state_slot(spec::adan::kExpAvgDiffs);
constexpr int kNegPreGrad = state_slot(spec::adan::kNegPreGrads);
using spec::adan::kBeta1, spec::adan::kBeta2, spec::adan::kBeta3, spec::adan::kEps,
    spec::adan::kWeightDecay;
using spec::adan::kNoProx;

template <class P, class G, bool kMasterWeights>
struct AdanBody {
  using T = Opmath<P>;
  using S = StateOf<P, kMasterWeights>;
  static constexpr int kWidth =
      kMasterWeights ? kVecWidth<P, G, S, float> : kVecWidth<P, G, S>;

  P* p;
  const G* g;
  S* m;
  S* n;
  S* v;
  S* npg;
  float* master;
  bool master_sync;  // [note: master sync]
  AdanScalars<T> s;
  GradLoad<T> load_g;

  __device__ __forceinline__ AdanBody(const Row& row, int t, const StepArgs& a)
      : p(static_cast<P*>(row.slot[kParam])),
        g(static_cast<const G*>(row.slot[kGrad])),
        m(static_cast<S*>(row.slot[kExpAvg])),
        n(static_cast<S*>(row.slot[kExpAvgSq])),
        v(static_cast<S*>(row.slot[kExpAvgDiff])),
        npg(static_cast<S*>(row.slot[kNegPreGrad])),
        master(static_cast<float*>(row.slot[kMaster])),
        master_sync(a.master_sync),
        s(adan_scalars<T>(step_lr(row, t, a), row.hyper[kBeta1], row.hyper[kBeta2],
                          row.hyper[kBeta3], row.hyper[kEps], row.hyper[kWeightDecay],
                          static_cast<double>(*row.step), a.flag[kNoProx])),
        load_g(make_grad_load<T>(a.scalars.grad_scale, a.scalars.clip_coef, false)) {}

  __device__ __forceinline__ bool aligned(int64_t start) const {
    return aligned_all(start, p, g, m, n, v, npg, master);
  }

  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    T pv[V], gv[V], mv[V], nv[V], vv[V], qv[V];
    load_param<V, P, T, kMasterWeights>(p, master, i, pv, master_sync);
    load<V>(g, i, gv);
    load<V>(m, i, mv);
    load<V>(n, i, nv);
    load<V>(v, i, vv);
    load<V>(npg, i, qv);
#pragma unroll
    for (int k = 0; k < V; ++k)
      adan_update(pv[k], load_grad(gv[k], load_g), mv[k], vv[k], nv[k], qv[k], s);
    store_param<V, P, T, kMasterWeights>(p, master, i, pv);
    store<V>(m, i, mv);
    store<V>(n, i, nv);
    store<V>(v, i, vv);
    store<V>(npg, i, qv);
  }
};

}  // namespace

void adan(const AdanCall& call, const ExecContext& ctx) {
  const StepLists& lists = call.lists;
  if (lists.num_tensors == 0) return;
  StepArgs args = step_args(lists);
  TableBuilder host = step_table(lists);
  FUSEDOPT_FILL_STEP_CALL(ADAN)
  const cudaStream_t stream = stream_of(ctx);
  const Table table = host.upload(ctx);
  increment_steps(table, lists.scalars.found_inf, stream);
  dispatch_step_types(lists.params.dtype, lists.grads.dtype, lists.master_params.present(),
                      [&](auto p, auto g, auto master) {
                        using P = decltype(p);
                        using G = decltype(g);
                        constexpr bool kM = decltype(master)::value;
                        launch_step<AdanBody<P, G, kM>>(host, table, args, stream);
                      });
}

}  // namespace fusedopt::cuda
