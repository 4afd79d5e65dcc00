// scale_ on the CPU: tensors[i] *= scale, flagging non-finite inputs.
// Per element: reads and writes one storage value (2 x dtype size bytes).
#include <vector>

#include "fusedopt/launch.h"
#include "fusedopt/math/norm.h"
#include "loop.h"

namespace fusedopt::cpu {
namespace {

/// Scales [begin, end) of one tensor; returns whether any input element was non-finite.
template <typename T>
bool scale_range(void* base, DType d, int64_t begin, int64_t end, T scale) {
  alignas(64) T buffer[kBlock];
  int bad = 0;
  for (int64_t off = begin; off < end; off += kBlock) {
    const int64_t n = std::min(kBlock, end - off);
    T* x = view_block(base, d, off, n, buffer);
    for (int64_t i = 0; i < n; ++i) {
      bad |= !is_finite(x[i]);
      x[i] = scale_element(x[i], scale);
    }
    write_block(base, d, off, n, x);
  }
  return bad != 0;
}

}  // namespace

void scale(const ScaleCall& call, const ExecContext& ctx) {
  const std::vector<WorkItem> items = split_work(call.num_tensors, call.numels);
  std::vector<char> bad(items.size(), 0);
  const float scale_value = *call.scale;
  parallel_items(items, ctx, [&](int64_t k) {
    const WorkItem& w = items[k];
    const DType d = call.dtypes[w.tensor];
    void* base = call.data[w.tensor];
    bad[k] = d == DType::kFloat64
                 ? scale_range<double>(base, d, w.begin, w.end, static_cast<double>(scale_value))
                 : scale_range<float>(base, d, w.begin, w.end, scale_value);
  });
  if (call.found_inf == nullptr) return;
  for (char b : bad)
    if (b) *call.found_inf = 1.0f;
}

}  // namespace fusedopt::cpu
