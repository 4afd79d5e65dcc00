// What the step ops (adamw, lamb, lion, sgd) share: one kernel template that walks a block's
// chunk with an op's Body, the slots every step op has, and the host side of a launch.
//
// A Body<P, G, kMaster, ...> is the per-element work of one op for param storage P, grad
// storage G and master weights or not; states are fp32 with masters, else P
// (DESIGN.md §3). It is built once per block from the block's Row (the per-tensor scalars,
// derived in double by the math headers), then apply<V>(i) handles elements i..i+V-1.
#pragma once

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

/// The storage of a step op's states: fp32 with master weights, else the param's.
template <class P, bool kMasterWeights>
using StateOf = std::conditional_t<kMasterWeights, float, P>;

/// Per-call arguments every step kernel receives (by value, in kernel parameter space).
struct StepArgs {
  DeviceScalars scalars;
  const void* extra;  // an op's per-tensor device array (LAMB's sq_norms), or null
  bool master_sync;             // StepLists::master_sync ([note: master sync])
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
/// kernel argument, the same for the whole launch, so the branch never diverges.
template <int V, class P, class T, bool kMasterWeights>
__device__ __forceinline__ void load_param(const P* p, const float* master, int64_t i,
                                           T (&x)[V], bool master_sync) {
  if constexpr (kMasterWeights) {
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

template <int V, class P, class T, bool kMasterWeights>
__device__ __forceinline__ void store_param(P* p, float* master, int64_t i, const T (&x)[V]) {
  if constexpr (kMasterWeights) store<V>(master, i, x);
  store<V>(p, i, x);
}

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

}  // namespace fusedopt::cuda
