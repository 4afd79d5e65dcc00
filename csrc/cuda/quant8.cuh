// 8-bit states on CUDA ([note: 8-bit states] in fusedopt/quant8.py): the step kernel that
// walks a chunk by quantization blocks, the block-wide absmax, and the host side.
//
// A CUDA block takes one 2^16-element chunk (the shared chunk table) and owns the
// quantization blocks whose first element lies in it (a block starting near the chunk's end
// runs on into the next chunk, whose CUDA block skips it): every quantization block has one
// owner. A quantization block is a run of up to 256 elements of one row (the param's last
// dim, in Row::reserved), one element per thread; its new absmax is a block reduction (a
// fixed shuffle tree, block_reduce: deterministic) broadcast through shared memory. Known
// cost, not measured on a GPU: two reductions and four __syncthreads per 256 elements, and
// scalar (not 128-bit) loads; a warp per quantization block with 8 elements per lane would
// vectorise and need no block barrier.
#pragma once

#include "fusedopt/quant8.h"
#include "step.cuh"

namespace fusedopt::cuda {

static_assert(kThreads == kQuantBlock, "one thread per element of a quantization block");

struct MaxOf {
  __device__ __forceinline__ float operator()(float a, float b) const { return a > b ? a : b; }
};

/// The absmax of the block's values as fusedopt/quant8.py takes it (q8::canonical_absmax:
/// NaN if any is NaN), in every thread. Every thread of the block must call it.
__device__ __forceinline__ float q8_absmax(float x, bool in) {
  __shared__ float result;
  const float a = in ? (x < 0.0f ? -x : x) : 0.0f;
  const int any_nan = __syncthreads_or(a != a);
  const float m = block_reduce(a == a ? a : 0.0f, MaxOf{}, 0.0f);
  if (threadIdx.x == 0) result = m;
  __syncthreads();
  const float absmax = result;
  __syncthreads();  // before the next call writes `result`
  return q8::canonical_absmax(absmax, any_nan != 0);
}

/// The first quantization block of a tensor whose first element is at or after `offset`.
__device__ __forceinline__ int64_t first_q8_block(int64_t offset, int64_t row_length,
                                                  int64_t per_row) {
  const int64_t row = offset / row_length;
  return row * per_row + (offset - row * row_length + kQuantBlock - 1) / kQuantBlock;
}

template <class Body>
__global__ void __launch_bounds__(kThreads) q8_step_kernel(Table table, StepArgs args) {
  if (skip_step(args.scalars.found_inf)) return;
  const Work w = this_work(table);
  const Row& row = table.rows[w.t];
  const Body body(row, w.t, args);
  const int64_t row_length = row.reserved > 0 ? row.reserved : 1;
  const q8::BlockGrid grid{row_length, (row_length + kQuantBlock - 1) / kQuantBlock};
  const int64_t last = first_q8_block(w.span.start + w.span.len, row_length, grid.blocks_per_row);
  for (int64_t b = first_q8_block(w.span.start, row_length, grid.blocks_per_row); b < last;
       ++b) {
    const int64_t i = grid.begin(b, kQuantBlock) + threadIdx.x;
    body.apply(b, i, i < grid.end(b, kQuantBlock));
  }
}

/// Row::reserved of each tensor: its row length (StepLists::row_lengths; < 2^31, checked by
/// the binding).
inline void set_row_lengths(TableBuilder& host, const StepLists& lists) {
  for (int i = 0; i < host.n(); ++i)
    host.row(i).reserved = static_cast<int32_t>(lists.row_lengths[i]);
}

/// run_step for a Body of 8-bit states: the table, the step increment, q8_step_kernel.
template <template <class, class, MasterKind> class Body>
void run_q8_step(const StepLists& lists, TableBuilder& host, const StepArgs& args,
                 const ExecContext& ctx) {
  const cudaStream_t stream = stream_of(ctx);
  const Table table = host.upload(ctx);
  increment_steps(table, lists.scalars.found_inf, stream, -1);
  if (host.total_chunks() == 0) return;
  dispatch_step_types(lists.params.dtype, lists.grads.dtype, master_kind(lists),
                      [&](auto p, auto g, auto master) {
                        using OpBody = Body<decltype(p), decltype(g), decltype(master)::value>;
                        launch_kernel(q8_step_kernel<OpBody>, chunk_grid(host.total_chunks()),
                                      kThreads, stream, table, args);
                        check(cudaGetLastError(), "launching an 8-bit step kernel");
                      });
}

}  // namespace fusedopt::cuda
