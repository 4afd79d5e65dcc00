// lion_: one Lion step (lion-pytorch semantics, sign(0) = 0) over every tensor of the call,
// with the math of fusedopt/math/lion.h. Per element: reads g, p, m (+master) and writes p, m
// (+master): bf16 everything 10 bytes, fp32 20. Lion keeps no step count: one launch (plus a
// table upload when the table changed).
#include "fusedopt/math/lion.h"
#include "quant8.cuh"
#include "step.cuh"

namespace fusedopt::cuda {
namespace {

// Slots, hyperparameters and StepArgs::flag indices of a lion call, from its spec.
constexpr int kExpAvg = state_slot(spec::lion::kExpAvgs);
constexpr int kExpAvgScales = state_slot(spec::lion::kExpAvgScales);  // [note: 8-bit states]
using spec::lion::kBeta1, spec::lion::kBeta2, spec::lion::kWeightDecay;
using spec::lion::kMaximize;

/// The update of one element (both Bodies').
struct LionUpdate {
  template <class T, class Scalars>
  __device__ __forceinline__ void operator()(T& p, T g, T& m, const Scalars& s) const {
    lion_update(p, g, m, s);
  }
};

/// The moment in storage S ([note: state dtype] in fusedopt/dtype.h: run_step_with_states).
template <class S, class P, class G, MasterKind kMasterWeights>
struct LionBodyOf : StepBodyOf<S, P, G, kMasterWeights, LionScalars<Opmath<P>>, kExpAvg> {
  using Base = StepBodyOf<S, P, G, kMasterWeights, LionScalars<Opmath<P>>, kExpAvg>;
  using typename Base::T;

  __device__ __forceinline__ LionBodyOf(const Row& row, int t, const StepArgs& a)
      : Base(row, a, a.flag[kMaximize], [&] {
          return lion_scalars<T>(step_lr(row, t, a), row.hyper[kBeta1], row.hyper[kBeta2],
                          row.hyper[kWeightDecay]);
        }) {}

  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    apply_every_state<V>(*this, i, LionUpdate{});
  }
};

/// Lion with DESIGN.md §3's state storage (StateOf): a type of its own, so that these kernels
/// keep their names (tests/test_cuda_static.py, the H200 model).
template <class P, class G, MasterKind kMasterWeights>
struct LionBody : LionBodyOf<StateOf<P, kMasterWeights>, P, G, kMasterWeights> {
  using LionBodyOf<StateOf<P, kMasterWeights>, P, G, kMasterWeights>::LionBodyOf;
};

/// [note: 8-bit states] (fusedopt/quant8.py): the moment as int8 codes (quant8.cuh).
template <class P, class G, MasterKind kMasterWeights>
struct LionQ8Body : LionBody<P, G, kMasterWeights> {
  Q8States<true> q;

  __device__ __forceinline__ LionQ8Body(const Row& row, int t, const StepArgs& a)
      : LionBody<P, G, kMasterWeights>(row, t, a), q(row, {kExpAvg}, {kExpAvgScales}) {}

  __device__ __forceinline__ void apply(const Q8Lane& l) const {
    q8_apply(*this, q, l, true, LionUpdate{});
  }
};

}  // namespace

void lion(const LionCall& call, const ExecContext& ctx) {
  if (call.lists.num_tensors == 0) return;
  FUSEDOPT_STEP_HOST(LION)
  if (call.exp_avg_scales.present()) {  // [note: 8-bit states]: fp32/bf16/fp16 params only
    set_row_lengths(host, call.lists);
    run_q8_step<LionQ8Body>(call.lists, host, args, ctx, /*count_steps=*/false);
    return;
  }
  // [note: state dtype]: the moment's storage is the call's (exp_avgs' slot dtype).
  run_step_with_states<LionBodyOf, LionBody>("lion_", call.lists, call.exp_avgs.dtype, host,
                                             args, /*count_steps=*/false, ctx);
}

}  // namespace fusedopt::cuda
