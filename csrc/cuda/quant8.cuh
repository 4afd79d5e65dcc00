// 8-bit states on CUDA ([note: 8-bit states] in fusedopt/quant8.py): the walk of a chunk by
// quantization blocks (for_q8_blocks: the step kernel's and LAMB's norms pass's), an
// element's update between dequantization and requantization (q8_apply) or its read-only
// use (q8_read), the block-wide absmax, and the host side.
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

#include <type_traits>
#include <utility>

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

/// The 8-bit states of an op's call, from its row: state k's codes (int8 when kSigned[k],
/// else uint8) in slot code_slots[k] and its block absmaxes in slot scale_slots[k].
template <bool... kSigned>
struct Q8States {
  static constexpr int kN = sizeof...(kSigned);
  static constexpr bool kSignedOf[kN] = {kSigned...};
  void* codes[kN];
  float* scales[kN];

  __device__ __forceinline__ Q8States(const Row& row, const int (&code_slots)[kN],
                                      const int (&scale_slots)[kN]) {
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      codes[k] = row.slot[code_slots[k]];
      scales[k] = static_cast<float*>(row.slot[scale_slots[k]]);
    }
  }
};

template <bool kSigned>
using CodeOf = std::conditional_t<kSigned, int8_t, uint8_t>;

template <bool kSigned, class T>
__device__ __forceinline__ T q8_load(const void* codes, const float* scales, int64_t b,
                                     int64_t i) {
  return q8::dequantize<kSigned>(static_cast<const CodeOf<kSigned>*>(codes)[i], scales[b]);
}

template <bool kSigned, class T>
__device__ __forceinline__ void q8_store(void* codes, int64_t i, T x, float scale) {
  static_cast<CodeOf<kSigned>*>(codes)[i] =
      static_cast<CodeOf<kSigned>>(q8::quantize<kSigned>(static_cast<float>(x), scale));
}

/// Element i of quantization block b (i in the block): the param (or master) and the grad
/// as opmath values, load_grad applied to g, and each state dequantized into sv.
template <class Body, class Q, std::size_t... k>
__device__ __forceinline__ void q8_load_element(const Body& body, const Q& q, int64_t b,
                                                int64_t i, typename Body::T (&pv)[1],
                                                typename Body::T& g,
                                                typename Body::T (&sv)[Q::kN],
                                                std::index_sequence<k...>) {
  using T = typename Body::T;
  T gv[1];
  body.load_param_and_grad(i, pv, gv);
  g = load_grad(gv[0], body.load_g);
  ((sv[k] = q8_load<Q::kSignedOf[k], T>(q.codes[k], q.scales[k], b, i)), ...);
}

template <class Body, class Q, class Update, std::size_t... k>
__device__ __forceinline__ void q8_apply(const Body& body, const Q& q, int64_t b, int64_t i,
                                         bool in, bool write, Update update,
                                         std::index_sequence<k...> states) {
  using T = typename Body::T;
  T pv[1] = {T(0)}, g = T(0);
  T sv[Q::kN] = {};
  if (in) {
    q8_load_element(body, q, b, i, pv, g, sv, states);
    update(pv[0], g, sv[k]..., body.s);
  }
  float scale[Q::kN] = {};
  // (the reads of b's scales are done: q8_absmax syncs the block)
  if (write) ((scale[k] = q8_absmax(static_cast<float>(sv[k]), in)), ...);
  if (in) {
    body.store_param_and_master(i, pv);
    if (write) (q8_store<Q::kSignedOf[k]>(q.codes[k], i, sv[k], scale[k]), ...);
  }
  if (write && threadIdx.x == 0) ((q.scales[k][b] = scale[k]), ...);
}

/// Element i of quantization block b (every thread of the CUDA block calls it; `in`: i is
/// in the block) for any op with 8-bit states: each state dequantized, `update(p, g,
/// states&..., scalars)` (the op's elementwise update, as apply_every_state takes it), the
/// block's new absmaxes (block reductions) and the requantized codes. `write` (the same
/// for the whole block: a per-tensor choice) false leaves the states as they are (SGD's
/// tensor whose momentum is 0).
template <class Body, class Q, class Update>
__device__ __forceinline__ void q8_apply(const Body& body, const Q& q, int64_t b, int64_t i,
                                         bool in, bool write, Update update) {
  q8_apply(body, q, b, i, in, write, update, std::make_index_sequence<Q::kN>{});
}

template <class Body, class Q, class Read, std::size_t... k>
__device__ __forceinline__ void q8_read(const Body& body, const Q& q, int64_t b, int64_t i,
                                        Read read, std::index_sequence<k...> states) {
  using T = typename Body::T;
  T pv[1], g, sv[Q::kN];
  q8_load_element(body, q, b, i, pv, g, sv, states);
  read(pv[0], g, sv[k]..., body.s);
}

/// Element i of quantization block b, read only (i in the block; no block barrier, so a
/// thread may skip the elements outside it): `read(p, g, states..., scalars)` with the
/// states dequantized, as q8_apply's update sees them before it changes them; nothing is
/// written (LAMB's norms pass: [note: lamb passes] in math/lamb.h).
template <class Body, class Q, class Read>
__device__ __forceinline__ void q8_read(const Body& body, const Q& q, int64_t b, int64_t i,
                                        Read read) {
  q8_read(body, q, b, i, read, std::make_index_sequence<Q::kN>{});
}

/// The first quantization block of a tensor whose first element is at or after `offset`.
__device__ __forceinline__ int64_t first_q8_block(int64_t offset, int64_t row_length,
                                                  int64_t per_row) {
  const int64_t row = offset / row_length;
  return row * per_row + (offset - row * row_length + kQuantBlock - 1) / kQuantBlock;
}

/// Calls body.apply(b, i, in) for each quantization block b the CUDA block owns in its work
/// w (those whose first element lies in its chunk), every thread for every block: thread x
/// takes element i = the block's first + x, `in` when i lies in the block.
template <class Body>
__device__ __forceinline__ void for_q8_blocks(const Work& w, const Row& row, const Body& body) {
  const int64_t row_length = row.reserved > 0 ? row.reserved : 1;
  const q8::BlockGrid grid{row_length, (row_length + kQuantBlock - 1) / kQuantBlock};
  const int64_t last = first_q8_block(w.span.start + w.span.len, row_length, grid.blocks_per_row);
  for (int64_t b = first_q8_block(w.span.start, row_length, grid.blocks_per_row); b < last;
       ++b) {
    const int64_t i = grid.begin(b, kQuantBlock) + threadIdx.x;
    body.apply(b, i, i < grid.end(b, kQuantBlock));
  }
}

template <class Body>
__global__ void __launch_bounds__(kThreads) q8_step_kernel(Table table, StepArgs args) {
  if (skip_step(args.scalars.found_inf)) return;
  const Work w = this_work(table);
  const Row& row = table.rows[w.t];
  const Body body(row, w.t, args);
  for_q8_blocks(w, row, body);
}

/// Row::reserved of each tensor: its row length (StepLists::row_lengths; < 2^31, checked by
/// the binding).
inline void set_row_lengths(TableBuilder& host, const StepLists& lists) {
  for (int i = 0; i < host.n(); ++i)
    host.row(i).reserved = static_cast<int32_t>(lists.row_lengths[i]);
}

/// launch_step (step.cuh) for a Body of 8-bit states: q8_step_kernel over the uploaded table
/// (its rows' row lengths set: set_row_lengths).
template <template <class, class, MasterKind> class Body>
void launch_q8_step(const StepLists& lists, const TableBuilder& host, const Table& table,
                    const StepArgs& args, cudaStream_t stream) {
  if (host.total_chunks() == 0) return;
  dispatch_step_types(lists.params.dtype, lists.grads.dtype, master_kind(lists),
                      [&](auto p, auto g, auto master) {
                        using OpBody = Body<decltype(p), decltype(g), decltype(master)::value>;
                        launch_kernel(q8_step_kernel<OpBody>, chunk_grid(host.total_chunks()),
                                      kThreads, stream, table, args);
                        check(cudaGetLastError(), "launching an 8-bit step kernel");
                      });
}

/// run_step for a Body of 8-bit states: the table, the step increment (count_steps and
/// skip_if_zero: as run_step's), q8_step_kernel.
template <template <class, class, MasterKind> class Body>
void run_q8_step(const StepLists& lists, TableBuilder& host, const StepArgs& args,
                 const ExecContext& ctx, bool count_steps = true, int skip_if_zero = -1) {
  const cudaStream_t stream = stream_of(ctx);
  const Table table = host.upload(ctx);
  if (count_steps) increment_steps(table, lists.scalars.found_inf, stream, skip_if_zero);
  launch_q8_step<Body>(lists, host, table, args, stream);
}

}  // namespace fusedopt::cuda
