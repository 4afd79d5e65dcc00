// What the step ops (adamw, lamb, lion, sgd) share: one kernel template that walks a block's
// chunk with an op's Body, the slots every step op has, and the host side of a launch.
//
// A Body<P, G, kMasterWeights, ...> is the per-element work of one op for param storage P,
// grad storage G and its MasterKind (none, fp32, compact, Kahan); states are fp32 with masters, else P
// (DESIGN.md §3). It is built once per block from the block's Row (the per-tensor scalars,
// derived in double by the math headers), then apply<V>(i) handles elements i..i+V-1. The
// elementwise ops' Bodies derive from StepBody (below), which holds what they share.
//
// Bytes: an op file's "+ master" (4 B read, 4 B written, beside the 16-bit param read for
// [note: master sync] and written as the master's rounding) is, with compact masters, the
// 2-byte remainder read and written beside the bf16 param ([note: compact master] in
// fusedopt/_contract.py): AMP AdamW 30 -> 26 B per element without the norm pass. A Kahan
// master ([note: kahan master]) reads and writes a 2-byte compensation beside the 16-bit
// param in the same places: the same bytes as a compact one.
#pragma once

#include <stdexcept>
#include <string>
#include <utility>

#include "common.cuh"

namespace fusedopt::cuda {

// Slots of a step op's Row (each op adds its states from kState0 on).
inline constexpr int kParam = 0;
inline constexpr int kGrad = 1;
inline constexpr int kMaster = 2;
inline constexpr int kState0 = 3;
// hyper[0] is the lr of every step op (step_lr); the others are per op.
inline constexpr int kLr = 0;

/// The table slot of a step op's state list `index` (its index in the op's spec,
/// fusedopt/ops_spec.h).
constexpr int state_slot(int index) { return kState0 + index; }

// The op-specific host side of a step call, from its spec (fusedopt/ops_spec.h): the state
// slots (from kState0 on, in schema order) and the flags, each at its spec index (step_table
// points each row at its hyperparameter row). Expands in a launcher that has `host` (the
// TableBuilder from step_table), `call` and `args` (the StepArgs) in scope.
#define FUSEDOPT_FILL_STATE(name, Name, index, may_be_empty, when) \
  fill_slot(host, state_slot(index), call.name);
#define FUSEDOPT_FILL_FLAG(name, Name, index, default_value) args.flag[index] = call.name;
#define FUSEDOPT_FILL_STEP_CALL(OP)           \
  FUSEDOPT_##OP##_STATES(FUSEDOPT_FILL_STATE) \
  FUSEDOPT_##OP##_FLAGS(FUSEDOPT_FILL_FLAG)

// The host side of a step call up to its launch: `args` (the StepArgs) and `host` (its
// TableBuilder: step_table, then the op's state slots and flags), in a launcher that has
// `call` in scope.
#define FUSEDOPT_STEP_HOST(OP)                 \
  StepArgs args = step_args(call.lists);       \
  TableBuilder host = step_table(call.lists);  \
  FUSEDOPT_FILL_STEP_CALL(OP)

/// The storage of a step op's states: fp32 with master weights, else the param's.
template <class P, MasterKind kMasterWeights>
using StateOf = std::conditional_t<kMasterWeights != kNoMaster, float, P>;

/// The storage of a step op's master slot: fp32 masters, the int16 remainders of compact
/// ones ([note: compact master] in fusedopt/_contract.py), or the compensations of Kahan ones,
/// in the param's storage P ([note: kahan master]); unused without masters.
template <class P, MasterKind kMasterWeights>
using MasterOf = std::conditional_t<
    kMasterWeights == kKahanMaster, P,
    std::conditional_t<kMasterWeights == kCompactMaster, int16_t, float>>;

/// Per-call arguments every step kernel receives (by value, in kernel parameter space).
struct StepArgs {
  DeviceScalars scalars;
  const void* extra;  // an op's per-tensor device array (LAMB's sq_norms), or null
  bool master_sync;             // StepLists::master_sync ([note: master sync])
  bool stochastic_states;       // StepLists::stochastic_states ([note: state dtype])
  bool flag[spec::kMaxFlags];  // an op's per-call flags, at their spec index
};

/// The learning rate of tensor t: the lr tensor (1 or N values) when given, else its row's
/// (fusedopt::tensor_lr, math/common.h, on the device table).
__device__ __forceinline__ double step_lr(const Row& row, int t, const StepArgs& a) {
  if (a.scalars.lr) return static_cast<double>(a.scalars.lr[a.scalars.lr_numel > 1 ? t : 0]);
  return row.hyper[kLr];
}

/// True when every non-null pointer is 16-byte aligned at element `start` ([note: vector
/// path]).
template <class... S>
__device__ __forceinline__ bool aligned_all(int64_t start, const S*... ptrs) {
  return (mt::aligned16(ptrs, start, sizeof(S)) && ...);
}

/// The param value in opmath: the master's when there is one ([note: master weights] in
/// DESIGN.md §3: the param is always master.to(dtype)). With master_sync, an element whose
/// param bits differ from its rounded master's takes the param's value ([note: master sync]
/// in fusedopt/_contract.py): one more (vector) load of the 16-bit param. The flag is a
/// kernel argument, the same for the whole launch, so the branch never diverges. A compact
/// master is joined from the bf16 param and its int16 remainder ([note: compact master]), a
/// Kahan one from the param and its compensation (the param alone where their fp32 sum does
/// not round to it: a written param, [note: kahan master]); both whatever master_sync says.
template <int V, class P, class T, MasterKind kMasterWeights>
__device__ __forceinline__ void load_param(const P* p, const MasterOf<P, kMasterWeights>* master,
                                           int64_t i, T (&x)[V], bool master_sync) {
  if constexpr (kMasterWeights == kCompactMaster) {
    static_assert(std::is_same_v<P, bf16>, "compact masters are for bf16 params");
    const Pack<P, V> bits = load_pack<V>(p, i);
    const Pack<int16_t, V> remainder = load_pack<V>(master, i);
#pragma unroll
    for (int k = 0; k < V; ++k) x[k] = join_master(bits.v[k].bits, remainder.v[k]);
  } else if constexpr (kMasterWeights == kKahanMaster) {
    const Pack<P, V> bits = load_pack<V>(p, i);
    const Pack<P, V> compensation = load_pack<V>(master, i);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const T param = to_opmath<T>(bits.v[k]);
      const T sum = param + to_opmath<T>(compensation.v[k]);
      x[k] = from_opmath<P>(sum).bits == bits.v[k].bits ? sum : param;
    }
  } else if constexpr (kMasterWeights == kFp32Master) {
    load<V>(master, i, x);
    if (master_sync) {
      const Pack<P, V> bits = load_pack<V>(p, i);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (from_opmath<P>(x[k]).bits != bits.v[k].bits) x[k] = to_opmath<T>(bits.v[k]);
      }
    }
  } else {
    load<V>(p, i, x);
  }
}

/// Whether and with which key a Body's param store rounds stochastically ([note:
/// stochastic rounding] in fusedopt/dtype.h): only bf16 params without master weights, when
/// the call has an sr_key. The flag is the same for the whole launch: the branch never
/// diverges.
struct StochasticStore {
  bool enabled = false;
  RoundingKey key;
};

template <class P, MasterKind kMasterWeights>
__device__ __forceinline__ StochasticStore stochastic_store(const Row& row, const StepArgs& a) {
  if constexpr (std::is_same_v<P, bf16> && kMasterWeights == kNoMaster) {
    if (a.scalars.sr_key != nullptr) return {true, rounding_key(a.scalars.sr_key, row.index)};
  }
  return {};
}

/// Whether and with which key a Body's state stores round stochastically ([note: state
/// dtype] in fusedopt/dtype.h): bf16 states of an op with free state dtypes, when the call
/// has an sr_key (StepArgs::stochastic_states); the same for the whole launch.
template <class S>
__device__ __forceinline__ StochasticStore stochastic_states(const Row& row, const StepArgs& a) {
  if constexpr (std::is_same_v<S, bf16>) {
    if (a.stochastic_states) return {true, rounding_key(a.scalars.sr_key, row.index)};
  }
  return {};
}

template <int V, class P, class T, MasterKind kMasterWeights>
__device__ __forceinline__ void store_param(P* p, MasterOf<P, kMasterWeights>* master, int64_t i,
                                            const T (&x)[V], const StochasticStore& sr = {}) {
  if constexpr (kMasterWeights == kCompactMaster) {
    Pack<P, V> bits;
    Pack<int16_t, V> remainder;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const CompactMaster c = split_master(x[k]);
      bits.v[k].bits = c.param;
      remainder.v[k] = c.remainder;
    }
    store_pack<V>(master, i, remainder);
    store_pack<V>(p, i, bits);
  } else if constexpr (kMasterWeights == kKahanMaster) {
    Pack<P, V> bits;
    Pack<P, V> compensation;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      bits.v[k] = from_opmath<P>(x[k]);
      const T param = to_opmath<T>(bits.v[k]);
      const T diff = x[k] - param;
      P c = from_opmath<P>(diff - diff == T(0) ? diff : T(0));  // 0 for a non-finite diff
      // A tie that would round param + c off the param: c one step toward zero (c != 0).
      const bool tie = from_opmath<P>(param + to_opmath<T>(c)).bits != bits.v[k].bits;
      if (tie && (c.bits & 0x7FFFu)) c.bits = static_cast<uint16_t>(c.bits - 1u);
      compensation.v[k] = c;
    }
    store_pack<V>(master, i, compensation);
    store_pack<V>(p, i, bits);
  } else {
    if constexpr (kMasterWeights == kFp32Master) store<V>(master, i, x);
    if constexpr (std::is_same_v<P, bf16> && kMasterWeights == kNoMaster) {
      if (sr.enabled) return store_stochastic<V>(p, i, x, sr.key);
    }
    store<V>(p, i, x);
  }
}

/// What every step op's Body holds and does alike: the param, grad, state and master
/// pointers of its Row, the master_sync flag, the op's per-tensor `Scalars` (from its math
/// header), the grad load (the common scalars), the vector width, the alignment test, and
/// the loads and stores of param and grad. `kStateSlots` are the op's state slots in spec
/// order (`states[k]`). An op's Body derives from it and adds `apply<V>`:
/// load_param_and_grad, its state loads, its math per element, store_param_and_master, its
/// state stores.
///
/// The members are built in the order the hand-written Bodies used (pointers, scalars, grad
/// load last): with the grad scalars loaded before the scalars' pow() calls they stay live
/// across the calls, which cost two AdamW kernels a 24-byte stack frame and the fp64 Lion
/// one an 8-byte frame; with the state pointers loaded after the calls, AdamW's fp32 kernel
/// took 48 registers instead of 40 (nvcc 13.0, sm_90; tests/test_cuda_static.py).
///
/// `S` is the states' storage: StateOf (StepBody) unless the op declares free state dtypes
/// ([note: state dtype] in fusedopt/dtype.h: run_step_with_states).
template <class S_, class P, class G, MasterKind kMasterWeights, class Scalars,
          int... kStateSlots>
struct StepBodyOf {
  using T = Opmath<P>;
  using S = S_;
  using M = MasterOf<P, kMasterWeights>;
  static constexpr int kWidth =
      kMasterWeights != kNoMaster ? kVecWidth<P, G, S, M> : kVecWidth<P, G, S>;

  P* p;
  const G* g;
  S* states[sizeof...(kStateSlots)];
  M* master;
  bool master_sync;  // [note: master sync]
  StochasticStore sr;  // [note: stochastic rounding]
  StochasticStore sr_states;  // [note: state dtype]
  Scalars s;
  GradLoad<T> load_g;

  /// `make_scalars()` returns the op's Scalars (a lambda of the op's Body constructor).
  template <class MakeScalars>
  __device__ __forceinline__ StepBodyOf(const Row& row, const StepArgs& a, bool maximize,
                                        MakeScalars make_scalars)
      : p(static_cast<P*>(row.slot[kParam])),
        g(static_cast<const G*>(row.slot[kGrad])),
        states{static_cast<S*>(row.slot[kStateSlots])...},
        master(static_cast<M*>(row.slot[kMaster])),
        master_sync(a.master_sync),
        sr(stochastic_store<P, kMasterWeights>(row, a)),
        sr_states(stochastic_states<S>(row, a)),
        s(make_scalars()),
        load_g(make_grad_load<T>(a.scalars.grad_scale, a.scalars.clip_coef, maximize)) {}

  /// True when param, grad, every state and master are 16-byte aligned at element `start`
  /// ([note: vector path]).
  __device__ __forceinline__ bool aligned(int64_t start) const {
    return aligned_states(start, std::make_index_sequence<sizeof...(kStateSlots)>{});
  }

  /// aligned() for param, grad and master only (8-bit states' codes: quant8.cuh's own).
  __device__ __forceinline__ bool aligned_param(int64_t start) const {
    return aligned_all(start, p, g, master);
  }

  /// Elements i..i+V-1 of the param in opmath (load_param) and of the raw grad (the op
  /// applies load_grad per element).
  template <int V>
  __device__ __forceinline__ void load_param_and_grad(int64_t i, T (&pv)[V], T (&gv)[V]) const {
    load_param<V, P, T, kMasterWeights>(p, master, i, pv, master_sync);
    load<V>(g, i, gv);
  }

  template <int V>
  __device__ __forceinline__ void store_param_and_master(int64_t i, const T (&pv)[V]) const {
    store_param<V, P, T, kMasterWeights>(p, master, i, pv, sr);
  }

  /// Elements i..i+V-1 of state slot k (spec order): rounded to nearest, or stochastically
  /// with stream k + 1 of the element's Philox evaluation ([note: state dtype]).
  template <int k, int V>
  __device__ __forceinline__ void store_state(int64_t i, const T (&x)[V]) const {
    if constexpr (std::is_same_v<S, bf16>) {
      if (sr_states.enabled) return store_stochastic<V>(states[k], i, x, sr_states.key, k + 1);
    }
    store<V>(states[k], i, x);
  }

 private:
  template <std::size_t... k>
  __device__ __forceinline__ bool aligned_states(int64_t start,
                                                 std::index_sequence<k...>) const {
    return aligned_all(start, p, g, states[k]..., master);
  }
};

/// The Body base of the step ops whose states follow DESIGN.md §3's rule: fp32 with master
/// weights, else the param's storage.
template <class P, class G, MasterKind kMasterWeights, class Scalars, int... kStateSlots>
using StepBody = StepBodyOf<StateOf<P, kMasterWeights>, P, G, kMasterWeights, Scalars,
                            kStateSlots...>;

template <class Body>
__global__ void __launch_bounds__(kThreads) step_kernel(Table table, StepArgs args) {
  if (skip_step(args.scalars.found_inf)) return;
  const Work w = this_work(table);
  const Body body(table.rows[w.t], w.t, args);
  for_chunk<Body::kWidth>(w.span, body.aligned(w.span.start), body);
}

/// The StepArgs of a call: its device scalars and master_sync.
inline StepArgs step_args(const StepLists& lists) {
  StepArgs args{};
  args.scalars = lists.scalars;
  args.master_sync = lists.master_sync && lists.master_params.present();
  args.stochastic_states = lists.stochastic_states && lists.scalars.sr_key != nullptr;
  return args;
}

/// The host side of a step op: a table with the common slots, steps and the address of each
/// tensor's hyperparameter row filled in (addresses only: the table stays cached while a
/// schedule rewrites the values, [note: hyper table] in fusedopt/_contract.py).
inline TableBuilder step_table(const StepLists& lists) {
  TableBuilder table(lists.num_tensors, lists.numels);
  fill_slot(table, kParam, lists.params);
  fill_slot(table, kGrad, lists.grads);
  fill_slot(table, kMaster, lists.master_params);
  for (int i = 0; i < table.n(); ++i) {
    Row& row = table.row(i);
    row.step = lists.steps ? lists.steps[i] : nullptr;
    row.hyper = lists.hypers.row(i);
    row.index = i;
  }
  return table;
}

template <class Body>
void launch_step(const TableBuilder& host, const Table& table, const StepArgs& args,
                 cudaStream_t stream) {
  if (host.total_chunks() == 0) return;
  launch_kernel(step_kernel<Body>, chunk_grid(host.total_chunks()), kThreads, stream, table,
                args);
  check(cudaGetLastError(), "launching a step kernel");
}

/// The rest of a step op's launcher: uploads the table, advances the step counts when the op
/// keeps them (`count_steps`: its kernel reads the incremented count; `skip_if_zero`: as
/// increment_steps's) and launches Body<P, G, kMasterWeights, kVariant...> for the call's
/// storage types.
template <template <class, class, MasterKind, bool...> class Body, bool... kVariant>
void run_step(const StepLists& lists, TableBuilder& host, const StepArgs& args, bool count_steps,
              const ExecContext& ctx, int skip_if_zero = -1) {
  const cudaStream_t stream = stream_of(ctx);
  const Table table = host.upload(ctx);
  if (count_steps) increment_steps(table, lists.scalars.found_inf, stream, skip_if_zero);
  dispatch_step_types(lists.params.dtype, lists.grads.dtype, master_kind(lists),
                      [&](auto p, auto g, auto master) {
                        using OpBody = Body<decltype(p), decltype(g),
                                            decltype(master)::value, kVariant...>;
                        launch_step<OpBody>(host, table, args, stream);
                      });
}

/// [note: state dtype] on CUDA: the state storages built besides StateOf's (fp32 with
/// masters, else the param's), as the users of 16-bit or fp32 moments run them: fp32 params
/// with bf16 or fp16 states, and bf16 params with fp32, compact or Kahan masters and bf16
/// states (either grad dtype). The other storages of the op (16-bit params without masters
/// and states of another dtype, fp16 params with masters and 16-bit states, bf16 params
/// with masters and fp16 states) run on the reference, cpu and triton backends and are
/// refused here: each storage is 2 kernels per op variant; all of them took adamw.cu from 51
/// to 111 kernels (sm_90 cubin 6.26 -> 21.27 MB, nvcc 13.0), these to 67 (10.61 MB):
/// DESIGN.md §3.
template <class S, class P, MasterKind kM>
inline constexpr bool kCudaStateStorage =
    std::is_same_v<S, StateOf<P, kM>> ||
    (std::is_same_v<P, float> && (std::is_same_v<S, bf16> || std::is_same_v<S, fp16>)) ||
    (std::is_same_v<P, bf16> && kM != kNoMaster && std::is_same_v<S, bf16>);

/// The refusal of a state storage that kCudaStateStorage leaves out.
[[noreturn]] inline void refuse_state_storage(const char* op, DType state, DType param,
                                              MasterKind master) {
  throw std::invalid_argument(
      std::string("fusedopt CUDA backend: ") + op + ": " + dtype_name(state) + " states beside " +
      dtype_name(param) + " params " + (master == kNoMaster ? "without" : "with") +
      " master weights are not built for the cuda backend (built: fp32 params with bf16 or "
      "fp16 states; bf16 params with fp32, compact or Kahan masters and bf16 states; and "
      "DESIGN.md's default, fp32 with masters else the param's dtype); use backend='triton' "
      "or another state_dtype ([note: state dtype])");
}

/// Calls f(p, g, master, s) (values whose types are P, G, the MasterKind constant and S) for
/// a call of an op that declares free state dtypes ([note: state dtype] in fusedopt/dtype.h)
/// whose float states have storage `state`: S = fp32, bf16 or fp16 (fp64 params keep fp64
/// states) where kCudaStateStorage builds it; any other storage is refused with
/// std::invalid_argument, before f runs (so before a table upload or a step count moves).
template <class F>
void dispatch_step_states(const char* op, const StepLists& lists, DType state, F&& f) {
  dispatch_step_types(lists.params.dtype, lists.grads.dtype, master_kind(lists),
                      [&](auto p, auto g, auto master) {
                        // remove_cvref: g++ 12 reads decltype(p) in the nested lambda
                        // below as that of a captured reference (bf16&)
                        using P = std::remove_cvref_t<decltype(p)>;
                        constexpr MasterKind kM = decltype(master)::value;
                        auto run = [&](auto s) {
                          if constexpr (!kCudaStateStorage<decltype(s), P, kM>) {
                            refuse_state_storage(op, state, lists.params.dtype, kM);
                          } else {
                            f(p, g, master, s);
                          }
                        };
                        if constexpr (std::is_same_v<P, double>) {
                          run(double{});
                        } else if (state == DType::kBFloat16) {
                          run(bf16{});
                        } else if (state == DType::kFloat16) {
                          run(fp16{});
                        } else {
                          run(float{});
                        }
                      });
}

/// Refuses (as dispatch_step_states) a state storage the CUDA backend does not build, for an
/// op whose launcher uploads its table before it dispatches (lamb).
inline void check_state_storage(const char* op, const StepLists& lists, DType state) {
  dispatch_step_states(op, lists, state, [](auto, auto, auto, auto) {});
}

/// run_step for an op that declares free state dtypes ([note: state dtype] in
/// fusedopt/dtype.h): Body<P, G, kMasterWeights, kVariant...> where the call's state storage
/// `state` is StateOf's (the kernels run_step launches), else BodyOf<S, P, G,
/// kMasterWeights, kVariant...> for the storages dispatch_step_states builds; any other is
/// refused before the table is uploaded or a step count moves (`skip_if_zero`: as
/// run_step's). New instantiations per op and variant: 2 for fp32 params, 6 for bf16 ones
/// (3 master kinds x 2 grad dtypes).
template <template <class, class, class, MasterKind, bool...> class BodyOf,
          template <class, class, MasterKind, bool...> class Body, bool... kVariant>
void run_step_with_states(const char* op, const StepLists& lists, DType state,
                          TableBuilder& host, const StepArgs& args, bool count_steps,
                          const ExecContext& ctx, int skip_if_zero = -1) {
  const cudaStream_t stream = stream_of(ctx);
  dispatch_step_states(op, lists, state, [&](auto p, auto g, auto master, auto s) {
    using P = std::remove_cvref_t<decltype(p)>;
    using G = std::remove_cvref_t<decltype(g)>;
    using S = std::remove_cvref_t<decltype(s)>;
    constexpr MasterKind kM = std::remove_cvref_t<decltype(master)>::value;
    const Table table = host.upload(ctx);
    if (count_steps) increment_steps(table, lists.scalars.found_inf, stream, skip_if_zero);
    if constexpr (std::is_same_v<S, StateOf<P, kM>>) {
      launch_step<Body<P, G, kM, kVariant...>>(host, table, args, stream);
    } else {
      launch_step<BodyOf<S, P, G, kM, kVariant...>>(host, table, args, stream);
    }
  });
}

template <int V, class Body, class Update, std::size_t... k>
__device__ __forceinline__ void apply_every_state(const Body& body, int64_t i, Update update,
                                                  std::index_sequence<k...>) {
  using T = typename Body::T;
  T pv[V], gv[V], sv[sizeof...(k)][V];
  body.load_param_and_grad(i, pv, gv);
  (load<V>(body.states[k], i, sv[k]), ...);
#pragma unroll
  for (int e = 0; e < V; ++e) update(pv[e], load_grad(gv[e], body.load_g), sv[k][e]..., body.s);
  body.store_param_and_master(i, pv);
  (body.template store_state<k>(i, sv[k]), ...);
}

/// The apply<V> of a Body that reads and writes every state in full, element by element:
/// loads elements i..i+V-1 of the param, the grad and each state (spec order), calls
/// `update(p, g, state..., body.s)` per element (g through load_grad), stores the param and
/// then the states (StepBodyOf::store_state: the bf16 ones of an SR call of an op with free
/// state dtypes stochastically). The loads and stores come in the order the hand-written
/// applies of lion, adan and schedulefree_adamw had (the same SASS: tests/test_cuda_static.py).
template <int V, class Body, class Update>
__device__ __forceinline__ void apply_every_state(const Body& body, int64_t i, Update update) {
  constexpr std::size_t kStates = std::extent_v<decltype(Body::states)>;
  apply_every_state<V>(body, i, update, std::make_index_sequence<kStates>{});
}

/// A step op's whole launcher `void op(const Call&, const ExecContext&)`: nothing for a call
/// without tensors, else its table and StepArgs (FUSEDOPT_STEP_HOST) and run_step<Body>.
#define FUSEDOPT_STEP_LAUNCHER(op, Call, OP, Body, count_steps)    \
  void op(const Call& call, const ExecContext& ctx) {              \
    if (call.lists.num_tensors == 0) return;                       \
    FUSEDOPT_STEP_HOST(OP)                                         \
    run_step<Body>(call.lists, host, args, count_steps, ctx);      \
  }

}  // namespace fusedopt::cuda
