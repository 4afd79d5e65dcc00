// adamw_: one Adam (decoupled=false) / AdamW step over every tensor of the call, with the
// math of fusedopt/math/adamw.h. Per element: reads g, p, m, v (+vmax with amsgrad, +master)
// and writes p, m, v (+vmax, +master): bf16 params and states without masters 14 bytes,
// fp32 28, bf16 params with fp32 grads and masters 30. Launches: the step increment, the
// step kernel (plus a table upload when the table changed).
#include "fusedopt/math/adamw.h"
#include "quant8.cuh"
#include "step.cuh"

namespace fusedopt::cuda {
namespace {

// Slots, hyperparameters and StepArgs::flag indices of an adamw call, from its spec.
constexpr int kExpAvg = state_slot(spec::adamw::kExpAvgs);
constexpr int kExpAvgSq = state_slot(spec::adamw::kExpAvgSqs);
constexpr int kMaxExpAvgSq = state_slot(spec::adamw::kMaxExpAvgSqs);
// With 8-bit states, the codes in the moments' slots and the block absmaxes in their own.
constexpr int kExpAvgCodes = kExpAvg, kExpAvgSqCodes = kExpAvgSq;
constexpr int kExpAvgScales = state_slot(spec::adamw::kExpAvgScales);
constexpr int kExpAvgSqScales = state_slot(spec::adamw::kExpAvgSqScales);
using spec::adamw::kBeta1, spec::adamw::kBeta2, spec::adamw::kEps,
    spec::adamw::kWeightDecay;
using spec::adamw::kDecoupled, spec::adamw::kMaximize, spec::adamw::kBiasCorrection;

/// Tensor t's AdamWScalars from its table row: both Bodies' (fp32 and 8-bit states).
template <class T>
__device__ __forceinline__ AdamWScalars<T> row_scalars(const Row& row, int t, const StepArgs& a) {
  return adamw_scalars<T>(step_lr(row, t, a), row.hyper[kBeta1], row.hyper[kBeta2],
                          row.hyper[kEps], row.hyper[kWeightDecay], static_cast<double>(*row.step),
                          a.flag[kDecoupled], a.flag[kBiasCorrection]);
}

/// The AdamW step with states stored as S ([note: state dtype] in fusedopt/dtype.h: fp32,
/// bf16 or fp16 whatever P; bf16 ones round stochastically in an SR call, streams 1-3).
template <class S, class P, class G, MasterKind kMasterWeights, bool kAmsgrad>
struct AdamWBodyOf : StepBodyOf<S, P, G, kMasterWeights, AdamWScalars<Opmath<P>>, kExpAvg,
                                kExpAvgSq, kMaxExpAvgSq> {
  using Base = StepBodyOf<S, P, G, kMasterWeights, AdamWScalars<Opmath<P>>, kExpAvg, kExpAvgSq,
                          kMaxExpAvgSq>;
  using typename Base::T;

  __device__ __forceinline__ AdamWBodyOf(const Row& row, int t, const StepArgs& a)
      : Base(row, a, a.flag[kMaximize], [&] { return row_scalars<T>(row, t, a); }) {}

  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    const auto [m, v, vmax] = this->states;
    T pv[V], gv[V], mv[V], vv[V], xv[V];
    this->load_param_and_grad(i, pv, gv);
    load<V>(m, i, mv);
    load<V>(v, i, vv);
    if constexpr (kAmsgrad) load<V>(vmax, i, xv);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      adamw_update<T, kAmsgrad>(pv[k], load_grad(gv[k], this->load_g), mv[k], vv[k], xv[k],
                                this->s);
    }
    this->store_param_and_master(i, pv);
    this->template store_state<0>(i, mv);
    this->template store_state<1>(i, vv);
    if constexpr (kAmsgrad) this->template store_state<2>(i, xv);
  }
};

/// AdamW with DESIGN.md §3's state storage (StateOf). A type of its own rather than an alias,
/// so that these kernels keep their names (tests/test_cuda_static.py, the H200 model).
template <class P, class G, MasterKind kMasterWeights, bool kAmsgrad>
struct AdamWBody : AdamWBodyOf<StateOf<P, kMasterWeights>, P, G, kMasterWeights, kAmsgrad> {
  using AdamWBodyOf<StateOf<P, kMasterWeights>, P, G, kMasterWeights, kAmsgrad>::AdamWBodyOf;
};

// [note: 8-bit states] (fusedopt/quant8.py) on CUDA: a block walks its chunk by
// quantization blocks, a warp per block and 8 elements per lane ([note: q8 warps] in
// quant8.cuh); each block's new absmaxes are warp reductions. The param, master and grad go
// through the shared loads and stores of step.cuh. Per element: reads g, p (+master), m, v
// (1 B each), writes p (+master), m, v; 8 B of scales read and written per 256 elements.
template <class P, class G, MasterKind kMasterWeights>
struct AdamWQ8Body : StepBody<P, G, kMasterWeights, AdamWScalars<Opmath<P>>> {
  using Base = StepBody<P, G, kMasterWeights, AdamWScalars<Opmath<P>>>;
  using typename Base::T;
  Q8States<true, false> q;

  __device__ __forceinline__ AdamWQ8Body(const Row& row, int t, const StepArgs& a)
      : Base(row, a, a.flag[kMaximize], [&] { return row_scalars<T>(row, t, a); }),
        q(row, {kExpAvgCodes, kExpAvgSqCodes}, {kExpAvgScales, kExpAvgSqScales}) {}

  __device__ __forceinline__ void apply(const Q8Lane& l) const {
    q8_apply(*this, q, l, true, [](T& p, T g, T& m, T& v, const auto& s) {
      T unused = T(0);
      adamw_update<T, false>(p, g, m, v, unused, s);
    });
  }
};

}  // namespace

void adamw(const AdamWCall& call, const ExecContext& ctx) {
  if (call.lists.num_tensors == 0) return;
  FUSEDOPT_STEP_HOST(ADAMW)
  if (call.exp_avg_scales.present()) {  // [note: 8-bit states]: fp32/bf16/fp16 params only
    set_row_lengths(host, call.lists);
    run_q8_step<AdamWQ8Body>(call.lists, host, args, ctx);
    return;
  }
  // [note: state dtype]: the states' storage is the call's (exp_avgs' slot dtype).
  const DType state = call.exp_avgs.dtype;
  if (call.amsgrad) {
    run_step_with_states<AdamWBodyOf, AdamWBody, true>("adamw_", call.lists, state, host,
                                                       args, /*count_steps=*/true, ctx);
  } else {
    run_step_with_states<AdamWBodyOf, AdamWBody, false>("adamw_", call.lists, state, host,
                                                        args, /*count_steps=*/true, ctx);
  }
}

}  // namespace fusedopt::cuda
