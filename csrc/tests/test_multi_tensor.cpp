// Host test of the multi-tensor traversal (fusedopt/multi_tensor.h): the kernels' chunk and
// tail arithmetic, run on the CPU for odd sizes, offsets, chunk boundaries, empty tensors and
// element counts of 2^31 and more (arithmetic only: nothing that large is allocated).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "check.h"
#include "fusedopt/multi_tensor.h"

namespace mt = fusedopt::mt;

constexpr int64_t K = mt::kChunkElems;

static void test_chunk_count() {
  CHECK(mt::chunk_count(0) == 0);
  CHECK(mt::chunk_count(1) == 1);
  CHECK(mt::chunk_count(K - 1) == 1);
  CHECK(mt::chunk_count(K) == 1);
  CHECK(mt::chunk_count(K + 1) == 2);
  CHECK(mt::chunk_count(int64_t{1} << 31) == (int64_t{1} << 31) / K);
  CHECK(mt::chunk_count((int64_t{1} << 31) + 1) == (int64_t{1} << 31) / K + 1);
  CHECK(mt::chunk_count((int64_t{1} << 40) + 3) == (int64_t{1} << 40) / K + 1);
}

// Every tensor of `numels`, traversed as the kernel does (one block per work item, every
// thread of the block), must see each element exactly once; vector accesses must start at a
// multiple of W from the chunk start and stay inside it; an aligned chunk leaves exactly
// len % W elements to the scalar tail, an unaligned one does all of it scalar.
template <int W>
static void test_coverage(const std::vector<int64_t>& numels, int misalign_elems, int nthreads) {
  const int n = static_cast<int>(numels.size());
  std::vector<int64_t> begin(n + 1);
  const int64_t total = mt::build_chunk_begin(numels.data(), n, begin.data());
  int64_t expected_total = 0;
  for (int64_t x : numels) expected_total += mt::chunk_count(x);
  CHECK(total == expected_total);

  constexpr int elem_bytes = mt::kVecBytes / W;
  // A fake, 16-byte-aligned base address per tensor, shifted by `misalign_elems` elements
  // as a view at an odd storage offset would be.
  std::vector<std::vector<uint8_t>> hits(n);
  for (int i = 0; i < n; ++i) hits[i].assign(static_cast<size_t>(numels[i]), 0);
  for (int64_t chunk = 0; chunk < total; ++chunk) {
    const int t = mt::locate_tensor(begin.data(), n, chunk);
    CHECK(t >= 0 && t < n);
    CHECK(begin[t] <= chunk && chunk < begin[t + 1]);
    CHECK(numels[t] > 0);
    const mt::ChunkSpan span = mt::chunk_span(numels[t], chunk - begin[t]);
    CHECK(span.len > 0 && span.len <= K);
    CHECK(span.start + span.len <= numels[t]);
    const auto* base = reinterpret_cast<const void*>(uintptr_t{0x10000} * (t + 1) +
                                                      misalign_elems * elem_bytes);
    const bool aligned = mt::aligned16(base, span.start, elem_bytes);
    CHECK(aligned == (misalign_elems * elem_bytes % mt::kVecBytes == 0));
    int64_t scalar_count = 0;
    for (int tid = 0; tid < nthreads; ++tid) {
      mt::for_each_in_chunk<W>(
          span, aligned, tid, nthreads,
          [&](int64_t i) {
            CHECK(aligned);
            CHECK((i - span.start) % W == 0);
            CHECK(i >= span.start && i + W <= span.start + span.len);
            for (int k = 0; k < W; ++k) ++hits[t][static_cast<size_t>(i + k)];
          },
          [&](int64_t i) {
            CHECK(i >= span.start && i < span.start + span.len);
            ++hits[t][static_cast<size_t>(i)];
            ++scalar_count;
          });
    }
    CHECK(scalar_count == (aligned ? span.len % W : span.len));
  }
  for (int i = 0; i < n; ++i)
    for (uint8_t h : hits[i]) CHECK(h == 1);
}

static void test_locate_exhaustive() {
  // Leading, trailing and consecutive empty tensors, and one-element ones.
  const std::vector<int64_t> numels = {0, 0, 1, 0, K, 0, 0, K + 1, 1, 0, 3 * K, 0};
  const int n = static_cast<int>(numels.size());
  std::vector<int64_t> begin(n + 1);
  const int64_t total = mt::build_chunk_begin(numels.data(), n, begin.data());
  CHECK(total == 1 + 1 + 2 + 1 + 3);
  const int owner[] = {2, 4, 7, 7, 8, 10, 10, 10};
  for (int64_t c = 0; c < total; ++c) CHECK(mt::locate_tensor(begin.data(), n, c) == owner[c]);
  // A single tensor.
  const int64_t one[] = {5};
  int64_t b1[2];
  CHECK(mt::build_chunk_begin(one, 1, b1) == 1);
  CHECK(mt::locate_tensor(b1, 1, 0) == 0);
}

// Tensors of 2^31 elements and more: the arithmetic only, at the boundaries that matter.
static void test_huge() {
  const int64_t two31 = int64_t{1} << 31;
  const std::vector<int64_t> numels = {two31 + 5, 0, 3, (int64_t{1} << 32) + K + 1, two31 - 1};
  const int n = static_cast<int>(numels.size());
  std::vector<int64_t> begin(n + 1);
  const int64_t total = mt::build_chunk_begin(numels.data(), n, begin.data());
  CHECK(begin[1] == two31 / K + 1);
  CHECK(begin[2] == begin[1] && begin[3] == begin[2] + 1);
  CHECK(total == begin[3] + (int64_t{1} << 32) / K + 2 + two31 / K);
  for (int t = 0; t < n; ++t) {
    if (numels[t] == 0) continue;
    const int64_t first = begin[t], last = begin[t + 1] - 1;
    CHECK(mt::locate_tensor(begin.data(), n, first) == t);
    CHECK(mt::locate_tensor(begin.data(), n, last) == t);
    const mt::ChunkSpan head = mt::chunk_span(numels[t], 0);
    CHECK(head.start == 0 && head.len == (numels[t] < K ? numels[t] : K));
    const mt::ChunkSpan tail = mt::chunk_span(numels[t], last - first);
    CHECK(tail.start + tail.len == numels[t]);  // the last element is reached, no further
    CHECK(tail.len > 0 && tail.len <= K);
    // The last chunk of a huge tensor, walked by 512 threads, covers exactly its elements
    // with indices beyond 2^31 (no 32-bit wrap).
    int64_t seen = 0, max_index = -1;
    for (int tid = 0; tid < 512; ++tid) {
      mt::for_each_in_chunk<8>(
          tail, true, tid, 512,
          [&](int64_t i) {
            seen += 8;
            if (i + 7 > max_index) max_index = i + 7;
          },
          [&](int64_t i) {
            seen += 1;
            if (i > max_index) max_index = i;
          });
    }
    CHECK(seen == tail.len);
    CHECK(max_index == numels[t] - 1);
  }
  // The chunk that straddles element 2^31 of the first tensor starts exactly there.
  CHECK(mt::chunk_span(numels[0], two31 / K).start == two31);
  CHECK(mt::chunk_span(numels[0], two31 / K).len == 5);
  CHECK(mt::aligned16(reinterpret_cast<const void*>(uintptr_t{0x100000}), two31 + 8, 2));
  CHECK(!mt::aligned16(reinterpret_cast<const void*>(uintptr_t{0x100000}), two31 + 4, 2));
}

static void test_aligned16() {
  CHECK(mt::aligned16(nullptr, 3, 4));
  const auto* base = reinterpret_cast<const void*>(uintptr_t{0x1000});
  CHECK(mt::aligned16(base, 0, 4) && mt::aligned16(base, 4, 4) && !mt::aligned16(base, 2, 4));
  CHECK(mt::aligned16(base, 8, 2) && !mt::aligned16(base, 1, 2) && !mt::aligned16(base, 4, 2));
  CHECK(mt::aligned16(base, 2, 8) && !mt::aligned16(base, 1, 8));
  CHECK(!mt::aligned16(reinterpret_cast<const void*>(uintptr_t{0x1002}), 0, 2));
  CHECK(mt::aligned16(reinterpret_cast<const void*>(uintptr_t{0x1002}), 7, 2));
  CHECK(mt::vec_width(2) == 8 && mt::vec_width(4) == 4 && mt::vec_width(8) == 2);
}

int main() {
  test_chunk_count();
  test_locate_exhaustive();
  test_aligned16();
  // Odd sizes around the vector width and the chunk boundary; empty tensors between them.
  const std::vector<int64_t> sizes = {0, 1, 7, 8, 9, 0, K - 1, K, K + 1, 0, 2 * K + 13, 3, 0};
  for (int misalign : {0, 1, 3, 8}) {
    for (int nthreads : {1, 32, 96, 512}) {
      test_coverage<8>(sizes, misalign, nthreads);
      test_coverage<4>(sizes, misalign, nthreads);
      test_coverage<2>(sizes, misalign, nthreads);
    }
  }
  test_coverage<8>({}, 0, 32);   // no tensors at all: no work items
  test_coverage<4>({0, 0}, 0, 32);  // only empty tensors
  test_huge();
  if (g_failures) {
    std::fprintf(stderr, "test_multi_tensor: %d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("test_multi_tensor: all checks passed\n");
  return 0;
}
