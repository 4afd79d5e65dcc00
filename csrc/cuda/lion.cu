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
    apply_every_state<V>(*this, i,
                         [](T& p, T g, T& m, const auto& s) { lion_update(p, g, m, s); });
  }
};

}  // namespace

FUSEDOPT_STEP_LAUNCHER(lion, LionCall, LION, LionBody, /*count_steps=*/false)

}  // namespace fusedopt::cuda
