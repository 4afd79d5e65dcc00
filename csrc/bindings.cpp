// THE binding file: the only file of fusedopt._C that includes torch.
//
// It implements the ops whose schemas fusedopt/_contract.py defines (TORCH_LIBRARY_IMPL only:
// no schema lives in C++) for the CPU dispatch key, and for the CUDA key when compiled with
// FUSEDOPT_WITH_CUDA. Each op has one templated implementation: it validates every input
// (dtypes, devices, shapes, dense layouts, list lengths), raising an error that names the
// tensor ("adamw_cpu_: grads[3] ...") before any tensor is touched, then fills the torch-free
// call struct of fusedopt/launch.h and calls the backend's launcher.
// Not <torch/extension.h>: it pulls in pybind11 and torch's whole C++ frontend, and this
// file, the one translation unit that includes torch, bounds the build's wall time on any
// number of cores. With the headers below it compiles in 21 s of CPU instead of 52 s
// (g++ 12, -O3, this 2-core VM).
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cmath>
#include <deque>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <tuple>
#include <vector>

#include "fusedopt/launch.h"

#ifdef FUSEDOPT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace fusedopt {
namespace {

using at::Tensor;
using at::TensorList;
using OptTensor = std::optional<Tensor>;

// ---------------------------------------------------------------------------------------
// Backends: the launchers and the execution context of each dispatch key.

/// Owns the scratch tensors a launcher asks for; they live until the op returns (CUDA's
/// caching allocator orders their reuse on the stream, so pending kernels stay safe).
struct Scratch {
  c10::Device device;
  std::vector<Tensor> tensors;
  static void* allocate(void* self, size_t bytes) {
    auto* scratch = static_cast<Scratch*>(self);
    const auto options = at::TensorOptions().dtype(at::kByte).device(scratch->device);
    scratch->tensors.push_back(at::empty({static_cast<int64_t>(bytes)}, options));
    return scratch->tensors.back().data_ptr();
  }
};

// lamb_'s two passes (lamb_direction_, lamb_apply_), in every backend.
#define FUSEDOPT_LAMB_PASS_LAUNCHERS(ns)                                                   \
  static void lamb_direction(const LambDirectionCall& c, const ExecContext& x) {           \
    ns::lamb_direction(c, x);                                                              \
  }                                                                                        \
  static void lamb_apply(const LambApplyCall& c, const ExecContext& x) { ns::lamb_apply(c, x); }

// muon_'s two passes (muon_momentum_, muon_apply_), in every backend.
#define FUSEDOPT_MUON_PASS_LAUNCHERS(ns)                                                    \
  static void muon_momentum(const MuonCall& c, const ExecContext& x) {                      \
    ns::muon_momentum(c, x);                                                                \
  }                                                                                         \
  static void muon_apply(const MuonCall& c, const ExecContext& x) { ns::muon_apply(c, x); }

struct CpuBackend {
  static constexpr const char* kName = "cpu";
  static constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;
  static ExecContext context(c10::Device, Scratch& scratch) {
    ExecContext ctx;
    ctx.num_threads = at::get_num_threads();  // torch.set_num_threads applies to fusedopt too
    ctx.workspace = {&Scratch::allocate, &scratch};
    return ctx;
  }
  static void scale(const ScaleCall& c, const ExecContext& x) { cpu::scale(c, x); }
  static void grad_norm(const GradNormCall& c, const ExecContext& x) { cpu::grad_norm(c, x); }
#define FUSEDOPT_CPU_LAUNCHER(op, OP, Stem) \
  static void op(const Stem##Call& c, const ExecContext& x) { cpu::op(c, x); }
  FUSEDOPT_STEP_OPS(FUSEDOPT_CPU_LAUNCHER)
  FUSEDOPT_LAMB_PASS_LAUNCHERS(cpu)
  FUSEDOPT_MUON_PASS_LAUNCHERS(cpu)
};

#ifdef FUSEDOPT_WITH_CUDA
struct CudaBackend {
  static constexpr const char* kName = "cuda";
  static constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;
  static ExecContext context(c10::Device device, Scratch& scratch) {
    ExecContext ctx;
    ctx.stream = static_cast<void*>(at::cuda::getCurrentCUDAStream(device.index()).stream());
    ctx.workspace = {&Scratch::allocate, &scratch};
    return ctx;
  }
  static void scale(const ScaleCall& c, const ExecContext& x) { cuda::scale(c, x); }
  static void grad_norm(const GradNormCall& c, const ExecContext& x) { cuda::grad_norm(c, x); }
#define FUSEDOPT_CUDA_LAUNCHER(op, OP, Stem) \
  static void op(const Stem##Call& c, const ExecContext& x) { cuda::op(c, x); }
  FUSEDOPT_STEP_OPS(FUSEDOPT_CUDA_LAUNCHER)
  FUSEDOPT_LAMB_PASS_LAUNCHERS(cuda)
  FUSEDOPT_MUON_PASS_LAUNCHERS(cuda)
};
#endif

// ---------------------------------------------------------------------------------------
// Validation.

/// Where a tensor sits in a call's lists (`grads[3]`), printed only into an error message.
/// The checks run on every tensor of every step: a name formatted up front was one string
/// allocation per tensor (~4 per param) when all is well (issue #14 item 5; [note: cached
/// plan] in fusedopt/optim/_plan.py). TORCH_CHECK formats its message only when it fails.
struct Indexed {
  const char* list;
  size_t index;
};

std::ostream& operator<<(std::ostream& out, const Indexed& where) {
  return out << where.list << "[" << where.index << "]";
}

std::optional<DType> to_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    case at::kDouble: return DType::kFloat64;
    default: return std::nullopt;
  }
}

/// The checks of one op call: every message starts with the op's registered name.
class Checker {
 public:
  Checker(std::string op, c10::DeviceType device_type) : op_(std::move(op)), type_(device_type) {}

  const std::string& op() const { return op_; }

  /// A tensor of a list: defined, on this backend's device type, dense, supported dtype.
  DType tensor(const Tensor& t, const Indexed& where) const {
    TORCH_CHECK(t.defined(), op_, ": ", where, " is an undefined tensor");
    TORCH_CHECK(t.device().type() == type_, op_, ": ", where, " is on ", t.device(), "; ", op_,
                " takes ", c10::DeviceTypeName(type_, true), " tensors");
    TORCH_CHECK(t.layout() == at::kStrided, op_, ": ", where, " is sparse (", t.layout(),
                "); only dense tensors are supported");
    const auto d = to_dtype(t.scalar_type());
    TORCH_CHECK_TYPE(d.has_value(), op_, ": ", where, " has unsupported dtype ", t.scalar_type(),
                     " (supported: float32, bfloat16, float16, float64)");
    TORCH_CHECK(t.is_non_overlapping_and_dense(), op_, ": ", where, " is not dense (shape ",
                t.sizes(), ", strides ", t.strides(),
                "); fused kernels need non-overlapping, dense memory: pass .contiguous() tensors");
    return *d;
  }

  /// A tensor paired element for element with `param`: same device, shape and strides.
  void like(const Tensor& t, const Tensor& param, const Indexed& where) const {
    TORCH_CHECK(t.device() == param.device(), op_, ": ", where, " is on ", t.device(),
                " but its param is on ", param.device());
    TORCH_CHECK(t.sizes() == param.sizes(), op_, ": ", where, " has shape ", t.sizes(),
                " but its param has ", param.sizes());
    bool same_layout = true;
    for (int64_t d = 0; d < t.dim(); ++d)
      same_layout &= t.size(d) == 1 || t.stride(d) == param.stride(d);
    TORCH_CHECK(same_layout, op_, ": ", where, " has strides ", t.strides(), " but its param has ",
                param.strides(), "; both must share one memory layout");
  }

  /// A device scalar: one fp32 element (fp32 or fp64 with allow_fp64) on `device` (absent
  /// is fine).
  template <class Name>
  void scalar(const OptTensor& t, const Name& name, c10::Device device,
              bool allow_fp64 = false) const {
    if (!t.has_value()) return;
    TORCH_CHECK(t->defined(), op_, ": ", name, " is an undefined tensor");
    const bool dtype_ok =
        t->scalar_type() == at::kFloat || (allow_fp64 && t->scalar_type() == at::kDouble);
    TORCH_CHECK_TYPE(t->numel() == 1 && dtype_ok, op_, ": ", name, " must be a one-element ",
                     allow_fp64 ? "float32 or float64" : "float32", " tensor, got shape ",
                     t->sizes(), " and dtype ", t->scalar_type());
    TORCH_CHECK(t->device() == device, op_, ": ", name, " is on ", t->device(),
                " but the tensors are on ", device);
  }

  void length(const char* name, size_t got, size_t n, bool may_be_empty) const {
    TORCH_CHECK_VALUE(got == n || (may_be_empty && got == 0), op_, ": ", name, " has ", got,
                      " entries but params has ", n, " (expected ", n,
                      may_be_empty ? " or 0)" : ")");
  }

 private:
  std::string op_;
  c10::DeviceType type_;
};

/// A tensor list turned into a TensorSlot (the pointer table lives here).
struct SlotTable {
  std::vector<void*> pointers;
  DType dtype = DType::kFloat32;
  TensorSlot slot() const {
    TensorSlot s;
    s.data = pointers.empty() ? nullptr : pointers.data();
    s.dtype = dtype;
    return s;
  }
};

/// Validates and converts the lists and scalars every step op has (params, grads,
/// master_params, steps, the common device scalars) and the op's state lists.
class StepArguments {
 public:
  StepArguments(const Checker& check, TensorList params, TensorList grads,
                TensorList master_params, TensorList steps, bool steps_optional,
                const OptTensor& lr_tensor, const OptTensor& grad_scale,
                const OptTensor& clip_coef, const OptTensor& found_inf, bool master_sync)
      : check_(check), params_(params), n_(params.size()) {
    check.length("grads", grads.size(), n_, false);
    check.length("master_params", master_params.size(), n_, true);
    check.length("steps", steps.size(), n_, steps_optional);
    if (n_ == 0) return;
    device_ = params[0].device();
    param_dtype_ = check.tensor(params[0], Indexed{"params", 0});
    grad_dtype_ = check.tensor(grads[0], Indexed{"grads", 0});
    const bool masters = !master_params.empty();
    for (size_t i = 0; i < n_; ++i) {
      const Indexed p_name{"params", i};
      const DType pd = check.tensor(params[i], p_name);
      TORCH_CHECK(params[i].device() == device_, check.op(), ": ", p_name, " is on ",
                  params[i].device(), " but params[0] is on ", device_,
                  "; one call takes tensors on one device");
      TORCH_CHECK_TYPE(pd == param_dtype_, check.op(), ": ", p_name, " has dtype ",
                       params[i].scalar_type(), " but params[0] has ", params[0].scalar_type(),
                       "; one call takes one param dtype");
      const Indexed g_name{"grads", i};
      const DType gd = check.tensor(grads[i], g_name);
      check.like(grads[i], params[i], g_name);
      TORCH_CHECK_TYPE(gd == param_dtype_ || gd == DType::kFloat32, check.op(), ": ", g_name,
                       " has dtype ", grads[i].scalar_type(), "; expected ",
                       params[i].scalar_type(), " (the param's) or float32");
      TORCH_CHECK_TYPE(gd == grad_dtype_, check.op(), ": ", g_name, " has dtype ",
                       grads[i].scalar_type(), " but grads[0] has ", grads[0].scalar_type(),
                       "; one call takes one grad dtype");
      if (masters) {
        const Indexed m_name{"master_params", i};
        TORCH_CHECK_TYPE(pd == DType::kBFloat16 || pd == DType::kFloat16, check.op(), ": ",
                         m_name, " given for a ", params[i].scalar_type(),
                         " param; master weights are for bfloat16/float16 params");
        const DType md = check.tensor(master_params[i], m_name);
        check.like(master_params[i], params[i], m_name);
        TORCH_CHECK_TYPE(md == DType::kFloat32, check.op(), ": ", m_name, " has dtype ",
                         master_params[i].scalar_type(), ", expected float32");
      }
      if (!steps.empty()) {
        const Indexed s_name{"steps", i};
        check.tensor(steps[i], s_name);
        check.scalar(steps[i], s_name, device_);
      }
    }
    state_dtype_ = masters ? DType::kFloat32 : param_dtype_;
    const bool fp64 = param_dtype_ == DType::kFloat64;
    check.scalar(grad_scale, "grad_scale", device_, fp64);
    check.scalar(clip_coef, "clip_coef", device_, fp64);
    check.scalar(found_inf, "found_inf", device_);
    if (lr_tensor.has_value()) {
      const Tensor& lr = *lr_tensor;
      TORCH_CHECK_TYPE(lr.defined() && lr.scalar_type() == at::kFloat && lr.dim() <= 1 &&
                           (lr.numel() == 1 || lr.numel() == static_cast<int64_t>(n_)),
                       check.op(), ": lr_tensor must be float32, 0-d or of length ", n_,
                       "; got shape ", lr.sizes(), " and dtype ", lr.scalar_type());
      TORCH_CHECK(lr.device() == device_, check.op(), ": lr_tensor is on ", lr.device(),
                  " but the params are on ", device_);
    }

    params_table_ = table(params, param_dtype_);
    grads_table_ = table(grads, grad_dtype_);
    masters_table_ = table(master_params, DType::kFloat32);
    for (const Tensor& s : steps) steps_.push_back(s.data_ptr<float>());
    numels_.reserve(n_);
    for (const Tensor& p : params) numels_.push_back(p.numel());
    lists_.num_tensors = static_cast<int64_t>(n_);
    lists_.numels = numels_.data();
    lists_.params = params_table_.slot();
    lists_.grads = grads_table_.slot();
    lists_.master_params = masters_table_.slot();
    lists_.steps = steps_.empty() ? nullptr : steps_.data();
    lists_.master_sync = master_sync;
    if (lr_tensor.has_value()) {
      lists_.scalars.lr = lr_tensor->data_ptr<float>();
      lists_.scalars.lr_numel = lr_tensor->numel();
    }
    // [note: opmath scalars] in fusedopt/_contract.py: the kernels read them in opmath.
    const auto opmath = fp64 ? at::kDouble : at::kFloat;
    if (grad_scale) grad_scale_ = grad_scale->to(opmath);
    if (clip_coef) clip_coef_ = clip_coef->to(opmath);
    lists_.scalars.grad_scale = grad_scale ? grad_scale_.const_data_ptr() : nullptr;
    lists_.scalars.clip_coef = clip_coef ? clip_coef_.const_data_ptr() : nullptr;
    lists_.scalars.found_inf = found_inf ? found_inf->data_ptr<float>() : nullptr;
  }

  size_t size() const { return n_; }
  c10::Device device() const { return device_; }
  const StepLists& lists() const { return lists_; }

  /// A per-param state list (exp_avgs...): fp32 with master weights, else the param dtype
  /// (layout "param"); `fixed` names the dtype of a list whose layout fixes it (Muon's
  /// ns_buffers: "bf16").
  TensorSlot state(const char* name, TensorList states, bool may_be_empty,
                   std::optional<DType> fixed = std::nullopt) {
    check_.length(name, states.size(), n_, may_be_empty);
    const DType expected = fixed.value_or(state_dtype_);
    for (size_t i = 0; i < states.size(); ++i) {
      const Indexed where{name, i};
      const DType d = check_.tensor(states[i], where);
      check_.like(states[i], params_[i], where);
      TORCH_CHECK_TYPE(d == expected, check_.op(), ": ", where, " has dtype ",
                       states[i].scalar_type(), ", expected ", dtype_name(expected));
    }
    states_.push_back(table(states, expected));
    return states_.back().slot();
  }

  /// Checks the hyperparameter table ([note: hyper table] in fusedopt/_contract.py: float64
  /// [G, width] on the params' device, G group sizes summing to N) and points the call at
  /// it; tensor i's row index is expanded here, N ints in C++, not in the dispatcher.
  void hypers(const Tensor& table, c10::IntArrayRef group_sizes, int64_t width) {
    TORCH_CHECK_TYPE(table.defined() && table.scalar_type() == at::kDouble && table.dim() == 2 &&
                         table.size(1) == width && table.stride(1) == 1,
                     check_.op(), ": hypers must be a float64 [G, ", width,
                     "] table with unit column stride, got shape ", table.sizes(),
                     " and dtype ", table.scalar_type());
    TORCH_CHECK(n_ == 0 || table.device() == device_, check_.op(), ": hypers is on ",
                table.device(), " but the params are on ", device_);
    TORCH_CHECK_VALUE(static_cast<int64_t>(group_sizes.size()) == table.size(0), check_.op(),
                      ": group_sizes has ", group_sizes.size(), " entries for the ",
                      table.size(0), " rows of hypers");
    group_.clear();
    group_.reserve(n_);
    for (size_t g = 0; g < group_sizes.size(); ++g) {
      TORCH_CHECK_VALUE(group_sizes[g] >= 0 && group_.size() + group_sizes[g] <= n_, check_.op(),
                        ": group_sizes ", group_sizes, " must be counts >= 0 summing to ", n_);
      group_.insert(group_.end(), group_sizes[g], static_cast<int32_t>(g));
    }
    TORCH_CHECK_VALUE(group_.size() == n_, check_.op(), ": group_sizes ", group_sizes,
                      " must be counts >= 0 summing to ", n_);
    lists_.hypers.data = table.const_data_ptr<double>();
    lists_.hypers.row_stride = table.stride(0);
    lists_.hypers.group = group_.data();
  }

 private:
  static SlotTable table(TensorList list, DType dtype) {
    SlotTable t;
    t.dtype = dtype;
    for (const Tensor& x : list) t.pointers.push_back(x.data_ptr());
    return t;
  }

  const Checker& check_;
  TensorList params_;
  size_t n_;
  c10::Device device_{c10::DeviceType::CPU};
  DType param_dtype_ = DType::kFloat32, grad_dtype_ = DType::kFloat32,
        state_dtype_ = DType::kFloat32;
  SlotTable params_table_, grads_table_, masters_table_;
  std::deque<SlotTable> states_;  // deque: slots handed out keep pointing at live tables
  std::vector<float*> steps_;
  std::vector<int64_t> numels_;
  std::vector<int32_t> group_;  // tensor i's row of the hyperparameter table
  Tensor grad_scale_, clip_coef_;  // in opmath, alive for the call
  StepLists lists_;
};

template <class B>
std::string op_name(const char* op) {
  return std::string(op) + "_" + B::kName + "_";
}

/// Runs a launcher on the device of the call, with the backend's execution context.
template <class B, class Call, class Launcher>
void launch(c10::Device device, const Call& call, Launcher launcher) {
  const c10::DeviceGuard guard(device);
  Scratch scratch{device, {}};
  launcher(call, B::context(device, scratch));
}

// ---------------------------------------------------------------------------------------
// The ops, in the order of fusedopt/_contract.py.

/// A list whose tensors may mix dtypes (scale_, grad_norm): pointers, numels and dtypes.
struct MixedList {
  std::vector<void*> data;
  std::vector<int64_t> numels;
  std::vector<DType> dtypes;
  c10::Device device{c10::DeviceType::CPU};

  MixedList(const Checker& check, TensorList tensors) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      const Indexed where{"tensors", i};
      dtypes.push_back(check.tensor(tensors[i], where));
      if (i == 0) device = tensors[0].device();
      TORCH_CHECK(tensors[i].device() == device, check.op(), ": ", where, " is on ",
                  tensors[i].device(), " but tensors[0] is on ", device,
                  "; one call takes tensors on one device");
      data.push_back(tensors[i].data_ptr());
      numels.push_back(tensors[i].numel());
    }
  }
};

template <class B>
void scale_impl(TensorList tensors, const Tensor& scale, const OptTensor& found_inf) {
  const Checker check(op_name<B>("scale"), B::kDeviceType);
  const MixedList list(check, tensors);
  if (tensors.empty()) return;
  check.scalar(scale, "scale", list.device);
  check.scalar(found_inf, "found_inf", list.device);
  ScaleCall call;
  call.num_tensors = static_cast<int64_t>(tensors.size());
  call.numels = list.numels.data();
  call.data = list.data.data();
  call.dtypes = list.dtypes.data();
  call.scale = scale.data_ptr<float>();
  call.found_inf = found_inf ? found_inf->data_ptr<float>() : nullptr;
  launch<B>(list.device, call, B::scale);
}

template <class B>
std::tuple<Tensor, Tensor, Tensor> grad_norm_impl(TensorList tensors, double norm_type,
                                                  bool per_tensor, const OptTensor& grad_scale) {
  const Checker check("grad_norm_" + std::string(B::kName), B::kDeviceType);
  TORCH_CHECK_VALUE(norm_type == 2.0 || (std::isinf(norm_type) && norm_type > 0), check.op(),
                    ": norm_type must be 2.0 or inf, got ", norm_type);
  const MixedList list(check, tensors);
  const c10::Device device =
      tensors.empty() && grad_scale ? grad_scale->device() : list.device;
  check.scalar(grad_scale, "grad_scale", device);
  bool all_fp64 = !tensors.empty();
  for (DType d : list.dtypes) all_fp64 &= d == DType::kFloat64;
  const auto out_type = all_fp64 ? at::kDouble : at::kFloat;
  const auto options = at::TensorOptions().device(device);
  const int64_t n = static_cast<int64_t>(tensors.size());
  Tensor total = at::zeros({}, options.dtype(out_type));
  Tensor per = at::zeros({per_tensor ? n : 0}, options.dtype(out_type));
  Tensor found_inf = at::zeros({}, options.dtype(at::kFloat));
  if (tensors.empty()) return {total, per, found_inf};
  GradNormCall call;
  call.num_tensors = n;
  call.numels = list.numels.data();
  call.data = list.data.data();
  call.dtypes = list.dtypes.data();
  call.inf_norm = std::isinf(norm_type);
  call.per_tensor = per_tensor;
  call.grad_scale = grad_scale ? grad_scale->data_ptr<float>() : nullptr;
  call.out_dtype = all_fp64 ? DType::kFloat64 : DType::kFloat32;
  call.total_norm = total.data_ptr();
  call.per_tensor_norms = per_tensor ? per.data_ptr() : nullptr;
  call.found_inf = found_inf.data_ptr<float>();
  launch<B>(device, call, B::grad_norm);
  return {total, per, found_inf};
}

/// The steps argument of an op without step counts (lion_): none.
TensorList steps_or_none() { return {}; }
TensorList steps_or_none(TensorList steps) { return steps; }

// The step ops: one implementation per op, written once below from the op's spec
// (fusedopt/ops_spec.h, generated from fusedopt/_contract.py): the parameters in schema
// order (the common flags, master_sync, last: StepArguments takes them), then the checks of
// StepArguments, each state list (a list that a flag switches on,
// amsgrad's, must be empty while the flag is off), the hyperparameter table, and the flags.
#define FUSEDOPT_STATE_PARAM(name, ...) TensorList name,
#define FUSEDOPT_FLAG_PARAM(name, ...) bool name,
#define FUSEDOPT_STEPS_PARAM(name) TensorList name,
#define FUSEDOPT_NAME(name) name
#define FUSEDOPT_TRAILING_FLAG_PARAM(name, ...) , bool name
#define FUSEDOPT_TRAILING_NAME(name, ...) , name
#define FUSEDOPT_SET_STATE(name, Name, index, may_be_empty, when)                               \
  if (when) {                                                                                   \
    call.name = args.state(#name, name, may_be_empty);                                          \
  } else {                                                                                      \
    TORCH_CHECK_VALUE(name.empty(), check.op(), ": " #name " has ", name.size(),                \
                      " entries but " #when " is False (expected 0)");                          \
  }
#define FUSEDOPT_CHECK_STEPS_WITH(name)                                                         \
  TORCH_CHECK_VALUE(name.empty() == steps.empty(), check.op(), ": " #name " has ", name.size(), \
                    " entries and steps has ", steps.size(), "; pass both or neither");
#define FUSEDOPT_SET_FLAG(name, ...) call.name = name;
#define FUSEDOPT_STEP_IMPL(op, OP, Stem)                                                        \
  template <class B>                                                                            \
  void op##_impl(TensorList params, TensorList grads,                                           \
                 FUSEDOPT_##OP##_STATES(FUSEDOPT_STATE_PARAM) TensorList master_params,         \
                 FUSEDOPT_##OP##_STEPS(FUSEDOPT_STEPS_PARAM) const Tensor& hypers,              \
                 c10::IntArrayRef group_sizes,                                                  \
                 FUSEDOPT_##OP##_FLAGS(FUSEDOPT_FLAG_PARAM) const OptTensor& lr_tensor,         \
                 const OptTensor& grad_scale, const OptTensor& clip_coef,                       \
                 const OptTensor& found_inf FUSEDOPT_COMMON_FLAGS(FUSEDOPT_TRAILING_FLAG_PARAM)) { \
    const Checker check(op_name<B>(#op), B::kDeviceType);                                       \
    StepArguments args(check, params, grads, master_params,                                     \
                       steps_or_none(FUSEDOPT_##OP##_STEPS(FUSEDOPT_NAME)),                     \
                       FUSEDOPT_##OP##_STEPS_OPTIONAL, lr_tensor, grad_scale, clip_coef,        \
                       found_inf FUSEDOPT_COMMON_FLAGS(FUSEDOPT_TRAILING_NAME));                \
    Stem##Call call;                                                                            \
    FUSEDOPT_##OP##_STATES(FUSEDOPT_SET_STATE)                                                  \
    FUSEDOPT_##OP##_STEPS_WITH(FUSEDOPT_CHECK_STEPS_WITH)                                       \
    args.hypers(hypers, group_sizes, spec::op::kNumHypers);                                     \
    if (args.size() == 0) return;                                                               \
    call.lists = args.lists();                                                                  \
    FUSEDOPT_##OP##_FLAGS(FUSEDOPT_SET_FLAG)                                                    \
    launch<B>(args.device(), call, B::op);                                                      \
  }
FUSEDOPT_STEP_OPS(FUSEDOPT_STEP_IMPL)

// lamb_'s two passes (fusedopt/_contract.py PHASE_OPS): lamb_'s arguments, checked as
// lamb_impl checks them, with sq_norms after the flags (lamb_apply_) or returned
// (lamb_direction_): [N, 2] in the params' opmath, on their device.
#define FUSEDOPT_ARG_NAME(name, ...) name,
#define FUSEDOPT_LAMB_PASS_PARAMS                                                   \
  TensorList params, TensorList grads, FUSEDOPT_LAMB_STATES(FUSEDOPT_STATE_PARAM)  \
      TensorList master_params, TensorList steps, const Tensor &hypers,            \
      c10::IntArrayRef group_sizes, FUSEDOPT_LAMB_FLAGS(FUSEDOPT_FLAG_PARAM)
#define FUSEDOPT_LAMB_PASS_SCALARS                                                         \
  const OptTensor &lr_tensor, const OptTensor &grad_scale, const OptTensor &clip_coef,    \
      const OptTensor &found_inf, bool master_sync
#define FUSEDOPT_LAMB_PASS_ARGS                                                            \
  params, grads, FUSEDOPT_LAMB_STATES(FUSEDOPT_ARG_NAME) master_params, steps, hypers, \
      group_sizes, FUSEDOPT_LAMB_FLAGS(FUSEDOPT_ARG_NAME) lr_tensor, grad_scale, clip_coef, \
      found_inf, master_sync

/// Checks a lamb pass's lamb_ arguments and calls run(call, device) (not for an empty call).
template <class Run>
void with_lamb_call(const Checker& check, FUSEDOPT_LAMB_PASS_PARAMS FUSEDOPT_LAMB_PASS_SCALARS,
                    Run run) {
  StepArguments args(check, params, grads, master_params, steps, false, lr_tensor, grad_scale,
                     clip_coef, found_inf, master_sync);
  LambCall call;
  FUSEDOPT_LAMB_STATES(FUSEDOPT_SET_STATE)
  args.hypers(hypers, group_sizes, spec::lamb::kNumHypers);
  if (args.size() == 0) return;
  call.lists = args.lists();
  FUSEDOPT_LAMB_FLAGS(FUSEDOPT_SET_FLAG)
  run(call, args.device());
}

at::ScalarType lamb_opmath(TensorList params) {
  return !params.empty() && params[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

template <class B>
Tensor lamb_direction_impl(FUSEDOPT_LAMB_PASS_PARAMS FUSEDOPT_LAMB_PASS_SCALARS) {
  const Checker check(op_name<B>("lamb_direction"), B::kDeviceType);
  const auto options = at::TensorOptions().dtype(lamb_opmath(params));
  Tensor sq_norms = at::zeros({0, 2}, options);
  with_lamb_call(check, FUSEDOPT_LAMB_PASS_ARGS, [&](const LambCall& call, c10::Device device) {
    sq_norms = at::zeros({call.lists.num_tensors, 2}, options.device(device));
    LambDirectionCall pass{call, sq_norms.data_ptr()};
    launch<B>(device, pass, B::lamb_direction);
  });
  return sq_norms;
}

template <class B>
void lamb_apply_impl(FUSEDOPT_LAMB_PASS_PARAMS const Tensor& sq_norms,
                     FUSEDOPT_LAMB_PASS_SCALARS) {
  const Checker check(op_name<B>("lamb_apply"), B::kDeviceType);
  with_lamb_call(check, FUSEDOPT_LAMB_PASS_ARGS, [&](const LambCall& call, c10::Device device) {
    TORCH_CHECK_TYPE(sq_norms.scalar_type() == lamb_opmath(params) && sq_norms.dim() == 2 &&
                         sq_norms.size(0) == call.lists.num_tensors && sq_norms.size(1) == 2 &&
                         sq_norms.is_contiguous(),
                     check.op(), ": sq_norms must be a contiguous ", lamb_opmath(params),
                     " tensor of shape (", call.lists.num_tensors,
                     ", 2) (lamb_direction_'s output); got shape ", sq_norms.sizes(),
                     " and dtype ", sq_norms.scalar_type());
    TORCH_CHECK(sq_norms.device() == device, check.op(), ": sq_norms is on ", sq_norms.device(),
                " but the params are on ", device);
    LambApplyCall pass{call, sq_norms.const_data_ptr()};
    launch<B>(device, pass, B::lamb_apply);
  });
}

// muon_'s passes (fusedopt/_contract.py PHASE_OPS): muon_'s arguments, each pass one
// launch. muon_ itself runs torch's Newton-Schulz GEMMs between them, so it is composed in
// Python for every backend ([note: muon passes] in fusedopt/optim/muon.py).
#define FUSEDOPT_MUON_PASS_PARAMS                                                             \
  TensorList params, TensorList grads, TensorList momentum_buffers, TensorList ns_buffers,   \
      TensorList master_params, const Tensor &hypers, c10::IntArrayRef group_sizes,          \
      bool nesterov, const OptTensor &lr_tensor, const OptTensor &grad_scale,                \
      const OptTensor &clip_coef, const OptTensor &found_inf, bool master_sync

/// Checks a Muon pass's muon_ arguments and launches `pass` (not for an empty call).
template <class B, class Pass>
void muon_pass(const char* name, Pass pass, FUSEDOPT_MUON_PASS_PARAMS) {
  const Checker check(op_name<B>(name), B::kDeviceType);
  StepArguments args(check, params, grads, master_params, {}, true, lr_tensor, grad_scale,
                     clip_coef, found_inf, master_sync);
  MuonCall call;
  call.momentum_buffers = args.state("momentum_buffers", momentum_buffers, false);
  call.ns_buffers = args.state("ns_buffers", ns_buffers, false, DType::kBFloat16);
  args.hypers(hypers, group_sizes, spec::muon::kNumHypers);
  if (args.size() == 0) return;
  call.lists = args.lists();
  call.nesterov = nesterov;
  launch<B>(args.device(), call, pass);
}

#define FUSEDOPT_MUON_PASS_ARGS                                                         \
  params, grads, momentum_buffers, ns_buffers, master_params, hypers, group_sizes, nesterov, \
      lr_tensor, grad_scale, clip_coef, found_inf, master_sync

template <class B>
void muon_momentum_impl(FUSEDOPT_MUON_PASS_PARAMS) {
  muon_pass<B>("muon_momentum", B::muon_momentum, FUSEDOPT_MUON_PASS_ARGS);
}

template <class B>
void muon_apply_impl(FUSEDOPT_MUON_PASS_PARAMS) {
  muon_pass<B>("muon_apply", B::muon_apply, FUSEDOPT_MUON_PASS_ARGS);
}

/// Registers every op of backend B.
template <class B>
void register_backend(torch::Library& m) {
  m.impl(op_name<B>("scale").c_str(), &scale_impl<B>);
  m.impl(("grad_norm_" + std::string(B::kName)).c_str(), &grad_norm_impl<B>);
#define FUSEDOPT_REGISTER_STEP(op, OP, Stem) m.impl(op_name<B>(#op).c_str(), &op##_impl<B>);
  FUSEDOPT_STEP_OPS(FUSEDOPT_REGISTER_STEP)
  m.impl(op_name<B>("lamb_direction").c_str(), &lamb_direction_impl<B>);
  m.impl(op_name<B>("lamb_apply").c_str(), &lamb_apply_impl<B>);
  m.impl(op_name<B>("muon_momentum").c_str(), &muon_momentum_impl<B>);
  m.impl(op_name<B>("muon_apply").c_str(), &muon_apply_impl<B>);
}

}  // namespace
}  // namespace fusedopt

// Registration: the schemas come from fusedopt/_contract.py (imported before _C by
// fusedopt/__init__.py); C++ only implements them.
TORCH_LIBRARY_IMPL(fusedopt, CPU, m) { fusedopt::register_backend<fusedopt::CpuBackend>(m); }

#ifdef FUSEDOPT_WITH_CUDA
TORCH_LIBRARY_IMPL(fusedopt, CUDA, m) { fusedopt::register_backend<fusedopt::CudaBackend>(m); }
#endif

// The Python module itself only says whether the CUDA part was built: importing it runs the
// registrations above. Plain CPython API, so no pybind11 (see the includes).
#ifdef FUSEDOPT_WITH_CUDA
#define FUSEDOPT_WITH_CUDA_PY Py_True
#else
#define FUSEDOPT_WITH_CUDA_PY Py_False
#endif
#define FUSEDOPT_STR_(x) #x
#define FUSEDOPT_STR(x) FUSEDOPT_STR_(x)
#define FUSEDOPT_CONCAT_(a, b) a##b
#define FUSEDOPT_CONCAT(a, b) FUSEDOPT_CONCAT_(a, b)

static PyModuleDef fusedopt_module = {
    PyModuleDef_HEAD_INIT, FUSEDOPT_STR(TORCH_EXTENSION_NAME),
    "fusedopt's C++ kernels: the cpu backend (and cuda when built with CUDA)", -1, nullptr};

PyMODINIT_FUNC FUSEDOPT_CONCAT(PyInit_, TORCH_EXTENSION_NAME)() {
  PyObject* module = PyModule_Create(&fusedopt_module);
  if (module != nullptr && PyModule_AddObjectRef(module, "WITH_CUDA", FUSEDOPT_WITH_CUDA_PY) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

// ---------------------------------------------------------------------------------------
// The cached plan's per-tensor check ([note: cached plan] in fusedopt/optim/_plan.py).
//
// A step that reuses the last step's plan must find every planned param and grad as the
// plan saw them: what a user can change without telling the optimizer (a grad set, dropped
// or replaced by one of another dtype, shape, layout or device; a param's .data swapped).
// plan_record writes that down once per plan, in a PlanRecord that holds the params (strong
// references: the same TensorImpls the Python params wrap, which a .data swap keeps);
// plan_grads compares it every step in one loop, reading each grad in C++, and returns the
// grads the step ops take. Handing over the record instead of the params' list is the point:
// the dispatcher converts a Python list of tensors at ~100 ns per tensor (1,000 tensors:
// ~130 us, 2-core CPU VM) and the loop costs a few ns per tensor. The record travels as an
// empty CPU tensor whose storage owns it (its deleter deletes it; plan_grads checks that
// deleter before it trusts the pointer): a tensor argument costs ~0.3 us per call, a
// TorchScript custom class ~6 us. Not an op of the contract (no kernel, no backend of its
// own): defined here with its schema, it exists only where fusedopt._C is built; without it
// the plan runs the same check in Python. Both read only tensor metadata: no device sync.

namespace fusedopt {
namespace {

/// What plan_grads compares of one tensor, in order: layout, dtype, device type and index,
/// dim, then sizes and strides. A tensor that is not strided (a sparse param without a grad:
/// a plan with a sparse grad is not cached) has no strides: dim -1 stands for "layout,
/// dtype and device only".
constexpr int64_t kNotStrided = -1;

void record_tensor(std::vector<int64_t>& out, const Tensor& t) {
  const auto device = t.device();
  const bool strided = t.layout() == at::kStrided;
  out.insert(out.end(), {static_cast<int64_t>(t.layout()), static_cast<int64_t>(t.scalar_type()),
                         static_cast<int64_t>(device.type()), device.index(),
                         strided ? t.dim() : kNotStrided});
  if (!strided) return;
  out.insert(out.end(), t.sizes().begin(), t.sizes().end());
  out.insert(out.end(), t.strides().begin(), t.strides().end());
}

/// Whether ``t`` is as recorded at ``meta[at...]``; moves ``at`` past the entry when it is.
bool matches(const Tensor& t, const std::vector<int64_t>& meta, size_t& at) {
  const int64_t* m = meta.data() + at;
  if (at + 5 > meta.size() || m[0] != static_cast<int64_t>(t.layout()) ||
      m[1] != static_cast<int64_t>(t.scalar_type()) ||
      m[2] != static_cast<int64_t>(t.device().type()) || m[3] != t.device().index()) {
    return false;
  }
  if (m[4] == kNotStrided) {  // the layout matched, so t is not strided either
    at += 5;
    return true;
  }
  if (m[4] != t.dim()) return false;
  const size_t dim = static_cast<size_t>(m[4]);  // a strided layout matched: t has strides
  if (at + 5 + 2 * dim > meta.size() || !std::equal(m + 5, m + 5 + dim, t.sizes().begin()) ||
      !std::equal(m + 5 + dim, m + 5 + 2 * dim, t.strides().begin())) {
    return false;
  }
  at += 5 + 2 * dim;
  return true;
}

/// The params of a plan, and what plan_grads compares of them and of their grads.
struct PlanRecord {
  std::vector<Tensor> params;
  std::vector<int64_t> meta;  // per param: had a grad (0/1), the param's entry, the grad's
};

void delete_plan_record(void* record) { delete static_cast<PlanRecord*>(record); }

/// An empty CPU tensor that owns the PlanRecord of ``params``.
Tensor plan_record(TensorList params) {
  auto record = std::make_unique<PlanRecord>();
  record->params = params.vec();
  record->meta.reserve(params.size() * 16);
  for (const Tensor& p : params) {
    const Tensor& g = p.grad();
    record->meta.push_back(g.defined() ? 1 : 0);
    record_tensor(record->meta, p);
    if (g.defined()) record_tensor(record->meta, g);
  }
  void* owned = record.get();
  Tensor handle = at::for_blob(owned, {0})
                      .context(owned, &delete_plan_record)
                      .options(at::TensorOptions().dtype(at::kByte))
                      .make_tensor();
  record.release();  // the handle's storage owns it now
  return handle;
}

/// (true, the grads of the params that had one, in order) if every param and grad is as
/// ``handle``'s record says; (false, []) at the first difference.
std::tuple<bool, std::vector<Tensor>> plan_grads(const Tensor& handle) {
  TORCH_CHECK(handle.has_storage() &&
                  handle.storage().data_ptr().get_deleter() == &delete_plan_record,
              "fusedopt::plan_grads: the argument is not a tensor plan_record made");
  const auto& record = *static_cast<const PlanRecord*>(handle.storage().data_ptr().get_context());
  const std::vector<int64_t>& meta = record.meta;
  std::vector<Tensor> grads;
  grads.reserve(record.params.size());
  const auto mismatch = [] { return std::make_tuple(false, std::vector<Tensor>{}); };
  size_t at = 0;
  for (const Tensor& p : record.params) {
    const bool had_grad = meta[at++] != 0;
    if (!matches(p, meta, at)) return mismatch();
    const Tensor& g = p.grad();
    if (g.defined() != had_grad) return mismatch();
    if (had_grad) {
      if (!matches(g, meta, at)) return mismatch();
      grads.push_back(g);
    }
  }
  return std::make_tuple(true, std::move(grads));
}

}  // namespace
}  // namespace fusedopt

// A fragment of the namespace fusedopt/_contract.py defines; catch-all kernels (they read
// only metadata, on any device).
TORCH_LIBRARY_FRAGMENT(fusedopt, m) {
  m.def("plan_record(Tensor[] params) -> Tensor", &fusedopt::plan_record);
  m.def("plan_grads(Tensor record) -> (bool, Tensor[])", &fusedopt::plan_grads);
}
