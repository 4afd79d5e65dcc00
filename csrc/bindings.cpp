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
#include <torch/csrc/autograd/variable.h>
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

// A backend's launchers as static members of its struct (B::adamw, B::lamb_apply...): every
// one that launch.h's FUSEDOPT_DECLARE_LAUNCHERS declares in namespace ns.
#define FUSEDOPT_FORWARD(ns, op, Call) \
  static void op(const Call& c, const ExecContext& x) { ns::op(c, x); }
#define FUSEDOPT_FORWARD_STEP_cpu(op, OP, Stem) FUSEDOPT_FORWARD(cpu, op, Stem##Call)
#define FUSEDOPT_FORWARD_STEP_cuda(op, OP, Stem) FUSEDOPT_FORWARD(cuda, op, Stem##Call)
#define FUSEDOPT_BACKEND_LAUNCHERS(ns)                         \
  FUSEDOPT_FORWARD(ns, scale, ScaleCall)                       \
  FUSEDOPT_FORWARD(ns, grad_norm, GradNormCall)                \
  FUSEDOPT_STEP_OPS(FUSEDOPT_FORWARD_STEP_##ns)                \
  FUSEDOPT_FORWARD(ns, lamb_direction, LambDirectionCall)      \
  FUSEDOPT_FORWARD(ns, lamb_apply, LambApplyCall)              \
  FUSEDOPT_FORWARD(ns, adafactor_norms, AdafactorNormsCall)    \
  FUSEDOPT_FORWARD(ns, adafactor_apply, AdafactorApplyCall)    \
  FUSEDOPT_FORWARD(ns, muon_momentum, MuonCall)                \
  FUSEDOPT_FORWARD(ns, muon_apply, MuonCall)

struct CpuBackend {
  static constexpr const char* kName = "cpu";
  static constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;
  static ExecContext context(c10::Device, Scratch& scratch) {
    ExecContext ctx;
    ctx.num_threads = at::get_num_threads();  // torch.set_num_threads applies to fusedopt too
    ctx.workspace = {&Scratch::allocate, &scratch};
    return ctx;
  }
  FUSEDOPT_BACKEND_LAUNCHERS(cpu)
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
  FUSEDOPT_BACKEND_LAUNCHERS(cuda)
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
  /// With `codes`, int8 and uint8 too (the codes of 8-bit states).
  DType tensor(const Tensor& t, const Indexed& where, bool codes = false) const {
    TORCH_CHECK(t.defined(), op_, ": ", where, " is an undefined tensor");
    TORCH_CHECK(t.device().type() == type_, op_, ": ", where, " is on ", t.device(), "; ", op_,
                " takes ", c10::DeviceTypeName(type_, true), " tensors");
    TORCH_CHECK(t.layout() == at::kStrided, op_, ": ", where, " is sparse (", t.layout(),
                "); only dense tensors are supported");
    auto d = to_dtype(t.scalar_type());
    if (codes && t.scalar_type() == at::kChar) d = DType::kInt8;
    if (codes && t.scalar_type() == at::kByte) d = DType::kUInt8;
    TORCH_CHECK_TYPE(d.has_value(), op_, ": ", where, " has unsupported dtype ", t.scalar_type(),
                     codes ? " (supported: int8, uint8: 8-bit codes)"
                           : " (supported: float32, bfloat16, float16, float64)");
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

/// [note: prefetch] A step's lists hold ~5 tensors per param, each a TensorImpl of ~4 cache
/// lines and a StorageImpl elsewhere in memory; at 10,000 params that is ~13 MB of
/// metadata, more than the caches keep between steps, and the checks read it one dependent
/// load after another. So each loop over a list asks for the TensorImpl of the tensor
/// kPrefetchAhead places on, and for the StorageImpl of the one half as far on (its
/// TensorImpl asked for earlier), and reads each tensor's data pointer in the same loop as
/// its checks, while its lines are there: no tensor's metadata is read twice per call.
constexpr size_t kPrefetchAhead = 16;

inline void prefetch_tensor(TensorList list, size_t i) {
  if (i + kPrefetchAhead < list.size()) {
    const auto* impl = reinterpret_cast<const char*>(list[i + kPrefetchAhead].unsafeGetTensorImpl());
    for (size_t line = 0; line < sizeof(c10::TensorImpl); line += 64) __builtin_prefetch(impl + line);
  }
  if (i + kPrefetchAhead / 2 < list.size()) {
    const c10::TensorImpl* impl = list[i + kPrefetchAhead / 2].unsafeGetTensorImpl();
    if (impl->has_storage()) __builtin_prefetch(impl->unsafe_storage().unsafeGetStorageImpl());
  }
}

/// Validates and converts the lists and scalars every step op has (params, grads,
/// master_params, steps, the common device scalars) and the op's state lists.
///
/// [note: one pass per call] The lists' lengths and the scalars are checked as they come in
/// (the constructor, state(), hypers()); every tensor of every list is checked, and its data
/// pointer read, in one loop over the params when the call asks for its lists (lists()):
/// tensor i of each list, then tensor i + 1. A loop per list read each param's TensorImpl
/// once per list (a state is checked against its param) and every list's metadata from
/// memory again: at 10,000 params, 4 lines of ~50,000 TensorImpls each (~13 MB) do not stay
/// in the 1 MB L2 of the 2-core CPU VM between loops. One pass reads each once; the errors
/// are the same, in list order for each index.
class StepArguments {
 public:
  StepArguments(const Checker& check, TensorList params, TensorList grads,
                TensorList master_params, TensorList steps, bool steps_optional,
                const OptTensor& lr_tensor, const OptTensor& grad_scale,
                const OptTensor& clip_coef, const OptTensor& found_inf, bool master_sync,
                const OptTensor& sr_key)
      : check_(check),
        params_(params),
        grads_(grads),
        masters_(master_params),
        steps_list_(steps),
        n_(params.size()) {
    check.length("grads", grads.size(), n_, false);
    check.length("master_params", master_params.size(), n_, true);
    check.length("steps", steps.size(), n_, steps_optional);
    if (n_ == 0) return;
    device_ = params[0].device();
    param_dtype_ = check.tensor(params[0], Indexed{"params", 0});
    grad_dtype_ = check.tensor(grads[0], Indexed{"grads", 0});
    const bool masters = !master_params.empty();
    compact_master_ = masters && master_params[0].scalar_type() == at::kShort;
    // A master of the param's own dtype is a Kahan compensation ([note: kahan master]).
    kahan_master_ = masters && master_params[0].scalar_type() == params[0].scalar_type();
    params_table_.dtype = param_dtype_;
    grads_table_.dtype = grad_dtype_;
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

    lists_.master_sync = master_sync;
    lists_.compact_master = compact_master_;
    lists_.kahan_master = kahan_master_;
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
    if (sr_key.has_value()) {  // [note: stochastic rounding] in fusedopt/dtype.h
      const Tensor& key = *sr_key;
      TORCH_CHECK_TYPE(key.defined() && key.scalar_type() == at::kLong && key.dim() == 1 &&
                           key.numel() == static_cast<int64_t>(n_) + 2 && key.is_contiguous(),
                       check.op(), ": sr_key must be a contiguous int64 vector of length ",
                       n_ + 2, " ([seed, counter, one id per param]); got shape ", key.sizes(),
                       " and dtype ", key.scalar_type());
      TORCH_CHECK(key.device() == device_, check.op(), ": sr_key is on ", key.device(),
                  " but the params are on ", device_);
      sr_key_ = &key;
    }
  }

  /// [note: state dtype] (fusedopt/dtype.h): for an op that declares free state dtypes
  /// (spec kStateDtypes), the call's float states take the dtype of `states[0]` (its first
  /// state list that is given and not 8-bit) when it is fp32, bf16 or fp16 and the params
  /// are not fp64; every state of the call is then checked against it. Call before state().
  void adopt_state_dtype(TensorList states) {
    if (adopted_ || states.empty() || param_dtype_ == DType::kFloat64) return;
    adopted_ = true;
    const at::ScalarType t = states[0].scalar_type();
    if (t == at::kFloat || t == at::kBFloat16 || t == at::kHalf)
      state_dtype_ = t == at::kFloat ? DType::kFloat32
                     : t == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat16;
    free_states_ = true;
  }

  /// Checks what sr_key may round ([note: stochastic rounding], [note: state dtype]): bf16
  /// params without master weights, or the bf16 states of an op with free state dtypes; the
  /// latter then round stochastically too (StepLists::stochastic_states). Call after state().
  void check_sr_key() {
    if (sr_key_ == nullptr) return;
    const bool masters = !masters_.empty();
    const bool bf16_param = param_dtype_ == DType::kBFloat16 && !masters;
    const bool bf16_states = free_states_ && state_dtype_ == DType::kBFloat16;
    TORCH_CHECK_TYPE(!free_states_ || state_dtype_ != DType::kFloat16, check_.op(),
                     ": sr_key beside float16 states: stochastic rounding stores bf16 only, "
                     "and every 16-bit store of an SR step rounds stochastically");
    TORCH_CHECK_TYPE(bf16_param || bf16_states, check_.op(),
                     ": sr_key (stochastic rounding of 16-bit stores) is for bfloat16 params "
                     "without master weights or bfloat16 states; got ",
                     params_[0].scalar_type(), " params", masters ? " with master_params" : "",
                     " and ", dtype_name(state_dtype_), " states");
    lists_.scalars.sr_key = sr_key_->const_data_ptr<int64_t>();
    lists_.stochastic_states = free_states_;
  }

  size_t size() const { return n_; }
  c10::Device device() const { return device_; }

  /// The call's lists, every tensor checked ([note: one pass per call]).
  const StepLists& lists() {
    if (!checked_) check_tensors();
    return lists_;
  }

  /// A per-param state list (exp_avgs...): fp32 with master weights, else the param dtype,
  /// in its shape rule ([note: factored layouts] in fusedopt/_contract.py): the param's shape
  /// and strides, or a factored state's shape, contiguous (a (0,) placeholder where the param
  /// has no such state: its dtype is not checked). Layout kBf16 is the param's shape in
  /// bfloat16 whatever the param's dtype (Muon's ns_buffers, [note: muon passes]). Its
  /// length is checked here, its tensors by lists(), which fills the slot's pointer table.
  TensorSlot state(const char* name, TensorList states, bool may_be_empty,
                   spec::StateLayout layout,
                   spec::StateCodes codes = spec::StateCodes::kNone) {
    check_.length(name, states.size(), n_, may_be_empty);
    SlotTable& table = states_.emplace_back();
    DType expected = layout == spec::StateLayout::kBf16 ? DType::kBFloat16 : state_dtype_;
    if (layout == spec::StateLayout::kBlockScales) expected = DType::kFloat32;
    if (codes != spec::StateCodes::kNone)  // [note: 8-bit states] in fusedopt/quant8.py
      expected = codes == spec::StateCodes::kSigned ? DType::kInt8 : DType::kUInt8;
    table.dtype = expected;
    table.pointers.assign(states.size(), nullptr);  // sized now: the slot points at it
    if (!states.empty()) pending_.push_back(PendingState{name, states, layout, codes, &table});
    factored_ |= layout == spec::StateLayout::kRow;
    eight_bit_ |= layout == spec::StateLayout::kBlockScales && !states.empty();
    return table.slot();
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
  /// The shape of a state of `layout` for a param of `sizes` (fusedopt/_contract.py
  /// state_shape).
  static std::vector<int64_t> state_shape(spec::StateLayout layout, at::IntArrayRef sizes) {
    std::vector<int64_t> shape = sizes.vec();
    const bool factored = shape.size() >= 2;
    switch (layout) {
      case spec::StateLayout::kParam:
        return shape;
      case spec::StateLayout::kUnfactored:
        return factored ? std::vector<int64_t>{0} : shape;
      case spec::StateLayout::kRow:
        if (!factored) return {0};
        shape.back() = 1;
        return shape;
      case spec::StateLayout::kCol:
        if (!factored) return {0};
        shape[shape.size() - 2] = 1;
        return shape;
      case spec::StateLayout::kBlockScales:  // [note: 8-bit states] in fusedopt/quant8.py
        if (shape.empty()) return {1};
        shape.back() = (shape.back() + kQuantBlock - 1) / kQuantBlock;
        return shape;
    }
    return shape;
  }

  /// Each param's row length (its last dim; 1 for a 0-d param) for the block scales of
  /// 8-bit states (StepLists::row_lengths).
  void row_lengths() {
    row_lengths_.assign(n_, 1);
    for (size_t i = 0; i < n_; ++i) {
      if (params_[i].dim() > 0) row_lengths_[i] = params_[i].sizes().back();
      TORCH_CHECK(row_lengths_[i] < (int64_t{1} << 31), check_.op(), ": params[", i,
                  "] has a last dim of ", row_lengths_[i], "; 8-bit states take rows of fewer "
                  "than 2^31 elements");
    }
    lists_.row_lengths = row_lengths_.data();
  }

  /// A state list the call checks in lists() ([note: one pass per call]).
  struct PendingState {
    const char* name;
    TensorList tensors;
    spec::StateLayout layout;
    spec::StateCodes codes;  // 8-bit codes ([note: 8-bit states]), or kNone
    SlotTable* table;
  };

  /// [note: one pass per call] Every tensor of every list, index by index: its checks and
  /// data pointer, while its metadata is in the cache.
  void check_tensors() {
    checked_ = true;
    const Checker& check = check_;
    const bool masters = !masters_.empty();
    params_table_.pointers.reserve(n_);
    grads_table_.pointers.reserve(n_);
    masters_table_.pointers.reserve(masters_.size());
    numels_.reserve(n_);
    steps_.reserve(steps_list_.size());
    for (size_t i = 0; i < n_; ++i) {  // [note: prefetch]
      prefetch_tensor(params_, i);
      prefetch_tensor(grads_, i);
      if (masters) prefetch_tensor(masters_, i);
      if (!steps_list_.empty()) prefetch_tensor(steps_list_, i);
      for (const PendingState& s : pending_) prefetch_tensor(s.tensors, i);
      const TensorList params = params_, grads = grads_;
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
        const TensorList master_params = masters_;
        const Indexed m_name{"master_params", i};
        TORCH_CHECK_TYPE(pd == DType::kBFloat16 || pd == DType::kFloat16, check.op(), ": ",
                         m_name, " given for a ", params[i].scalar_type(),
                         " param; master weights are for bfloat16/float16 params");
        // An int16 master is a compact one: the remainders of bf16 params ([note: compact
        // master] in fusedopt/_contract.py), checked as the bf16 view of its bits. A master of
        // the param's own dtype is a Kahan compensation ([note: kahan master]).
        const bool compact = master_params[i].scalar_type() == at::kShort;
        const bool kahan = master_params[i].scalar_type() == params[i].scalar_type();
        TORCH_CHECK_TYPE(!compact || pd == DType::kBFloat16, check.op(), ": ", m_name,
                         " is int16 (a compact master) beside a ", params[i].scalar_type(),
                         " param; compact masters are for bfloat16 params only");
        TORCH_CHECK_TYPE(master_params[i].scalar_type() == master_params[0].scalar_type(),
                         check.op(), ": ", m_name, " has dtype ",
                         master_params[i].scalar_type(), " but master_params[0] has ",
                         master_params[0].scalar_type(), "; one call takes one master dtype");
        const DType md = check.tensor(
            compact ? master_params[i].view(at::kBFloat16) : master_params[i], m_name);
        check.like(master_params[i], params[i], m_name);
        TORCH_CHECK_TYPE(compact || kahan || md == DType::kFloat32, check.op(), ": ", m_name,
                         " has dtype ", master_params[i].scalar_type(),
                         ", expected float32 (or int16: a compact master of a bfloat16 param; or ",
                         params[i].scalar_type(), ": a Kahan compensation)");
        masters_table_.pointers.push_back(master_params[i].data_ptr());
      }
      if (!steps_list_.empty()) {
        const Indexed s_name{"steps", i};
        check.tensor(steps_list_[i], s_name);
        check.scalar(steps_list_[i], s_name, device_);
        steps_.push_back(steps_list_[i].data_ptr<float>());
      }
      params_table_.pointers.push_back(params[i].data_ptr());
      grads_table_.pointers.push_back(grads[i].data_ptr());
      numels_.push_back(params[i].numel());
      for (const PendingState& s : pending_) check_state(s, i);
    }
    if (factored_) factor_dims();
    if (eight_bit_) row_lengths();
    lists_.num_tensors = static_cast<int64_t>(n_);
    lists_.numels = numels_.data();
    lists_.params = params_table_.slot();
    lists_.grads = grads_table_.slot();
    lists_.master_params = masters_table_.slot();
    lists_.steps = steps_.empty() ? nullptr : steps_.data();
  }

  /// Tensor i of the state list ``s`` against param i.
  void check_state(const PendingState& s, size_t i) {
    const Tensor& t = s.tensors[i];
    const Tensor& param = params_[i];
    const Indexed where{s.name, i};
    const bool codes = s.codes != spec::StateCodes::kNone;
    const DType d = check_.tensor(t, where, codes);
    if (codes) {  // [note: 8-bit states] in fusedopt/quant8.py
      TORCH_CHECK_TYPE(param_dtype_ != DType::kFloat64, check_.op(), ": ", where,
                       " holds 8-bit codes beside a float64 param; 8-bit states are for "
                       "float32, bfloat16 and float16 params");
      TORCH_CHECK(t.is_contiguous() && param.is_contiguous(), check_.op(), ": ", where,
                  " or its param is not contiguous; 8-bit states quantize runs of the last "
                  "dimension, which the kernels walk in row-major order");
    }
    if (s.layout == spec::StateLayout::kParam || s.layout == spec::StateLayout::kBf16) {
      check_.like(t, param, where);
    } else if (const std::vector<int64_t> shape = state_shape(s.layout, param.sizes());
               shape == param.sizes().vec()) {
      check_.like(t, param, where);
    } else {
      TORCH_CHECK(t.device() == device_, check_.op(), ": ", where, " is on ", t.device(),
                  " but its param is on ", device_);
      TORCH_CHECK(t.sizes() == at::IntArrayRef(shape) && t.is_contiguous(), check_.op(), ": ",
                  where, " has shape ", t.sizes(), " (strides ", t.strides(),
                  ") but this state of a param of shape ", param.sizes(),
                  " is a contiguous tensor of shape ", shape);
    }
    TORCH_CHECK_TYPE(d == s.table->dtype || t.numel() == 0, check_.op(), ": ", where,
                     " has dtype ", t.scalar_type(), ", expected ", dtype_name(s.table->dtype));
    s.table->pointers[i] = t.data_ptr();
  }

  /// Each param's (rows, cols) for the factored states (StepLists::factor_dims).
  void factor_dims() {
    factor_dims_.assign(2 * n_, 0);
    for (size_t i = 0; i < n_; ++i) {
      const at::IntArrayRef sizes = params_[i].sizes();
      if (sizes.size() < 2) continue;
      TORCH_CHECK(params_[i].is_contiguous(), check_.op(), ": params[", i, "] (shape ", sizes,
                  ", strides ", params_[i].strides(), ") is not contiguous; a param with "
                  "factored states is reduced over its last two dims, which the kernels walk "
                  "in row-major order: pass .contiguous() tensors");
      factor_dims_[2 * i] = sizes[sizes.size() - 2];
      factor_dims_[2 * i + 1] = sizes.back();
    }
    lists_.factor_dims = factor_dims_.data();
  }

  const Checker& check_;
  TensorList params_, grads_, masters_, steps_list_;
  size_t n_;
  std::vector<PendingState> pending_;
  bool factored_ = false;  // a state list of layout kRow: the call needs factor_dims
  bool eight_bit_ = false;  // block scales given ([note: 8-bit states]): needs row_lengths
  bool checked_ = false;  // check_tensors ran
  bool adopted_ = false;  // adopt_state_dtype ran
  bool free_states_ = false;  // the op's states may have any float dtype ([note: state dtype])
  const Tensor* sr_key_ = nullptr;  // checked, not yet handed to the lists (check_sr_key)
  c10::Device device_{c10::DeviceType::CPU};
  DType param_dtype_ = DType::kFloat32, grad_dtype_ = DType::kFloat32,
        state_dtype_ = DType::kFloat32;
  SlotTable params_table_, grads_table_, masters_table_;
  bool compact_master_ = false;  // StepLists::compact_master
  bool kahan_master_ = false;    // StepLists::kahan_master
  std::deque<SlotTable> states_;  // deque: slots handed out keep pointing at live tables
  std::vector<float*> steps_;
  std::vector<int64_t> numels_;
  std::vector<int32_t> group_;  // tensor i's row of the hyperparameter table
  std::vector<int64_t> factor_dims_;  // StepLists::factor_dims
  std::vector<int64_t> row_lengths_;  // StepLists::row_lengths
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
    data.reserve(tensors.size());
    numels.reserve(tensors.size());
    dtypes.reserve(tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) {
      prefetch_tensor(tensors, i);  // [note: prefetch]
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
#define FUSEDOPT_ADOPT_STATE_DTYPE(name, Name, index, may_be_empty, when)                       \
  if (free_states && (when) && !eight_bit &&                                                    \
      layouts[index] == spec::StateLayout::kParam)                                              \
    args.adopt_state_dtype(name);
#define FUSEDOPT_SET_STATE(name, Name, index, may_be_empty, when)                               \
  if (when) {                                                                                   \
    call.name = args.state(#name, name, may_be_empty, layouts[index],                           \
                           eight_bit ? codes[index] : spec::StateCodes::kNone);                 \
  } else {                                                                                      \
    TORCH_CHECK_VALUE(name.empty(), check.op(), ": " #name " has ", name.size(),                \
                      " entries but " #when " is False (expected 0)");                          \
  }
#define FUSEDOPT_GIVEN_SCALES(name, Name, index, may_be_empty, when) \
  eight_bit |= layouts[index] == spec::StateLayout::kBlockScales && !name.empty();
#define FUSEDOPT_CHECK_SCALES(name, Name, index, may_be_empty, when)                        \
  TORCH_CHECK_VALUE(!eight_bit || layouts[index] != spec::StateLayout::kBlockScales ||      \
                        !name.empty(),                                                      \
                    check.op(), ": " #name " is empty but other block scales are given; "   \
                    "8-bit states take the scales of every quantized state, or none");
#define FUSEDOPT_CHECK_STEPS_WITH(name)                                                         \
  TORCH_CHECK_VALUE(name.empty() == steps.empty(), check.op(), ": " #name " has ", name.size(), \
                    " entries and steps has ", steps.size(), "; pass both or neither");
#define FUSEDOPT_SET_FLAG(name, ...) call.name = name;
#define FUSEDOPT_ARG_NAME(name, ...) name,
// A step op's parameters, in its schema's order, and their names as arguments.
#define FUSEDOPT_STEP_PARAMS(OP)                                                             \
  TensorList params, TensorList grads, FUSEDOPT_##OP##_STATES(FUSEDOPT_STATE_PARAM)          \
      TensorList master_params, FUSEDOPT_##OP##_STEPS(FUSEDOPT_STEPS_PARAM) const Tensor &hypers, \
      c10::IntArrayRef group_sizes, FUSEDOPT_##OP##_FLAGS(FUSEDOPT_FLAG_PARAM)               \
      const OptTensor &lr_tensor, const OptTensor &grad_scale, const OptTensor &clip_coef,   \
      const OptTensor &found_inf FUSEDOPT_COMMON_FLAGS(FUSEDOPT_TRAILING_FLAG_PARAM),        \
      const OptTensor &sr_key
#define FUSEDOPT_STEP_ARGS(OP)                                                                 \
  params, grads, FUSEDOPT_##OP##_STATES(FUSEDOPT_ARG_NAME) master_params,                      \
      FUSEDOPT_##OP##_STEPS(FUSEDOPT_ARG_NAME) hypers, group_sizes,                            \
      FUSEDOPT_##OP##_FLAGS(FUSEDOPT_ARG_NAME) lr_tensor, grad_scale, clip_coef,               \
      found_inf FUSEDOPT_COMMON_FLAGS(FUSEDOPT_TRAILING_NAME), sr_key
/// with_<op>_call checks a step op's arguments and calls run(call, device) (not for an empty
/// call): the step op's <op>_impl launches it, its passes' impls (below) launch theirs.
#define FUSEDOPT_STEP_IMPL(op, OP, Stem)                                                        \
  template <class Run>                                                                          \
  void with_##op##_call(const Checker& check, FUSEDOPT_STEP_PARAMS(OP), Run run) {              \
    StepArguments args(check, params, grads, master_params,                                     \
                       steps_or_none(FUSEDOPT_##OP##_STEPS(FUSEDOPT_NAME)),                     \
                       FUSEDOPT_##OP##_STEPS_OPTIONAL, lr_tensor, grad_scale, clip_coef,        \
                       found_inf FUSEDOPT_COMMON_FLAGS(FUSEDOPT_TRAILING_NAME), sr_key);        \
    Stem##Call call;                                                                            \
    const auto& layouts = spec::op::kStateLayouts;                                              \
    const auto& codes = spec::op::kStateCodes;                                                  \
    constexpr bool free_states = spec::op::kStateDtypes; /* [note: state dtype] */              \
    bool eight_bit = false; /* [note: 8-bit states]: block scales given */                      \
    FUSEDOPT_##OP##_STATES(FUSEDOPT_GIVEN_SCALES)                                               \
    FUSEDOPT_##OP##_STATES(FUSEDOPT_ADOPT_STATE_DTYPE)                                          \
    FUSEDOPT_##OP##_STATES(FUSEDOPT_SET_STATE)                                                  \
    FUSEDOPT_##OP##_STATES(FUSEDOPT_CHECK_SCALES)                                               \
    args.check_sr_key();                                                                        \
    FUSEDOPT_##OP##_STEPS_WITH(FUSEDOPT_CHECK_STEPS_WITH)                                       \
    args.hypers(hypers, group_sizes, spec::op::kNumHypers);                                     \
    if (args.size() == 0) return;                                                               \
    call.lists = args.lists();                                                                  \
    FUSEDOPT_##OP##_FLAGS(FUSEDOPT_SET_FLAG)                                                    \
    run(call, args.device());                                                                   \
  }                                                                                             \
  template <class B>                                                                            \
  void op##_impl(FUSEDOPT_STEP_PARAMS(OP)) {                                                    \
    const Checker check(op_name<B>(#op), B::kDeviceType);                                       \
    with_##op##_call(check, FUSEDOPT_STEP_ARGS(OP),                                             \
                     [&](const Stem##Call& call, c10::Device device) {                          \
                       launch<B>(device, call, B::op);                                          \
                     });                                                                        \
  }
FUSEDOPT_STEP_OPS(FUSEDOPT_STEP_IMPL)

// The passes of multi-pass step ops (fusedopt/_contract.py PHASE_OPS): the step op's
// arguments, checked by its with_<op>_call, with sq_norms after the flags (the last pass)
// or returned (the first): [N, 2] in the params' opmath, on their device. lamb_direction_ /
// lamb_apply_ and adafactor_norms_ / adafactor_apply_.
#define FUSEDOPT_PASS_PARAMS(OP)                                                     \
  TensorList params, TensorList grads, FUSEDOPT_##OP##_STATES(FUSEDOPT_STATE_PARAM)  \
      TensorList master_params, TensorList steps, const Tensor &hypers,             \
      c10::IntArrayRef group_sizes, FUSEDOPT_##OP##_FLAGS(FUSEDOPT_FLAG_PARAM)
#define FUSEDOPT_PASS_SCALARS                                                              \
  const OptTensor &lr_tensor, const OptTensor &grad_scale, const OptTensor &clip_coef,    \
      const OptTensor &found_inf, bool master_sync, const OptTensor &sr_key

at::ScalarType pass_opmath(TensorList params) {
  return !params.empty() && params[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

/// Checks sq_norms, the input of a last pass: [N, 2] contiguous, the params' opmath, on their
/// device.
void check_sq_norms(const Checker& check, const Tensor& sq_norms, TensorList params, int64_t n,
                    c10::Device device, const char* first_pass) {
  TORCH_CHECK_TYPE(sq_norms.scalar_type() == pass_opmath(params) && sq_norms.dim() == 2 &&
                       sq_norms.size(0) == n && sq_norms.size(1) == 2 &&
                       sq_norms.is_contiguous(),
                   check.op(), ": sq_norms must be a contiguous ", pass_opmath(params),
                   " tensor of shape (", n, ", 2) (", first_pass, "'s output); got shape ",
                   sq_norms.sizes(), " and dtype ", sq_norms.scalar_type());
  TORCH_CHECK(sq_norms.device() == device, check.op(), ": sq_norms is on ", sq_norms.device(),
              " but the params are on ", device);
}

/// <first>_impl (returns sq_norms) and <last>_impl (takes it) of a two-pass step op.
#define FUSEDOPT_PASS_IMPLS(op, OP, Stem, first, last)                                        \
  template <class B>                                                                          \
  Tensor first##_impl(FUSEDOPT_PASS_PARAMS(OP) FUSEDOPT_PASS_SCALARS) {                       \
    const Checker check(op_name<B>(#first), B::kDeviceType);                                  \
    const auto options = at::TensorOptions().dtype(pass_opmath(params));                      \
    Tensor sq_norms = at::zeros({0, 2}, options);                                             \
    with_##op##_call(check, FUSEDOPT_STEP_ARGS(OP), [&](const Stem##Call& call,               \
                                                         c10::Device device) {                \
      sq_norms = at::zeros({call.lists.num_tensors, 2}, options.device(device));              \
      launch<B>(device, FirstPassCall<Stem##Call>{call, sq_norms.data_ptr()}, B::first);      \
    });                                                                                       \
    return sq_norms;                                                                          \
  }                                                                                           \
  template <class B>                                                                          \
  void last##_impl(FUSEDOPT_PASS_PARAMS(OP) const Tensor& sq_norms, FUSEDOPT_PASS_SCALARS) {  \
    const Checker check(op_name<B>(#last), B::kDeviceType);                                   \
    with_##op##_call(check, FUSEDOPT_STEP_ARGS(OP), [&](const Stem##Call& call,               \
                                                         c10::Device device) {                \
      check_sq_norms(check, sq_norms, params, call.lists.num_tensors, device, #first "_");    \
      launch<B>(device, LastPassCall<Stem##Call>{call, sq_norms.const_data_ptr()}, B::last);  \
    });                                                                                       \
  }

FUSEDOPT_PASS_IMPLS(lamb, LAMB, Lamb, lamb_direction, lamb_apply)
FUSEDOPT_PASS_IMPLS(adafactor, ADAFACTOR, Adafactor, adafactor_norms, adafactor_apply)

// muon_'s passes (fusedopt/_contract.py PHASE_OPS): muon_'s arguments, each pass one
// launch. muon_ itself runs torch's Newton-Schulz GEMMs between them, so it is composed in
// Python for every backend ([note: muon passes] in fusedopt/optim/muon.py).
#define FUSEDOPT_MUON_PASS_PARAMS                                                             \
  TensorList params, TensorList grads, TensorList momentum_buffers, TensorList ns_buffers,   \
      TensorList master_params, const Tensor &hypers, c10::IntArrayRef group_sizes,          \
      bool nesterov, const OptTensor &lr_tensor, const OptTensor &grad_scale,                \
      const OptTensor &clip_coef, const OptTensor &found_inf, bool master_sync,              \
      const OptTensor &sr_key

/// Checks a Muon pass's muon_ arguments and launches `pass` (not for an empty call).
template <class B, class Pass>
void muon_pass(const char* name, Pass pass, FUSEDOPT_MUON_PASS_PARAMS) {
  const Checker check(op_name<B>(name), B::kDeviceType);
  StepArguments args(check, params, grads, master_params, {}, true, lr_tensor, grad_scale,
                     clip_coef, found_inf, master_sync, sr_key);
  MuonCall call;
  call.momentum_buffers =
      args.state("momentum_buffers", momentum_buffers, false, spec::StateLayout::kParam);
  call.ns_buffers = args.state("ns_buffers", ns_buffers, false, spec::StateLayout::kBf16);
  args.check_sr_key();
  args.hypers(hypers, group_sizes, spec::muon::kNumHypers);
  if (args.size() == 0) return;
  call.lists = args.lists();
  call.nesterov = nesterov;
  launch<B>(args.device(), call, pass);
}

#define FUSEDOPT_MUON_PASS_ARGS                                                         \
  params, grads, momentum_buffers, ns_buffers, master_params, hypers, group_sizes, nesterov, \
      lr_tensor, grad_scale, clip_coef, found_inf, master_sync, sr_key

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
  m.impl(op_name<B>("adafactor_norms").c_str(), &adafactor_norms_impl<B>);
  m.impl(op_name<B>("adafactor_apply").c_str(), &adafactor_apply_impl<B>);
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

namespace fusedopt {
namespace {

// The Python part of the cached plan's per-step check, in C ([note: cached plan] in
// fusedopt/optim/_plan.py): the optimizer's state and its groups' params lists, compared by
// identity with what the plan saw. The same comparisons as the Python fallback's
// `all(map(operator.is_, ...))`, but a pointer comparison per entry instead of an iterator
// step, two reference counts and a call: those touched each param's, state dict's and state
// tensor's Python object every step, ~70,000 objects for 10,000 AdamW params (~1.7 ms a
// step, 2-core CPU VM); here only the dicts' and lists' own tables are read.

/// `seq` (a list or tuple) holds exactly `expected` (a list or tuple), element by element.
bool same_elements(PyObject* seq, PyObject* expected) {
  if (!(PyList_Check(seq) || PyTuple_Check(seq))) return false;  // the fallback compares
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(expected);
  if (PySequence_Fast_GET_SIZE(seq) != n) return false;
  PyObject** got = PySequence_Fast_ITEMS(seq);
  PyObject** want = PySequence_Fast_ITEMS(expected);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (got[i] != want[i]) return false;
  }
  return true;
}

/// `mapping[key]` is `expected`; -1 with a Python error set for an error other than a
/// missing key.
int holds(PyObject* mapping, PyObject* key, PyObject* expected) {
  if (PyDict_CheckExact(mapping)) {  // (a borrowed reference; no call into Python)
    PyObject* value = PyDict_GetItemWithError(mapping, key);
    return value == nullptr ? (PyErr_Occurred() ? -1 : 0) : value == expected;
  }
  PyObject* value = PyObject_GetItem(mapping, key);  // a dict subclass, any mapping
  if (value == nullptr) {
    if (!PyErr_ExceptionMatches(PyExc_KeyError)) return -1;
    PyErr_Clear();
    return 0;
  }
  Py_DECREF(value);
  return value == expected;
}

/// plan_state_matches(state, keys, values, state_tensors, groups, group_params) -> bool:
/// `state` (the optimizer's state dict) holds exactly `keys` and `values` (tuples), in
/// order; for each `(key, dicts, tensors)` of `state_tensors`, `dicts[i][key]` is
/// `tensors[i]`; and each group of `groups` (the optimizer's param_groups) has `params`
/// holding exactly `group_params[g]`. Reads only the containers' tables, by identity.
PyObject* plan_state_matches(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 6 || !PyDict_Check(args[0]) || !PyTuple_Check(args[1]) ||
      !PyTuple_Check(args[2]) || !PyList_Check(args[3]) || !PyList_Check(args[4]) ||
      !PyList_Check(args[5])) {
    PyErr_SetString(PyExc_TypeError,
                    "plan_state_matches(state: dict, keys: tuple, values: tuple, "
                    "state_tensors: list, groups: list, group_params: list)");
    return nullptr;
  }
  PyObject *state = args[0], *keys = args[1], *values = args[2];
  PyObject *state_tensors = args[3], *groups = args[4], *group_params = args[5];
  if (PyList_GET_SIZE(groups) != PyList_GET_SIZE(group_params)) Py_RETURN_FALSE;
  PyObject* params_key = PyUnicode_InternFromString("params");
  if (params_key == nullptr) return nullptr;
  for (Py_ssize_t g = 0; g < PyList_GET_SIZE(groups); ++g) {
    PyObject* group = PyList_GET_ITEM(groups, g);
    PyObject* params = PyDict_Check(group) ? PyDict_GetItemWithError(group, params_key) : nullptr;
    if (params == nullptr || !same_elements(params, PyList_GET_ITEM(group_params, g))) {
      Py_DECREF(params_key);
      if (PyErr_Occurred()) return nullptr;
      Py_RETURN_FALSE;
    }
  }
  Py_DECREF(params_key);
  const Py_ssize_t n = PyTuple_GET_SIZE(keys);
  if (PyDict_GET_SIZE(state) != n || PyTuple_GET_SIZE(values) != n) Py_RETURN_FALSE;
  Py_ssize_t position = 0, i = 0;
  PyObject *key, *value;
  while (PyDict_Next(state, &position, &key, &value)) {  // in insertion order
    if (key != PyTuple_GET_ITEM(keys, i) || value != PyTuple_GET_ITEM(values, i)) Py_RETURN_FALSE;
    ++i;
  }
  for (Py_ssize_t k = 0; k < PyList_GET_SIZE(state_tensors); ++k) {
    PyObject* entry = PyList_GET_ITEM(state_tensors, k);
    if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 3 ||
        !PyList_Check(PyTuple_GET_ITEM(entry, 1)) || !PyList_Check(PyTuple_GET_ITEM(entry, 2))) {
      PyErr_SetString(PyExc_TypeError, "plan_state_matches: state_tensors holds (key, dicts, "
                                       "tensors) tuples of a key and two lists");
      return nullptr;
    }
    PyObject *state_key = PyTuple_GET_ITEM(entry, 0), *dicts = PyTuple_GET_ITEM(entry, 1),
             *tensors = PyTuple_GET_ITEM(entry, 2);
    if (PyList_GET_SIZE(dicts) != PyList_GET_SIZE(tensors)) Py_RETURN_FALSE;
    for (Py_ssize_t j = 0; j < PyList_GET_SIZE(dicts); ++j) {
      const int same = holds(PyList_GET_ITEM(dicts, j), state_key, PyList_GET_ITEM(tensors, j));
      if (same < 0) return nullptr;
      if (same == 0) Py_RETURN_FALSE;
    }
  }
  Py_RETURN_TRUE;
}

PyMethodDef module_methods[] = {
    {"plan_state_matches", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(
                               &plan_state_matches)),
     METH_FASTCALL, "The state part of a cached plan's per-step check ([note: cached plan])."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace fusedopt

static PyModuleDef fusedopt_module = {
    PyModuleDef_HEAD_INIT, FUSEDOPT_STR(TORCH_EXTENSION_NAME),
    "fusedopt's C++ kernels: the cpu backend (and cuda when built with CUDA)", -1,
    fusedopt::module_methods};

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
  // [note: step grads] The grads plan_grads found as recorded, held from plan_grads to the
  // end of the step (plan_release): the step's norm pass and planned calls take them from
  // here instead of reading each param's grad again (its TensorImpl, its autograd metadata,
  // the grad's TensorImpl: ~3 cache misses per param at 10,000 params, each time). Released
  // at the end of the step, so that no grad outlives the step here (zero_grad frees them).
  mutable std::vector<Tensor> step_grads;
  mutable bool has_step_grads = false;
};

/// A handle op's object (PlanRecord, PlannedCall) owned by an empty CPU tensor's storage, so
/// that Python holds it like any tensor; owned<T>(handle, what) reads it back, refusing a
/// tensor that some other op (or no handle op) made.
template <class T>
void delete_owned(void* object) {
  delete static_cast<T*>(object);
}

template <class T>
Tensor owning_handle(std::unique_ptr<T> object) {
  void* raw = object.get();
  Tensor handle = at::for_blob(raw, {0})
                      .context(raw, &delete_owned<T>)
                      .options(at::TensorOptions().dtype(at::kByte))
                      .make_tensor();
  object.release();  // the handle's storage owns it now
  return handle;
}

template <class T>
const T& owned(const Tensor& handle, const char* what) {
  TORCH_CHECK(
      handle.has_storage() && handle.storage().data_ptr().get_deleter() == &delete_owned<T>,
      what);
  return *static_cast<const T*>(handle.storage().data_ptr().get_context());
}

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
  return owning_handle(std::move(record));
}

/// (true, the grads of the params that had one, in order) if every param and grad is as
/// ``handle``'s record says; (false, []) at the first difference. With ``return_grads``
/// false, (true, []): a step whose op calls and norm pass are all planned ([note: planned
/// calls]) reads its grads in C++ and needs none in Python, and handing 10,000 grads to
/// Python (each wrapped into the boxed stack, converted to its Python object, listed, and
/// released again at the end of the step) cost ~1 ms of a ~12 ms step (perf, 2-core CPU VM).
std::tuple<bool, std::vector<Tensor>> plan_grads(const Tensor& handle, bool return_grads) {
  const auto& record = owned<PlanRecord>(
      handle, "fusedopt::plan_grads: the argument is not a tensor plan_record made");
  const std::vector<int64_t>& meta = record.meta;
  std::vector<Tensor>& grads = record.step_grads;  // [note: step grads]
  grads.clear();
  record.has_step_grads = false;
  grads.reserve(record.params.size());
  const auto mismatch = [&grads] {
    grads.clear();
    return std::make_tuple(false, std::vector<Tensor>{});
  };
  size_t at = 0;
  const TensorList params = record.params;
  for (size_t i = 0; i < params.size(); ++i) {
    // [note: prefetch]: each param's TensorImpl, then its autograd metadata (which holds
    // the grad), then the grad's TensorImpl, ahead of the loop: 10,000 fp32 params,
    // 0.14-0.16 -> 0.05 us per param (CPU time, load ~11, 2-core CPU VM).
    prefetch_tensor(params, i);
    if (i + kPrefetchAhead / 2 < params.size()) {
      __builtin_prefetch(params[i + kPrefetchAhead / 2].unsafeGetTensorImpl()->autograd_meta());
    }
    if (i + kPrefetchAhead / 4 < params.size()) {  // the grad's TensorImpl, its meta asked for
      const auto* grad_meta = static_cast<const torch::autograd::AutogradMeta*>(
          params[i + kPrefetchAhead / 4].unsafeGetTensorImpl()->autograd_meta());
      if (grad_meta != nullptr && grad_meta->grad_.defined()) {
        const auto* impl = reinterpret_cast<const char*>(grad_meta->grad_.unsafeGetTensorImpl());
        for (size_t line = 0; line < sizeof(c10::TensorImpl); line += 64) {
          __builtin_prefetch(impl + line);
        }
      }
    }
    const Tensor& p = params[i];
    const bool had_grad = meta[at++] != 0;
    if (!matches(p, meta, at)) return mismatch();
    const Tensor& g = p.grad();
    if (g.defined() != had_grad) return mismatch();
    if (had_grad) {
      if (!matches(g, meta, at)) return mismatch();
      grads.push_back(g);
    }
  }
  record.has_step_grads = true;
  return std::make_tuple(true, return_grads ? grads : std::vector<Tensor>{});
}

/// Drops the grads plan_grads holds for the step ([note: step grads]): the step's end.
void plan_release(const Tensor& handle) {
  const auto& record = owned<PlanRecord>(
      handle, "fusedopt::plan_release: the argument is not a tensor plan_record made");
  record.step_grads.clear();
  record.has_step_grads = false;
}

/// The grads of this step, in order: the ones plan_grads found as recorded and holds
/// ([note: step grads]), else each recorded param's grad, read again.
std::vector<Tensor> recorded_grads(const PlanRecord& record) {
  if (record.has_step_grads) return record.step_grads;
  std::vector<Tensor> grads;
  grads.reserve(record.params.size());
  for (const Tensor& p : record.params) {
    const Tensor& g = p.grad();
    if (g.defined()) grads.push_back(g);
  }
  return grads;
}

/// grad_norm (its outputs; per_tensor off) on ``backend`` over the grads of ``handle``'s
/// record: the norm pass of a step whose grads plan_grads checked and kept in C++.
std::tuple<Tensor, Tensor, Tensor> plan_grad_norm(const Tensor& handle, const std::string& backend,
                                                  double norm_type, const OptTensor& grad_scale) {
  const auto& record = owned<PlanRecord>(
      handle, "fusedopt::plan_grad_norm: the argument is not a tensor plan_record made");
  const std::vector<Tensor> grads_read = record.has_step_grads ? std::vector<Tensor>{}
                                                              : recorded_grads(record);
  const TensorList grads = record.has_step_grads ? TensorList(record.step_grads) : grads_read;
  if (backend == CpuBackend::kName) {
    return grad_norm_impl<CpuBackend>(grads, norm_type, false, grad_scale);
  }
#ifdef FUSEDOPT_WITH_CUDA
  if (backend == CudaBackend::kName) {
    return grad_norm_impl<CudaBackend>(grads, norm_type, false, grad_scale);
  }
#endif
  TORCH_CHECK_VALUE(false, "fusedopt::plan_grad_norm: no backend ", backend, " in fusedopt._C");
}

// ---------------------------------------------------------------------------------------
// A cached plan's op calls ([note: planned calls] in fusedopt/optim/_plan.py).
//
// A step op called from Python converts every tensor list it takes: the dispatcher wraps
// each tensor of each list (params, grads, the states, masters, steps: ~5 per param) into
// a boxed stack, reads its dispatch keys, the autograd fallback reads whether it requires
// grad, and the kernel wrapper copies each list out of the stack again. At 10,000 tensors
// that touches ~50,000 TensorImpls and their Python objects several times over: ~7 of a
// 13 ms op call (perf, 2-core CPU VM), more than the op's own checks and kernel. But all
// those lists but the grads are the plan's, the same tensors every step. plan_call keeps
// them in C++ once per plan, in a PlannedCall that holds them (strong references) with the
// op's flags; plan_call_step takes that handle, reads each param's grad in C++ (the
// optimizer's plan_grads checked them this step) and calls the op's implementation with
// the lists, so every check of the op still runs, on the same tensors. What reaches the
// dispatcher is a handle and the step's few scalars.

/// One op call of a cached plan: the op's tensor lists in schema order, the grads' (index
/// 1) left empty, and its flags then the common flags (master_sync), in schema order.
struct PlannedCall {
  using Run = void (*)(const PlannedCall&, TensorList grads, const Tensor& hypers,
                       c10::IntArrayRef group_sizes, const OptTensor& lr_tensor,
                       const OptTensor& grad_scale, const OptTensor& clip_coef,
                       const OptTensor& found_inf);
  Run run = nullptr;
  std::vector<std::vector<Tensor>> lists;
  std::vector<bool> flags;
  // The plan's record (its handle, holding it alive) and the positions of this call's
  // params among its step grads ([note: step grads]); all of them, in order: `all_grads`.
  Tensor record_handle;
  const PlanRecord* record = nullptr;
  std::vector<int64_t> grad_positions;
  bool all_grads = false;
};

// The op's implementation called with a PlannedCall's lists and flags, for each step op.
#define FUSEDOPT_PLANNED_STATE(name, Name, index, ...) c.lists[2 + index],
#define FUSEDOPT_PLANNED_STEPS(name) c.lists.back(),
#define FUSEDOPT_PLANNED_FLAG(name, Name, index, ...) c.flags[index],
#define FUSEDOPT_PLANNED_COMMON_FLAG(name, Name, index, ...) , c.flags[kOpFlags + index]
#define FUSEDOPT_PLANNED_RUN(op, OP, Stem)                                                     \
  template <class B>                                                                           \
  void op##_planned(const PlannedCall& c, TensorList grads, const Tensor& hypers,              \
                    c10::IntArrayRef group_sizes, const OptTensor& lr_tensor,                  \
                    const OptTensor& grad_scale, const OptTensor& clip_coef,                   \
                    const OptTensor& found_inf) {                                              \
    constexpr int kOpFlags = spec::op::kNumFlags;                                              \
    op##_impl<B>(c.lists[0], grads, FUSEDOPT_##OP##_STATES(FUSEDOPT_PLANNED_STATE)             \
                     c.lists[2 + spec::op::kNumStates],                                        \
                 FUSEDOPT_##OP##_STEPS(FUSEDOPT_PLANNED_STEPS) hypers, group_sizes,            \
                 FUSEDOPT_##OP##_FLAGS(FUSEDOPT_PLANNED_FLAG) lr_tensor, grad_scale, clip_coef, \
                 found_inf FUSEDOPT_COMMON_FLAGS(FUSEDOPT_PLANNED_COMMON_FLAG), std::nullopt); \
  }
FUSEDOPT_STEP_OPS(FUSEDOPT_PLANNED_RUN)

/// The number of tensor lists and of flags (the op's and the common ones) of each step op.
struct PlannedShape {
  PlannedCall::Run run;
  size_t lists, flags;
};

#define FUSEDOPT_COUNT(...) +1
template <class B>
std::optional<PlannedShape> planned_shape(const std::string& op) {
#define FUSEDOPT_PLANNED_SHAPE(op_, OP, Stem)                                             \
  if (op == #op_ "_") {                                                                   \
    return PlannedShape{&op_##_planned<B>,                                                \
                        3 + spec::op_::kNumStates FUSEDOPT_##OP##_STEPS(FUSEDOPT_COUNT), \
                        spec::op_::kNumFlags FUSEDOPT_COMMON_FLAGS(FUSEDOPT_COUNT)};     \
  }
  FUSEDOPT_STEP_OPS(FUSEDOPT_PLANNED_SHAPE)
  return std::nullopt;
}

/// An empty CPU tensor that owns the PlannedCall of the step op ``op`` (``"adamw_"``) on
/// ``backend`` (``"cpu"``, ``"cuda"``): ``tensors`` holds its lists in schema order, the
/// grads' left out (``list_sizes[1]`` is 0), one after the other, ``list_sizes`` their
/// lengths; ``flags`` the op's flags then the common flags, in schema order.
Tensor plan_call(const std::string& op, const std::string& backend, TensorList tensors,
                 c10::IntArrayRef list_sizes, c10::IntArrayRef flags, const OptTensor& record,
                 c10::IntArrayRef grad_positions) {
  std::optional<PlannedShape> shape;
  if (backend == CpuBackend::kName) shape = planned_shape<CpuBackend>(op);
#ifdef FUSEDOPT_WITH_CUDA
  if (backend == CudaBackend::kName) shape = planned_shape<CudaBackend>(op);
#endif
  TORCH_CHECK_VALUE(shape.has_value(), "fusedopt::plan_call: no step op ", op,
                    " on the backend ", backend, " in fusedopt._C");
  TORCH_CHECK_VALUE(list_sizes.size() == shape->lists && flags.size() == shape->flags &&
                        list_sizes[1] == 0,
                    "fusedopt::plan_call: ", op, " takes ", shape->lists, " lists (grads empty) and ",
                    shape->flags, " flags; got ", list_sizes, " and ", flags);
  auto call = std::make_unique<PlannedCall>();
  call->run = shape->run;
  size_t at = 0;
  for (const int64_t size : list_sizes) {
    TORCH_CHECK_VALUE(size >= 0 && at + size <= tensors.size(), "fusedopt::plan_call: ",
                      "list_sizes ", list_sizes, " do not add up to the ", tensors.size(),
                      " tensors");
    call->lists.emplace_back(tensors.begin() + at, tensors.begin() + at + size);
    at += size;
  }
  TORCH_CHECK_VALUE(at == tensors.size(), "fusedopt::plan_call: list_sizes ", list_sizes,
                    " do not add up to the ", tensors.size(), " tensors");
  call->flags.assign(flags.begin(), flags.end());
  if (record.has_value()) {  // [note: step grads]
    call->record = &owned<PlanRecord>(
        *record, "fusedopt::plan_call: record is not a tensor plan_record made");
    call->record_handle = *record;
    TORCH_CHECK_VALUE(grad_positions.size() == call->lists[0].size(), "fusedopt::plan_call: ",
                      grad_positions.size(), " grad_positions for ", call->lists[0].size(),
                      " params");
    call->grad_positions.assign(grad_positions.begin(), grad_positions.end());
    bool in_order = true;
    for (size_t i = 0; i < grad_positions.size(); ++i) in_order &= grad_positions[i] == int64_t(i);
    call->all_grads = in_order;
  }
  return owning_handle(std::move(call));
}

/// Runs the planned call ``handle`` with the params' grads and this step's hyperparameter
/// table and scalars (the step op's arguments of those names).
void plan_call_step(const Tensor& handle, const Tensor& hypers, c10::IntArrayRef group_sizes,
                    const OptTensor& lr_tensor, const OptTensor& grad_scale,
                    const OptTensor& clip_coef, const OptTensor& found_inf) {
  const auto& call = owned<PlannedCall>(
      handle, "fusedopt::plan_call_step: the argument is not a tensor plan_call made");
  const size_t n = call.lists[0].size();
  const PlanRecord* record = call.record;
  if (record != nullptr && record->has_step_grads) {  // [note: step grads]
    const std::vector<Tensor>& held = record->step_grads;
    if (call.all_grads && held.size() == n) {
      call.run(call, held, hypers, group_sizes, lr_tensor, grad_scale, clip_coef, found_inf);
      return;
    }
    std::vector<Tensor> grads;
    grads.reserve(n);
    for (const int64_t at : call.grad_positions) {
      TORCH_CHECK(at >= 0 && static_cast<size_t>(at) < held.size(),
                  "fusedopt::plan_call_step: grad position ", at, " of ", held.size());
      grads.push_back(held[at]);
    }
    call.run(call, grads, hypers, group_sizes, lr_tensor, grad_scale, clip_coef, found_inf);
    return;
  }
  std::vector<Tensor> grads;
  grads.reserve(n);
  for (const Tensor& p : call.lists[0]) grads.push_back(p.grad());  // undefined: the op raises
  call.run(call, grads, hypers, group_sizes, lr_tensor, grad_scale, clip_coef, found_inf);
}

}  // namespace
}  // namespace fusedopt

// A fragment of the namespace fusedopt/_contract.py defines; catch-all kernels (they read
// metadata, and call the backends' implementations above).
//
// Their schemas do not tell the truth about mutation: plan_call_step writes the params,
// states, masters and step counts its handle holds (and plan_grad_norm reads the grads its
// record points to), none of which is an argument. That is fine in eager mode, where the
// dispatcher runs the kernel as it is, but a tracer (torch.compile, make_fx,
// functionalization) would record them as pure ops and could drop or reorder them. So the
// optimizer never calls them while a step is traced: under torch.compile or any dispatch
// mode it plans afresh and calls the step ops with their lists (_tracing in
// fusedopt/optim/_plan.py; tests/test_optim_plan.py checks both paths).
TORCH_LIBRARY_FRAGMENT(fusedopt, m) {
  m.def("plan_record(Tensor[] params) -> Tensor", &fusedopt::plan_record);
  m.def("plan_grads(Tensor record, bool return_grads=True) -> (bool, Tensor[])",
        &fusedopt::plan_grads);
  m.def("plan_grad_norm(Tensor record, str backend, float norm_type, Tensor? grad_scale) -> "
        "(Tensor, Tensor, Tensor)",
        &fusedopt::plan_grad_norm);
  m.def("plan_release(Tensor record) -> ()", &fusedopt::plan_release);
  m.def("plan_call(str op, str backend, Tensor[] tensors, int[] list_sizes, int[] flags, "
        "Tensor? record=None, int[] grad_positions=[]) -> Tensor",
        &fusedopt::plan_call);
  m.def("plan_call_step(Tensor call, Tensor hypers, int[] group_sizes, Tensor? lr_tensor, "
        "Tensor? grad_scale, Tensor? clip_coef, Tensor? found_inf) -> ()",
        &fusedopt::plan_call_step);
}
