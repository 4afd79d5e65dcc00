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

template <class P, class G, MasterKind kMasterWeights>
struct AdanBody : StepBody<P, G, kMasterWeights, AdanScalars<Opmath<P>>, kExpAvg, kExpAvgSq,
                           kExpAvgDiff, kNegPreGrad> {
  using Base = StepBody<P, G, kMasterWeights, AdanScalars<Opmath<P>>, kExpAvg, kExpAvgSq,
                        kExpAvgDiff, kNegPreGrad>;
  using typename Base::T;

  __device__ __forceinline__ AdanBody(const Row& row, int t, const StepArgs& a)
      : Base(row, a, false, [&] {
          return adan_scalars<T>(step_lr(row, t, a), row.hyper[kBeta1], row.hyper[kBeta2],
                          row.hyper[kBeta3], row.hyper[kEps], row.hyper[kWeightDecay],
                          static_cast<double>(*row.step), a.flag[kNoProx]);
        }) {}

  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    const auto [m, n, v, npg] = this->states;
    T pv[V], gv[V], mv[V], nv[V], vv[V], qv[V];
    this->load_param_and_grad(i, pv, gv);
    load<V>(m, i, mv);
    load<V>(n, i, nv);
    load<V>(v, i, vv);
    load<V>(npg, i, qv);
#pragma unroll
    for (int k = 0; k < V; ++k)
      adan_update(pv[k], load_grad(gv[k], this->load_g), mv[k], vv[k], nv[k], qv[k], this->s);
    this->store_param_and_master(i, pv);
    store<V>(m, i, mv);
    store<V>(n, i, nv);
    store<V>(v, i, vv);
    store<V>(npg, i, qv);
  }
};

}  // namespace

void adan(const AdanCall& call, const ExecContext& ctx) {
  if (call.lists.num_tensors == 0) return;
  FUSEDOPT_STEP_HOST(ADAN)
  run_step<AdanBody>(call.lists, host, args, /*count_steps=*/true, ctx);
}

}  // namespace fusedopt::cuda
