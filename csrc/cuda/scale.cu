// scale_: tensors[i] *= scale in place, in opmath (fp64 for fp64 tensors, else fp32); sets
// found_inf to 1 when an input element is non-finite. Per element: reads and writes one
// value of the tensor's dtype (4 bytes bf16/fp16, 8 fp32, 16 fp64). One launch (plus a table
// upload when the tensor list changed).
#include "common.cuh"
#include "fusedopt/math/norm.h"

namespace fusedopt::cuda {
namespace {

template <class S>
struct ScaleBody {
  S* data;
  Opmath<S> scale;
  float* found_inf;

  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    Opmath<S> x[V];
    load<V>(data, i, x);
    bool finite = true;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      finite &= is_finite(x[k]);
      x[k] = scale_element(x[k], scale);
    }
    // Every writer stores the same 1.0: a benign race, and the flag is never cleared.
    if (!finite && found_inf) *found_inf = 1.0f;
    store<V>(data, i, x);
  }
};

template <class S>
__device__ __forceinline__ void scale_chunk(const Row& row, const mt::ChunkSpan& span,
                                            const float* scale, float* found_inf) {
  const ScaleBody<S> body{static_cast<S*>(row.slot[0]), static_cast<Opmath<S>>(*scale),
                          found_inf};
  const bool aligned = mt::aligned16(body.data, span.start, sizeof(S));
  for_chunk<kVecWidth<S>>(span, aligned, body);
}

// Tensors may mix dtypes: the branch on the row's dtype is uniform over the block.
__global__ void __launch_bounds__(kThreads)
    scale_kernel(Table table, const float* scale, float* found_inf) {
  const Work w = this_work(table);
  const Row& row = table.rows[w.t];
  switch (static_cast<DType>(row.dtype)) {
    case DType::kFloat32: return scale_chunk<float>(row, w.span, scale, found_inf);
    case DType::kBFloat16: return scale_chunk<bf16>(row, w.span, scale, found_inf);
    case DType::kFloat16: return scale_chunk<fp16>(row, w.span, scale, found_inf);
    case DType::kFloat64: return scale_chunk<double>(row, w.span, scale, found_inf);
    case DType::kInt8:  // (the binding refuses 8-bit codes here)
    case DType::kUInt8: return;
  }
}

}  // namespace

void scale(const ScaleCall& call, const ExecContext& ctx) {
  TableBuilder table(call.num_tensors, call.numels);
  if (table.total_chunks() == 0) return;
  for (int i = 0; i < table.n(); ++i) {
    table.row(i).slot[0] = call.data[i];
    table.row(i).dtype = static_cast<int32_t>(call.dtypes[i]);
  }
  const Table device_table = table.upload(ctx);
  launch_kernel(scale_kernel, chunk_grid(table.total_chunks()), kThreads, stream_of(ctx),
                device_table, call.scale, call.found_inf);
  check(cudaGetLastError(), "launching scale_");
}

}  // namespace fusedopt::cuda
