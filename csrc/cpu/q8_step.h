// [note: 8-bit states] (fusedopt/quant8.py) on the CPU, for every op that has them: the
// traversal of step.h by whole quantization blocks. A work item is up to kBlocksPerItem
// quantization blocks of one tensor; each block is walked by for_each_block (param, master
// and grad as opmath values, the master paths unchanged) with the op's 8-bit states
// dequantized into stack buffers, handed to the op's own block function (the one its plain
// states take: step_blocks' `block`), and requantized with the block's new absmax.
// Per element: the op's bytes with 1-byte states, + 8 B per 256 elements per state (its
// scale read and written).
//
// The states go through q8_block.h's block functions (AVX2, bit for bit quant8.h's scalar
// rules), not one quant8.h call per element: that scalar loop (a division, the guess's square
// roots and its data-dependent correction loops per element) made the 8-bit step 14-35x the
// plain one. 1 thread, min of 5 steps, one 14.7M-param fp32 tensor, the 2-core VM at load
// ~9.5 from other builds (so every number is a few times its quiet value), ms/step before ->
// after (plain states): AdamW 1188 -> 162 (34-40), Lion 806 -> 58 (19-22), SGD with momentum
// 820 -> 57 (22-36), LAMB 1443 -> 297 (125-140). GPT-2 small (`python -m bench.memory
// --model gpt2 --threads 1 --quick-ceiling`, mode bf16+master+8-bit states, load ~5.7, a
// ceiling of ~22 GB/s): AdamW 2443 -> 671 ms/step, 4% -> 15% of the ceiling (bf16+master:
// 197 ms, 87%); Lion 1094 -> 316, 8% -> 29% (127, 99%); SGD 1126 -> 312, 8% -> 29% (145,
// 87%); LAMB 3106 -> 1296, 5% -> 12% (620, 43%). What is left is compute, not bytes: per
// element and state a division, one or two square roots, the absmax and (uint8 codes) one
// gather (q8_block.h's per-element costs).
#pragma once

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

#include "fusedopt/launch.h"
#include "fusedopt/quant8.h"
#include "q8_block.h"
#include "step.h"

namespace fusedopt::cpu {

/// One 8-bit state of a call: its codes (int8 signed, uint8 unsigned) and block absmaxes.
struct Q8Slot {
  TensorSlot codes;
  TensorSlot scales;
};

/// A call's work over quantization blocks: the items (tensor, first block, end block) and
/// each tensor's block grid (lists.row_lengths).
struct Q8Work {
  static constexpr int64_t kBlocksPerItem = 256;
  std::vector<WorkItem> items;
  std::vector<q8::BlockGrid> grids;

  explicit Q8Work(const StepLists& lists) : grids(lists.num_tensors) {
    for (int64_t i = 0; i < lists.num_tensors; ++i) {
      const int64_t row = lists.row_lengths[i];
      grids[i] = {row, (row + kQuantBlock - 1) / kQuantBlock};
      const int64_t blocks = row == 0 ? 0 : lists.numels[i] / row * grids[i].blocks_per_row;
      for (int64_t b = 0; b < blocks; b += kBlocksPerItem)
        items.push_back({i, b, std::min(blocks, b + kBlocksPerItem)});
    }
  }
};

/// values[0, n) = the dequantized codes [begin, begin + n) of tensor i's state `slot`, whose
/// block b they are (q8_block.h: AVX2 where built for it, equal to quant8.h's dequantize).
template <typename T>
void load_q8_block(const Q8Slot& slot, int64_t i, int64_t b, int64_t begin, int64_t n,
                   T* values) {
  const float scale = static_cast<const float*>(slot.scales.data[i])[b];
  alignas(32) float widened[std::is_same_v<T, float> ? 1 : kQuantBlock];
  float* out = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    out = values;
  } else {
    out = widened;
  }
  if (slot.codes.dtype == DType::kInt8) {
    q8_block::dequantize<true>(static_cast<const int8_t*>(slot.codes.data[i]) + begin, n, scale,
                               out);
  } else {
    q8_block::dequantize<false>(static_cast<const uint8_t*>(slot.codes.data[i]) + begin, n,
                                scale, out);
  }
  if constexpr (!std::is_same_v<T, float>)
    for (int64_t e = 0; e < n; ++e) values[e] = static_cast<T>(widened[e]);
}

/// Block b of tensor i's state `slot` (codes [begin, begin + n)) requantized from values[0, n)
/// (as fp32) with their absmax as its new scale.
template <typename T>
void store_q8_block(const Q8Slot& slot, int64_t i, int64_t b, int64_t begin, int64_t n,
                    const T* values) {
  alignas(32) float narrowed[std::is_same_v<T, float> ? 1 : kQuantBlock];
  const float* x = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    x = values;
  } else {
    for (int64_t e = 0; e < n; ++e) narrowed[e] = static_cast<float>(values[e]);
    x = narrowed;
  }
  const float scale = q8_block::absmax(x, n);
  static_cast<float*>(slot.scales.data[i])[b] = scale;
  if (slot.codes.dtype == DType::kInt8) {
    q8_block::quantize<true>(x, n, scale, static_cast<int8_t*>(slot.codes.data[i]) + begin);
  } else {
    q8_block::quantize<false>(x, n, scale, static_cast<uint8_t*>(slot.codes.data[i]) + begin);
  }
}

/// Calls f(p, g, st, n) for each quantization block of `item` (blocks [begin, end) of its
/// tensor), st[k] pointing at the n dequantized values of state k. With kWrite the param
/// (and master) are written back and, where write_states, every state requantized with
/// its new absmax; without, nothing is written (LAMB's norm pass). kReadGrad: as
/// for_each_block's.
template <typename T, size_t kStates, bool kWrite = true, bool kReadGrad = true, typename F>
void for_each_q8_block(const StepLists& lists, const Q8Work& work,
                       const std::array<Q8Slot, kStates>& states, const WorkItem& item,
                       bool write_states, F&& f) {
  const int64_t i = item.tensor;
  const q8::BlockGrid& grid = work.grids[i];
  const std::array<TensorSlot, 0> no_states{};
  for (int64_t b = item.begin; b < item.end; ++b) {
    const WorkItem block{i, grid.begin(b, kQuantBlock), grid.end(b, kQuantBlock)};
    for_each_block<T, 0, kWrite, kReadGrad>(
        lists, no_states, block, [&](T* p, const T* g, auto&, int64_t n) {
          T values[kStates][kQuantBlock];
          std::array<T*, kStates> st{};
          for (size_t k = 0; k < kStates; ++k) {
            st[k] = values[k];
            load_q8_block(states[k], i, b, block.begin, n, values[k]);
          }
          f(p, g, st, n);
          if (!kWrite || !write_states) return;
          for (size_t k = 0; k < kStates; ++k)
            store_q8_block(states[k], i, b, block.begin, n, values[k]);
        });
  }
}

/// step_blocks (step.h) for a call whose `states` are 8-bit: the same `block(divide, p, g,
/// st, n, s)` over quantization blocks. A tensor i with !writes_states(i) keeps its states
/// as they are (SGD's tensor whose momentum is 0: [note: sgd momentum 0]).
template <typename T, size_t kStates, typename Scalars, typename Block,
          typename WritesStates>
void q8_step_blocks(const StepLists& lists, const std::array<Q8Slot, kStates>& states,
                    const std::vector<Scalars>& scalars, bool divide, const ExecContext& ctx,
                    Block&& block, WritesStates&& writes_states) {
  const Q8Work work(lists);
  parallel_items(work.items, ctx, [&](int64_t k) {
    const WorkItem& w = work.items[k];
    const Scalars s = scalars[w.tensor];
    for_each_q8_block<T, kStates>(lists, work, states, w, writes_states(w.tensor),
                                  [&](T* p, const T* g, auto& st, int64_t n) {
                                    with_divide(divide, [&](auto d) { block(d, p, g, st, n, s); });
                                  });
  });
}

template <typename T, size_t kStates, typename Scalars, typename Block>
void q8_step_blocks(const StepLists& lists, const std::array<Q8Slot, kStates>& states,
                    const std::vector<Scalars>& scalars, bool divide, const ExecContext& ctx,
                    Block&& block) {
  q8_step_blocks<T>(lists, states, scalars, divide, ctx, block, [](int64_t) { return true; });
}

}  // namespace fusedopt::cpu
