// schedulefree_adamw_: one Schedule-Free AdamW step (the schedulefree package's
// AdamWScheduleFree) over every tensor of the call, with the math of
// fusedopt/math/schedulefree_adamw.h. Per element: reads g, y, z, v (+master) and writes y, z,
// v (+master): bf16 everything 14 bytes, fp32 28. No step counts (the group's k lives on the
// host, which computes the step's scalars): one launch (plus the table upload, which happens
// at every step here, since ckp1 and the bias correction change every step).
#include "fusedopt/math/schedulefree_adamw.h"
#include "step.cuh"

namespace fusedopt::cuda {
namespace {

// Slots and hyperparameters of a schedulefree_adamw call, from its spec.
constexpr int kZ = state_slot(spec::schedulefree_adamw::kZs);
constexpr int kExpAvgSq = state_slot(spec::schedulefree_adamw::kExpAvgSqs);
using spec::schedulefree_adamw::kBeta1, spec::schedulefree_adamw::kBeta2,
    spec::schedulefree_adamw::kEps, spec::schedulefree_adamw::kWeightDecay,
    spec::schedulefree_adamw::kCkp1, spec::schedulefree_adamw::kBiasCorrection2;

template <class P, class G, bool kMasterWeights>
struct ScheduleFreeAdamWBody
    : StepBody<P, G, kMasterWeights, ScheduleFreeAdamWScalars<Opmath<P>>, kZ, kExpAvgSq> {
  using Base = StepBody<P, G, kMasterWeights, ScheduleFreeAdamWScalars<Opmath<P>>, kZ, kExpAvgSq>;
  using typename Base::T;

  __device__ __forceinline__ ScheduleFreeAdamWBody(const Row& row, int t, const StepArgs& a)
      : Base(row, a, false, [&] {
          return schedulefree_adamw_scalars<T>(step_lr(row, t, a), row.hyper[kBeta1],
                                               row.hyper[kBeta2], row.hyper[kEps],
                                               row.hyper[kWeightDecay], row.hyper[kCkp1],
                                               row.hyper[kBiasCorrection2]);
        }) {}

  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    const auto [z, v] = this->states;
    T yv[V], gv[V], zv[V], vv[V];
    this->load_param_and_grad(i, yv, gv);
    load<V>(z, i, zv);
    load<V>(v, i, vv);
#pragma unroll
    for (int k = 0; k < V; ++k)
      schedulefree_adamw_update(yv[k], load_grad(gv[k], this->load_g), zv[k], vv[k], this->s);
    this->store_param_and_master(i, yv);
    store<V>(z, i, zv);
    store<V>(v, i, vv);
  }
};

}  // namespace

void schedulefree_adamw(const ScheduleFreeAdamWCall& call, const ExecContext& ctx) {
  if (call.lists.num_tensors == 0) return;
  FUSEDOPT_STEP_HOST(SCHEDULEFREEADAMW)
  run_step<ScheduleFreeAdamWBody>(call.lists, host, args, /*count_steps=*/false, ctx);
}

}  // namespace fusedopt::cuda
