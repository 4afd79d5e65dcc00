// The traversal every step op shares: for one work item, walk its blocks with the param
// (the fp32 master when there are master weights; joined from param and remainder for a
// compact master, from param and compensation for a Kahan one), the grad and the op's state slots seen
// as opmath values, then write back what changed: the master and the rounded param (so
// param == master.to(dtype) bit for bit), and the states.
#pragma once

#include <array>
#include <cstring>
#include <type_traits>
#include <vector>

#include "fusedopt/launch.h"
#include "fusedopt/math/common.h"
#include "loop.h"

namespace fusedopt::cpu {

/// Whether the step runs at all: found_inf, when given and non-zero, makes it a no-op.
inline bool step_enabled(const StepLists& lists) {
  return lists.scalars.found_inf == nullptr || *lists.scalars.found_inf == 0.0f;
}

/// The learning rate of tensor i, whose row holds `lr` (lr_tensor overrides it).
inline double lr_of(const StepLists& lists, double lr, int64_t i) {
  return tensor_lr(lr, lists.scalars.lr, lists.scalars.lr_numel, i);
}

/// A call's per-tensor scalars, in tensor order: make(i, lr) for tensor i with its learning
/// rate (lr_of: the call's lr column, or lr_tensor); make builds the op's Scalars from the
/// math header (and may advance the tensor's step count first).
template <typename Call, typename Make>
auto tensor_scalars(const Call& call, Make&& make) {
  const StepLists& lists = call.lists;
  std::vector<decltype(make(int64_t{0}, 0.0))> scalars(lists.num_tensors);
  for (int64_t i = 0; i < lists.num_tensors; ++i)
    scalars[i] = make(i, lr_of(lists, call.lr(i), i));
  return scalars;
}

/// The step counts, as the bias corrections use them (a two-pass op's last pass: the counts
/// its first pass advanced).
inline std::vector<double> step_counts(const StepLists& lists) {
  std::vector<double> t(lists.num_tensors);
  for (int64_t i = 0; i < lists.num_tensors; ++i) t[i] = static_cast<double>(*lists.steps[i]);
  return t;
}

/// Adds 1 to each step count and returns the new counts (as the bias corrections use them).
inline std::vector<double> advance_steps(const StepLists& lists) {
  for (int64_t i = 0; i < lists.num_tensors; ++i) *lists.steps[i] += 1.0f;
  return step_counts(lists);
}

/// [note: master sync] (fusedopt/_contract.py) on the CPU: `master` is block [off, off+n) of
/// the fp32 master; where the 16-bit param's bits differ from the master's rounded bits,
/// the param's value replaces the master's. Returns the values to step with: `master`
/// itself when nothing was written (the common case: one vectorised round-and-compare
/// loop, convert.h's rounds_to), else `master` changed in place (in_place: the caller
/// writes the master back anyway) or `buffer` holding the adopted values (LAMB's norm pass
/// writes nothing, so the master memory must not change there).
template <typename T>
inline T* adopt_written_params(T* master, const void* param, DType d, int64_t off, int64_t n,
                               bool in_place, T* buffer) {
  const uint16_t* bits = static_cast<const uint16_t*>(param) + off;
  if constexpr (std::is_same_v<T, float>) {
    if (rounds_to(master, bits, d, n)) return master;
  }
  alignas(64) uint16_t rounded[kBlock];
  alignas(64) T widened[kBlock];
  store_values(rounded, d, master, n);
  load_values(widened, bits, d, n);
  T* out = master;
  if (!in_place) {
    std::memcpy(buffer, master, n * sizeof(T));
    out = buffer;
  }
  for (int64_t k = 0; k < n; ++k)
    if (rounded[k] != bits[k]) out[k] = widened[k];
  return out;
}

/// [note: compact master] (fusedopt/_contract.py) on the CPU: block [off, off+n) of the
/// fp32 master joined from the bf16 param and its int16 remainder (join_master), and back
/// (split_master). Both loops are integer code that g++ vectorises like the bf16 ones.
inline void join_block(float* master, const void* param, const void* remainder, int64_t off,
                       int64_t n) {
  const uint16_t* p = static_cast<const uint16_t*>(param) + off;
  const int16_t* r = static_cast<const int16_t*>(remainder) + off;
  for (int64_t k = 0; k < n; ++k) master[k] = join_master(p[k], r[k]);
}

inline void split_block(void* param, void* remainder, int64_t off, int64_t n,
                        const float* master) {
  uint16_t* p = static_cast<uint16_t*>(param) + off;
  int16_t* r = static_cast<int16_t*>(remainder) + off;
  for (int64_t k = 0; k < n; ++k) {
    const CompactMaster c = split_master(master[k]);
    p[k] = c.param;
    r[k] = c.remainder;
  }
}

/// [note: kahan master] (fusedopt/_contract.py) on the CPU: block [off, off+n) of the fp32
/// master fp32(param) + fp32(compensation), where that sum rounds to the param (else the
/// param alone: a value written into it since), and back: param round(x), compensation
/// round(x - param) (0 where not finite), one step toward zero at a tie that would round
/// param + compensation off the param. Rounding to nearest even both ways: dtype.h's
/// conversions, through convert.h's loops.
inline void join_kahan_block(float* master, const void* param, const void* compensation,
                             DType d, int64_t off, int64_t n) {
  const uint16_t* p = static_cast<const uint16_t*>(param) + off;
  alignas(64) float c[kBlock];
  alignas(64) float sum[kBlock];
  alignas(64) uint16_t rounded[kBlock];
  load_values(master, p, d, n);
  load_values(c, static_cast<const uint16_t*>(compensation) + off, d, n);
  for (int64_t k = 0; k < n; ++k) sum[k] = master[k] + c[k];
  store_values(rounded, d, sum, n);
  for (int64_t k = 0; k < n; ++k) master[k] = rounded[k] == p[k] ? sum[k] : master[k];
}

inline void split_kahan_block(void* param, void* compensation, DType d, int64_t off, int64_t n,
                              const float* master) {
  uint16_t* p = static_cast<uint16_t*>(param) + off;
  uint16_t* c = static_cast<uint16_t*>(compensation) + off;
  alignas(64) float widened[kBlock];
  alignas(64) float diff[kBlock];
  alignas(64) uint16_t rounded[kBlock];
  store_values(p, d, master, n);
  load_values(widened, p, d, n);
  for (int64_t k = 0; k < n; ++k) {
    const float x = master[k] - widened[k];
    diff[k] = x - x == 0.0f ? x : 0.0f;  // x - x is NaN for an infinite or NaN x
  }
  store_values(c, d, diff, n);
  load_values(diff, c, d, n);
  for (int64_t k = 0; k < n; ++k) widened[k] += diff[k];
  store_values(rounded, d, widened, n);
  for (int64_t k = 0; k < n; ++k)  // a tie (c != 0 there): one step toward zero
    c[k] = static_cast<uint16_t>(c[k] - (rounded[k] != p[k] && (c[k] & 0x7FFFu) ? 1 : 0));
}

/// Calls f(p, g, states, n) for each block of work item w, where p, g and states[k] point at
/// n opmath values of the param (or master, after [note: master sync] when lists.master_sync),
/// the grad and state slot k. With kWrite the param, master and states are written back
/// after f (f may change them); without, nothing is written (LAMB's norm pass). Without
/// kReadGrad the grad is not read (g is null: LAMB's second pass over stored moments).
/// Without kParam the param is neither read nor written (p is null: Muon's momentum pass);
/// only states [0, kWrittenStates) are written back (Muon's apply pass reads its bf16
/// Newton-Schulz output and writes none).
template <typename T, size_t kStates, bool kWrite, bool kReadGrad = true, bool kParam = true,
          size_t kWrittenStates = kStates, typename F>
void for_each_block(const StepLists& lists, const std::array<TensorSlot, kStates>& states,
                    const WorkItem& w, F&& f) {
  const int64_t i = w.tensor;
  const bool master = lists.master_params.present();
  const bool compact = master && lists.compact_master;  // [note: compact master]
  const bool kahan = master && lists.kahan_master;      // [note: kahan master]
  const bool joined = compact || kahan;                 // the master is not in memory
  const bool sync = master && !joined && lists.master_sync;
  // [note: stochastic rounding] (fusedopt/dtype.h): the param store of a bf16 param without
  // master weights, when the call has an sr_key.
  const bool stochastic = lists.scalars.sr_key != nullptr && !master &&
                          lists.params.dtype == DType::kBFloat16;
  const RoundingKey key =
      lists.scalars.sr_key != nullptr ? rounding_key(lists.scalars.sr_key, i) : RoundingKey{};
  // [note: state dtype] (fusedopt/dtype.h): with the call's sr_key, the bf16 states of an op
  // with free state dtypes round stochastically, state slot k with stream k + 1.
  const bool stochastic_states = lists.stochastic_states;
  void* param = lists.params.data[i];
  void* p_base = master ? lists.master_params.data[i] : param;
  const DType p_dtype = master ? DType::kFloat32 : lists.params.dtype;
  void* g_base = lists.grads.data[i];
  alignas(64) T p_buffer[kBlock];
  alignas(64) T g_buffer[kBlock];
  alignas(64) T s_buffer[kStates > 0 ? kStates : 1][kBlock];
  std::array<T*, kStates> s{};
  // [note: vector philox] (convert.h): the block's Philox words, one evaluation per element
  // for the param and every state store. bf16+SR steps of 16M bf16 params on the shared
  // 2-core VM (1 thread, min of 9 steps' thread time, load average ~8), per-store scalar
  // evaluation -> this: Lion 89.6 -> 50.9 ms, SGD (momentum) 88.9 -> 49.9 ms, AdamW (param
  // and two bf16 moments) 414 -> 69.5 ms; round to nearest (bf16): 9.0, 7.7, 16.6 ms.
  bool any_stochastic_state = false;
  for (size_t k = 0; k < kWrittenStates; ++k)
    any_stochastic_state |= stochastic_states && states[k].dtype == DType::kBFloat16;
  const bool draws = kWrite && ((kParam && stochastic) || any_stochastic_state);
  alignas(64) uint32_t word_buffer[4][kBlock];
  const std::array<uint32_t*, 4> words{word_buffer[0], word_buffer[1], word_buffer[2],
                                       word_buffer[3]};
  for (int64_t off = w.begin; off < w.end; off += kBlock) {
    const int64_t n = std::min(kBlock, w.end - off);
    T* p = nullptr;
    if constexpr (kParam) {
      p = p_buffer;
      if constexpr (std::is_same_v<T, float>) {
        if (compact) join_block(p_buffer, param, p_base, off, n);
        if (kahan) join_kahan_block(p_buffer, param, p_base, lists.params.dtype, off, n);
      }
      if (!joined) p = view_block(p_base, p_dtype, off, n, p_buffer);
      if (sync) p = adopt_written_params(p, param, lists.params.dtype, off, n, kWrite, p_buffer);
    }
    const T* g = kReadGrad ? view_block(g_base, lists.grads.dtype, off, n, g_buffer) : nullptr;
    for (size_t k = 0; k < kStates; ++k)
      s[k] = view_block(states[k].data[i], states[k].dtype, off, n, s_buffer[k]);
    f(p, g, s, n);
    if constexpr (kWrite) {
      if (draws) rounding_words_n(words, key, off, n);
      if constexpr (kParam) {
        if constexpr (std::is_same_v<T, float>) {
          if (compact) split_block(param, p_base, off, n, p);
          if (kahan) split_kahan_block(param, p_base, lists.params.dtype, off, n, p);
        }
        if constexpr (std::is_same_v<T, float>) {
          if (stochastic)
            write_block<Rounding::kStochastic>(param, p_dtype, off, n, p, stream_bits(words, 0));
        }
        if (!joined && !stochastic) {
          write_block(p_base, p_dtype, off, n, p);
          if (master) write_block(param, lists.params.dtype, off, n, p);
        }
      }
      for (size_t k = 0; k < kWrittenStates; ++k) {
        if constexpr (std::is_same_v<T, float>) {
          if (stochastic_states && states[k].dtype == DType::kBFloat16) {
            write_block<Rounding::kStochastic>(
                states[k].data[i], states[k].dtype, off, n, s[k],
                stream_bits(words, static_cast<uint32_t>(k + 1)));
            continue;
          }
        }
        write_block(states[k].data[i], states[k].dtype, off, n, s[k]);
      }
    }
  }
}

/// Runs body(std::bool_constant<divide>{}): a loop's variant with or without the division by
/// grad_scale (GradLoad::divide), the same bits either way.
template <typename F>
void with_divide(bool divide, F&& body) {
  if (divide) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

/// A step op's loop over a call, in parallel: its work items (split_work), each tensor's
/// elements in blocks (for_each_block, with the op's `states`), each block through
/// `block(divide, p, g, st, n, s)` with the tensor's `scalars` and the grad load's division
/// choice (with_divide: `divide` is a std::bool_constant). kReadGrad, kParam and
/// kWrittenStates: what a pass reads and writes, as for_each_block's.
template <typename T, size_t kStates, bool kReadGrad = true, bool kParam = true,
          size_t kWrittenStates = kStates, typename Scalars, typename Block>
void step_blocks(const StepLists& lists, const std::array<TensorSlot, kStates>& states,
                 const std::vector<Scalars>& scalars, bool divide, const ExecContext& ctx,
                 Block&& block) {
  const std::vector<WorkItem> items = split_work(lists.num_tensors, lists.numels);
  parallel_items(items, ctx, [&](int64_t k) {
    const WorkItem& w = items[k];
    const Scalars s = scalars[w.tensor];
    for_each_block<T, kStates, true, kReadGrad, kParam, kWrittenStates>(
        lists, states, w, [&](T* p, const T* g, auto& st, int64_t n) {
          with_divide(divide, [&](auto d) { block(d, p, g, st, n, s); });
        });
  });
}

/// Runs `body<T>()` with T = double for fp64 params, float otherwise.
template <typename F>
void with_opmath(DType param_dtype, F&& body) {
  if (param_dtype == DType::kFloat64) {
    body(double{});
  } else {
    body(float{});
  }
}

/// sum p^2 and sum u^2 of one work item (or reduction chunk) of a two-pass op's first pass.
struct NormPartial {
  double param_sq = 0.0;
  double update_sq = 0.0;
};

/// Adds parts[k], the partials of items[k] (each with its `tensor`), into norms[tensor], in
/// item order: the same sums whatever the thread count ([note: fixed partition] in loop.h).
template <typename Item>
void add_partials(std::vector<NormPartial>& norms, const std::vector<Item>& items,
                  const std::vector<NormPartial>& parts) {
  for (size_t k = 0; k < items.size(); ++k) {
    norms[items[k].tensor].param_sq += parts[k].param_sq;
    norms[items[k].tensor].update_sq += parts[k].update_sq;
  }
}

/// A first pass's output: tensor i's sums at sq_norms[2i] (sum p^2) and [2i + 1] (sum u^2),
/// in the opmath T.
template <typename T>
void store_sq_norms(const std::vector<NormPartial>& norms, T* sq_norms) {
  for (size_t i = 0; i < norms.size(); ++i) {
    sq_norms[2 * i] = static_cast<T>(norms[i].param_sq);
    sq_norms[2 * i + 1] = static_cast<T>(norms[i].update_sq);
  }
}

/// The CPU launchers of a two-pass step op ([note: multi-pass ops] in DESIGN.md §2): `op`
/// (Stem##Call) and its passes `first` (FirstPassCall) and `last` (LastPassCall), from the
/// file's pass functions `first_pass<T>(const Stem##Call&, T* sq_norms, ctx)` and
/// `last_pass<T>(const Stem##Call&, const T* sq_norms, ctx)` in the params' opmath T. Under
/// found_inf each does nothing (a first pass's sq_norms stay 0); `op` runs the two passes
/// over a zeroed sq_norms of its own.
#define FUSEDOPT_CPU_TWO_PASS_LAUNCHERS(op, Stem, first, first_pass, last, last_pass)      \
  void first(const FirstPassCall<Stem##Call>& call, const ExecContext& ctx) {               \
    if (!step_enabled(call.step.lists)) return;                                             \
    with_opmath(call.step.lists.params.dtype, [&](auto zero) {                              \
      using T = decltype(zero);                                                             \
      first_pass<T>(call.step, static_cast<T*>(call.sq_norms), ctx);                        \
    });                                                                                     \
  }                                                                                         \
  void last(const LastPassCall<Stem##Call>& call, const ExecContext& ctx) {                 \
    if (!step_enabled(call.step.lists)) return;                                             \
    with_opmath(call.step.lists.params.dtype, [&](auto zero) {                              \
      using T = decltype(zero);                                                             \
      last_pass<T>(call.step, static_cast<const T*>(call.sq_norms), ctx);                   \
    });                                                                                     \
  }                                                                                         \
  void op(const Stem##Call& call, const ExecContext& ctx) {                                 \
    if (!step_enabled(call.lists)) return;                                                  \
    with_opmath(call.lists.params.dtype, [&](auto zero) {                                   \
      using T = decltype(zero);                                                             \
      std::vector<T> sq_norms(2 * call.lists.num_tensors, T(0));                            \
      first_pass<T>(call, sq_norms.data(), ctx);                                            \
      last_pass<T>(call, sq_norms.data(), ctx);                                             \
    });                                                                                     \
  }

}  // namespace fusedopt::cpu
