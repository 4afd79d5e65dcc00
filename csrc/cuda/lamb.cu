// lamb_: one LAMB step (timm semantics, DESIGN.md §3) over every tensor of the call, with the
// math of fusedopt/math/lamb.h, as its two passes, each also an op of its own
// ([note: lamb passes] there says which pass reads and writes what):
// lamb_direction_ advances the steps (one launch), reduces |p|^2, |u|^2 per chunk of each
// tensor that adapts (storing m, v where the states are exact) and folds the chunk partials
// into sq_norms per tensor in a fixed order (a one-block kernel); lamb_apply_ takes the trust
// ratio from sq_norms in each block and writes p (u from the stored m, v) or p, m, v (u from
// g and the old m, v). Per element: fp32 24 + 16 bytes, bf16 without masters 8 + 14.
// Tensors that do not adapt (wd == 0 and not always_adapt) skip the first pass's work (its
// kernels still run: the weight decays are device memory). Launches: step increment,
// norms, fold, apply (plus a table upload when the table changed); all deterministic
// ([note: deterministic norm] in grad_norm.cu).
// 8-bit moments ([note: 8-bit states] in fusedopt/quant8.py) are never exact, so every tensor
// takes lamb_apply_'s one-pass path: lamb_q8_norms_kernel reads g, p and the codes of the
// quantization blocks a CUDA block owns (quant8.cuh: for_q8_blocks, q8_read) and writes
// nothing; the apply pass is q8_step_kernel with LambQ8ApplyBody (q8_apply: the moments
// written once per step). Per element, fp32: 4 + 4 + 2 read, then 4 + 4 + 2 read and 4 + 2
// written (+ 8 B per 256 elements per moment for the scales, read in both, written in the
// second).
#include "fusedopt/math/lamb.h"
#include "quant8.cuh"
#include "step.cuh"

namespace fusedopt::cuda {
namespace {

// Slots, hyperparameters and StepArgs::flag indices of a lamb call, from its spec.
constexpr int kExpAvg = state_slot(spec::lamb::kExpAvgs);
constexpr int kExpAvgSq = state_slot(spec::lamb::kExpAvgSqs);
constexpr int kExpAvgScales = state_slot(spec::lamb::kExpAvgScales);  // [note: 8-bit states]
constexpr int kExpAvgSqScales = state_slot(spec::lamb::kExpAvgSqScales);
using spec::lamb::kBeta1, spec::lamb::kBeta2, spec::lamb::kEps, spec::lamb::kWeightDecay;
using spec::lamb::kGradAveraging, spec::lamb::kBiasCorrection, spec::lamb::kTrustClip,
    spec::lamb::kAlwaysAdapt;
inline constexpr int kFoldThreads = 1024;

__device__ __forceinline__ bool adapts(const Row& row, const StepArgs& a) {
  return row.hyper[kWeightDecay] != 0.0 || a.flag[kAlwaysAdapt];
}

/// Tensor t's trust ratio from the sums of squares in StepArgs::extra (lamb_direction_'s
/// sq_norms); 1 for a tensor that does not adapt.
template <class T>
__device__ __forceinline__ T trust_ratio(const Row& row, int t, const StepArgs& a) {
  const T* sq_norms = static_cast<const T*>(a.extra);
  return adapts(row, a) ? lamb_trust_ratio_sq(sq_norms[2 * t], sq_norms[2 * t + 1], true,
                                              a.flag[kTrustClip])
                        : T(1);
}

/// What both passes compute per element: the new m, v and the update direction u. The
/// pointers, scalars and loads are StepBodyOf's (step.cuh): states[0] is m, states[1] v, in
/// storage S ([note: state dtype] in fusedopt/dtype.h).
template <class S_, class P, class G, MasterKind kMasterWeights>
struct LambElements
    : StepBodyOf<S_, P, G, kMasterWeights, LambScalars<Opmath<P>>, kExpAvg, kExpAvgSq> {
  using Base = StepBodyOf<S_, P, G, kMasterWeights, LambScalars<Opmath<P>>, kExpAvg, kExpAvgSq>;
  using typename Base::S;
  using typename Base::T;
  // The states hold opmath values exactly: a tensor that adapts takes two passes
  // ([note: lamb passes] in math/lamb.h).
  static constexpr bool kStatesExact = std::is_same_v<S, T>;

  __device__ __forceinline__ LambElements(const Row& row, int t, const StepArgs& a)
      : Base(row, a, /*maximize=*/false, [&] {
          return lamb_scalars<T>(step_lr(row, t, a), row.hyper[kBeta1], row.hyper[kBeta2],
                                 row.hyper[kEps], row.hyper[kWeightDecay],
                                 static_cast<double>(*row.step), a.flag[kGradAveraging],
                                 a.flag[kBiasCorrection]);
        }) {}

  template <int V>
  __device__ __forceinline__ void direction(int64_t i, T (&pv)[V], T (&mv)[V], T (&vv)[V],
                                            T (&uv)[V]) const {
    T gv[V];
    this->load_param_and_grad(i, pv, gv);
    load<V>(this->states[0], i, mv);
    load<V>(this->states[1], i, vv);
#pragma unroll
    for (int k = 0; k < V; ++k)
      uv[k] = lamb_direction(pv[k], load_grad(gv[k], this->load_g), mv[k], vv[k], this->s);
  }
};

/// lamb_direction_: accumulates |p|^2 and |u|^2 of the thread's elements (a tensor that
/// adapts); stores m, v when the states are exact.
template <class S, class P, class G, MasterKind kMasterWeights>
struct LambNormBody : LambElements<S, P, G, kMasterWeights> {
  using Base = LambElements<S, P, G, kMasterWeights>;
  using T = typename Base::T;
  T* p2;
  T* u2;

  __device__ __forceinline__ LambNormBody(const Row& row, int t, const StepArgs& a, T* p2_,
                                          T* u2_)
      : Base(row, t, a), p2(p2_), u2(u2_) {}

  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    T pv[V], mv[V], vv[V], uv[V];
    this->template direction<V>(i, pv, mv, vv, uv);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      *p2 = *p2 + pv[k] * pv[k];
      *u2 = *u2 + uv[k] * uv[k];
    }
    if constexpr (Base::kStatesExact) {
      store<V>(this->states[0], i, mv);
      store<V>(this->states[1], i, vv);
    }
  }
};

/// lamb_apply_: p -= lr * ratio * u, the ratio from sq_norms (StepArgs::extra); u from the
/// stored m, v (two-pass tensors: writes p) or from g and the old m, v (writes p, m, v).
template <class S, class P, class G, MasterKind kMasterWeights>
struct LambApplyBodyOf : LambElements<S, P, G, kMasterWeights> {
  using Base = LambElements<S, P, G, kMasterWeights>;
  using T = typename Base::T;
  T ratio;
  bool two_pass;  // the same for the whole block: no divergence

  __device__ __forceinline__ LambApplyBodyOf(const Row& row, int t, const StepArgs& a)
      : Base(row, t, a),
        ratio(trust_ratio<T>(row, t, a)),
        two_pass(lamb_two_pass(adapts(row, a), Base::kStatesExact)) {}

  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    T pv[V], mv[V], vv[V], uv[V];
    if (two_pass) {
      load_param<V, P, T, kMasterWeights>(this->p, this->master, i, pv, this->master_sync);
      load<V>(this->states[0], i, mv);
      load<V>(this->states[1], i, vv);
#pragma unroll
      for (int k = 0; k < V; ++k) uv[k] = lamb_update(pv[k], mv[k], vv[k], this->s);
    } else {
      this->template direction<V>(i, pv, mv, vv, uv);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) pv[k] = lamb_apply(pv[k], uv[k], ratio, this->s);
    this->store_param_and_master(i, pv);
    if (!two_pass) {  // bf16 states of an SR call round stochastically ([note: state dtype])
      this->template store_state<0>(i, mv);
      this->template store_state<1>(i, vv);
    }
  }
};

/// lamb_apply_ with DESIGN.md §3's state storage (StateOf): a type of its own, so that these
/// kernels keep their names (tests/test_cuda_static.py, the H200 model).
template <class P, class G, MasterKind kMasterWeights>
struct LambApplyBody : LambApplyBodyOf<StateOf<P, kMasterWeights>, P, G, kMasterWeights> {
  using LambApplyBodyOf<StateOf<P, kMasterWeights>, P, G, kMasterWeights>::LambApplyBodyOf;
};

/// [note: 8-bit states] (fusedopt/quant8.py): m as int8 and v as uint8 codes with their
/// block absmaxes (quant8.cuh), in the slots of the exact moments and of their scales.
template <class P, class G, MasterKind kMasterWeights>
struct LambQ8Elements : LambElements<StateOf<P, kMasterWeights>, P, G, kMasterWeights> {
  using Base = LambElements<StateOf<P, kMasterWeights>, P, G, kMasterWeights>;
  Q8States<true, false> q;

  __device__ __forceinline__ LambQ8Elements(const Row& row, int t, const StepArgs& a)
      : Base(row, t, a),
        q(row, {kExpAvg, kExpAvgSq}, {kExpAvgScales, kExpAvgSqScales}) {}
};

/// lamb_direction_ with 8-bit moments: |p|^2 and |u|^2 of the thread's elements of the
/// quantization blocks its CUDA block owns; the codes only read.
template <class P, class G, MasterKind kMasterWeights>
struct LambQ8NormBody : LambQ8Elements<P, G, kMasterWeights> {
  using T = typename LambQ8Elements<P, G, kMasterWeights>::T;
  T* p2;
  T* u2;

  __device__ __forceinline__ LambQ8NormBody(const Row& row, int t, const StepArgs& a, T* p2_,
                                            T* u2_)
      : LambQ8Elements<P, G, kMasterWeights>(row, t, a), p2(p2_), u2(u2_) {}

  __device__ __forceinline__ void apply(const Q8Lane& l) const {
    q8_read(*this, this->q, l, [&](T p, T g, T m, T v, const auto& s) {
      const T u = lamb_direction(p, g, m, v, s);
      *p2 = *p2 + p * p;
      *u2 = *u2 + u * u;
    });
  }
};

/// lamb_apply_ with 8-bit moments: every tensor's one-pass path (u from g and the old
/// moments; writes p, the codes and the scales: q8_apply).
template <class P, class G, MasterKind kMasterWeights>
struct LambQ8ApplyBody : LambQ8Elements<P, G, kMasterWeights> {
  using T = typename LambQ8Elements<P, G, kMasterWeights>::T;
  T ratio;

  __device__ __forceinline__ LambQ8ApplyBody(const Row& row, int t, const StepArgs& a)
      : LambQ8Elements<P, G, kMasterWeights>(row, t, a), ratio(trust_ratio<T>(row, t, a)) {}

  __device__ __forceinline__ void apply(const Q8Lane& l) const {
    const T r = ratio;
    q8_apply(*this, this->q, l, true, [r](T& p, T g, T& m, T& v, const auto& s) {
      p = lamb_apply(p, lamb_direction(p, g, m, v, s), r, s);
    });
  }
};

template <class T>
struct NormPartial {
  T p2, u2;
};

/// The norms pass of Body (LambNormBody or LambQ8NormBody) over the block's work: each
/// thread's sums, block-reduced into the chunk's partial. `walk(w, row, body)` visits the
/// elements.
template <class Body, class Walk>
__device__ __forceinline__ void lamb_norms(const Table& table, const StepArgs& args,
                                           NormPartial<typename Body::T>* partials, Walk walk) {
  using T = typename Body::T;
  if (skip_step(args.scalars.found_inf)) return;
  const Work w = this_work(table);
  const Row& row = table.rows[w.t];
  if (!adapts(row, args)) return;  // its ratio is 1; lamb_fold_kernel reads no partial
  T p2 = T(0), u2 = T(0);
  const Body body(row, w.t, args, &p2, &u2);
  walk(w, row, body);
  p2 = block_reduce(p2, Sum{}, T(0));
  u2 = block_reduce(u2, Sum{}, T(0));
  if (threadIdx.x == 0) partials[blockIdx.x] = {p2, u2};
}

template <class S, class P, class G, MasterKind kMasterWeights>
__global__ void __launch_bounds__(kThreads)
    lamb_norms_kernel(Table table, StepArgs args, NormPartial<Opmath<P>>* partials) {
  using Body = LambNormBody<S, P, G, kMasterWeights>;
  lamb_norms<Body>(table, args, partials, [](const Work& w, const Row&, const Body& body) {
    for_chunk<Body::kWidth>(w.span, body.aligned(w.span.start), body);
  });
}

/// lamb_norms_kernel with 8-bit moments ([note: 8-bit states]): the quantization blocks the
/// CUDA block owns, a warp per block ([note: q8 warps] in quant8.cuh).
template <class P, class G, MasterKind kMasterWeights>
__global__ void __launch_bounds__(kThreads)
    lamb_q8_norms_kernel(Table table, StepArgs args, NormPartial<Opmath<P>>* partials) {
  using Body = LambQ8NormBody<P, G, kMasterWeights>;
  lamb_norms<Body>(table, args, partials, [](const Work& w, const Row& row, const Body& body) {
    for_q8_blocks(w, row, body);
  });
}

// One block: warp w folds the chunk partials of tensors w, w + 32, ... in a fixed order into
// sq_norms[2t], sq_norms[2t + 1] (0 for a tensor that does not adapt).
template <class T>
__global__ void __launch_bounds__(kFoldThreads)
    lamb_fold_kernel(Table table, StepArgs args, const NormPartial<T>* partials, T* sq_norms) {
  if (skip_step(args.scalars.found_inf)) return;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  for (int t = warp; t < table.n; t += nwarps) {
    const bool adapt = adapts(table.rows[t], args);
    T p2 = T(0), u2 = T(0);
    for (int64_t c = table.chunk_begin[t] + lane; adapt && c < table.chunk_begin[t + 1];
         c += 32) {
      p2 = p2 + partials[c].p2;
      u2 = u2 + partials[c].u2;
    }
    p2 = warp_reduce(p2, Sum{});
    u2 = warp_reduce(u2, Sum{});
    if (lane == 0) {
      sq_norms[2 * t] = p2;
      sq_norms[2 * t + 1] = u2;
    }
  }
}

/// A call's table and kernel arguments, shared by the two passes of lamb().
struct LambLaunch {
  StepArgs args;
  TableBuilder host;
  Table table;
  bool q8;  // 8-bit moments ([note: 8-bit states]): their scales are given

  LambLaunch(const LambCall& call, const ExecContext& ctx)
      : args(step_args(call.lists)),
        host(step_table(call.lists)),
        q8(call.exp_avg_scales.present()) {
    // [note: state dtype]: a storage the cuda backend does not build is refused before the
    // table upload or a step count moves (8-bit moments are codes: q8_step_kernel's own)
    if (q8) {
      check_q8_params(call.lists);
    } else {
      check_state_storage("lamb_", call.lists, call.exp_avgs.dtype);
    }
    FUSEDOPT_FILL_STEP_CALL(LAMB)
    if (q8) set_row_lengths(host, call.lists);
    table = host.upload(ctx);
  }
};

/// Launches `norms` (a norms kernel: chunk partials of T) and the fold into sq_norms.
template <class T, class Kernel>
void launch_norms(Kernel norms, const LambLaunch& l, void* sq_norms, const ExecContext& ctx) {
  const cudaStream_t stream = stream_of(ctx);
  auto* partials = static_cast<NormPartial<T>*>(
      ctx.workspace.get(sizeof(NormPartial<T>) * l.host.total_chunks()));
  launch_kernel(norms, chunk_grid(l.host.total_chunks()), kThreads, stream, l.table, l.args,
                partials);
  check(cudaGetLastError(), "launching lamb_direction_ (norms)");
  launch_kernel(lamb_fold_kernel<T>, 1, kFoldThreads, stream, l.table, l.args, partials,
                static_cast<T*>(sq_norms));
  check(cudaGetLastError(), "launching lamb_direction_ (fold)");
}

void run_direction(const LambCall& call, LambLaunch& l, void* sq_norms, const ExecContext& ctx) {
  increment_steps(l.table, call.lists.scalars.found_inf, stream_of(ctx));
  // The weight decays are device memory ([note: hyper table] in fusedopt/_contract.py), so
  // the host cannot tell which tensors adapt: the norms kernel skips each tensor that does
  // not (the fold writes its 0), and a call where none does costs two almost empty launches
  // instead of none.
  if (l.host.total_chunks() == 0) return;
  if (l.q8) {  // 8-bit moments: codes, not a state storage ([note: 8-bit states])
    dispatch_q8_types(call.lists, [&](auto p, auto g, auto master) {
      using P = decltype(p);
      constexpr MasterKind kM = decltype(master)::value;
      launch_norms<Opmath<P>>(lamb_q8_norms_kernel<P, decltype(g), kM>, l, sq_norms, ctx);
    });
    return;
  }
  // [note: state dtype]: the moments' storage is the call's (exp_avgs' slot dtype)
  dispatch_step_states(
      "lamb_", call.lists, call.exp_avgs.dtype, [&](auto p, auto g, auto master, auto s) {
        using P = decltype(p);
        constexpr MasterKind kM = decltype(master)::value;
        launch_norms<Opmath<P>>(lamb_norms_kernel<decltype(s), P, decltype(g), kM>, l,
                                sq_norms, ctx);
      });
}

void run_apply(const LambCall& call, LambLaunch& l, const void* sq_norms,
               const ExecContext& ctx) {
  l.args.extra = sq_norms;
  if (l.q8) {
    launch_q8_step<LambQ8ApplyBody>(call.lists, l.host, l.table, l.args, stream_of(ctx));
    return;
  }
  dispatch_step_states(
      "lamb_", call.lists, call.exp_avgs.dtype, [&](auto p, auto g, auto master, auto s) {
        using P = decltype(p);
        using G = decltype(g);
        using S = decltype(s);
        constexpr MasterKind kM = decltype(master)::value;
        if constexpr (std::is_same_v<S, StateOf<P, kM>>) {
          launch_step<LambApplyBody<P, G, kM>>(l.host, l.table, l.args, stream_of(ctx));
        } else {
          launch_step<LambApplyBodyOf<S, P, G, kM>>(l.host, l.table, l.args, stream_of(ctx));
        }
      });
}

}  // namespace

void lamb_direction(const LambDirectionCall& call, const ExecContext& ctx) {
  if (call.step.lists.num_tensors == 0) return;
  LambLaunch l(call.step, ctx);
  run_direction(call.step, l, call.sq_norms, ctx);
}

void lamb_apply(const LambApplyCall& call, const ExecContext& ctx) {
  if (call.step.lists.num_tensors == 0) return;
  LambLaunch l(call.step, ctx);
  run_apply(call.step, l, call.sq_norms, ctx);
}

void lamb(const LambCall& call, const ExecContext& ctx) {
  if (call.lists.num_tensors == 0) return;
  LambLaunch l(call, ctx);
  const size_t bytes = (call.lists.params.dtype == DType::kFloat64 ? 8 : 4) * 2 * l.host.n();
  void* sq_norms = ctx.workspace.get(bytes);  // the fold writes every entry that is read
  run_direction(call, l, sq_norms, ctx);
  run_apply(call, l, sq_norms, ctx);
}

}  // namespace fusedopt::cuda
