// adamw_ on the CPU (Adam with decoupled=false). Per element: reads g, p, m, v (+ vmax with
// amsgrad, + the fp32 master), writes p, m, v (+ vmax, + master): 28 bytes for fp32.
#include <vector>

#include "fusedopt/launch.h"
#include "fusedopt/math/adamw.h"
#include "fusedopt/quant8.h"
#include "step.h"

namespace fusedopt::cpu {
namespace {

template <typename T, bool kAmsgrad, bool kDivide>
void adamw_block(T* __restrict p, const T* __restrict g, T* __restrict m, T* __restrict v,
                 T* __restrict vmax, int64_t n, const AdamWScalars<T> s, const GradLoad<T> load) {
  for (int64_t k = 0; k < n; ++k) {
    T unused = T(0);
    adamw_update<T, kAmsgrad>(p[k], load_grad<kDivide>(g[k], load), m[k], v[k],
                              kAmsgrad ? vmax[k] : unused, s);
  }
}

template <typename T, bool kAmsgrad>
void adamw_items(const AdamWCall& call, const ExecContext& ctx) {
  const StepLists& lists = call.lists;
  const std::vector<double> t = advance_steps(lists);
  const auto scalars = tensor_scalars(call, [&](int64_t i, double lr) {
    return adamw_scalars<T>(lr, call.beta1(i), call.beta2(i), call.eps(i), call.weight_decay(i),
                            t[i], call.decoupled, call.bias_correction);
  });
  const GradLoad<T> load = make_grad_load<T>(lists.scalars.grad_scale, lists.scalars.clip_coef,
                                             call.maximize);
  constexpr size_t kStates = kAmsgrad ? 3 : 2;
  std::array<TensorSlot, kStates> states;
  states[0] = call.exp_avgs;
  states[1] = call.exp_avg_sqs;
  if constexpr (kAmsgrad) states[2] = call.max_exp_avg_sqs;
  step_blocks<T>(lists, states, scalars, load.divide, ctx,
                 [&](auto divide, T* p, const T* g, auto& st, int64_t n, const auto& s) {
                   T* vmax = kAmsgrad ? st[kStates - 1] : nullptr;
                   adamw_block<T, kAmsgrad, divide()>(p, g, st[0], st[1], vmax, n, s, load);
                 });
}

/// [note: 8-bit states] (fusedopt/quant8.py) on the CPU: work items of whole quantization
/// blocks (up to 256 blocks each), each block walked by for_each_block (param, master and
/// grad as fp32) with its moments dequantized into stack buffers, stepped by the unchanged
/// adamw_update, and requantized with the block's new absmax.
/// Per element: reads g, p, m, v (1 B each), writes p, m, v, + 8 B per block of scales.
void adamw_q8(const AdamWCall& call, const ExecContext& ctx) {
  const StepLists& lists = call.lists;
  const std::vector<double> t = advance_steps(lists);
  const auto scalars = tensor_scalars(call, [&](int64_t i, double lr) {
    return adamw_scalars<float>(lr, call.beta1(i), call.beta2(i), call.eps(i),
                                call.weight_decay(i), t[i], call.decoupled,
                                call.bias_correction);
  });
  const GradLoad<float> load = make_grad_load<float>(lists.scalars.grad_scale,
                                                     lists.scalars.clip_coef, call.maximize);
  constexpr int64_t kBlocksPerItem = 256;
  std::vector<WorkItem> items;  // (tensor, first block, end block)
  std::vector<q8::BlockGrid> grids(lists.num_tensors);
  for (int64_t i = 0; i < lists.num_tensors; ++i) {
    const int64_t row = lists.row_lengths[i];
    grids[i] = {row, (row + kQuantBlock - 1) / kQuantBlock};
    const int64_t blocks = row == 0 ? 0 : lists.numels[i] / row * grids[i].blocks_per_row;
    for (int64_t b = 0; b < blocks; b += kBlocksPerItem)
      items.push_back({i, b, std::min(blocks, b + kBlocksPerItem)});
  }
  const std::array<TensorSlot, 0> no_states{};
  parallel_items(items, ctx, [&](int64_t k) {
    const WorkItem& item = items[k];
    const int64_t i = item.tensor;
    const AdamWScalars<float> s = scalars[i];
    int8_t* m_codes = static_cast<int8_t*>(call.exp_avgs.data[i]);
    uint8_t* v_codes = static_cast<uint8_t*>(call.exp_avg_sqs.data[i]);
    float* m_scales = static_cast<float*>(call.exp_avg_scales.data[i]);
    float* v_scales = static_cast<float*>(call.exp_avg_sq_scales.data[i]);
    for (int64_t b = item.begin; b < item.end; ++b) {
      const WorkItem block{i, grids[i].begin(b, kQuantBlock), grids[i].end(b, kQuantBlock)};
      for_each_block<float, 0, true>(lists, no_states, block, [&](float* p, const float* g,
                                                                  auto&, int64_t n) {
        float m[kQuantBlock], v[kQuantBlock];
        for (int64_t e = 0; e < n; ++e) {
          m[e] = q8::dequantize<true>(m_codes[block.begin + e], m_scales[b]);
          v[e] = q8::dequantize<false>(v_codes[block.begin + e], v_scales[b]);
        }
        with_divide(load.divide, [&](auto divide) {
          float unused = 0.0f;
          for (int64_t e = 0; e < n; ++e)
            adamw_update<float, false>(p[e], load_grad<divide()>(g[e], load), m[e], v[e],
                                       unused, s);
        });
        float m_max = 0.0f, v_max = 0.0f;
        bool m_nan = false, v_nan = false;
        for (int64_t e = 0; e < n; ++e) {
          q8::fold_absmax(m[e], m_max, m_nan);
          q8::fold_absmax(v[e], v_max, v_nan);
        }
        m_scales[b] = q8::canonical_absmax(m_max, m_nan);
        v_scales[b] = q8::canonical_absmax(v_max, v_nan);
        for (int64_t e = 0; e < n; ++e) {
          m_codes[block.begin + e] = static_cast<int8_t>(q8::quantize<true>(m[e], m_scales[b]));
          v_codes[block.begin + e] = static_cast<uint8_t>(q8::quantize<false>(v[e], v_scales[b]));
        }
      });
    }
  });
}

}  // namespace

void adamw(const AdamWCall& call, const ExecContext& ctx) {
  if (!step_enabled(call.lists)) return;
  if (call.exp_avg_scales.present()) {  // [note: 8-bit states]: fp32/bf16/fp16 params only
    adamw_q8(call, ctx);
    return;
  }
  with_opmath(call.lists.params.dtype, [&](auto zero) {
    using T = decltype(zero);
    if (call.amsgrad) {
      adamw_items<T, true>(call, ctx);
    } else {
      adamw_items<T, false>(call, ctx);
    }
  });
}

}  // namespace fusedopt::cpu
