// adafactor_: one Adafactor step (torch.optim.Adafactor, DESIGN.md §3) over every tensor of
// the call, with the math of fusedopt/math/adafactor.h, as its passes ([note: adafactor
// passes] there), each also an op: adafactor_norms_ (step increment; one block per tensor:
// sum p^2, the row and column sums of g^2 folded into the factors (or g^2 into a vector's
// variance), the floored row means, sum u^2 -> sq_norms) and adafactor_apply_ (one block per
// tensor: the floored row means again, into scratch; then one block per chunk: p = p*(1 -
// lr*wd) - (alpha/clip)*u). Every sum has a fixed order: a factor's sums run in element
// order in double in one thread, as the CPU launcher's (the same bits); sum p^2 and sum u^2
// are per-thread partials folded by block_reduce.
//
// [note: adafactor rows] A factored tensor's (rows, cols) travel in its Row's `dtype` and
// `reserved` fields (step ops have no use for them; 0 for a vector or scalar), and the
// address of its floored row means in the slot after its states (kFloors): the kernels need
// three numbers per tensor beyond what every step op has, and the Row has room for them.
//
// Known cost, not measured on a GPU: a tensor's reductions run in one block, a row (column)
// per thread, in strided loads; a large matrix is reduced by one SM. The chunked form
// (per-chunk partial factors, folded per factor) is the next step.
#include <cfloat>

#include "fusedopt/math/adafactor.h"
#include "step.cuh"

namespace fusedopt::cuda {
namespace {

constexpr int kRowVar = state_slot(spec::adafactor::kRowVars);
constexpr int kColVar = state_slot(spec::adafactor::kColVars);
constexpr int kVariance = state_slot(spec::adafactor::kVariances);
constexpr int kFloors = state_slot(spec::adafactor::kNumStates);  // [note: adafactor rows]
static_assert(kFloors < kMaxSlots, "the Row has no free slot for the floored row means");
using spec::adafactor::kBeta2Decay, spec::adafactor::kEps1, spec::adafactor::kEps2,
    spec::adafactor::kD, spec::adafactor::kWeightDecay, spec::adafactor::kMaximize;

/// torch.finfo(P).eps: eps1 = None (P the type the update runs on: float with masters).
template <class P>
__host__ __device__ constexpr double storage_eps() {
  if constexpr (std::is_same_v<P, double>) return DBL_EPSILON;
  if constexpr (std::is_same_v<P, bf16>) return 0.0078125;
  if constexpr (std::is_same_v<P, fp16>) return 0.0009765625;
  return FLT_EPSILON;
}

struct Dims {
  int64_t rows, cols, batches;  // rows == 0: not factored
};

__device__ __forceinline__ Dims dims_of(const Row& row) {
  const int64_t rows = row.dtype, cols = row.reserved;
  return {rows, cols, rows > 0 && row.numel > 0 ? row.numel / (rows * cols) : 0};
}

template <class P, MasterKind kM>
__device__ __forceinline__ double eps1_of(const Row& row) {
  return adafactor_eps1(row.hyper[kEps1], kM != kNoMaster ? storage_eps<float>() : storage_eps<P>());
}

/// The scalars of the reductions (with the lerp weight; lr unused there).
template <class P, MasterKind kM, class T>
__device__ __forceinline__ AdafactorScalars<T> scalars_of(const Row& row) {
  return adafactor_scalars<T>(0.0, row.hyper[kBeta2Decay], eps1_of<P, kM>(row),
                              row.hyper[kWeightDecay], static_cast<double>(*row.step));
}

template <class S, class T>
__device__ __forceinline__ T load1(const S* base, int64_t i) {
  T x[1];
  load<1>(base, i, x);
  return x[0];
}

template <class S, class T>
__device__ __forceinline__ void store1(S* base, int64_t i, T value) {
  const T x[1] = {value};
  store<1>(base, i, x);
}

/// max(mean of batch b's row factor as stored, eps1), summed in order in double.
template <class S, class T>
__device__ __forceinline__ T batch_floor(const S* row_var, int64_t b, int64_t rows,
                                         const AdafactorScalars<T>& s) {
  double sum = 0.0;
  for (int64_t r = 0; r < rows; ++r) sum += static_cast<double>(load1<S, T>(row_var, b * rows + r));
  return adafactor_row_floor(static_cast<T>(sum / static_cast<double>(rows)), s);
}

/// floors[b] for every batch of a factored tensor (the block's threads, batch by batch).
template <class S, class T>
__device__ __forceinline__ void write_floors(const Row& row, const Dims& d,
                                             const AdafactorScalars<T>& s) {
  const S* row_var = static_cast<const S*>(row.slot[kRowVar]);
  T* floors = static_cast<T*>(row.slot[kFloors]);
  for (int64_t b = threadIdx.x; b < d.batches; b += blockDim.x)
    floors[b] = batch_floor<S, T>(row_var, b, d.rows, s);
}

/// a / b for a, b >= 0: a 32-bit division where both fit (the common case: a few
/// instructions), else the 64-bit one (a call).
__device__ __forceinline__ int64_t quotient(int64_t a, int64_t b) {
  if (((a | b) >> 32) == 0) return static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
  return a / b;
}

/// The variance estimate of element i (factored: from the factors as stored and the floors).
template <class S, class T>
__device__ __forceinline__ T variance_at(const Row& row, const Dims& d, int64_t i) {
  if (d.rows == 0) return load1<S, T>(static_cast<const S*>(row.slot[kVariance]), i);
  const int64_t r = quotient(i, d.cols), c = i - r * d.cols, b = quotient(r, d.rows);
  return adafactor_factored_variance(load1<S, T>(static_cast<const S*>(row.slot[kRowVar]), r),
                                     load1<S, T>(static_cast<const S*>(row.slot[kColVar]),
                                                 b * d.cols + c),
                                     static_cast<const T*>(row.slot[kFloors])[b]);
}

template <class P, class G, MasterKind kM>
__global__ void __launch_bounds__(kThreads)
    adafactor_norms_kernel(Table table, StepArgs args, Opmath<P>* sq_norms) {
  using T = Opmath<P>;
  using S = StateOf<P, kM>;
  if (skip_step(args.scalars.found_inf)) return;
  const int t = blockIdx.x;
  const Row& row = table.rows[t];
  const Dims d = dims_of(row);
  const AdafactorScalars<T> s = scalars_of<P, kM, T>(row);
  const GradLoad<T> gl =
      make_grad_load<T>(args.scalars.grad_scale, args.scalars.clip_coef, args.flag[kMaximize]);
  const P* p = static_cast<const P*>(row.slot[kParam]);
  const G* g = static_cast<const G*>(row.slot[kGrad]);
  const MasterOf<P, kM>* master = static_cast<const MasterOf<P, kM>*>(row.slot[kMaster]);
  auto grad = [&](int64_t i) { return load_grad(load1<G, T>(g, i), gl); };
  T p2 = T(0), u2 = T(0);
  for (int64_t i = threadIdx.x; i < row.numel; i += blockDim.x) {
    T pv[1];
    load_param<1, P, T, kM>(p, master, i, pv, args.master_sync);
    p2 = p2 + pv[0] * pv[0];
  }
  if (d.rows == 0) {  // a vector or scalar: its variance, and u, in this pass
    S* v = static_cast<S*>(row.slot[kVariance]);
    for (int64_t i = threadIdx.x; i < row.numel; i += blockDim.x) {
      const T ge = grad(i);
      store1(v, i, adafactor_lerp(load1<S, T>(v, i), ge * ge, s.weight));
      const T u = adafactor_update(ge, load1<S, T>(v, i), s);  // as stored
      u2 = u2 + u * u;
    }
  } else if (row.numel > 0) {
    S* row_var = static_cast<S*>(row.slot[kRowVar]);
    S* col_var = static_cast<S*>(row.slot[kColVar]);
    for (int64_t r = threadIdx.x; r < d.batches * d.rows; r += blockDim.x) {
      double sum = 0.0;
      for (int64_t c = 0; c < d.cols; ++c) {
        const T ge = grad(r * d.cols + c);
        sum += static_cast<double>(ge * ge);
      }
      const T mean = static_cast<T>(sum / static_cast<double>(d.cols));
      store1(row_var, r, adafactor_lerp(load1<S, T>(row_var, r), mean, s.weight));
    }
    for (int64_t j = threadIdx.x; j < d.batches * d.cols; j += blockDim.x) {
      const int64_t b = quotient(j, d.cols), c = j - b * d.cols;
      double sum = 0.0;
      for (int64_t r = 0; r < d.rows; ++r) {
        const T ge = grad((b * d.rows + r) * d.cols + c);
        sum += static_cast<double>(ge * ge);
      }
      const T mean = static_cast<T>(sum / static_cast<double>(d.rows));
      store1(col_var, j, adafactor_lerp(load1<S, T>(col_var, j), mean, s.weight));
    }
    __syncthreads();  // the factors as stored, for every thread
    write_floors<S, T>(row, d, s);
    __syncthreads();
    for (int64_t i = threadIdx.x; i < row.numel; i += blockDim.x) {
      const T u = adafactor_update(grad(i), variance_at<S, T>(row, d, i), s);
      u2 = u2 + u * u;
    }
  }
  p2 = block_reduce(p2, Sum{}, T(0));
  u2 = block_reduce(u2, Sum{}, T(0));
  if (threadIdx.x == 0) {
    sq_norms[2 * t] = p2;
    sq_norms[2 * t + 1] = u2;
  }
}

template <class P, class G, MasterKind kM>
__global__ void __launch_bounds__(kThreads) adafactor_floor_kernel(Table table, StepArgs args) {
  using T = Opmath<P>;
  if (skip_step(args.scalars.found_inf)) return;
  const Row& row = table.rows[blockIdx.x];
  const Dims d = dims_of(row);
  if (d.batches > 0) write_floors<StateOf<P, kM>, T>(row, d, scalars_of<P, kM, T>(row));
}

/// adafactor_apply_'s per-chunk body: p = p*(1 - lr*wd) - step_size * u.
template <class P, class G, MasterKind kM>
struct AdafactorApplyBody {
  using T = Opmath<P>;
  using S = StateOf<P, kM>;
  static constexpr int kWidth = kM ? kVecWidth<P, G, S, float> : kVecWidth<P, G, S>;
  const Row& row;
  Dims d;
  P* p;
  const G* g;
  MasterOf<P, kM>* master;
  bool master_sync;
  AdafactorScalars<T> s;
  GradLoad<T> gl;

  __device__ __forceinline__ AdafactorApplyBody(const Row& row_, int t, const StepArgs& a)
      : row(row_),
        d(dims_of(row_)),
        p(static_cast<P*>(row_.slot[kParam])),
        g(static_cast<const G*>(row_.slot[kGrad])),
        master(static_cast<MasterOf<P, kM>*>(row_.slot[kMaster])),
        master_sync(a.master_sync),
        s(adafactor_update_scalars<T>(step_lr(row_, t, a), eps1_of<P, kM>(row_),
                                      row_.hyper[kWeightDecay])),
        gl(make_grad_load<T>(a.scalars.grad_scale, a.scalars.clip_coef, a.flag[kMaximize])) {
    const T* sq = static_cast<const T*>(a.extra);
    s.step_size = static_cast<T>(adafactor_step_size(
        step_lr(row_, t, a), static_cast<double>(*row_.step), row_.hyper[kEps2], row_.hyper[kD],
        static_cast<double>(sq[2 * t]), static_cast<double>(sq[2 * t + 1]), row_.numel));
  }

  __device__ __forceinline__ bool aligned(int64_t start) const {
    return aligned_all(start, p, g, master) &&
           (d.rows > 0 || aligned_all(start, static_cast<const S*>(row.slot[kVariance])));
  }

  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    T pv[V], gv[V];
    load_param<V, P, T, kM>(p, master, i, pv, master_sync);
    load<V>(g, i, gv);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const T u = adafactor_update(load_grad(gv[k], gl), variance_at<S, T>(row, d, i + k), s);
      pv[k] = adafactor_apply(pv[k], u, s);
    }
    store_param<V, P, T, kM>(p, master, i, pv);
  }
};

/// A call's table and kernel arguments ([note: adafactor rows]); `floors` (device scratch,
/// one opmath value per batch of every factored tensor) is set for the apply pass.
struct AdafactorLaunch {
  StepArgs args;
  TableBuilder host;
  Table table;

  AdafactorLaunch(const AdafactorCall& call, const ExecContext& ctx, bool floors)
      : args(step_args(call.lists)), host(step_table(call.lists)) {
    FUSEDOPT_FILL_STEP_CALL(ADAFACTOR)
    const int64_t* dims = call.lists.factor_dims;
    int64_t total = 0;
    for (int i = 0; i < host.n(); ++i) {
      Row& row = host.row(i);
      row.dtype = static_cast<int32_t>(dims[2 * i]);
      row.reserved = static_cast<int32_t>(dims[2 * i + 1]);
      if (dims[2 * i] > 0 && call.lists.numels[i] > 0)
        total += call.lists.numels[i] / (dims[2 * i] * dims[2 * i + 1]);
    }
    const size_t opmath = call.lists.params.dtype == DType::kFloat64 ? 8 : 4;
    if (floors && total > 0) {
      auto* base = static_cast<unsigned char*>(ctx.workspace.get(opmath * total));
      for (int i = 0, first = 0; i < host.n(); ++i) {
        host.row(i).slot[kFloors] = base + opmath * first;
        if (dims[2 * i] > 0 && call.lists.numels[i] > 0)
          first += static_cast<int>(call.lists.numels[i] / (dims[2 * i] * dims[2 * i + 1]));
      }
    }
    table = host.upload(ctx);
  }
};

void run_norms(const AdafactorCall& call, void* sq_norms, const ExecContext& ctx) {
  AdafactorLaunch l(call, ctx, true);  // the norms pass writes floors too
  const cudaStream_t stream = stream_of(ctx);
  increment_steps(l.table, call.lists.scalars.found_inf, stream);
  dispatch_step_types(call.lists.params.dtype, call.lists.grads.dtype,
                      master_kind(call.lists), [&](auto p, auto g, auto master) {
                        using P = decltype(p);
                        constexpr MasterKind kM = decltype(master)::value;
                        launch_kernel(adafactor_norms_kernel<P, decltype(g), kM>, l.host.n(),
                                      kThreads, stream, l.table, l.args,
                                      static_cast<Opmath<P>*>(sq_norms));
                        check(cudaGetLastError(), "launching adafactor_norms_");
                      });
}

void run_apply(const AdafactorCall& call, const void* sq_norms, const ExecContext& ctx) {
  AdafactorLaunch l(call, ctx, true);
  l.args.extra = sq_norms;
  const cudaStream_t stream = stream_of(ctx);
  dispatch_step_types(call.lists.params.dtype, call.lists.grads.dtype,
                      master_kind(call.lists), [&](auto p, auto g, auto master) {
                        using P = decltype(p);
                        using G = decltype(g);
                        constexpr MasterKind kM = decltype(master)::value;
                        launch_kernel(adafactor_floor_kernel<P, G, kM>, l.host.n(), kThreads,
                                      stream, l.table, l.args);
                        check(cudaGetLastError(), "launching adafactor_apply_ (floors)");
                        launch_step<AdafactorApplyBody<P, G, kM>>(l.host, l.table, l.args,
                                                                  stream);
                      });
}

}  // namespace

void adafactor_norms(const AdafactorNormsCall& call, const ExecContext& ctx) {
  if (call.step.lists.num_tensors == 0) return;
  run_norms(call.step, call.sq_norms, ctx);
}

void adafactor_apply(const AdafactorApplyCall& call, const ExecContext& ctx) {
  if (call.step.lists.num_tensors == 0) return;
  run_apply(call.step, call.sq_norms, ctx);
}

void adafactor(const AdafactorCall& call, const ExecContext& ctx) {
  if (call.lists.num_tensors == 0) return;
  const size_t bytes = (call.lists.params.dtype == DType::kFloat64 ? 8 : 4) * 2 *
                       static_cast<size_t>(call.lists.num_tensors);
  void* sq_norms = ctx.workspace.get(bytes);  // the norms kernel writes every entry
  run_norms(call, sq_norms, ctx);
  run_apply(call, sq_norms, ctx);
}

}  // namespace fusedopt::cuda
