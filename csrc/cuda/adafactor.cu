// adafactor_: one Adafactor step (torch.optim.Adafactor, DESIGN.md §3) over every tensor of
// the call, with the math of fusedopt/math/adafactor.h, as its passes ([note: adafactor
// passes] there), each also an op. Every reduction runs over chunks ([note: adafactor sums]:
// a factored tensor's chunks are runs of whole rows), so a large matrix is reduced by every
// SM. adafactor_norms_ launches:
//   1. the step increment;
//   2. adafactor_vectors_kernel, a block per reduction chunk of a vector or scalar: its
//      variance, sum p^2 and sum u^2;
//   3. adafactor_rows_kernel, a block per reduction chunk of a factored tensor: sum p^2, the
//      row sums of g^2 (a warp per row) and the column partials (a thread per column, rows
//      in order), into scratch. (2 and 3 are one kernel with a branch per tensor kind, but
//      together they kept 8-24 bytes of stack in most sm_90 builds: the IEEE division calls
//      of the grad loads with both paths' state live);
//   4. adafactor_columns_kernel, a block per (tensor, 256 columns): the column partials in
//      chunk order, folded into the column factor; the tensor's first block also folds the
//      row sums into the row factor, then writes the floored row means (a warp per batch);
//   5. adafactor_updates_kernel, a block per reduction chunk of a factored tensor: sum u^2
//      from the factors as stored (a warp per row);
//   6. adafactor_fold_kernel, one block: each tensor's chunk partials in chunk order, in
//      double, into sq_norms.
// adafactor_apply_: adafactor_floor_kernel (the floors again, into scratch), then a block
// per chunk: p = p*(1 - lr*wd) - (alpha/clip)*u. The factor sums and floors are the CPU
// launcher's bits; sum p^2 and sum u^2 are per-thread partials folded by block_reduce,
// then in double across chunks. No float atomics.
//
// [note: adafactor rows] A factored tensor's (rows, cols) travel in its Row's `dtype` and
// `reserved` fields (step ops have no use for them; 0 for a vector or scalar), and the
// address of its scratch in the slot after its states (kScratch): its floored row means
// (one opmath value per batch), then (norms only, 8-byte aligned) its row sums (a double
// per row) and its column partials (cols doubles per reduction chunk). The table of
// adafactor_norms_ is a step table whose chunk_begin counts reduction chunks
// (adafactor_table); its rows hold the real numels.
//
// Costs, not measured on a GPU: the row sums and column partials are 8 * (rows + cols)
// bytes per chunk of ~2^16 elements (8 bytes per 85 elements for GPT-2's embedding: ~2% of
// its fp32 grad bytes, written once and read once); pass 1 reads g twice, the second time
// from L1/L2 (the chunk's 256 KB); a floor is summed by one warp (50,257 rows for GPT-2's
// embedding: 1,571 loads per lane).
#include <algorithm>
#include <cfloat>
#include <stdexcept>
#include <vector>

#include "fusedopt/math/adafactor.h"
#include "step.cuh"

namespace fusedopt::cuda {
namespace {

constexpr int kRowVar = state_slot(spec::adafactor::kRowVars);
constexpr int kColVar = state_slot(spec::adafactor::kColVars);
constexpr int kVariance = state_slot(spec::adafactor::kVariances);
constexpr int kScratch = state_slot(spec::adafactor::kNumStates);  // [note: adafactor rows]
static_assert(kScratch < kMaxSlots, "the Row has no free slot for the scratch");
using spec::adafactor::kBeta2Decay, spec::adafactor::kEps1, spec::adafactor::kEps2,
    spec::adafactor::kD, spec::adafactor::kWeightDecay, spec::adafactor::kMaximize;
inline constexpr int kFoldThreads = 1024;
static_assert(kAdafactorLanes == 32, "a row sum's lanes are a warp's");

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

/// Bytes of a factored tensor's floors in its scratch, rounded up to 8: its column
/// partials follow ([note: adafactor rows]).
__host__ __device__ __forceinline__ int64_t floor_bytes(int64_t batches, int64_t opmath) {
  return (batches * opmath + 7) / 8 * 8;
}

template <class T>
__device__ __forceinline__ T* floors_of(const Row& row) {
  return static_cast<T*>(row.slot[kScratch]);
}

/// A factored tensor's row sums of g^2 (norms only): batches * rows doubles.
template <class T>
__device__ __forceinline__ double* row_sums_of(const Row& row, const Dims& d) {
  return reinterpret_cast<double*>(static_cast<unsigned char*>(row.slot[kScratch]) +
                                   floor_bytes(d.batches, sizeof(T)));
}

/// Its column partials (norms only): cols doubles per reduction chunk.
template <class T>
__device__ __forceinline__ double* col_partials_of(const Row& row, const Dims& d) {
  return row_sums_of<T>(row, d) + d.batches * d.rows;
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

/// floors[b] = max(mean of batch b's row factor as stored, eps1) for every batch of a
/// factored tensor: a warp per batch, in the 32-lane order of [note: adafactor sums].
template <class S, class T>
__device__ __forceinline__ void write_floors(const Row& row, const Dims& d,
                                             const AdafactorScalars<T>& s) {
  const S* row_var = static_cast<const S*>(row.slot[kRowVar]);
  T* floors = floors_of<T>(row);
  const int lane = threadIdx.x % 32;
  for (int64_t b = threadIdx.x / 32; b < d.batches; b += kWarps) {
    double sum = 0.0;
    for (int64_t r = lane; r < d.rows; r += 32)
      sum += static_cast<double>(load1<S, T>(row_var, b * d.rows + r));
    sum = warp_reduce(sum, Sum{});
    if (lane == 0)
      floors[b] = adafactor_row_floor(static_cast<T>(sum / static_cast<double>(d.rows)), s);
  }
}

template <class T>
struct NormPartial {
  T p2, u2;
};

/// This block's tensor and its reduction chunk in a reduction table.
struct ReduceWork {
  int t;
  int64_t k;
};

__device__ __forceinline__ ReduceWork this_reduce_work(const Table& table) {
  const int64_t chunk = blockIdx.x;
  const int t = mt::locate_tensor(table.chunk_begin, table.n, chunk);
  return {t, chunk - table.chunk_begin[t]};
}

/// sum p^2 of elements [begin, end) of a tensor, this thread's share (strided).
template <class P, MasterKind kM, class T>
__device__ __forceinline__ T param_sq(const Row& row, const StepArgs& args, int64_t begin,
                                      int64_t end) {
  const P* p = static_cast<const P*>(row.slot[kParam]);
  const MasterOf<P, kM>* master = static_cast<const MasterOf<P, kM>*>(row.slot[kMaster]);
  T p2 = T(0);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    T pv[1];
    load_param<1, P, T, kM>(p, master, i, pv, args.master_sync);
    p2 = p2 + pv[0] * pv[0];
  }
  return p2;
}

/// A block per reduction chunk of a vector or scalar: its variance, sum p^2 and sum u^2.
template <class P, class G, MasterKind kM>
__global__ void __launch_bounds__(kThreads)
    adafactor_vectors_kernel(Table table, StepArgs args, NormPartial<Opmath<P>>* partials) {
  using T = Opmath<P>;
  using S = StateOf<P, kM>;
  if (skip_step(args.scalars.found_inf)) return;
  const ReduceWork w = this_reduce_work(table);
  const Row& row = table.rows[w.t];
  if (dims_of(row).rows > 0) return;  // adafactor_rows_kernel's
  const GradLoad<T> gl =
      make_grad_load<T>(args.scalars.grad_scale, args.scalars.clip_coef, args.flag[kMaximize]);
  const G* g = static_cast<const G*>(row.slot[kGrad]);
  const mt::ChunkSpan span = mt::chunk_span(row.numel, w.k);
  T p2 = param_sq<P, kM, T>(row, args, span.start, span.start + span.len), u2 = T(0);
  const AdafactorScalars<T> s = scalars_of<P, kM, T>(row);
  S* v = static_cast<S*>(row.slot[kVariance]);
  for (int64_t i = span.start + threadIdx.x; i < span.start + span.len; i += blockDim.x) {
    const T ge = load_grad(load1<G, T>(g, i), gl);
    store1(v, i, adafactor_lerp(load1<S, T>(v, i), ge * ge, s.weight));
    const T u = adafactor_update(ge, load1<S, T>(v, i), s);  // as stored
    u2 = u2 + u * u;
  }
  p2 = block_reduce(p2, Sum{}, T(0));
  u2 = block_reduce(u2, Sum{}, T(0));
  if (threadIdx.x == 0) partials[blockIdx.x] = {p2, u2};
}

/// A block per reduction chunk of a factored tensor (whole rows): sum p^2, the row sums of
/// g^2 (a warp per row) and the column partials (a thread per column, rows in order), into
/// scratch ([note: adafactor sums]).
template <class P, class G, MasterKind kM>
__global__ void __launch_bounds__(kThreads)
    adafactor_rows_kernel(Table table, StepArgs args, NormPartial<Opmath<P>>* partials) {
  using T = Opmath<P>;
  if (skip_step(args.scalars.found_inf)) return;
  const ReduceWork w = this_reduce_work(table);
  const Row& row = table.rows[w.t];
  const Dims d = dims_of(row);
  if (d.rows == 0) return;  // adafactor_vectors_kernel's
  const GradLoad<T> gl =
      make_grad_load<T>(args.scalars.grad_scale, args.scalars.clip_coef, args.flag[kMaximize]);
  const G* g = static_cast<const G*>(row.slot[kGrad]);
  const AdafactorRowChunk chunk = adafactor_row_chunk(w.k, d.rows, d.cols);
  const int64_t end_row = chunk.first_row + chunk.num_rows;
  T p2 = param_sq<P, kM, T>(row, args, chunk.first_row * d.cols, end_row * d.cols);
  double* row_sums = row_sums_of<T>(row, d);
  const int lane = threadIdx.x % 32;
  for (int64_t r = chunk.first_row + threadIdx.x / 32; r < end_row; r += kWarps) {
    double sum = 0.0;  // lane j: columns j, j + 32, ... ([note: adafactor sums])
    for (int64_t c = lane; c < d.cols; c += 32) {
      const T ge = load_grad(load1<G, T>(g, r * d.cols + c), gl);
      sum += static_cast<double>(ge * ge);
    }
    sum = warp_reduce(sum, Sum{});
    if (lane == 0) row_sums[r] = sum;  // folded by adafactor_columns_kernel
  }
  double* col_sum = col_partials_of<T>(row, d) + w.k * d.cols;
  for (int64_t c = threadIdx.x; c < d.cols; c += blockDim.x) {
    double sum = 0.0;
    for (int64_t r = chunk.first_row; r < end_row; ++r) {
      const T ge = load_grad(load1<G, T>(g, r * d.cols + c), gl);
      sum += static_cast<double>(ge * ge);
    }
    col_sum[c] = sum;
  }
  p2 = block_reduce(p2, Sum{}, T(0));
  if (threadIdx.x == 0) partials[blockIdx.x] = {p2, T(0)};
}

/// Block (t, y): columns [256 y, 256 y + 256) of factored tensor t (over its batches): the
/// column partials summed in chunk order, folded into the column factor; block (t, 0) also
/// folds the row sums into the row factor, then writes the tensor's floors. (The divisions
/// by rows and cols are here, not in the partials kernel: there, as calls with the loops'
/// state live, they cost a stack frame of 8-40 bytes, sm_90.)
template <class P, class G, MasterKind kM>
__global__ void __launch_bounds__(kThreads) adafactor_columns_kernel(Table table, StepArgs args) {
  using T = Opmath<P>;
  using S = StateOf<P, kM>;
  if (skip_step(args.scalars.found_inf)) return;
  const Row& row = table.rows[blockIdx.x];
  const Dims d = dims_of(row);
  if (d.batches == 0) return;
  const AdafactorScalars<T> s = scalars_of<P, kM, T>(row);
  const int64_t chunks = adafactor_chunks_per_batch(d.rows, d.cols);
  const double* partials = col_partials_of<T>(row, d);
  S* col_var = static_cast<S*>(row.slot[kColVar]);
  const int64_t j = int64_t{blockIdx.y} * blockDim.x + threadIdx.x;
  if (j < d.batches * d.cols) {
    const int64_t b = j / d.cols, c = j - b * d.cols;
    const double* part = partials + b * chunks * d.cols + c;
    double sum = 0.0;
    for (int64_t k = 0; k < chunks; ++k) sum += part[k * d.cols];
    const T mean = static_cast<T>(sum / static_cast<double>(d.rows));
    store1(col_var, j, adafactor_lerp(load1<S, T>(col_var, j), mean, s.weight));
  }
  if (blockIdx.y == 0) {
    const double* row_sums = row_sums_of<T>(row, d);
    S* row_var = static_cast<S*>(row.slot[kRowVar]);
    for (int64_t r = threadIdx.x; r < d.batches * d.rows; r += blockDim.x) {
      const T mean = static_cast<T>(row_sums[r] / static_cast<double>(d.cols));
      store1(row_var, r, adafactor_lerp(load1<S, T>(row_var, r), mean, s.weight));
    }
    __syncthreads();  // the row factors as stored, for every warp
    write_floors<S, T>(row, d, s);
  }
}

/// The variance estimate of element (r, c) of a factored tensor, from the factors as stored.
template <class S, class T>
__device__ __forceinline__ T factored_variance(const Row& row, const Dims& d, int64_t r,
                                               int64_t b, int64_t c) {
  return adafactor_factored_variance(load1<S, T>(static_cast<const S*>(row.slot[kRowVar]), r),
                                     load1<S, T>(static_cast<const S*>(row.slot[kColVar]),
                                                 b * d.cols + c),
                                     floors_of<T>(row)[b]);
}

template <class P, class G, MasterKind kM>
__global__ void __launch_bounds__(kThreads)
    adafactor_updates_kernel(Table table, StepArgs args, NormPartial<Opmath<P>>* partials) {
  using T = Opmath<P>;
  using S = StateOf<P, kM>;
  if (skip_step(args.scalars.found_inf)) return;
  const ReduceWork w = this_reduce_work(table);
  const Row& row = table.rows[w.t];
  const Dims d = dims_of(row);
  if (d.rows == 0) return;  // a vector's sum u^2 is pass 1's
  const AdafactorScalars<T> s = scalars_of<P, kM, T>(row);
  const GradLoad<T> gl =
      make_grad_load<T>(args.scalars.grad_scale, args.scalars.clip_coef, args.flag[kMaximize]);
  const G* g = static_cast<const G*>(row.slot[kGrad]);
  const AdafactorRowChunk chunk = adafactor_row_chunk(w.k, d.rows, d.cols);
  T u2 = T(0);
  for (int64_t r = chunk.first_row + threadIdx.x / 32; r < chunk.first_row + chunk.num_rows;
       r += kWarps) {
    for (int64_t c = threadIdx.x % 32; c < d.cols; c += 32) {
      const T ge = load_grad(load1<G, T>(g, r * d.cols + c), gl);
      const T u = adafactor_update(ge, factored_variance<S, T>(row, d, r, chunk.batch, c), s);
      u2 = u2 + u * u;
    }
  }
  u2 = block_reduce(u2, Sum{}, T(0));
  if (threadIdx.x == 0) partials[blockIdx.x].u2 = u2;
}

// One block: warp w folds the chunk partials of tensors w, w + 32, ... in chunk order (a
// lane's in double, then the warp tree) into sq_norms[2t], sq_norms[2t + 1].
template <class T>
__global__ void __launch_bounds__(kFoldThreads)
    adafactor_fold_kernel(Table table, StepArgs args, const NormPartial<T>* partials,
                          T* sq_norms) {
  if (skip_step(args.scalars.found_inf)) return;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  for (int t = warp; t < table.n; t += nwarps) {
    double p2 = 0.0, u2 = 0.0;
    for (int64_t c = table.chunk_begin[t] + lane; c < table.chunk_begin[t + 1]; c += 32) {
      p2 += static_cast<double>(partials[c].p2);
      u2 += static_cast<double>(partials[c].u2);
    }
    p2 = warp_reduce(p2, Sum{});
    u2 = warp_reduce(u2, Sum{});
    if (lane == 0) {
      sq_norms[2 * t] = static_cast<T>(p2);
      sq_norms[2 * t + 1] = static_cast<T>(u2);
    }
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
  const int64_t r = quotient(i, d.cols), c = i - r * d.cols;
  return factored_variance<S, T>(row, d, r, quotient(r, d.rows), c);
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
  StochasticStore sr;  // [note: stochastic rounding] in fusedopt/dtype.h
  AdafactorScalars<T> s;
  GradLoad<T> gl;

  __device__ __forceinline__ AdafactorApplyBody(const Row& row_, int t, const StepArgs& a)
      : row(row_),
        d(dims_of(row_)),
        p(static_cast<P*>(row_.slot[kParam])),
        g(static_cast<const G*>(row_.slot[kGrad])),
        master(static_cast<MasterOf<P, kM>*>(row_.slot[kMaster])),
        master_sync(a.master_sync),
        sr(stochastic_store<P, kM>(row_, a)),
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
    store_param<V, P, T, kM>(p, master, i, pv, sr);
  }
};

/// The step table of a call, or (`reduction`) its reduction table: chunk_begin counts the
/// reduction chunks of [note: adafactor sums], the rows keep the real numels.
TableBuilder adafactor_table(const StepLists& lists, bool reduction) {
  if (!reduction) return step_table(lists);
  std::vector<int64_t> chunks(lists.num_tensors);
  for (int64_t i = 0; i < lists.num_tensors; ++i)
    chunks[i] = adafactor_reduce_chunks(lists.numels[i], lists.factor_dims[2 * i],
                                        lists.factor_dims[2 * i + 1]) *
                mt::kChunkElems;
  StepLists counted = lists;
  counted.numels = chunks.data();
  TableBuilder host = step_table(counted);
  for (int64_t i = 0; i < lists.num_tensors; ++i) host.row(i).numel = lists.numels[i];
  return host;
}

/// A call's table and kernel arguments ([note: adafactor rows]), with each factored tensor's
/// scratch: its floors and, for the norms pass (`reduction`), its column partials.
struct AdafactorLaunch {
  StepArgs args;
  TableBuilder host;
  Table table;
  int64_t max_column_tiles = 0;  // of the column kernel: ceil(batches * cols / kThreads)

  AdafactorLaunch(const AdafactorCall& call, const ExecContext& ctx, bool reduction)
      : args(step_args(call.lists)), host(adafactor_table(call.lists, reduction)) {
    FUSEDOPT_FILL_STEP_CALL(ADAFACTOR)
    const int64_t* dims = call.lists.factor_dims;
    const int64_t opmath = call.lists.params.dtype == DType::kFloat64 ? 8 : 4;
    std::vector<int64_t> offsets(host.n());
    int64_t total = 0;
    for (int i = 0; i < host.n(); ++i) {
      Row& row = host.row(i);
      const int64_t rows = dims[2 * i], cols = dims[2 * i + 1], numel = call.lists.numels[i];
      row.dtype = static_cast<int32_t>(rows);
      row.reserved = static_cast<int32_t>(cols);
      offsets[i] = total;
      if (rows == 0 || numel == 0) continue;
      const int64_t batches = numel / (rows * cols);
      total += floor_bytes(batches, opmath);
      if (reduction) {
        total += 8 * (batches * rows + cols * adafactor_reduce_chunks(numel, rows, cols));
        max_column_tiles = std::max(max_column_tiles, (batches * cols + kThreads - 1) / kThreads);
      }
    }
    if (total > 0) {
      auto* base = static_cast<unsigned char*>(ctx.workspace.get(total));
      for (int i = 0; i < host.n(); ++i)
        if (dims[2 * i] > 0 && call.lists.numels[i] > 0)
          host.row(i).slot[kScratch] = base + offsets[i];
    }
    table = host.upload(ctx);
  }
};

void run_norms(const AdafactorCall& call, void* sq_norms, const ExecContext& ctx) {
  AdafactorLaunch l(call, ctx, true);
  const cudaStream_t stream = stream_of(ctx);
  increment_steps(l.table, call.lists.scalars.found_inf, stream);
  dispatch_step_types(
      call.lists.params.dtype, call.lists.grads.dtype, master_kind(call.lists),
      [&](auto p, auto g, auto master) {
        using P = decltype(p);
        using G = decltype(g);
        using T = Opmath<P>;
        constexpr MasterKind kM = decltype(master)::value;
        const int64_t chunks = l.host.total_chunks();
        auto* partials = static_cast<NormPartial<T>*>(
            ctx.workspace.get(sizeof(NormPartial<T>) * std::max<int64_t>(chunks, 1)));
        if (chunks > 0) {  // two kernels: one would need a stack frame (see the top)
          launch_kernel(adafactor_vectors_kernel<P, G, kM>, chunk_grid(chunks), kThreads,
                        stream, l.table, l.args, partials);
          check(cudaGetLastError(), "launching adafactor_norms_ (vectors)");
          launch_kernel(adafactor_rows_kernel<P, G, kM>, chunk_grid(chunks), kThreads, stream,
                        l.table, l.args, partials);
          check(cudaGetLastError(), "launching adafactor_norms_ (rows)");
        }
        if (l.max_column_tiles > 0) {
          if (l.max_column_tiles > 65535)
            throw std::invalid_argument("fusedopt CUDA backend: adafactor_norms_: a factor of "
                                        "more than 2^24 columns");
          launch_kernel(adafactor_columns_kernel<P, G, kM>,
                        dim3(l.host.n(), static_cast<unsigned>(l.max_column_tiles)), kThreads,
                        stream, l.table, l.args);
          check(cudaGetLastError(), "launching adafactor_norms_ (columns)");
          launch_kernel(adafactor_updates_kernel<P, G, kM>, chunk_grid(chunks), kThreads,
                        stream, l.table, l.args, partials);
          check(cudaGetLastError(), "launching adafactor_norms_ (updates)");
        }
        launch_kernel(adafactor_fold_kernel<T>, 1, kFoldThreads, stream, l.table, l.args,
                      partials, static_cast<T*>(sq_norms));
        check(cudaGetLastError(), "launching adafactor_norms_ (fold)");
      });
}

void run_apply(const AdafactorCall& call, const void* sq_norms, const ExecContext& ctx) {
  AdafactorLaunch l(call, ctx, false);
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
