// muon_momentum_ and muon_apply_: Muon's two elementwise passes (torch.optim.Muon) over every
// tensor of the call, one launch each, with the math of fusedopt/math/muon.h; torch runs the
// Newton-Schulz GEMMs between them ([note: muon passes] in fusedopt/optim/muon.py).
// Per element: the momentum pass reads g, buf and writes buf and the bf16 Newton-Schulz input
// (fp32 14 bytes; bf16 with masters 12, without 8; no param); the apply pass reads p (or its
// master, +the 16-bit param with master_sync) and the bf16 output and writes p (+master)
// (fp32 10 bytes; bf16 without masters 6). No step counts. The vector width counts the bf16
// stream too, so that each stream moves 128 bits per access ([note: vector path]).
#include "fusedopt/math/muon.h"
#include "step.cuh"

namespace fusedopt::cuda {
namespace {

// Slots, hyperparameters and StepArgs::flag indices of a muon call, from its spec.
constexpr int kMomentumBuffer = state_slot(spec::muon::kMomentumBuffers);
constexpr int kNsBuffer = state_slot(spec::muon::kNsBuffers);
using spec::muon::kMomentum, spec::muon::kWeightDecay, spec::muon::kLrRatio;
using spec::muon::kNesterov;

/// What both passes hold beyond StepBody: the bf16 Newton-Schulz buffer, in the vector width
/// and the alignment test. `kStateSlots`: the StepBody states of the pass.
template <class P, class G, MasterKind kMasterWeights, int... kStateSlots>
struct MuonBody : StepBody<P, G, kMasterWeights, MuonScalars<Opmath<P>>, kStateSlots...> {
  using Base = StepBody<P, G, kMasterWeights, MuonScalars<Opmath<P>>, kStateSlots...>;
  using typename Base::S;
  using typename Base::T;
  static constexpr int kWidth =
      kMasterWeights ? kVecWidth<P, G, S, float, bf16> : kVecWidth<P, G, S, bf16>;

  bf16* ns;

  __device__ __forceinline__ MuonBody(const Row& row, int t, const StepArgs& a)
      : Base(row, a, /*maximize=*/false, [&] {
          return muon_scalars<T>(step_lr(row, t, a), row.hyper[kMomentum],
                                 row.hyper[kWeightDecay], row.hyper[kLrRatio]);
        }),
        ns(static_cast<bf16*>(row.slot[kNsBuffer])) {}

  __device__ __forceinline__ bool aligned(int64_t start) const {
    return Base::aligned(start) && aligned_all(start, ns);
  }
};

/// muon_momentum_: buf = lerp(buf, g, 1 - momentum); ns = bf16(lerp(g, buf, momentum)) with
/// Nesterov (buf as stored), else bf16(buf). Reads no param.
template <class P, class G, MasterKind kMasterWeights, bool kNesterovVariant>
struct MuonMomentumBody : MuonBody<P, G, kMasterWeights, kMomentumBuffer> {
  using Base = MuonBody<P, G, kMasterWeights, kMomentumBuffer>;
  using typename Base::S;
  using typename Base::T;
  using Base::Base;

  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    auto* const buf = this->states[0];
    T gv[V], bv[V], nv[V];
    load<V>(this->g, i, gv);
    load<V>(buf, i, bv);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      nv[k] = muon_momentum<T, kNesterovVariant>(
          load_grad(gv[k], this->load_g), bv[k], this->s,
          [&](T x) { return bv[k] = to_opmath<T>(from_opmath<S>(x)); });
    }
    store<V>(buf, i, bv);
    store<V>(this->ns, i, nv);
  }
};

/// muon_apply_: p = fma(-(lr*lr_ratio), O, p*(1 - lr*wd)), O the Newton-Schulz output in
/// ns. Reads no grad.
template <class P, class G, MasterKind kMasterWeights>
struct MuonApplyBody : MuonBody<P, G, kMasterWeights> {
  using Base = MuonBody<P, G, kMasterWeights>;
  using typename Base::T;
  using Base::Base;

  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    T pv[V], nv[V];
    load_param<V, P, T, kMasterWeights>(this->p, this->master, i, pv, this->master_sync);
    load<V>(this->ns, i, nv);
#pragma unroll
    for (int k = 0; k < V; ++k) pv[k] = muon_apply(pv[k], nv[k], this->s);
    this->store_param_and_master(i, pv);
  }
};

}  // namespace

void muon_momentum(const MuonCall& call, const ExecContext& ctx) {
  if (call.lists.num_tensors == 0) return;
  FUSEDOPT_STEP_HOST(MUON)
  if (args.flag[kNesterov]) {
    run_step<MuonMomentumBody, true>(call.lists, host, args, /*count_steps=*/false, ctx);
  } else {
    run_step<MuonMomentumBody, false>(call.lists, host, args, /*count_steps=*/false, ctx);
  }
}

void muon_apply(const MuonCall& call, const ExecContext& ctx) {
  if (call.lists.num_tensors == 0) return;
  FUSEDOPT_STEP_HOST(MUON)
  run_step<MuonApplyBody>(call.lists, host, args, /*count_steps=*/false, ctx);
}

}  // namespace fusedopt::cuda
