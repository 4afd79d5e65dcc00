// Multi-tensor traversal: which element of which tensor each CUDA thread touches.
//
// Torch-free and CUDA-free: the same functions run in the kernels (csrc/cuda/) and on the
// host in csrc/tests/test_multi_tensor.cpp, so the chunk and tail arithmetic is tested
// without a GPU.
//
// [note: chunks] A launch covers every tensor of an op call. Each tensor is cut into chunks
// of kChunkElems elements; the work items are the (tensor, chunk) pairs, numbered 0..total-1
// across all tensors, one CUDA block per work item. The host writes the exclusive prefix sum
// of the chunk counts (chunk_begin, N+1 entries) into the device table; a block finds its
// tensor by binary search over it, so the table has one row per tensor (not per chunk), a
// launch covers any number of tensors, and empty tensors own no chunk at all. Every index is
// 64-bit: a tensor may hold 2^31 elements or more; only the offset inside a chunk is 32-bit.
//
// [note: vector path] Inside a chunk, a thread moves W elements per access, W chosen so that
// the narrowest storage dtype of the op's slots fills 16 bytes (8 bf16/fp16, 4 fp32, 2 fp64);
// wider slots take several 16-byte accesses for the same W elements. That needs every slot's
// address at the chunk start to be 16-byte aligned (chunk offsets are multiples of
// kChunkElems, so in practice: every slot's base address); otherwise the whole chunk takes the
// scalar path. The last chunk of a tensor ends with a tail of len % W elements, done scalar.
#pragma once

#include <cstddef>
#include <cstdint>

#ifndef FUSEDOPT_HD
#if defined(__CUDACC__)
#define FUSEDOPT_HD __host__ __device__ inline
#else
#define FUSEDOPT_HD inline
#endif
#endif

namespace fusedopt::mt {

// 64K elements: 128 KB of bf16 per slot per block; big enough that the per-block set-up
// (binary search, table reads) is noise, small enough that a 1B-parameter step has ~16K blocks
// to balance over 132 SMs.
inline constexpr int64_t kChunkElems = int64_t{1} << 16;
inline constexpr int kVecBytes = 16;

// Elements per vector access for a narrowest storage dtype of `min_elem_bytes` bytes.
constexpr int vec_width(int min_elem_bytes) { return kVecBytes / min_elem_bytes; }

FUSEDOPT_HD int64_t chunk_count(int64_t numel) {
  return numel <= 0 ? 0 : (numel + kChunkElems - 1) / kChunkElems;
}

// Host: chunk_begin[i] = chunks of tensors 0..i-1, for i = 0..n. Returns the total.
inline int64_t build_chunk_begin(const int64_t* numels, int n, int64_t* chunk_begin) {
  int64_t total = 0;
  for (int i = 0; i < n; ++i) {
    chunk_begin[i] = total;
    total += chunk_count(numels[i]);
  }
  chunk_begin[n] = total;
  return total;
}

// The tensor that owns work item `chunk` (0 <= chunk < chunk_begin[n]): the i with
// chunk_begin[i] <= chunk < chunk_begin[i + 1]. That interval is empty for an empty tensor
// (chunk_begin[i] == chunk_begin[i + 1]), so an empty tensor is never returned.
FUSEDOPT_HD int locate_tensor(const int64_t* chunk_begin, int n, int64_t chunk) {
  int lo = 0, hi = n;  // invariant: chunk_begin[lo] <= chunk < chunk_begin[hi]
  while (hi - lo > 1) {
    const int mid = lo + (hi - lo) / 2;
    if (chunk_begin[mid] <= chunk) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Elements [start, start + len) of a tensor of `numel` elements form its chunk `local`.
struct ChunkSpan {
  int64_t start;
  int32_t len;
};

FUSEDOPT_HD ChunkSpan chunk_span(int64_t numel, int64_t local) {
  const int64_t start = local * kChunkElems;
  const int64_t rest = numel - start;
  return {start, static_cast<int32_t>(rest < kChunkElems ? rest : kChunkElems)};
}

// True when `addr + start * elem_bytes` is 16-byte aligned (a null slot counts as aligned).
FUSEDOPT_HD bool aligned16(const void* addr, int64_t start, int elem_bytes) {
  if (addr == nullptr) return true;
  const auto a = reinterpret_cast<uintptr_t>(addr) + static_cast<uintptr_t>(start * elem_bytes);
  return (a % kVecBytes) == 0;
}

// The traversal of one chunk by thread `tid` of `nthreads`: vector accesses of W elements
// first (none when unaligned), then the scalar tail. `vec(i)` handles elements i..i+W-1,
// `scalar(i)` element i; indices are tensor-global (64-bit). Consecutive threads touch
// consecutive vectors, so a warp's accesses coalesce.
template <int W, class VecFn, class ScalarFn>
FUSEDOPT_HD void for_each_in_chunk(ChunkSpan span, bool aligned, int tid, int nthreads,
                                   VecFn&& vec, ScalarFn&& scalar) {
  const int32_t nvec = aligned ? span.len / W : 0;
  for (int32_t v = tid; v < nvec; v += nthreads) vec(span.start + int64_t{v} * W);
  for (int32_t e = nvec * W + tid; e < span.len; e += nthreads) scalar(span.start + e);
}

}  // namespace fusedopt::mt
