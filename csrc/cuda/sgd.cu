// sgd_: one SGD step (torch.optim.SGD: weight decay, momentum, dampening, Nesterov,
// maximize) over every tensor of the call, with the math of fusedopt/math/sgd.h. Per element:
// reads g, p (+buf with momentum, +master) and writes p (+buf, +master): fp32 with momentum
// 20 bytes, without 12. Launches: the step increment (with momentum: torch's first-step
// rule needs the count), the step kernel (plus a table upload when the table changed).
#include "fusedopt/math/sgd.h"
#include "quant8.cuh"
#include "step.cuh"

namespace fusedopt::cuda {
namespace {

// Slots, hyperparameters and StepArgs::flag indices of an sgd call, from its spec.
constexpr int kMomentumBuffer = state_slot(spec::sgd::kMomentumBuffers);
constexpr int kMomentumBufferScales = state_slot(spec::sgd::kMomentumBufferScales);
using spec::sgd::kMomentum, spec::sgd::kDampening, spec::sgd::kWeightDecay;
using spec::sgd::kNesterov, spec::sgd::kMaximize;

/// The buffer in storage S ([note: state dtype] in fusedopt/dtype.h: run_step_with_states).
template <class S, class P, class G, MasterKind kMasterWeights, bool kWithMomentum>
struct SgdBodyOf
    : StepBodyOf<S, P, G, kMasterWeights, SgdScalars<Opmath<P>>, kMomentumBuffer> {
  using Base = StepBodyOf<S, P, G, kMasterWeights, SgdScalars<Opmath<P>>, kMomentumBuffer>;
  using typename Base::T;

  // [note: sgd momentum 0] (fusedopt/reference/ops.py): a tensor whose momentum is 0 steps
  // as momentum-free SGD even in a call with buffers; its buffer and step count stay as
  // they are (increment_steps skips a row whose momentum is 0).
  bool use_buffer;

  // The step count was incremented before this kernel: 1 now means this is the param's first
  // (unskipped) step, whatever a state dict loaded before.
  __device__ __forceinline__ SgdBodyOf(const Row& row, int t, const StepArgs& a)
      : Base(row, a, a.flag[kMaximize], [&] {
          return sgd_scalars<T>(step_lr(row, t, a), row.hyper[kMomentum],
                         row.hyper[kDampening], row.hyper[kWeightDecay],
                         kWithMomentum && row.step && *row.step == 1.0f, a.flag[kNesterov]);
        }),
        use_buffer(kWithMomentum && row.hyper[kMomentum] != 0.0) {}

  // Hides Base::aligned: an unused buffer need not be aligned.
  __device__ __forceinline__ bool aligned(int64_t start) const {
    return aligned_all(start, this->p, this->g, use_buffer ? this->states[0] : nullptr,
                       this->master);
  }

  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    auto* const buf = this->states[0];
    const auto& s = this->s;
    const GradLoad<T>& load_g = this->load_g;
    T pv[V], gv[V], bv[V] = {};
    this->load_param_and_grad(i, pv, gv);
    if (use_buffer) {
      // On the first step the buffer is overwritten, not read (it may hold anything).
      if (!s.first_step) load<V>(buf, i, bv);
#pragma unroll
      for (int k = 0; k < V; ++k) sgd_update<T, true>(pv[k], load_grad(gv[k], load_g), bv[k], s);
      this->template store_state<0>(i, bv);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) sgd_update<T, false>(pv[k], load_grad(gv[k], load_g), bv[k], s);
    }
    this->store_param_and_master(i, pv);
  }
};

/// SGD with DESIGN.md §3's state storage (StateOf): a type of its own, so that these kernels
/// keep their names (tests/test_cuda_static.py, the H200 model).
template <class P, class G, MasterKind kMasterWeights, bool kWithMomentum>
struct SgdBody : SgdBodyOf<StateOf<P, kMasterWeights>, P, G, kMasterWeights, kWithMomentum> {
  using SgdBodyOf<StateOf<P, kMasterWeights>, P, G, kMasterWeights, kWithMomentum>::SgdBodyOf;
};

/// [note: 8-bit states] (fusedopt/quant8.py): the buffers as int8 codes (quant8.cuh); a
/// tensor whose momentum is 0 keeps its codes and scales as they are.
template <class P, class G, MasterKind kMasterWeights>
struct SgdQ8Body : SgdBody<P, G, kMasterWeights, true> {
  using Base = SgdBody<P, G, kMasterWeights, true>;
  using typename Base::T;
  Q8States<true> q;

  __device__ __forceinline__ SgdQ8Body(const Row& row, int t, const StepArgs& a)
      : Base(row, t, a), q(row, {kMomentumBuffer}, {kMomentumBufferScales}) {}

  __device__ __forceinline__ void apply(const Q8Lane& l) const {
    q8_apply(*this, q, l, this->use_buffer, [](T& p, T g, T& buf, const auto& s) {
      sgd_update<T, true>(p, g, buf, s);  // momentum_on false: p only
    });
  }
};

}  // namespace

void sgd(const SgdCall& call, const ExecContext& ctx) {
  if (call.lists.num_tensors == 0) return;
  FUSEDOPT_STEP_HOST(SGD)
  if (call.momentum_buffer_scales.present()) {  // [note: 8-bit states]
    set_row_lengths(host, call.lists);
    run_q8_step<SgdQ8Body>(call.lists, host, args, ctx, /*count_steps=*/true, kMomentum);
    return;
  }
  if (call.momentum_buffers.present()) {
    // [note: sgd momentum 0]: a tensor whose momentum is 0 keeps its step count.
    // [note: state dtype]: the buffers' storage is the call's (their slot dtype).
    run_step_with_states<SgdBodyOf, SgdBody, true>("sgd_", call.lists,
                                                   call.momentum_buffers.dtype, host, args,
                                                   /*count_steps=*/true, ctx, kMomentum);
  } else {
    run_step<SgdBody, false>(call.lists, host, args, /*count_steps=*/false, ctx);
  }
}

}  // namespace fusedopt::cuda
