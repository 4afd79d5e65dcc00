// lamb_: one LAMB step (timm semantics, DESIGN.md §3) over every tensor of the call, with the
// math of fusedopt/math/lamb.h. The trust ratio |p| / |u| needs two per-tensor norms before
// any param moves, so (as math/lamb.h explains) pass 1 reads g, p, m, v and reduces
// |p|^2, |u|^2 per chunk (writing nothing else), a one-block kernel turns the chunk partials
// into one trust ratio per tensor, and pass 2 reads g, p, m, v again, recomputes the same
// m, v, u bit for bit and writes p, m, v. Per element: bf16 without masters 8 + 14 bytes, fp32
// 16 + 28. Tensors that do not adapt (wd == 0 and not always_adapt) skip pass 1, and a call
// where none adapts runs neither pass 1 nor the ratio kernel. Launches: step increment,
// pass 1, ratios, pass 2 (plus a table upload when the table changed); all deterministic
// ([note: deterministic norm] in grad_norm.cu).
#include "fusedopt/math/lamb.h"
#include "step.cuh"

namespace fusedopt::cuda {
namespace {

// Slots, hyperparameters and StepArgs::flag indices of a lamb call, from its spec.
constexpr int kExpAvg = state_slot(spec::lamb::kExpAvgs);
constexpr int kExpAvgSq = state_slot(spec::lamb::kExpAvgSqs);
using spec::lamb::kBeta1, spec::lamb::kBeta2, spec::lamb::kEps, spec::lamb::kWeightDecay;
using spec::lamb::kGradAveraging, spec::lamb::kBiasCorrection, spec::lamb::kTrustClip,
    spec::lamb::kAlwaysAdapt;
inline constexpr int kRatioThreads = 1024;

__device__ __forceinline__ bool adapts(const Row& row, const StepArgs& a) {
  return row.hyper[kWeightDecay] != 0.0 || a.flag[kAlwaysAdapt];
}

/// What both passes compute per element: the new m, v and the update direction u.
template <class P, class G, bool kMasterWeights>
struct LambElements {
  using T = Opmath<P>;
  using S = StateOf<P, kMasterWeights>;
  static constexpr int kWidth =
      kMasterWeights ? kVecWidth<P, G, S, float> : kVecWidth<P, G, S>;

  P* p;
  const G* g;
  S* m;
  S* v;
  float* master;
  bool master_sync;  // [note: master sync]
  LambScalars<T> s;
  GradLoad<T> load_g;

  __device__ __forceinline__ LambElements(const Row& row, int t, const StepArgs& a)
      : p(static_cast<P*>(row.slot[kParam])),
        g(static_cast<const G*>(row.slot[kGrad])),
        m(static_cast<S*>(row.slot[kExpAvg])),
        v(static_cast<S*>(row.slot[kExpAvgSq])),
        master(static_cast<float*>(row.slot[kMaster])),
        master_sync(a.master_sync),
        s(lamb_scalars<T>(step_lr(row, t, a), row.hyper[kBeta1], row.hyper[kBeta2],
                          row.hyper[kEps], row.hyper[kWeightDecay],
                          static_cast<double>(*row.step), a.flag[kGradAveraging],
                          a.flag[kBiasCorrection])),
        load_g(make_grad_load<T>(a.scalars.grad_scale, a.scalars.clip_coef, false)) {}

  __device__ __forceinline__ bool aligned(int64_t start) const {
    return aligned_all(start, p, g, m, v, master);
  }

  template <int V>
  __device__ __forceinline__ void direction(int64_t i, T (&pv)[V], T (&mv)[V], T (&vv)[V],
                                            T (&uv)[V]) const {
    T gv[V];
    load_param<V, P, T, kMasterWeights>(p, master, i, pv, master_sync);
    load<V>(g, i, gv);
    load<V>(m, i, mv);
    load<V>(v, i, vv);
#pragma unroll
    for (int k = 0; k < V; ++k) uv[k] = lamb_direction(pv[k], load_grad(gv[k], load_g), mv[k], vv[k], s);
  }
};

/// Pass 1: accumulates |p|^2 and |u|^2 of the thread's elements.
template <class P, class G, bool kMasterWeights>
struct LambNormBody : LambElements<P, G, kMasterWeights> {
  using Base = LambElements<P, G, kMasterWeights>;
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
  }
};

/// Pass 2: p -= lr * ratio * u; writes p, m, v.
template <class P, class G, bool kMasterWeights>
struct LambApplyBody : LambElements<P, G, kMasterWeights> {
  using Base = LambElements<P, G, kMasterWeights>;
  using T = typename Base::T;
  T ratio;

  __device__ __forceinline__ LambApplyBody(const Row& row, int t, const StepArgs& a)
      : Base(row, t, a), ratio(a.extra ? static_cast<const T*>(a.extra)[t] : T(1)) {}

  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    T pv[V], mv[V], vv[V], uv[V];
    this->template direction<V>(i, pv, mv, vv, uv);
#pragma unroll
    for (int k = 0; k < V; ++k) pv[k] = lamb_apply(pv[k], uv[k], ratio, this->s);
    store_param<V, P, T, kMasterWeights>(this->p, this->master, i, pv);
    store<V>(this->m, i, mv);
    store<V>(this->v, i, vv);
  }
};

template <class T>
struct NormPartial {
  T p2, u2;
};

template <class P, class G, bool kMasterWeights>
__global__ void __launch_bounds__(kThreads)
    lamb_norms_kernel(Table table, StepArgs args, NormPartial<Opmath<P>>* partials) {
  using T = Opmath<P>;
  if (skip_step(args.scalars.found_inf)) return;
  const Work w = this_work(table);
  const Row& row = table.rows[w.t];
  if (!adapts(row, args)) return;  // its ratio is 1; lamb_ratio_kernel reads no partial
  T p2 = T(0), u2 = T(0);
  const LambNormBody<P, G, kMasterWeights> body(row, w.t, args, &p2, &u2);
  for_chunk<LambNormBody<P, G, kMasterWeights>::kWidth>(w.span, body.aligned(w.span.start),
                                                        body);
  p2 = block_reduce(p2, Sum{}, T(0));
  u2 = block_reduce(u2, Sum{}, T(0));
  if (threadIdx.x == 0) partials[blockIdx.x] = {p2, u2};
}

// One block: warp w sums the partials of tensors w, w + 32, ... in a fixed order.
template <class T>
__global__ void __launch_bounds__(kRatioThreads)
    lamb_ratio_kernel(Table table, StepArgs args, const NormPartial<T>* partials, T* ratio) {
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
      ratio[t] = lamb_trust_ratio(sqrt_rn(p2), sqrt_rn(u2), adapt, args.flag[kTrustClip]);
    }
  }
}

}  // namespace

void lamb(const LambCall& call, const ExecContext& ctx) {
  const StepLists& lists = call.lists;
  if (lists.num_tensors == 0) return;
  StepArgs args = step_args(lists);
  TableBuilder host = step_table(lists);
  FUSEDOPT_FILL_STEP_CALL(LAMB)
  // The weight decays are device memory ([note: hyper table] in fusedopt/_contract.py): the
  // norms kernel skips each tensor that does not adapt, so a call where none does costs two
  // almost empty launches instead of none.
  bool any_adapts = false;
  for (int i = 0; i < host.n(); ++i) any_adapts |= lists.numels[i] > 0;
  const cudaStream_t stream = stream_of(ctx);
  const Table table = host.upload(ctx);
  increment_steps(table, lists.scalars.found_inf, stream);
  if (host.total_chunks() == 0) return;
  dispatch_step_types(
      lists.params.dtype, lists.grads.dtype, lists.master_params.present(),
      [&](auto p, auto g, auto master) {
        using P = decltype(p);
        using G = decltype(g);
        using T = Opmath<P>;
        constexpr bool kM = decltype(master)::value;
        if (any_adapts) {
          auto* partials = static_cast<NormPartial<T>*>(
              ctx.workspace.get(sizeof(NormPartial<T>) * host.total_chunks()));
          auto* ratio = static_cast<T*>(ctx.workspace.get(sizeof(T) * host.n()));
          launch_kernel(lamb_norms_kernel<P, G, kM>, chunk_grid(host.total_chunks()), kThreads,
                        stream, table, args, partials);
          check(cudaGetLastError(), "launching lamb_ (norms)");
          launch_kernel(lamb_ratio_kernel<T>, 1, kRatioThreads, stream, table, args, partials,
                        ratio);
          check(cudaGetLastError(), "launching lamb_ (trust ratios)");
          args.extra = ratio;
        }
        launch_step<LambApplyBody<P, G, kM>>(host, table, args, stream);
      });
}

}  // namespace fusedopt::cuda
