// The torch-free launcher interface: one plain struct per op call, and the launchers that
// take it. csrc/bindings.cpp (the only file that includes torch) validates tensors, fills
// these structs and calls fusedopt::cpu::<op> or fusedopt::cuda::<op>.
//
// For the CUDA backend (csrc/cuda/*.cu, compiled only with -DFUSEDOPT_WITH_CUDA):
//   * Implement exactly the functions declared in namespace fusedopt::cuda below, with these
//     signatures. bindings.cpp already registers every <op>_cuda_ op and calls them; nothing
//     else is needed on the binding side.
//   * Everything the binding has validated is listed under [note: validated call]; a
//     launcher may rely on it and should not re-check.
//   * Pointers: tensor data, numels-sized outputs and the device scalars (DeviceScalars,
//     GradNormCall outputs, steps) are DEVICE pointers; the arrays that hold them (the
//     `void* const*` tables, numels, dtypes, HyperTable::group) are HOST arrays that
//     live until the launcher returns. Copy what the kernel needs into device tables.
//     HyperTable::data is DEVICE memory (the caller's [G, K] table, [note: hyper table] in
//     fusedopt/_contract.py): a device table row holds the address of its tensor's row.
//   * ExecContext::stream is the current cudaStream_t (cast it back); launch on it, never
//     synchronise the host. ExecContext::workspace hands out device memory from torch's
//     caching allocator, stream-ordered on that stream, valid until the launcher returns
//     (the kernels may still be running then: the allocator orders reuse on the stream).
//   * found_inf (DeviceScalars::found_inf, read-only) non-zero means the whole op is a no-op:
//     no param, master, state or step changes. On the GPU this is read on the device.
//   * Step counts: steps[i] is a device float; add 1 (unless found_inf) and compute the bias
//     corrections from the new value in double (math/common.h: bias_correction).
//
// [note: validated call] bindings.cpp guarantees, before calling any launcher:
//   * every list has num_tensors entries, or the slot is absent (data == nullptr) where the
//     op allows it; all tensors are on one device, non-overlapping and dense, and every
//     tensor of one param shares its param's shape and strides, so element k of the memory
//     block at params.data[i] pairs with element k of grads.data[i], exp_avgs.data[i]...;
//   * numels[i] may be 0 (then the data pointer may be null) and may exceed 2^31;
//   * data pointers are aligned to their element size only (views at odd offsets happen);
//   * dtypes: params one of fp32/bf16/fp16/fp64; grads the param dtype or fp32; master_params
//     only for bf16/fp16 params: fp32, int16 (compact_master, bf16 only) or the param dtype
//     (kahan_master), one dtype per call; states fp32 with masters, else the param dtype
//     (layout "param"; a "bf16" layout state, Muon's ns_buffers, is bf16 always);
//     steps and the device scalars fp32; lr_numel is 1 or num_tensors;
//   * the hyperparameter table: width == the op's hyperparameter count, 0 <= group[i] < G.
#pragma once

#include <cstddef>
#include <cstdint>

#include "fusedopt/dtype.h"
#include "fusedopt/ops_spec.h"

namespace fusedopt {

/// One tensor slot (params, grads, exp_avgs...) of a call: a data pointer per tensor.
struct TensorSlot {
  void* const* data = nullptr;  // num_tensors pointers, or nullptr: slot absent
  DType dtype = DType::kFloat32;
  bool present() const { return data != nullptr; }
};

/// The common device scalars of a step op ([note: common scalars] in fusedopt/_contract.py).
/// Each pointer is null when the scalar is absent.
struct DeviceScalars {
  const float* lr = nullptr;  // lr_tensor: overrides the per-tensor lr when given
  int64_t lr_numel = 0;       // 1 (one lr for all) or num_tensors
  // grad_scale and clip_coef: one value of the call's opmath type (double for fp64 params,
  // else float), [note: opmath scalars] in fusedopt/_contract.py.
  const void* grad_scale = nullptr;
  const void* clip_coef = nullptr;
  const float* found_inf = nullptr;
  // sr_key: [seed, counter, id_0, ..., id_{N-1}] (int64), or null: round to nearest. With it,
  // the param store of bf16 params without master weights rounds stochastically ([note:
  // stochastic rounding] in fusedopt/dtype.h). Read only.
  const int64_t* sr_key = nullptr;
};

/// Temporary device memory for a launcher (CPU launchers use plain host memory instead).
struct Workspace {
  void* (*allocate)(void* context, size_t bytes) = nullptr;
  void* context = nullptr;
  void* get(size_t bytes) const { return allocate(context, bytes); }
};

/// Where and how a launcher runs: the same type for every backend.
struct ExecContext {
  int num_threads = 0;      // CPU: OpenMP threads (0: the OpenMP default)
  void* stream = nullptr;   // CUDA: the cudaStream_t to launch on
  Workspace workspace;      // CUDA: stream-ordered scratch memory
};

/// scale_: tensors[i] *= scale in opmath (fp64 for fp64 tensors, else fp32). Tensors may mix
/// dtypes. found_inf (may be null) is set to 1 if any input element is non-finite, never
/// cleared. Per element: reads and writes one value.
struct ScaleCall {
  int64_t num_tensors = 0;
  const int64_t* numels = nullptr;
  void* const* data = nullptr;
  const DType* dtypes = nullptr;  // per tensor
  const float* scale = nullptr;   // device scalar, required
  float* found_inf = nullptr;     // device scalar or null
};

/// grad_norm: the global L2 (or inf) norm of tensors[i] / grad_scale, accumulated in
/// out_dtype (fp64 iff every tensor is fp64, else fp32), deterministic. Tensors may mix
/// dtypes. Writes total_norm (0-d, out_dtype), per_tensor_norms (num_tensors values of
/// out_dtype, only when per_tensor) and found_inf (0-d fp32: 1 if any element is
/// non-finite, else 0). Per element: reads one value.
struct GradNormCall {
  int64_t num_tensors = 0;
  const int64_t* numels = nullptr;
  const void* const* data = nullptr;
  const DType* dtypes = nullptr;  // per tensor
  bool inf_norm = false;          // norm_type inf; else 2
  bool per_tensor = false;
  const float* grad_scale = nullptr;  // device scalar or null
  DType out_dtype = DType::kFloat32;
  void* total_norm = nullptr;         // device, 1 value of out_dtype
  void* per_tensor_norms = nullptr;   // device, num_tensors values of out_dtype (per_tensor)
  float* found_inf = nullptr;         // device, 1 fp32
};

/// The hyperparameter table of a step call ([note: hyper table] in fusedopt/_contract.py):
/// G rows of the op's hyperparameters in spec order (lr first), as doubles, `row_stride`
/// doubles apart, on the params' device; `group[i]` (a host array) is tensor i's row.
struct HyperTable {
  const double* data = nullptr;
  int64_t row_stride = 0;
  const int32_t* group = nullptr;
  /// Tensor i's row (a device address for the CUDA backend: not to be read on the host).
  const double* row(int64_t i) const { return data + group[i] * row_stride; }
};

/// The lists and scalars every step op has. `steps` holds num_tensors device floats, or is
/// null where the op has none (lion_; sgd_ without momentum).
struct StepLists {
  int64_t num_tensors = 0;
  const int64_t* numels = nullptr;
  TensorSlot params, grads, master_params;  // master_params absent: no master weights
  float* const* steps = nullptr;
  HyperTable hypers;
  DeviceScalars scalars;
  // With master_params: an element whose param bits differ from its rounded master's takes
  // the param's value as its master before the update ([note: master sync] in
  // fusedopt/_contract.py). Not under found_inf. Per element: one more read of the param.
  bool master_sync = true;
  // For an op with factored states ([note: factored layouts] in fusedopt/_contract.py):
  // 2 * num_tensors values, tensor i's (rows, cols) = its last two dims when it has two or
  // more, else (0, 0) (a vector or scalar: unfactored). Null for any other op.
  const int64_t* factor_dims = nullptr;
  // master_params holds the int16 remainders of bf16 params, not fp32 masters: the master is
  // joined from param and remainder ([note: compact master] in fusedopt/_contract.py), which
  // adopts a written param whatever master_sync says.
  bool compact_master = false;
  // master_params holds compensations of the params' own dtype (bf16/fp16): the master is
  // fp32(param) + fp32(compensation) ([note: kahan master] in fusedopt/_contract.py).
  bool kahan_master = false;
  // For an op with 8-bit states ([note: 8-bit states] in fusedopt/quant8.py), when they are
  // given: num_tensors values, tensor i's row length (its last dim; 1 for a 0-d param): its
  // quantization blocks are runs of min(256, rest of the row) elements. Null otherwise.
  const int64_t* row_lengths = nullptr;
  // [note: state dtype] (fusedopt/dtype.h): the call has an sr_key and its op declares free
  // state dtypes (spec kStateDtypes): every bf16 state store rounds stochastically too, state
  // slot k (in spec order) with stream k + 1 of the element's Philox evaluation.
  bool stochastic_states = false;
};

/// Elements per block of an 8-bit state (fusedopt/_contract.py QUANT_BLOCK).
inline constexpr int64_t kQuantBlock = 256;

// The call struct of a step op, from its spec (fusedopt/ops_spec.h, generated from
// fusedopt/_contract.py): the common lists (the hyperparameter table among them), then one
// TensorSlot per state list, one accessor per hyperparameter (`call.beta1(i)`: tensor i's
// value, read from lists.hypers on the host, so for the CPU backend only; lr: ignored where
// lists.scalars.lr is given) and one bool per flag, all in schema order and named as the
// schema names them.
#define FUSEDOPT_CALL_STATE(name, Name, index, may_be_empty, when) TensorSlot name;
#define FUSEDOPT_CALL_HYPER(name, Name, index) \
  double name(int64_t i) const { return lists.hypers.row(i)[index]; }
#define FUSEDOPT_CALL_FLAG(name, Name, index, default_value) bool name = default_value;
#define FUSEDOPT_STEP_CALL_FIELDS(OP)                 \
  StepLists lists;                                    \
  FUSEDOPT_##OP##_STATES(FUSEDOPT_CALL_STATE)         \
  FUSEDOPT_##OP##_HYPERS(FUSEDOPT_CALL_HYPER)         \
  FUSEDOPT_##OP##_FLAGS(FUSEDOPT_CALL_FLAG)

/// adamw_ (Adam with decoupled=false). max_exp_avg_sqs present iff amsgrad.
/// Per element: reads g, p, m, v (+vmax, +master); writes p, m, v (+vmax, +master).
struct AdamWCall {
  FUSEDOPT_STEP_CALL_FIELDS(ADAMW)
};

/// lamb_ (timm semantics; the global clip arrives in scalars.clip_coef).
/// Per element: pass 1 reads g, p, m, v; pass 2 reads them again and writes p, m, v.
struct LambCall {
  FUSEDOPT_STEP_CALL_FIELDS(LAMB)
};

/// lion_. lists.steps is null. Per element: reads g, p, m; writes p, m.
struct LionCall {
  FUSEDOPT_STEP_CALL_FIELDS(LION)
};

/// adan_ (the official Adan's conventions; neg_pre_grads hold -g of the previous step).
/// Per element: reads g, p, m, v, n, neg_pre_grad (+master); writes them all.
struct AdanCall {
  FUSEDOPT_STEP_CALL_FIELDS(ADAN)
};

/// schedulefree_adamw_ (the schedulefree package's AdamWScheduleFree; params hold y, zs hold
/// z; no step counts: ckp1 and bias_correction2 are hyperparameter columns from the host).
/// Per element: reads g, y, z, v (+master); writes y, z, v (+master).
struct ScheduleFreeAdamWCall {
  FUSEDOPT_STEP_CALL_FIELDS(SCHEDULEFREEADAMW)
};

/// sgd_. momentum_buffers and lists.steps are both present or both absent (no momentum).
/// A param whose step count is 0 before this step takes buf = g.
/// Per element: reads g, p (+buf); writes p (+buf).
struct SgdCall {
  FUSEDOPT_STEP_CALL_FIELDS(SGD)
};

/// adafactor_ (torch.optim.Adafactor). A param with two or more dims (lists.factor_dims:
/// rows, cols) has row_vars[i] (rows of every batch, contiguous) and col_vars[i] (cols of
/// every batch, contiguous) and an empty variances[i]; any other has variances[i] (its
/// layout) and empty row_vars[i], col_vars[i] ([note: factored layouts]). Per element, fp32:
/// pass 1 reads g, p (+ the variance, read and written, of a vector), pass 2 reads g of a
/// factored param, pass 3 reads g, p and writes p ([note: adafactor passes]).
struct AdafactorCall {
  FUSEDOPT_STEP_CALL_FIELDS(ADAFACTOR)
};

// The passes of a two-pass step op as ops of their own ([note: multi-pass ops] in DESIGN.md
// §2), so that a caller can act between them (sharded LAMB all-reduces the per-tensor sums).
// The first pass advances the steps and writes sq_norms: 2 * num_tensors values of the
// opmath type, pre-zeroed by the caller, sum p^2 and sum u^2 of each tensor in a fixed
// order; the last reads them and the advanced steps and writes the params. The step op
// (lamb(call), adafactor(call)) is the two.
template <class StepCall>
struct FirstPassCall {
  StepCall step;
  void* sq_norms = nullptr;  // device
};

template <class StepCall>
struct LastPassCall {
  StepCall step;
  const void* sq_norms = nullptr;  // device, 2 * num_tensors values of the opmath type
};

/// lamb_direction_: the sums of each tensor that adapts (0 for the others) and, for
/// two-pass tensors, m and v (math/lamb.h [note: lamb passes] says which pass reads and
/// writes what). Per element: reads g, p, m, v.
using LambDirectionCall = FirstPassCall<LambCall>;
/// lamb_apply_: trust ratios from sq_norms, then p -= lr * ratio * u. Per element: reads p,
/// m, v (+g for one-pass tensors); writes p (+m, v).
using LambApplyCall = LastPassCall<LambCall>;
/// adafactor_norms_ (passes 1 and 2): updates the second moments too.
using AdafactorNormsCall = FirstPassCall<AdafactorCall>;
/// adafactor_apply_ (pass 3).
using AdafactorApplyCall = LastPassCall<AdafactorCall>;

/// muon_ (torch.optim.Muon on 2-D params): its passes only, since torch runs the Newton-Schulz
/// GEMMs between them ([note: muon passes] in fusedopt/optim/muon.py; the step op muon_ is
/// the passes around the iteration, composed in Python for every backend: not in
/// FUSEDOPT_STEP_OPS). ns_buffers are bf16 whatever the param dtype; no step counts; the ns_*
/// hyperparameters are read on the host by the iteration, not by the passes.
/// muon_momentum_: buf = lerp(buf, g, 1 - momentum); ns = bf16(lerp(g, buf, momentum)) with
/// nesterov, else bf16(buf). Per element: reads g, buf; writes buf, ns (no param).
/// muon_apply_: p = fma(-(lr*lr_ratio), ns, p*(1 - lr*wd)). Per element: reads p (+master),
/// ns; writes p (+master). Both do nothing under found_inf.
struct MuonCall {
  FUSEDOPT_STEP_CALL_FIELDS(MUON)
};

/// The launchers: scale, grad_norm, one per step op (adamw, lamb...) and one per pass of a
/// multi-pass op, in each backend.
#define FUSEDOPT_DECLARE_LAUNCHER(op, OP, Stem) \
  void op(const Stem##Call& call, const ExecContext& ctx);
#define FUSEDOPT_DECLARE_LAUNCHERS                                                    \
  void scale(const ScaleCall& call, const ExecContext& ctx);                          \
  void grad_norm(const GradNormCall& call, const ExecContext& ctx);                   \
  FUSEDOPT_STEP_OPS(FUSEDOPT_DECLARE_LAUNCHER)                                        \
  void lamb_direction(const LambDirectionCall& call, const ExecContext& ctx);         \
  void lamb_apply(const LambApplyCall& call, const ExecContext& ctx);                 \
  void adafactor_norms(const AdafactorNormsCall& call, const ExecContext& ctx);       \
  void adafactor_apply(const AdafactorApplyCall& call, const ExecContext& ctx);       \
  void muon_momentum(const MuonCall& call, const ExecContext& ctx);                   \
  void muon_apply(const MuonCall& call, const ExecContext& ctx);

namespace cpu {
FUSEDOPT_DECLARE_LAUNCHERS
}  // namespace cpu

namespace cuda {
FUSEDOPT_DECLARE_LAUNCHERS
}  // namespace cuda

}  // namespace fusedopt
