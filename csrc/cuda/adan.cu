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
    // States in spec order: exp_avg m, exp_avg_sq n, exp_avg_diff v, neg_pre_grad npg.
    apply_every_state<V>(*this, i, [](T& p, T g, T& m, T& n, T& v, T& npg, const auto& s) {
      adan_update(p, g, m, v, n, npg, s);
    });
  }
};

}  // namespace

FUSEDOPT_STEP_LAUNCHER(adan, AdanCall, ADAN, AdanBody, /*count_steps=*/true)

}  // namespace fusedopt::cuda
