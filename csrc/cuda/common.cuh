// What every CUDA kernel of fusedopt shares: the device table, storage types and their
// 16-byte vector accesses, block reductions, dtype dispatch. Torch-free (DESIGN.md §2).
//
// [note: device table] One launch covers every tensor of an op call, whatever their number
// (DESIGN.md §2 "multi-tensor everywhere"). The launcher writes, on the host, one Row per
// tensor (slot addresses, numel, step address, its hyperparameter row's address, dtype) after
// the chunk prefix sums of [note: chunks] (fusedopt/multi_tensor.h), and puts that blob in
// device memory (table.cu: [note: table upload]); the kernels read their tensor's Row from it. The
// table has no size limit, unlike the 4 KB of kernel arguments that cap torch's and Apex's
// launches at ~110 tensors.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "fusedopt/dtype.h"
#include "fusedopt/launch.h"
#include "fusedopt/math/common.h"
#include "fusedopt/multi_tensor.h"
#include "fusedopt/philox.h"

namespace fusedopt::cuda {

inline constexpr int kThreads = 256;  // threads of every multi-tensor block
inline constexpr int kWarpSize = 32;
inline constexpr int kWarps = kThreads / kWarpSize;  // warps of a multi-tensor block
// Slots of a Row: params, grads, master_params and the most states of a step op.
inline constexpr int kMaxSlots = 3 + spec::kMaxStates;

/// One tensor of an op call, in the device table. Slot meaning is per op (each op names its
/// slots: kParam, kGrad...); an absent slot is null. hyper points at the tensor's row of the
/// call's hyperparameter table (device memory, doubles in spec order, as the math headers
/// take them; [note: hyper table] in fusedopt/_contract.py): a schedule that rewrites the
/// values leaves the Row, and so the cached device table, unchanged.
struct alignas(16) Row {
  void* slot[kMaxSlots];
  float* step;  // the tensor's step count (device), or null
  int64_t numel;
  const double* hyper;
  int32_t dtype;  // fusedopt::DType of slot 0, for ops whose tensors may mix dtypes
  int32_t reserved;
  int64_t index;  // the tensor's position in its call: its entry of a step op's sr_key
};
static_assert(sizeof(Row) % 16 == 0, "rows are copied 16 bytes at a time");
// index takes 8 bytes: with four states it fit the padding (96 bytes); with five (8-bit
// AdamW's block scales) the row is 112 bytes. No hidden padding beyond the 16-byte rounding:
static_assert(sizeof(Row) == 16 * ((8 * (kMaxSlots + 3) + 8 + 8 + 15) / 16), "Row grew");

/// The device view of the table: what a kernel receives as an argument.
struct Table {
  const int64_t* chunk_begin;  // n + 1 entries, [note: chunks]
  const Row* rows;             // n entries
  int n;
};

/// Throws std::runtime_error naming `what` when `err` is not cudaSuccess.
void check(cudaError_t err, const char* what);

/// Host side of a table: fill rows(), then upload() once per call.
class TableBuilder {
 public:
  TableBuilder(int64_t num_tensors, const int64_t* numels);
  Row& row(int64_t i) { return rows()[i]; }
  int n() const { return n_; }
  int64_t total_chunks() const { return total_chunks_; }
  /// Device memory holding the table, for kernels enqueued on ctx's stream during this
  /// call. Enqueues at most a few small copy kernels; never blocks the host.
  Table upload(const ExecContext& ctx);

 private:
  Row* rows() { return reinterpret_cast<Row*>(blob_.data() + rows_offset_); }
  int n_;
  int64_t total_chunks_;
  size_t rows_offset_;
  std::vector<unsigned char> blob_;
};

/// steps[i] += 1 for every tensor with a step, unless *found_inf != 0 (one launch; before
/// the kernels that read the new counts).
/// With `skip_if_zero` >= 0, a row whose hyperparameter in that column is 0 is skipped (SGD's
/// momentum, [note: sgd momentum 0]: the values are device memory, [note: hyper table]).
void increment_steps(const Table& table, const float* found_inf, cudaStream_t stream,
                     int skip_if_zero = -1);

/// The launch grid of a multi-tensor kernel: one block per work item.
dim3 chunk_grid(int64_t total_chunks);

inline cudaStream_t stream_of(const ExecContext& ctx) {
  return static_cast<cudaStream_t>(ctx.stream);
}

/// kernel<<<grid, block, 0, stream>>>(args...). Every launch of csrc/cuda goes through here:
/// `<<<>>>` is not C++, and this is the one place where the host emulation of the tests
/// (csrc/emulation, FUSEDOPT_CUDA_EMULATION) runs the same kernels instead.
template <class... Params, class... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
                   Args&&... args) {
#ifdef FUSEDOPT_CUDA_EMULATION
  emulation::launch(kernel, grid, block, stream, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
#endif
}

/// An access of type A at p: nothing on the GPU; under the host emulation, a fault where
/// the GPU would fault (p not aligned for A) or where a tensor's bounds are crossed.
template <class A>
__device__ __forceinline__ void check_access(const void* p) {
#ifdef FUSEDOPT_CUDA_EMULATION
  emulation::check_access(p, sizeof(A), alignof(A));
#else
  (void)p;
#endif
}

/// Writes the host arrays of a slot into every row (null where absent).
inline void fill_slot(TableBuilder& table, int slot, const TensorSlot& s) {
  for (int i = 0; i < table.n(); ++i) table.row(i).slot[slot] = s.present() ? s.data[i] : nullptr;
}

// ---------------------------------------------------------------------------------------
// Storage types. bf16/fp16 are bit containers converted by fusedopt/dtype.h, the exact c10
// rounding, so a GPU-written param equals the CPU's and `master.to(dtype)` bit for bit.

struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

/// The opmath type of a storage type: double for fp64, float otherwise.
template <class S>
using Opmath = std::conditional_t<std::is_same_v<S, double>, double, float>;

template <class T, class S>
__device__ __forceinline__ T to_opmath(S x) {
  if constexpr (std::is_same_v<S, bf16>) {
    return static_cast<T>(bf16_to_float(x.bits));
  } else if constexpr (std::is_same_v<S, fp16>) {
    return static_cast<T>(fp16_to_float(x.bits));
  } else {
    return static_cast<T>(x);
  }
}

/// x rounded to storage type S as R says ([note: store rounding] in fusedopt/dtype.h);
/// kStochastic (bf16 only) adds the 16 `random` bits ([note: stochastic rounding]).
template <class S, Rounding R = Rounding::kNearestEven, class T>
__device__ __forceinline__ S from_opmath(T x, uint32_t random = 0) {
  if constexpr (R == Rounding::kStochastic) {
    static_assert(std::is_same_v<S, bf16>, "stochastic rounding stores bf16 only");
    return bf16{float_to_bf16_stochastic(static_cast<float>(x), random)};
  } else if constexpr (std::is_same_v<S, bf16>) {
    return bf16{float_to_bf16(static_cast<float>(x))};
  } else if constexpr (std::is_same_v<S, fp16>) {
    return fp16{float_to_fp16(static_cast<float>(x))};
  } else {
    return static_cast<S>(x);
  }
}

/// The alignment of V elements of S accessed at once: their size up to 16 bytes when it is a
/// power of two (8 int8 codes: one 64-bit access, quant8.cuh), else S's own.
template <class S, int V>
inline constexpr std::size_t kPackAlign =
    V * sizeof(S) >= 16                         ? 16
    : ((V * sizeof(S)) & (V * sizeof(S) - 1)) == 0 ? V * sizeof(S)
                                                   : alignof(S);

/// V elements of storage type S: one or more 16-byte accesses when V * sizeof(S) >= 16
/// (alignas(16) is what lets the compiler issue LDG.E.128 / STG.E.128).
template <class S, int V>
struct alignas(kPackAlign<S, V>) Pack {
  S v[V];
};

/// x[0..V) = base[i..i+V) in opmath. V > 1 needs base + i 16-byte aligned ([note: vector
/// path]); V == 1 is the scalar path.
/// base[i..i+V) as stored (bits, unconverted); alignment as for load().
template <int V, class S>
__device__ __forceinline__ Pack<S, V> load_pack(const S* base, int64_t i) {
  // Table addresses reach the kernel through memory, so without this the compiler cannot
  // tell they are global and issues generic LD/ST (LD.E.128) instead of LDG/STG.
  __builtin_assume(__isGlobal(base));
  check_access<Pack<S, V>>(base + i);
  return *reinterpret_cast<const Pack<S, V>*>(base + i);
}

template <int V, class S, class T>
__device__ __forceinline__ void load(const S* base, int64_t i, T (&x)[V]) {
  const Pack<S, V> p = load_pack<V>(base, i);
#pragma unroll
  for (int k = 0; k < V; ++k) x[k] = to_opmath<T>(p.v[k]);
}

/// base[i..i+V) = p as stored (bits, unconverted); alignment as for load().
template <int V, class S>
__device__ __forceinline__ void store_pack(S* base, int64_t i, const Pack<S, V>& p) {
  __builtin_assume(__isGlobal(base));
  check_access<Pack<S, V>>(base + i);
  *reinterpret_cast<Pack<S, V>*>(base + i) = p;
}

/// base[i..i+V) = x[0..V), rounded as R says; the same alignment rule as load.
template <int V, Rounding R = Rounding::kNearestEven, class S, class T>
__device__ __forceinline__ void store(S* base, int64_t i, const T (&x)[V]) {
  static_assert(R == Rounding::kNearestEven, "stochastic stores take their key: store_rounded");
  Pack<S, V> p;
#pragma unroll
  for (int k = 0; k < V; ++k) p.v[k] = from_opmath<S, R>(x[k]);
  store_pack<V>(base, i, p);
}

/// base[i..i+V) = x[0..V) of bf16 storage, rounded stochastically with the bits of elements
/// i..i+V-1 under `key` ([note: stochastic rounding] in fusedopt/dtype.h), from `stream`
/// (0: the param store; k + 1: state slot k, [note: state dtype]).
template <int V, class T>
__device__ __forceinline__ void store_stochastic(bf16* base, int64_t i, const T (&x)[V],
                                                 const RoundingKey& key, uint32_t stream = 0) {
  Pack<bf16, V> p;
#pragma unroll
  for (int k = 0; k < V; ++k)
    p.v[k] = from_opmath<bf16, Rounding::kStochastic>(x[k], rounding_bits(key, i + k, stream));
  store_pack<V>(base, i, p);
}

/// The elements per vector access for slots of these storage types (the narrowest fills 16
/// bytes; [note: vector path]).
template <class... S>
inline constexpr int kVecWidth = mt::vec_width(static_cast<int>(std::min({sizeof(S)...})));

/// This block's work item ([note: chunks]): its tensor and element range.
struct Work {
  int t;
  mt::ChunkSpan span;
};

__device__ __forceinline__ Work this_work(const Table& table) {
  const int64_t chunk = blockIdx.x;
  const int t = mt::locate_tensor(table.chunk_begin, table.n, chunk);
  return {t, mt::chunk_span(table.rows[t].numel, chunk - table.chunk_begin[t])};
}

/// Runs body.template apply<V>(i) over the block's chunk: V = W on the vector path, then
/// V = 1 for the tail (or for everything when the chunk is not 16-byte aligned).
template <int W, class Body>
__device__ __forceinline__ void for_chunk(const mt::ChunkSpan& span, bool aligned,
                                          const Body& body) {
  mt::for_each_in_chunk<W>(
      span, aligned, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x),
      [&](int64_t i) { body.template apply<W>(i); },
      [&](int64_t i) { body.template apply<1>(i); });
}

/// The device scalar *p, or `fallback` when p is null.
__device__ __forceinline__ float scalar_or(const float* p, float fallback) {
  return p ? *p : fallback;
}

/// True when the whole op must be a no-op ([note: common scalars]).
__device__ __forceinline__ bool skip_step(const float* found_inf) {
  return found_inf != nullptr && *found_inf != 0.0f;
}

// ---------------------------------------------------------------------------------------
// Deterministic block reductions: a fixed shuffle tree per warp, then warp 0 over the
// warps' results in warp order. The result (valid in thread 0) depends only on the inputs
// and blockDim, never on timing.

template <class T, class Op>
__device__ __forceinline__ T warp_reduce(T x, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = op(x, __shfl_down_sync(0xffffffffu, x, offset));
  return x;
}

template <class T, class Op>
__device__ __forceinline__ T block_reduce(T x, Op op, T identity) {
  __shared__ T partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  x = warp_reduce(x, op);
  __syncthreads();  // `partial` may still be read by a previous call
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  x = (static_cast<int>(threadIdx.x) < static_cast<int>(blockDim.x / 32)) ? partial[lane] : identity;
  if (warp == 0) x = warp_reduce(x, op);
  return x;
}

/// The largest x of the warp's 32 lanes, in every lane (every lane calls it): one REDUX
/// from sm_80 on, else (and under the host emulation) a butterfly of shuffles.
__device__ __forceinline__ uint32_t warp_max(uint32_t x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_max_sync(0xffffffffu, x);
#else
#pragma unroll
  for (int mask = 16; mask > 0; mask /= 2) {
    const uint32_t y = __shfl_xor_sync(0xffffffffu, x, mask);
    x = x > y ? x : y;
  }
  return x;
#endif
}

struct Sum {
  template <class T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct NanMax {
  template <class T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return nan_max(a, b);
  }
};

// ---------------------------------------------------------------------------------------
// Host dtype dispatch: calls f(S{}) with the storage type of a DType.

template <class F>
void dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: return f(float{});
    case DType::kBFloat16: return f(bf16{});
    case DType::kFloat16: return f(fp16{});
    case DType::kFloat64: return f(double{});
    case DType::kInt8:  // 8-bit codes: never a param, grad or float state
    case DType::kUInt8: return;
  }
}

/// The master weights of a step op's Body: none, fp32 masters, compact ones (the int16
/// remainders of bf16 params, [note: compact master] in fusedopt/_contract.py) or Kahan ones
/// (a compensation of the 16-bit param's own dtype, [note: kahan master]).
enum MasterKind : int { kNoMaster = 0, kFp32Master = 1, kCompactMaster = 2, kKahanMaster = 3 };

/// The MasterKind of a call's lists.
inline MasterKind master_kind(const StepLists& lists) {
  if (!lists.master_params.present()) return kNoMaster;
  if (lists.kahan_master) return kKahanMaster;
  return lists.compact_master ? kCompactMaster : kFp32Master;
}

/// The storage types of a step op call ([note: validated call] in launch.h): calls
/// f(P{}, G{}, std::integral_constant<MasterKind, master>{}) for param dtype P and grad
/// dtype G (P or fp32). Compact masters exist for bf16 only: two Body instantiations each;
/// Kahan masters for bf16 and fp16: four.
template <class F>
void dispatch_step_types(DType param, DType grad, MasterKind master, F&& f) {
  using None = std::integral_constant<MasterKind, kNoMaster>;
  using Fp32 = std::integral_constant<MasterKind, kFp32Master>;
  using Compact = std::integral_constant<MasterKind, kCompactMaster>;
  using Kahan = std::integral_constant<MasterKind, kKahanMaster>;
  dispatch_dtype(param, [&](auto p) {
    using P = decltype(p);
    const bool fp32_grad = grad == DType::kFloat32 && !std::is_same_v<P, float>;
    if constexpr (std::is_same_v<P, bf16>) {
      if (master == kCompactMaster) {
        return fp32_grad ? f(p, float{}, Compact{}) : f(p, p, Compact{});
      }
    }
    if constexpr (std::is_same_v<P, bf16> || std::is_same_v<P, fp16>) {
      if (master == kKahanMaster) {
        return fp32_grad ? f(p, float{}, Kahan{}) : f(p, p, Kahan{});
      }
      if (master != kNoMaster) {
        return fp32_grad ? f(p, float{}, Fp32{}) : f(p, p, Fp32{});
      }
    }
    return fp32_grad ? f(p, float{}, None{}) : f(p, p, None{});
  });
}

}  // namespace fusedopt::cuda
