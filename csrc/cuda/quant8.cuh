// 8-bit states on CUDA ([note: 8-bit states] in fusedopt/quant8.py): the walk of a chunk by
// quantization blocks (for_q8_blocks: the step kernel's and LAMB's norms pass's), a lane's
// elements updated between dequantization and requantization (q8_apply) or used read-only
// (q8_read), the warp-wide absmax, and the host side.
//
// [note: q8 warps] A CUDA block takes one 2^16-element chunk (the shared chunk table) and
// owns the quantization blocks whose first element lies in it (a block starting near the
// chunk's end runs on into the next chunk, whose CUDA block skips it): every quantization
// block has one owner. A quantization block, a run of up to 256 elements of one row (the
// param's last dim, in Row::reserved), is one warp's: lane l takes its 8 consecutive
// elements from 8 l on (kLaneElements), so that the param, master and grad move in 128-bit
// accesses (two per lane for fp32) and each state's codes in one 64-bit access, where the
// lane's 8 elements are all in the block and every pointer is aligned for them (the vector
// path; else element by element). The 8 warps of a CUDA block take its quantization blocks
// in turn. A block's new absmax is a warp reduction (warp_max over the bits of |x|, whose
// unsigned order is the floats' and puts NaN above inf: one REDUX on sm_80+), so no block
// barrier and no shared memory. Before: one element per thread, 256 threads per
// quantization block, scalar loads, two block reductions and four __syncthreads per 256
// elements (the H200 model had no 128-bit loop to judge). Now it predicts 100% for fp32
// params and for 16-bit params with fp32 masters, except LAMB's norms pass (80% and 95%);
// the variants below 90% are issue-bound (tests/test_h200_model.py, KNOWN_BELOW).
#pragma once

#include <bit>
#include <stdexcept>
#include <type_traits>
#include <utility>

#include "fusedopt/quant8.h"
#include "step.cuh"

namespace fusedopt::cuda {

/// The elements of a quantization block per lane ([note: q8 warps]).
inline constexpr int kLaneElements = kQuantBlock / kWarpSize;
static_assert(kLaneElements * kWarpSize == kQuantBlock);

/// The absmax of a warp's quantization block as fusedopt/quant8.py takes it
/// (q8::canonical_absmax: NaN if any is NaN), in every lane, from each lane's values (0
/// where outside the block). Every lane of the warp must call it.
template <class T>
__device__ __forceinline__ float q8_absmax(const T (&x)[kLaneElements]) {
  uint32_t bits = 0;  // |x|'s bits: ordered as the floats, NaN above inf
#pragma unroll
  for (int e = 0; e < kLaneElements; ++e) {
    const uint32_t a = std::bit_cast<uint32_t>(static_cast<float>(x[e])) & 0x7FFFFFFFu;
    bits = a > bits ? a : bits;
  }
  bits = warp_max(bits);
  return q8::canonical_absmax(std::bit_cast<float>(bits), bits > 0x7F800000u);
}

template <bool kSigned>
using CodeOf = std::conditional_t<kSigned, int8_t, uint8_t>;

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

  /// State k's absmax of block b (a global load: the table's pointers are global memory).
  __device__ __forceinline__ float scale(int k, int64_t b) const {
    return load_pack<1>(scales[k], b).v[0];
  }
  __device__ __forceinline__ void set_scale(int k, int64_t b, float absmax) const {
    store_pack<1>(scales[k], b, Pack<float, 1>{{absmax}});
  }

  /// True when every state's codes are aligned for a lane's one access at element i (the
  /// Pack q8_load and q8_store access: 1-byte codes, so i counts bytes).
  __device__ __forceinline__ bool aligned(int64_t i) const {
    constexpr std::size_t kAlign = alignof(Pack<int8_t, kLaneElements>);
    bool all = true;
#pragma unroll
    for (int k = 0; k < kN; ++k)
      all = all && (reinterpret_cast<uintptr_t>(codes[k]) + i) % kAlign == 0;
    return all;
  }
};

/// Lane l's part of quantization block b: elements i..i+n-1 (n in [0, kLaneElements]);
/// `vector`: all kLaneElements of them in one access per slot (q8_vector_block). Every
/// load and store below branches on it (the same in the whole warp); the math between them
/// is the same code for both paths, and where the caller passes a constant (the loop of
/// tensors whose blocks are all whole and aligned) the compiler drops the other branch.
struct Q8Lane {
  int64_t b;
  int64_t i;
  int n;
  bool vector;
};

/// The lane's values of one state, dequantized (0 outside the block).
template <bool kSigned, class T>
__device__ __forceinline__ void q8_load(const void* codes, float scale, const Q8Lane& l,
                                        T (&x)[kLaneElements]) {
  const auto* c = static_cast<const CodeOf<kSigned>*>(codes);
  Pack<CodeOf<kSigned>, kLaneElements> pack{};
  if (l.vector) {
    pack = load_pack<kLaneElements>(c, l.i);
  } else {
#pragma unroll
    for (int e = 0; e < kLaneElements; ++e)
      if (e < l.n) pack.v[e] = load_pack<1>(c, l.i + e).v[0];
  }
#pragma unroll
  for (int e = 0; e < kLaneElements; ++e) x[e] = q8::dequantize<kSigned>(pack.v[e], scale);
}

/// The lane's values of one state, requantized in a block of absmax `scale`.
template <bool kSigned, class T>
__device__ __forceinline__ void q8_store(void* codes, float scale, const Q8Lane& l,
                                         const T (&x)[kLaneElements]) {
  using Code = CodeOf<kSigned>;
  auto* c = static_cast<Code*>(codes);
  Pack<Code, kLaneElements> pack;
#pragma unroll
  for (int e = 0; e < kLaneElements; ++e)
    pack.v[e] = static_cast<Code>(q8::quantize<kSigned>(static_cast<float>(x[e]), scale));
  if (l.vector) {
    store_pack<kLaneElements>(c, l.i, pack);
  } else {
#pragma unroll
    for (int e = 0; e < kLaneElements; ++e)
      if (e < l.n) store_pack<1>(c, l.i + e, Pack<Code, 1>{{pack.v[e]}});
  }
}

/// The lane's param (or master) and grad as opmath values, load_grad applied to g, and
/// each state dequantized (as q8_load), then `visit(p, g, states&..., scalars)` for each
/// of its elements in the block (the others stay 0).
template <class Body, class Q, class Visit, std::size_t... k>
__device__ __forceinline__ void q8_visit_lane(
    const Body& body, const Q& q, const Q8Lane& l, const float (&scale)[Q::kN],
    typename Body::T (&pv)[kLaneElements],
    typename Body::T (&sv)[Q::kN][kLaneElements], Visit visit, std::index_sequence<k...>) {
  using T = typename Body::T;
  T gv[kLaneElements] = {};
  if (l.vector) {
    body.template load_param_and_grad<kLaneElements>(l.i, pv, gv);
  } else {
#pragma unroll
    for (int e = 0; e < kLaneElements; ++e) {
      if (e < l.n) {
        T p1[1], g1[1];
        body.template load_param_and_grad<1>(l.i + e, p1, g1);
        pv[e] = p1[0];
        gv[e] = g1[0];
      }
    }
  }
  T loaded[Q::kN][kLaneElements];
  (q8_load<Q::kSignedOf[k]>(q.codes[k], scale[k], l, loaded[k]), ...);
#pragma unroll
  for (int e = 0; e < kLaneElements; ++e) {
    if (e < l.n) {
      ((sv[k][e] = loaded[k][e]), ...);
      visit(pv[e], load_grad(gv[e], body.load_g), sv[k][e]..., body.s);
    }
  }
}

template <class Body, class T>
__device__ __forceinline__ void q8_store_param(const Body& body, const Q8Lane& l,
                                               const T (&pv)[kLaneElements]) {
  if (l.vector) {
    body.template store_param_and_master<kLaneElements>(l.i, pv);
  } else {
#pragma unroll
    for (int e = 0; e < kLaneElements; ++e) {
      const T p1[1] = {pv[e]};
      if (e < l.n) body.template store_param_and_master<1>(l.i + e, p1);
    }
  }
}

/// True when quantization block [begin, end) takes the vector path ([note: q8 warps]): it
/// is whole, and param, grad, master and codes are aligned at its first element. The same
/// in every lane of the warp.
template <class Body>
__device__ __forceinline__ bool q8_vector_block(const Body& body, int64_t begin, int64_t end) {
  return end - begin == kQuantBlock && body.aligned_param(begin) && body.q.aligned(begin);
}

template <class Body, class Q, class Update, std::size_t... k>
__device__ __forceinline__ void q8_apply(const Body& body, const Q& q, const Q8Lane& l,
                                         bool write, Update update,
                                         std::index_sequence<k...> states) {
  using T = typename Body::T;
  const float old_scale[Q::kN] = {q.scale(k, l.b)...};
  T pv[kLaneElements] = {};
  T sv[Q::kN][kLaneElements] = {};  // 0 outside the block: no part of its absmax
  q8_visit_lane(body, q, l, old_scale, pv, sv, update, states);
  q8_store_param(body, l, pv);
  if (!write) return;
  // Every lane has read the old scales: warp_max syncs the warp before lane 0 writes them.
  const float scale[Q::kN] = {q8_absmax(sv[k])...};
  (q8_store<Q::kSignedOf[k]>(q.codes[k], scale[k], l, sv[k]), ...);
  if (threadIdx.x % kWarpSize == 0) (q.set_scale(k, l.b, scale[k]), ...);
}

/// The lane's elements of its quantization block for any op with 8-bit states (every lane
/// of the warp calls it): each state dequantized, `update(p, g, states&..., scalars)` (the
/// op's elementwise update, as apply_every_state takes it) per element, the param stored,
/// the block's new absmaxes (warp reductions) and the requantized codes. `write` (the same
/// for the whole warp: a per-tensor choice) false leaves the states as they are (SGD's
/// tensor whose momentum is 0).
template <class Body, class Q, class Update>
__device__ __forceinline__ void q8_apply(const Body& body, const Q& q, const Q8Lane& l,
                                         bool write, Update update) {
  q8_apply(body, q, l, write, update, std::make_index_sequence<Q::kN>{});
}

template <class Body, class Q, class Read, std::size_t... k>
__device__ __forceinline__ void q8_read(const Body& body, const Q& q, const Q8Lane& l,
                                        Read read, std::index_sequence<k...> states) {
  using T = typename Body::T;
  const float scale[Q::kN] = {q.scale(k, l.b)...};
  T pv[kLaneElements] = {};
  T sv[Q::kN][kLaneElements] = {};
  q8_visit_lane(body, q, l, scale, pv, sv, read, states);
}

/// The lane's elements of its quantization block, read only (no warp-wide step, so a lane
/// may have none): `read(p, g, states..., scalars)` per element with the states
/// dequantized, as q8_apply's update sees them before it changes them; nothing is written
/// (LAMB's norms pass: [note: lamb passes] in math/lamb.h).
template <class Body, class Q, class Read>
__device__ __forceinline__ void q8_read(const Body& body, const Q& q, const Q8Lane& l,
                                        Read read) {
  q8_read(body, q, l, read, std::make_index_sequence<Q::kN>{});
}

/// The first quantization block of a tensor whose first element is at or after `offset`.
__device__ __forceinline__ int64_t first_q8_block(int64_t offset, int64_t row_length,
                                                  int64_t per_row) {
  const int64_t row = offset / row_length;
  return row * per_row + (offset - row * row_length + kQuantBlock - 1) / kQuantBlock;
}

/// Calls body.apply(lane) for each quantization block the CUDA block owns in its work w
/// (those whose first element lies in its chunk): warp w takes the w-th of them, the
/// (w + kWarps)-th, ..., every lane of it for every block ([note: q8 warps]). A
/// tensor whose rows are whole blocks (row length a multiple of 256) and whose pointers are
/// aligned takes the vector path in a loop of its own (Q8Lane::vector a constant); any
/// other decides per block (q8_vector_block), element by element in the blocks that are
/// not whole or aligned.
template <class Body>
__device__ __forceinline__ void for_q8_blocks(const Work& w, const Row& row, const Body& body) {
  const int64_t row_length = row.reserved > 0 ? row.reserved : 1;
  const q8::BlockGrid grid{row_length, (row_length + kQuantBlock - 1) / kQuantBlock};
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t first = first_q8_block(w.span.start, row_length, grid.blocks_per_row) + warp;
  const int64_t last = first_q8_block(w.span.start + w.span.len, row_length, grid.blocks_per_row);
  if (row_length % kQuantBlock == 0 && body.aligned_param(0) && body.q.aligned(0)) {
    for (int64_t b = first; b < last; b += kWarps)
      body.apply(Q8Lane{b, b * kQuantBlock + lane * kLaneElements, kLaneElements, true});
    return;
  }
  for (int64_t b = first; b < last; b += kWarps) {
    const int64_t begin = grid.begin(b, kQuantBlock), end = grid.end(b, kQuantBlock);
    const int64_t i = begin + lane * kLaneElements;
    const int64_t left = end - i;
    const int n = static_cast<int>(left < 0 ? 0 : (left < kLaneElements ? left : kLaneElements));
    body.apply(Q8Lane{b, i, n, q8_vector_block(body, begin, end)});
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

/// 8-bit states are for fp32, bf16 and fp16 params: the binding refuses fp64 ones ([note:
/// 8-bit states]), and no kernel is built for them. Throws std::invalid_argument for one,
/// before a launcher uploads its table or moves a step count.
inline void check_q8_params(const StepLists& lists) {
  if (lists.params.dtype == DType::kFloat64)
    throw std::invalid_argument(
        "fusedopt CUDA backend: 8-bit states are for float32, bfloat16 and float16 params, "
        "not float64");
}

/// dispatch_step_types for a call with 8-bit states: f(p, g, master) for its fp32, bf16 or
/// fp16 params (check_q8_params first).
template <class F>
void dispatch_q8_types(const StepLists& lists, F&& f) {
  check_q8_params(lists);
  dispatch_step_types(lists.params.dtype, lists.grads.dtype, master_kind(lists),
                      [&](auto p, auto g, auto master) {
                        if constexpr (!std::is_same_v<decltype(p), double>) f(p, g, master);
                      });
}

/// launch_step (step.cuh) for a Body of 8-bit states: q8_step_kernel over the uploaded table
/// (its rows' row lengths set: set_row_lengths).
template <template <class, class, MasterKind> class Body>
void launch_q8_step(const StepLists& lists, const TableBuilder& host, const Table& table,
                    const StepArgs& args, cudaStream_t stream) {
  if (host.total_chunks() == 0) return;
  dispatch_q8_types(lists, [&](auto p, auto g, auto master) {
    using OpBody = Body<decltype(p), decltype(g), decltype(master)::value>;
    launch_kernel(q8_step_kernel<OpBody>, chunk_grid(host.total_chunks()), kThreads, stream,
                  table, args);
    check(cudaGetLastError(), "launching an 8-bit step kernel");
  });
}

/// run_step for a Body of 8-bit states: the table, the step increment (count_steps and
/// skip_if_zero: as run_step's), q8_step_kernel.
template <template <class, class, MasterKind> class Body>
void run_q8_step(const StepLists& lists, TableBuilder& host, const StepArgs& args,
                 const ExecContext& ctx, bool count_steps = true, int skip_if_zero = -1) {
  check_q8_params(lists);
  const cudaStream_t stream = stream_of(ctx);
  const Table table = host.upload(ctx);
  if (count_steps) increment_steps(table, lists.scalars.found_inf, stream, skip_if_zero);
  launch_q8_step<Body>(lists, host, table, args, stream);
}

}  // namespace fusedopt::cuda
