// grad_norm: the global L2 or inf norm of tensors[i] / grad_scale, per-tensor norms and a
// non-finite flag; accumulated in fp32 (fp64 when every tensor is fp64). Per element: reads
// one value of the tensor's dtype; writes nothing (per chunk of 64K elements, one partial).
//
// [note: deterministic norm] Two launches, no float atomics: (1) one block per chunk reduces
// its elements (per-thread sequential sums, then the fixed tree of block_reduce) to a
// partial; (2) one block reduces the partials: warp w takes tensors w, w + 32, ...; its lanes
// sum a tensor's chunks lane-strided, then a fixed shuffle tree; the tensors' sums then meet
// in block_reduce. Every grouping depends only on the sizes, so the bits never change.
#include "common.cuh"
#include "fusedopt/math/norm.h"

namespace fusedopt::cuda {
namespace {

inline constexpr int kFinishThreads = 1024;

template <class Acc>
struct Partial {
  Acc value;  // sum of squares (L2) or max |x| (inf) of the chunk
  int nonfinite;
  int reserved;
};

template <class Acc, bool kInf>
__device__ __forceinline__ Acc combine(Acc a, Acc b) {
  if constexpr (kInf) {
    return nan_max(a, b);
  } else {
    return a + b;
  }
}

template <class Acc, bool kInf, class S>
struct NormBody {
  const S* data;
  Acc grad_scale;
  Acc* acc;
  bool* finite;

  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    Opmath<S> x[V];
    load<V>(data, i, x);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      // Finite in its own dtype: an fp64 1e300 is a finite grad even though it overflows
      // the fp32 accumulator (and so gives an inf norm).
      *finite &= is_finite(x[k]);
      const Acc g = static_cast<Acc>(x[k]);
      *acc = kInf ? nan_max(*acc, norm_inf_term(g, grad_scale))
                  : *acc + norm2_term(g, grad_scale);
    }
  }
};

template <class Acc, bool kInf, class S>
__device__ __forceinline__ void norm_chunk(const Row& row, const mt::ChunkSpan& span,
                                           Acc grad_scale, Acc& acc, bool& finite) {
  const NormBody<Acc, kInf, S> body{static_cast<const S*>(row.slot[0]), grad_scale, &acc,
                                    &finite};
  const bool aligned = mt::aligned16(body.data, span.start, sizeof(S));
  for_chunk<kVecWidth<S>>(span, aligned, body);
}

template <class Acc, bool kInf>
__global__ void __launch_bounds__(kThreads)
    grad_norm_partials_kernel(Table table, const float* grad_scale, Partial<Acc>* partials) {
  const Work w = this_work(table);
  const Row& row = table.rows[w.t];
  const Acc scale = static_cast<Acc>(scalar_or(grad_scale, 1.0f));
  Acc acc = Acc(0);
  bool finite = true;
  if constexpr (std::is_same_v<Acc, double>) {
    norm_chunk<Acc, kInf, double>(row, w.span, scale, acc, finite);  // all tensors fp64
  } else {
    switch (static_cast<DType>(row.dtype)) {
      case DType::kFloat32: norm_chunk<Acc, kInf, float>(row, w.span, scale, acc, finite); break;
      case DType::kBFloat16: norm_chunk<Acc, kInf, bf16>(row, w.span, scale, acc, finite); break;
      case DType::kFloat16: norm_chunk<Acc, kInf, fp16>(row, w.span, scale, acc, finite); break;
      case DType::kFloat64: norm_chunk<Acc, kInf, double>(row, w.span, scale, acc, finite); break;
      case DType::kInt8:  // (the binding refuses 8-bit codes here)
      case DType::kUInt8: break;
    }
  }
  const int nonfinite = __syncthreads_or(!finite);
  acc = block_reduce(acc, [](Acc a, Acc b) { return combine<Acc, kInf>(a, b); }, Acc(0));
  if (threadIdx.x == 0) partials[blockIdx.x] = {acc, nonfinite, 0};
}

template <class Acc, bool kInf>
__global__ void __launch_bounds__(kFinishThreads)
    grad_norm_finish_kernel(Table table, const Partial<Acc>* partials, Acc* total,
                            Acc* per_tensor, float* found_inf) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  auto op = [](Acc a, Acc b) { return combine<Acc, kInf>(a, b); };
  Acc mine = Acc(0);
  int nonfinite = 0;
  for (int t = warp; t < table.n; t += nwarps) {
    Acc v = Acc(0);
    for (int64_t c = table.chunk_begin[t] + lane; c < table.chunk_begin[t + 1]; c += 32) {
      v = op(v, partials[c].value);
      nonfinite |= partials[c].nonfinite;
    }
    v = warp_reduce(v, op);
    if (lane == 0) {
      if (per_tensor) per_tensor[t] = kInf ? v : sqrt_rn(v);
      mine = op(mine, v);
    }
  }
  nonfinite = __syncthreads_or(nonfinite);
  mine = block_reduce(mine, op, Acc(0));
  if (threadIdx.x == 0) {
    *total = kInf ? mine : sqrt_rn(mine);
    *found_inf = nonfinite ? 1.0f : 0.0f;
  }
}

template <class Acc, bool kInf>
void launch(const GradNormCall& call, const ExecContext& ctx) {
  TableBuilder table(call.num_tensors, call.numels);
  for (int i = 0; i < table.n(); ++i) {
    table.row(i).slot[0] = const_cast<void*>(call.data[i]);
    table.row(i).dtype = static_cast<int32_t>(call.dtypes[i]);
  }
  const Table device_table = table.upload(ctx);
  const cudaStream_t stream = stream_of(ctx);
  Partial<Acc>* partials = nullptr;
  if (table.total_chunks() > 0) {
    partials = static_cast<Partial<Acc>*>(
        ctx.workspace.get(sizeof(Partial<Acc>) * table.total_chunks()));
    launch_kernel(grad_norm_partials_kernel<Acc, kInf>, chunk_grid(table.total_chunks()),
                  kThreads, stream, device_table, call.grad_scale, partials);
    check(cudaGetLastError(), "launching grad_norm (partials)");
  }
  launch_kernel(grad_norm_finish_kernel<Acc, kInf>, 1, kFinishThreads, stream, device_table,
                partials, static_cast<Acc*>(call.total_norm),
                call.per_tensor ? static_cast<Acc*>(call.per_tensor_norms) : nullptr,
                call.found_inf);
  check(cudaGetLastError(), "launching grad_norm (finish)");
}

}  // namespace

void grad_norm(const GradNormCall& call, const ExecContext& ctx) {
  const bool fp64 = call.out_dtype == DType::kFloat64;
  if (fp64) {
    call.inf_norm ? launch<double, true>(call, ctx) : launch<double, false>(call, ctx);
  } else {
    call.inf_norm ? launch<float, true>(call, ctx) : launch<float, false>(call, ctx);
  }
}

}  // namespace fusedopt::cuda
