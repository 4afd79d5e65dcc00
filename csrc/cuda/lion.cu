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

template <class P, class G, MasterKind kMasterWeights>
struct LionBody : StepBody<P, G, kMasterWeights, LionScalars<Opmath<P>>, kExpAvg> {
  using Base = StepBody<P, G, kMasterWeights, LionScalars<Opmath<P>>, kExpAvg>;
  using typename Base::T;

  __device__ __forceinline__ LionBody(const Row& row, int t, const StepArgs& a)
      : Base(row, a, a.flag[kMaximize], [&] {
          return lion_scalars<T>(step_lr(row, t, a), row.hyper[kBeta1], row.hyper[kBeta2],
                          row.hyper[kWeightDecay]);
        }) {}

  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    auto* const m = this->states[0];
    T pv[V], gv[V], mv[V];
    this->load_param_and_grad(i, pv, gv);
    load<V>(m, i, mv);
#pragma unroll
    for (int k = 0; k < V; ++k) lion_update(pv[k], load_grad(gv[k], this->load_g), mv[k], this->s);
    this->store_param_and_master(i, pv);
    store<V>(m, i, mv);
  }
};

}  // namespace

void lion(const LionCall& call, const ExecContext& ctx) {
  if (call.lists.num_tensors == 0) return;
  FUSEDOPT_STEP_HOST(LION)
  run_step<LionBody>(call.lists, host, args, /*count_steps=*/false, ctx);
}

}  // namespace fusedopt::cuda
