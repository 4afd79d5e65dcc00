// The CPU traversal shared by every op: the whole tensor list is cut into fixed-size work
// items (tensor, element range), which OpenMP threads share; each item is walked in blocks
// of kBlock elements, seen as opmath values (the memory itself when the storage dtype is the
// opmath dtype, else a converted copy in a stack buffer that is written back).
//
// [note: fixed partition] Item boundaries depend only on the tensor sizes (never on the
// thread count), and reductions combine per-item partials in item order, so grad_norm and
// LAMB's norms give the same bits for any number of threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "convert.h"
#include "fusedopt/dtype.h"
#include "fusedopt/launch.h"

namespace fusedopt::cpu {

/// Elements per work item: 64K elements keeps per-item overhead well under 1% and still
/// gives ~1900 items for GPT-2 small's 124M params.
constexpr int64_t kItemElements = 1 << 16;
/// Elements per block: the stack buffers of a five-slot op stay in L1 (5 x 2 KiB fp32).
constexpr int64_t kBlock = 512;
/// Below this many elements in total a call runs on the calling thread only.
constexpr int64_t kSerialElements = 1 << 15;

struct WorkItem {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

inline std::vector<WorkItem> split_work(int64_t num_tensors, const int64_t* numels) {
  std::vector<WorkItem> items;
  for (int64_t t = 0; t < num_tensors; ++t)
    for (int64_t b = 0; b < numels[t]; b += kItemElements)
      items.push_back({t, b, std::min(numels[t], b + kItemElements)});
  return items;
}

/// Runs f(k) for every item index k, on ctx.num_threads OpenMP threads (static schedule:
/// each thread walks a contiguous stretch of memory, which the prefetchers like).
template <typename F>
void parallel_items(const std::vector<WorkItem>& items, const ExecContext& ctx, F&& f) {
  const int64_t count = static_cast<int64_t>(items.size());
  int64_t total = 0;
  for (const WorkItem& w : items) total += w.end - w.begin;
  if (count <= 1 || total < kSerialElements || ctx.num_threads == 1) {
    for (int64_t k = 0; k < count; ++k) f(k);
    return;
  }
  const int threads = ctx.num_threads > 0 ? ctx.num_threads : 0;
  if (threads > 0) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t k = 0; k < count; ++k) f(k);
  } else {
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < count; ++k) f(k);
  }
}

inline void* element_ptr(void* base, DType d, int64_t offset) {
  return static_cast<char*>(base) + offset * dtype_size(d);
}

/// Block [offset, offset+n) of a storage slot as opmath T values: the memory itself when the
/// dtype is T's, else `buffer` filled with converted values.
template <typename T>
inline T* view_block(void* base, DType d, int64_t offset, int64_t n, T* buffer) {
  if (d == OpmathDType<T>::value) return static_cast<T*>(base) + offset;
  load_values(buffer, element_ptr(base, d, offset), d, n);
  return buffer;
}

/// Writes `values` (from view_block) back to block [offset, offset+n) of a storage slot,
/// rounded as R says ([note: store rounding] in fusedopt/dtype.h).
/// kStochastic (fp32 values to a bf16 slot) takes the block's random bits, block element k
/// those of element offset + k ([note: stochastic rounding], rounding_words_n).
template <Rounding R = Rounding::kNearestEven, typename T>
inline void write_block(void* base, DType d, int64_t offset, int64_t n, const T* values,
                        StreamBits bits = {}) {
  if (d == OpmathDType<T>::value) {
    T* dst = static_cast<T*>(base) + offset;
    if (dst != values) std::memcpy(dst, values, n * sizeof(T));
    return;
  }
  store_values<R>(element_ptr(base, d, offset), d, values, n, bits);
}

}  // namespace fusedopt::cpu
