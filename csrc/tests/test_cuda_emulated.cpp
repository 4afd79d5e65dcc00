// The CUDA launchers (csrc/cuda, compiled by g++ against the host emulation of csrc/emulation)
// against the CPU launchers, through the torch-free interface of fusedopt/launch.h, filled as
// csrc/bindings.cpp fills it.
//
// Both backends run the same math headers with contraction pinned ([note: pinned
// contraction], fusedopt/macros.h), so every elementwise result must be equal BIT FOR BIT:
// params, masters, states and step counts, after each of several steps. What differs is the
// traversal (chunks, 16-byte vector path and scalar tail, device table, slots, per-tensor
// scalars, skipped steps), which is what this test exercises: every op and variant x every
// storage combination x tensor sizes around the chunk and vector boundaries x aligned and
// misaligned tensors x the device scalars. grad_norm sums in another order on each backend:
// it is held to an error bound derived from its summation chains, and must give the same bits
// on every run and under both thread schedules of the emulator.
//
// The emulator faults (and so fails this test) on a misaligned vector access and on any
// tensor access outside the tensor's registered extent, even where it would not change a
// result.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "cuda_runtime.h"
#include "fusedopt/launch.h"
#include "fusedopt/multi_tensor.h"

using namespace fusedopt;
namespace emu = fusedopt::emulation;

namespace {

constexpr int64_t kChunk = mt::kChunkElems;

// ---------------------------------------------------------------------------------------
// Memory.

/// One tensor's memory: numel elements of a dtype at a 64-byte boundary, or one element past
/// it (misaligned: no 16-byte access is possible, so its chunks take the scalar path). Its
/// exact extent is registered as device memory with the emulator. An empty tensor has a null
/// pointer when `null_if_empty`, as torch may give.
class Buffer {
 public:
  Buffer(DType dtype, int64_t numel, bool misaligned, bool null_if_empty = false)
      : dtype_(dtype), bytes_(static_cast<size_t>(numel) * dtype_size(dtype)) {
    if (numel == 0 && null_if_empty) return;
    const size_t offset = misaligned ? dtype_size(dtype) : 0;
    const size_t capacity = (bytes_ + offset + 127) / 64 * 64;
    base_.reset(static_cast<unsigned char*>(std::aligned_alloc(64, capacity)));
    data_ = base_.get() + offset;
    emu::register_memory(data_, bytes_);
  }
  Buffer(const Buffer&) = delete;
  ~Buffer() {
    if (data_) emu::unregister_memory(data_);
  }
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  DType dtype() const { return dtype_; }
  int64_t numel() const { return static_cast<int64_t>(bytes_ / dtype_size(dtype_)); }

  /// Element k as a double (through the exact conversions of fusedopt/dtype.h).
  double get(int64_t k) const {
    switch (dtype_) {
      case DType::kFloat32: return static_cast<const float*>(data_)[k];
      case DType::kFloat64: return static_cast<const double*>(data_)[k];
      case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(data_)[k]);
      case DType::kFloat16: return fp16_to_float(static_cast<const uint16_t*>(data_)[k]);
      case DType::kInt8: return static_cast<const int8_t*>(data_)[k];
      case DType::kUInt8: return static_cast<const uint8_t*>(data_)[k];
    }
    return 0.0;
  }
  /// Element k = x rounded to the dtype.
  void set(int64_t k, double x) {
    switch (dtype_) {
      case DType::kFloat32: static_cast<float*>(data_)[k] = static_cast<float>(x); break;
      case DType::kFloat64: static_cast<double*>(data_)[k] = x; break;
      case DType::kBFloat16:
        static_cast<uint16_t*>(data_)[k] = float_to_bf16(static_cast<float>(x));
        break;
      case DType::kFloat16:
        static_cast<uint16_t*>(data_)[k] = float_to_fp16(static_cast<float>(x));
        break;
      case DType::kInt8: static_cast<int8_t*>(data_)[k] = static_cast<int8_t>(x); break;
      case DType::kUInt8: static_cast<uint8_t*>(data_)[k] = static_cast<uint8_t>(x); break;
    }
  }
  /// Element k's raw 16 bits (a 16-bit dtype's buffer; a compact master's remainders).
  void set_bits(int64_t k, uint16_t bits) { static_cast<uint16_t*>(data_)[k] = bits; }
  uint16_t bits(int64_t k) const { return static_cast<const uint16_t*>(data_)[k]; }
  void copy_from(const Buffer& other) {
    if (bytes_) std::memcpy(data_, other.data_, bytes_);
  }
  bool same_bits(const Buffer& other) const {
    return bytes_ == other.bytes_ && (bytes_ == 0 || std::memcmp(data_, other.data_, bytes_) == 0);
  }

 private:
  struct Free {
    void operator()(unsigned char* p) const { std::free(p); }
  };
  DType dtype_;
  size_t bytes_;
  std::unique_ptr<unsigned char, Free> base_;
  void* data_ = nullptr;
};

/// The CUDA launchers' ExecContext: workspace from the emulated cudaMallocAsync, freed when
/// the launch returns (the kernels have run by then: emulated launches are synchronous).
struct CudaContext {
  std::vector<void*> blocks;
  ExecContext ctx;
  CudaContext() {
    ctx.workspace = {&CudaContext::allocate, this};
  }
  ~CudaContext() {
    for (void* p : blocks) cudaFreeAsync(p, nullptr);
  }
  static void* allocate(void* self, size_t bytes) {
    void* p = nullptr;
    if (cudaMallocAsync(&p, bytes, nullptr) != cudaSuccess) std::abort();
    static_cast<CudaContext*>(self)->blocks.push_back(p);
    return p;
  }
};

// [note: norm tolerance] A sum of k-term chains of non-negative terms, each addition
// rounded to unit roundoff u, has relative error <= k*u (to first order; Higham, Accuracy and
// Stability, 4.2), and the square root halves it and adds u. Both backends add the same
// fp32 (or fp64) terms norm2_term(x, grad_scale), so against their exact double sum only
// the summation order counts:
//   * cuda: a thread adds <= kChunk/256 terms, then warp and block trees (5 + 5 levels); the
//     finishing block adds a tensor's chunk partials lane-strided (chunks/32 per lane), a
//     5-level tree, the tensors of one warp in a row (n/32), and a 5-level tree: k below;
//   * cpu: fp32 lanes of at most kLaneTerms = 32 terms (csrc/cpu/reduce.h), then double sums
//     (a lane tree, blocks, items, tensors) of at most total/32 + n lanes, each adding at most
//     2^-53.
// The exact reference sums the same terms in double (its own error, <= n_terms * 2^-53
// relative, is inside the bound).
double cuda_chain(int64_t max_chunks, int64_t n) {
  return kChunk / 256 + 10 + (max_chunks + 31) / 32 + 5 + (n + 31) / 32 + 5;
}

// ---------------------------------------------------------------------------------------
// The step ops: cases.

enum class Op { kAdamW, kLamb, kLion, kAdan, kScheduleFreeAdamW, kSgd, kMuon };

/// One variant of an op: its per-call flags (in launch.h's order), per-tensor
/// hyperparameters after lr (in launch.h's order) and which of them is 0 for every third
/// tensor (a param group without it: LAMB's weight decay, SGD's momentum), or -1.
struct Variant {
  const char* name;
  Op op;
  std::array<bool, 4> flags;
  std::array<double, 8> hyper;
  double lr;
  int zero_every_third;
};

// adamw: decoupled, amsgrad, maximize, bias_correction; beta1, beta2, eps, weight_decay
// lamb: grad_averaging, bias_correction, trust_clip, always_adapt; beta1, beta2, eps, wd
// lion: maximize; beta1, beta2, weight_decay
// adan: no_prox; beta1, beta2, beta3, eps, weight_decay
// schedulefree_adamw: (no flags); beta1, beta2, eps, weight_decay, ckp1, bias_correction2
// sgd: nesterov, maximize; momentum, dampening, weight_decay (momentum 0: no buffers)
// muon: nesterov; momentum, weight_decay, lr_ratio, ns_a, ns_b, ns_c, ns_eps, ns_steps (the
//   ns_* are the iteration's, read by neither pass)
const Variant kVariants[] = {
    {"adamw", Op::kAdamW, {true, false, false, true}, {0.9, 0.999, 1e-8, 0.01}, 1e-2, -1},
    {"adam_l2", Op::kAdamW, {false, false, false, true}, {0.9, 0.999, 1e-8, 0.01}, 1e-2, -1},
    {"adamw_amsgrad", Op::kAdamW, {true, true, false, true}, {0.8, 0.99, 1e-6, 0.1}, 1e-2, 3},
    {"adam_amsgrad_maximize", Op::kAdamW, {false, true, true, true}, {0.9, 0.999, 1e-8, 0.0},
     1e-2, -1},
    {"adamw_no_bias_correction", Op::kAdamW, {true, false, false, false},
     {0.9, 0.999, 1e-8, 0.01}, 1e-2, -1},
    {"lamb", Op::kLamb, {true, true, false, false}, {0.9, 0.999, 1e-6, 0.01}, 1e-2, -1},
    {"lamb_trust_clip_mixed_wd", Op::kLamb, {true, true, true, false}, {0.9, 0.999, 1e-6, 0.1},
     1e-2, 3},
    {"lamb_plain_no_adapt", Op::kLamb, {false, false, false, false}, {0.9, 0.99, 1e-6, 0.0},
     1e-2, -1},
    {"lamb_always_adapt", Op::kLamb, {true, true, false, true}, {0.9, 0.999, 1e-6, 0.0}, 1e-2,
     -1},
    {"lion", Op::kLion, {false}, {0.9, 0.99, 0.01, 0.0}, 1e-3, -1},
    {"lion_maximize", Op::kLion, {true}, {0.95, 0.98, 0.1, 0.0}, 1e-3, 2},
    {"adan", Op::kAdan, {false}, {0.98, 0.92, 0.99, 1e-8, 0.02}, 1e-2, -1},
    {"adan_no_prox_mixed_wd", Op::kAdan, {true}, {0.9, 0.8, 0.95, 1e-6, 0.1}, 1e-2, 4},
    {"schedulefree_adamw", Op::kScheduleFreeAdamW, {}, {0.9, 0.999, 1e-8, 0.01, 0.25, 0.05},
     1e-2, -1},
    // ckp1 >= 0.5: torch's lerp from z; every third tensor without weight decay.
    {"schedulefree_adamw_lerp_from_z_mixed_wd", Op::kScheduleFreeAdamW, {},
     {0.8, 0.99, 1e-6, 0.1, 0.75, 0.9}, 1e-2, 3},
    {"sgd", Op::kSgd, {false, false}, {0.0, 0.0, 0.01, 0.0}, 0.1, -1},
    {"sgd_momentum", Op::kSgd, {false, false}, {0.9, 0.0, 0.0, 0.0}, 0.1, -1},
    {"sgd_nesterov", Op::kSgd, {true, false}, {0.9, 0.0, 0.01, 0.0}, 0.1, -1},
    {"sgd_dampening_maximize", Op::kSgd, {false, true}, {0.8, 0.3, 0.01, 0.0}, 0.1, -1},
    {"sgd_momentum_0_in_buffered_call", Op::kSgd, {false, false}, {0.9, 0.1, 0.01, 0.0}, 0.1, 0},
    {"muon", Op::kMuon, {true}, {0.95, 0.1, 1.5, 3.4445, -4.775, 2.0315, 1e-7, 5.0}, 2e-2, -1},
    // momentum < 0.5: both lerps of torch's other form; every third tensor without decay
    {"muon_plain_mixed_wd", Op::kMuon, {false}, {0.3, 0.2, 0.75, 3.4445, -4.775, 2.0315, 1e-7, 5.0},
     2e-2, 1},
    {"muon_nesterov_low_momentum", Op::kMuon, {true}, {0.3, 0.0, 1.0, 3.4445, -4.775, 2.0315, 1e-7,
     5.0}, 2e-2, -1},
};

/// Storage of a step call: param and grad dtypes, master weights (DESIGN.md §3),
/// StepLists::master_sync ([note: master sync]; the user writes into the params of every
/// master-weight case between steps, see write_params), and compact masters (int16
/// remainders, held in 16-bit buffers: [note: compact master] in fusedopt/_contract.py), and
/// Kahan masters (a compensation of the param's dtype: [note: kahan master]).
/// `stochastic`: the call has an sr_key, so the bf16 param store rounds stochastically
/// ([note: stochastic rounding] in fusedopt/dtype.h; bf16 without masters), and AdamW's bf16
/// states too ([note: state dtype]). `state`: AdamW's state storage (a DType) where it is
/// not DESIGN.md §3's rule (-1), [note: state dtype].
struct Storage {
  DType param, grad;
  bool master;
  bool sync = true;
  bool compact = false;
  bool kahan = false;
  bool stochastic = false;
  int state = -1;
  /// The dtype of the master buffers.
  DType master_dtype() const {
    return kahan ? param : compact ? DType::kBFloat16 : DType::kFloat32;
  }
};
const Storage kStorages[] = {
    {DType::kFloat32, DType::kFloat32, false},   {DType::kBFloat16, DType::kBFloat16, false},
    {DType::kBFloat16, DType::kFloat32, false},  {DType::kFloat16, DType::kFloat16, false},
    {DType::kFloat16, DType::kFloat32, false},   {DType::kFloat64, DType::kFloat64, false},
    {DType::kBFloat16, DType::kBFloat16, true},  {DType::kBFloat16, DType::kFloat32, true},
    {DType::kFloat16, DType::kFloat16, true},    {DType::kFloat16, DType::kFloat32, true},
    {DType::kBFloat16, DType::kBFloat16, true, false},
    {DType::kBFloat16, DType::kBFloat16, true, true, true},
    {DType::kBFloat16, DType::kFloat32, true, true, true},
    {DType::kBFloat16, DType::kBFloat16, true, true, false, true},
    {DType::kBFloat16, DType::kFloat32, true, true, false, true},
    {DType::kFloat16, DType::kFloat16, true, true, false, true},
    {DType::kBFloat16, DType::kBFloat16, false, true, false, false, true},
    {DType::kBFloat16, DType::kFloat32, false, true, false, false, true},
};

/// [note: state dtype]: the states of AdamW, LAMB, Lion and SGD in their own storage, the
/// ones the CUDA backend builds (kCudaStateStorage in csrc/cuda/step.cuh): fp32 params with
/// 16-bit states, bf16 params with fp32 / compact / Kahan masters and bf16 states; bf16 ones
/// with stochastic rounding too.
constexpr int kSF32 = static_cast<int>(DType::kFloat32);
constexpr int kSBF16 = static_cast<int>(DType::kBFloat16);
constexpr int kSF16 = static_cast<int>(DType::kFloat16);
const Storage kStateStorages[] = {
    {DType::kFloat32, DType::kFloat32, false, true, false, false, false, kSBF16},
    {DType::kFloat32, DType::kFloat32, false, true, false, false, true, kSBF16},
    {DType::kFloat32, DType::kFloat32, false, true, false, false, false, kSF16},
    {DType::kBFloat16, DType::kFloat32, true, true, false, false, false, kSBF16},
    {DType::kBFloat16, DType::kBFloat16, true, true, false, false, true, kSBF16},
    {DType::kBFloat16, DType::kFloat32, true, true, true, false, true, kSBF16},
    {DType::kBFloat16, DType::kBFloat16, true, true, false, true, true, kSBF16},
};

/// The storages the CUDA backend refuses (the reference, cpu and triton backends run them:
/// tests/test_state_dtype.py): 16-bit params with masters and fp16 states, fp16 params with
/// masters and bf16 states, 16-bit params without masters and fp32 states.
const Storage kRefusedStateStorages[] = {
    {DType::kBFloat16, DType::kBFloat16, true, true, false, false, false, kSF16},
    {DType::kFloat16, DType::kFloat32, true, true, false, true, false, kSBF16},
    {DType::kFloat16, DType::kFloat16, true, true, false, false, false, kSF16},
    {DType::kBFloat16, DType::kBFloat16, false, true, false, false, true, kSF32},
    {DType::kFloat16, DType::kFloat32, false, true, false, false, false, kSF32},
};

/// The sr_key of a stochastic call at `step`: a seed above 2^32 (both key words count), the
/// counter, and ids that are not the tensors' positions (so a kernel that keys by position
/// shows); every third tensor a shard whose first element is not 0 ([note: sharded
/// stochastic rounding]: the element counted in the whole param, the param's and the
/// states' streams alike).
std::vector<int64_t> sr_key_of(size_t n, int step) {
  std::vector<int64_t> key = {0x5EED0000ABCDLL, 40 + step};
  for (size_t i = 0; i < n; ++i) {
    const int64_t first = i % 3 == 1 ? static_cast<int64_t>(4099 * i + 1) : 0;
    key.push_back(static_cast<int64_t>(1000 + 7 * i) | first << 32);
  }
  return key;
}

enum class LrKind { kUniform, kPerTensor, kTensor1, kTensorN };

/// The device scalars and learning rates of a case, and found_inf per step (-1: absent).
struct Scalars {
  const char* name;
  LrKind lr;
  float grad_scale;  // 0: absent
  float clip_coef;   // 0: absent
  std::array<float, 3> found_inf;
  bool capturing;    // cudaStreamIsCapturing reports a capture: the table goes to the workspace
};
const Scalars kScalars[] = {
    {"plain", LrKind::kUniform, 0.0f, 0.0f, {-1, -1, -1}, false},
    // found_inf 2.0: torch sums the flag over devices.
    {"scaled_skip_2nd", LrKind::kPerTensor, 8.0f, 0.75f, {0, 2, 0}, false},
    {"lr_tensor_skip_1st", LrKind::kTensor1, 0.0f, 0.0f, {1, 0, 0}, true},
    {"lr_tensors_scaled_skip_3rd", LrKind::kTensorN, 1024.0f, 0.5f, {0, 0, 1}, false},
};

/// A tensor of a case: numel and whether its memory is misaligned.
struct Shape {
  int64_t numel;
  bool misaligned;
};
// Small tensors around the vector width (empty ones in the middle, one with a null pointer),
// aligned and not: the semantics cases.
const std::vector<Shape> kSmall = {{7, true}, {0, false}, {1, false}, {33, false},
                                   {0, true}, {1029, true}, {130, false}};
// Around the chunk size and across several chunks: the traversal cases.
const std::vector<Shape> kLarge = {{kChunk - 1, false}, {kChunk + 1, true},
                                   {1, true},           {3 * kChunk + 3, false}};

struct StepCase {
  const Variant* variant;
  Storage storage;
  const Scalars* scalars;
  const std::vector<Shape>* shapes;
  int steps;
  emu::Schedule schedule;
};

// ---------------------------------------------------------------------------------------
// The step ops: state of one backend, and the call structs bindings.cpp would fill.

int state_count(const Variant& v) {
  switch (v.op) {
    case Op::kAdamW: return v.flags[1] ? 3 : 2;  // exp_avg, exp_avg_sq (+ max_exp_avg_sq)
    case Op::kLamb: return 2;
    case Op::kLion: return 1;
    case Op::kAdan: return 4;  // exp_avg, exp_avg_sq, exp_avg_diff, neg_pre_grad
    case Op::kScheduleFreeAdamW: return 2;  // z, exp_avg_sq
    case Op::kSgd: return v.hyper[0] != 0.0 ? 1 : 0;  // momentum buffers
    case Op::kMuon: return 2;  // momentum_buffer, the bf16 Newton-Schulz buffer
  }
  return 0;
}

/// Whether the op declares free state dtypes (spec kStateDtypes, [note: state dtype]).
bool free_state_dtypes(Op op) {
  return op == Op::kAdamW || op == Op::kLamb || op == Op::kLion || op == Op::kSgd;
}

/// The storage of state k: the storage's own state dtype where the op has free state dtypes
/// and the storage gives one, else fp32 with master weights, else the param's; Muon's
/// Newton-Schulz buffer is bf16 always (its layout "bf16").
DType state_dtype(const Variant& v, size_t k, const Storage& storage) {
  if (v.op == Op::kMuon && k == 1) return DType::kBFloat16;
  if (free_state_dtypes(v.op) && storage.state >= 0) return static_cast<DType>(storage.state);
  return storage.master ? DType::kFloat32 : storage.param;
}

bool has_steps(const Variant& v) {
  return v.op == Op::kAdamW || v.op == Op::kLamb || v.op == Op::kAdan || (v.op == Op::kSgd && state_count(v) > 0);
}

/// The tensors of one backend for one case.
struct World {
  std::vector<std::unique_ptr<Buffer>> params, grads, masters;
  std::vector<std::vector<std::unique_ptr<Buffer>>> states;  // [slot][tensor]
  std::vector<float> steps;

  World(const StepCase& c) {
    const size_t n = c.shapes->size();
    states.resize(state_count(*c.variant));
    for (size_t i = 0; i < n; ++i) {
      const Shape s = (*c.shapes)[i];
      const bool null = i == 1;  // the first empty tensor of kSmall has no memory at all
      params.push_back(std::make_unique<Buffer>(c.storage.param, s.numel, s.misaligned, null));
      grads.push_back(std::make_unique<Buffer>(c.storage.grad, s.numel, s.misaligned, null));
      if (c.storage.master)
        masters.push_back(std::make_unique<Buffer>(c.storage.master_dtype(), s.numel,
                                                   s.misaligned, null));
      // Mixed alignment inside one tensor's slots: its first state is aligned when the
      // param is not, and the other way round, so both "one slot refuses" cases occur.
      for (size_t k = 0; k < states.size(); ++k)
        states[k].push_back(std::make_unique<Buffer>(state_dtype(*c.variant, k, c.storage), s.numel,
                                                     k == 0 && i % 3 == 2 ? !s.misaligned
                                                                         : s.misaligned,
                                                     null));
    }
    steps.assign(n, 0.0f);
  }

  void copy_from(const World& o) {
    for (size_t i = 0; i < params.size(); ++i) {
      params[i]->copy_from(*o.params[i]);
      grads[i]->copy_from(*o.grads[i]);
      if (!masters.empty()) masters[i]->copy_from(*o.masters[i]);
      for (size_t k = 0; k < states.size(); ++k) states[k][i]->copy_from(*o.states[k][i]);
    }
    steps = o.steps;
  }

  /// Every buffer and step count with the same bits as o's; reports the first difference.
  bool same_bits(const World& o, const std::string& what) const {
    auto differ = [&](const char* slot, size_t i) {
      std::fprintf(stderr, "%s: %s[%zu] differs\n", what.c_str(), slot, i);
      return false;
    };
    for (size_t i = 0; i < params.size(); ++i) {
      if (!params[i]->same_bits(*o.params[i])) return differ("params", i);
      if (!masters.empty() && !masters[i]->same_bits(*o.masters[i])) return differ("masters", i);
      for (size_t k = 0; k < states.size(); ++k)
        if (!states[k][i]->same_bits(*o.states[k][i])) return differ("states", i);
    }
    if (std::memcmp(steps.data(), o.steps.data(), steps.size() * sizeof(float)) != 0)
      return differ("steps", 0);
    return true;
  }
};

/// Fills a world with a case's initial values: params in [-1, 1], grads ~ N(0, 1) times the
/// loss scale, moments of a run in progress (v >= 0, vmax >= v), step counts 0 or 5 (as
/// after a state dict load). SGD buffers of a param without steps yet hold NaN: its first
/// step must overwrite them without reading them.
void initialize(World& w, const StepCase& c, std::mt19937& rng) {
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  std::normal_distribution<double> normal;
  const double loss_scale = c.scalars->grad_scale > 0 ? c.scalars->grad_scale : 1.0;
  for (size_t i = 0; i < w.params.size(); ++i) {
    w.steps[i] = i % 2 ? 5.0f : 0.0f;
    for (int64_t k = 0; k < w.params[i]->numel(); ++k) {
      const double p = uniform(rng);
      if (c.storage.compact) {  // the param and remainder of the fp32 master
        const CompactMaster m = split_master(static_cast<float>(p));
        w.params[i]->set_bits(k, m.param);
        w.masters[i]->set_bits(k, static_cast<uint16_t>(m.remainder));
      } else if (c.storage.kahan) {  // the param and compensation of the fp32 value
        const float x = static_cast<float>(p);
        w.params[i]->set(k, x);
        w.masters[i]->set(k, x - static_cast<float>(w.params[i]->get(k)));
      } else {
        if (!w.masters.empty()) w.masters[i]->set(k, p);
        // The param is master.to(dtype) (DESIGN.md §3): round through fp32 as the master does.
        w.params[i]->set(k, w.masters.empty() ? p : static_cast<float>(p));
      }
      w.grads[i]->set(k, normal(rng) * loss_scale);
      const double v = 0.01 * std::fabs(normal(rng));
      for (size_t s = 0; s < w.states.size(); ++s) {
        double x = s == 0 ? 0.1 * normal(rng) : s == 1 ? v : v + 0.001 * std::fabs(normal(rng));
        if (c.variant->op == Op::kSgd && w.steps[i] == 0.0f) x = NAN;
        w.states[s][i]->set(k, x);
      }
    }
  }
}

/// The user writes into the params between steps (a model load, a re-initialisation, a
/// clamp; [note: master sync] in fusedopt/_contract.py): every 4th element, from one that
/// moves with the step, gets a new value, a third of them -0.0 (a sign bit only).
void write_params(World& w, int step) {
  for (auto& p : w.params)
    for (int64_t k = step % 4; k < p->numel(); k += 4)
      p->set(k, k % 3 == 0 ? -0.0 : 1.5 + 0.01 * static_cast<double>(k % 50));
}

/// Per-case arrays that the call structs point into (bindings.cpp keeps the same alive).
struct Call {
  std::vector<int64_t> numels;
  std::vector<void*> params, grads, masters;
  std::vector<std::vector<void*>> states;
  std::vector<float*> steps;
  // The hyperparameter table ([note: hyper table]): one row of kWidth doubles (lr, then
  // Variant::hyper) per run of tensors with equal values, and each tensor's row.
  static constexpr int kWidth = 9;
  std::vector<double> hypers;
  std::vector<int32_t> group;
  std::vector<float> lr_tensor;
  float grad_scale, clip_coef, found_inf;
  double grad_scale64, clip_coef64;  // the same values for fp64 steps, which read them in fp64
  std::vector<int64_t> sr_key;       // [note: stochastic rounding]

  StepLists lists(const StepCase& c, World& w, int step) {
    const size_t n = w.params.size();
    numels.clear();
    params.clear();
    grads.clear();
    masters.clear();
    steps.clear();
    states.assign(w.states.size(), {});
    for (size_t i = 0; i < n; ++i) {
      numels.push_back(w.params[i]->numel());
      params.push_back(w.params[i]->data());
      grads.push_back(w.grads[i]->data());
      if (!w.masters.empty()) masters.push_back(w.masters[i]->data());
      for (size_t k = 0; k < w.states.size(); ++k) states[k].push_back(w.states[k][i]->data());
      steps.push_back(&w.steps[i]);
    }
    const Variant& v = *c.variant;
    const Scalars& s = *c.scalars;
    hypers.clear();
    group.clear();
    for (size_t i = 0; i < n; ++i) {
      std::array<double, kWidth> row{v.lr};
      if (s.lr != LrKind::kUniform) row[0] = v.lr * (1.0 + 0.25 * i);
      for (int h = 0; h < kWidth - 1; ++h)
        row[h + 1] = h == v.zero_every_third && i % 3 == 1 ? 0.0 : v.hyper[h];
      if (hypers.empty() || !std::equal(row.begin(), row.end(), hypers.end() - kWidth))
        hypers.insert(hypers.end(), row.begin(), row.end());
      group.push_back(static_cast<int32_t>(hypers.size() / kWidth - 1));
    }
    StepLists l;
    l.num_tensors = static_cast<int64_t>(n);
    l.numels = numels.data();
    l.params = {params.data(), c.storage.param};
    l.grads = {grads.data(), c.storage.grad};
    if (c.storage.master)
      l.master_params = {masters.data(), c.storage.master_dtype()};
    l.master_sync = c.storage.sync;
    l.compact_master = c.storage.compact;
    l.kahan_master = c.storage.kahan;
    l.steps = has_steps(v) ? steps.data() : nullptr;
    l.hypers = {hypers.data(), kWidth, group.data()};
    if (s.lr == LrKind::kTensor1 || s.lr == LrKind::kTensorN) {
      // Values that differ from the lr lists, so a kernel that ignores the tensor shows.
      lr_tensor.assign(s.lr == LrKind::kTensor1 ? 1 : n, 0.0f);
      for (size_t i = 0; i < lr_tensor.size(); ++i)
        lr_tensor[i] = static_cast<float>(v.lr * (0.5 + 0.125 * i));
      l.scalars.lr = lr_tensor.data();
      l.scalars.lr_numel = static_cast<int64_t>(lr_tensor.size());
    }
    grad_scale = s.grad_scale;
    clip_coef = s.clip_coef;
    found_inf = s.found_inf[step];
    grad_scale64 = grad_scale;
    clip_coef64 = clip_coef;
    const bool fp64 = c.storage.param == DType::kFloat64;  // [note: opmath scalars]
    if (grad_scale > 0) l.scalars.grad_scale = fp64 ? static_cast<const void*>(&grad_scale64)
                                                    : &grad_scale;
    if (clip_coef > 0) l.scalars.clip_coef = fp64 ? static_cast<const void*>(&clip_coef64)
                                                  : &clip_coef;
    if (found_inf >= 0) l.scalars.found_inf = &found_inf;
    if (c.storage.stochastic) {
      sr_key = sr_key_of(n, step);
      l.scalars.sr_key = sr_key.data();
      // As the binding sets it: AdamW, LAMB, Lion and SGD declare free state dtypes
      // ([note: state dtype]).
      l.stochastic_states = free_state_dtypes(v.op);
    }
    return l;
  }

  TensorSlot state(size_t k, const StepCase& c) {
    return {states[k].data(), state_dtype(*c.variant, k, c.storage)};
  }
};

/// One step of a case's op on world w with the given backend (true: cuda).
void step(const StepCase& c, World& w, int index, bool cuda) {
  Call call;
  const StepLists lists = call.lists(c, w, index);
  const Variant& v = *c.variant;
  CudaContext cuda_ctx;
  const ExecContext& ctx = cuda_ctx.ctx;
  switch (v.op) {
    case Op::kAdamW: {
      AdamWCall a;
      a.lists = lists;
      a.exp_avgs = call.state(0, c);
      a.exp_avg_sqs = call.state(1, c);
      if (v.flags[1]) a.max_exp_avg_sqs = call.state(2, c);
      a.decoupled = v.flags[0];
      a.amsgrad = v.flags[1];
      a.maximize = v.flags[2];
      a.bias_correction = v.flags[3];
      return cuda ? cuda::adamw(a, ctx) : cpu::adamw(a, ExecContext{});
    }
    case Op::kLamb: {
      LambCall a;
      a.lists = lists;
      a.exp_avgs = call.state(0, c);
      a.exp_avg_sqs = call.state(1, c);
      a.grad_averaging = v.flags[0];
      a.bias_correction = v.flags[1];
      a.trust_clip = v.flags[2];
      a.always_adapt = v.flags[3];
      if (index % 2 == 0) return cuda ? cuda::lamb(a, ctx) : cpu::lamb(a, ExecContext{});
      // Odd steps run lamb_'s two passes as their own launchers (lamb_direction_, then
      // lamb_apply_ on its sq_norms: zeros first, as the binding hands them over), so that
      // the comparisons below check those launchers of the two backends against each other.
      const size_t bytes = (c.storage.param == DType::kFloat64 ? 8 : 4) * 2 * lists.num_tensors;
      void* sq_norms = cuda ? ctx.workspace.get(bytes) : std::malloc(bytes);
      std::memset(sq_norms, 0, bytes);  // emulated device memory is host memory
      if (cuda) {
        cuda::lamb_direction({a, sq_norms}, ctx);
        cuda::lamb_apply({a, sq_norms}, ctx);
      } else {
        cpu::lamb_direction({a, sq_norms}, ExecContext{});
        cpu::lamb_apply({a, sq_norms}, ExecContext{});
        std::free(sq_norms);
      }
      return;
    }
    case Op::kLion: {
      LionCall a;
      a.lists = lists;
      a.exp_avgs = call.state(0, c);
      a.maximize = v.flags[0];
      return cuda ? cuda::lion(a, ctx) : cpu::lion(a, ExecContext{});
    }
    case Op::kAdan: {
      AdanCall a;
      a.lists = lists;
      a.exp_avgs = call.state(0, c);
      a.exp_avg_sqs = call.state(1, c);
      a.exp_avg_diffs = call.state(2, c);
      a.neg_pre_grads = call.state(3, c);
      a.no_prox = v.flags[0];
      return cuda ? cuda::adan(a, ctx) : cpu::adan(a, ExecContext{});
    }
    case Op::kScheduleFreeAdamW: {
      ScheduleFreeAdamWCall a;
      a.lists = lists;
      a.zs = call.state(0, c);
      a.exp_avg_sqs = call.state(1, c);
      return cuda ? cuda::schedulefree_adamw(a, ctx) : cpu::schedulefree_adamw(a, ExecContext{});
    }
    case Op::kSgd: {
      SgdCall a;
      a.lists = lists;
      if (state_count(v) > 0) a.momentum_buffers = call.state(0, c);
      a.nesterov = v.flags[0];
      a.maximize = v.flags[1];
      return cuda ? cuda::sgd(a, ctx) : cpu::sgd(a, ExecContext{});
    }
    case Op::kMuon: {
      MuonCall a;
      a.lists = lists;
      a.momentum_buffers = call.state(0, c);
      a.ns_buffers = call.state(1, c);
      a.nesterov = v.flags[0];
      // The Newton-Schulz iteration between the passes is torch's (no C++): the apply pass
      // takes the momentum pass's bf16 output as the iteration's, as the oracle test does.
      if (cuda) {
        cuda::muon_momentum(a, ctx);
        cuda::muon_apply(a, ctx);
      } else {
        cpu::muon_momentum(a, ExecContext{});
        cpu::muon_apply(a, ExecContext{});
      }
      return;
    }
  }
}

const char* dtype_short(DType d) {
  switch (d) {
    case DType::kFloat32: return "f32";
    case DType::kBFloat16: return "bf16";
    case DType::kFloat16: return "f16";
    case DType::kFloat64: return "f64";
    case DType::kInt8: return "i8";
    case DType::kUInt8: return "u8";
  }
  return "?";
}

std::string name(const StepCase& c) {
  return std::string(c.variant->name) + " " + dtype_short(c.storage.param) + "/" +
         dtype_short(c.storage.grad) +
         (c.storage.compact ? "+compact"
          : c.storage.kahan ? "+kahan"
          : c.storage.master ? "+master"
                             : "") +
         (c.storage.stochastic ? "+sr" : "") +
         (c.storage.state >= 0 ? std::string("+s") + dtype_short(static_cast<DType>(c.storage.state))
                               : std::string()) +
         (c.storage.master && !c.storage.sync ? "-nosync" : "") + " " +
         c.scalars->name + (c.shapes == &kLarge ? " large" : " small") +
         (c.schedule == emu::Schedule::kReverse ? " reverse" : "");
}

/// Machine epsilon and smallest subnormal of a storage dtype.
double epsilon(DType d) {
  switch (d) {
    case DType::kFloat32: return 0x1p-23;
    case DType::kFloat64: return 0x1p-52;
    case DType::kBFloat16: return 0x1p-7;
    case DType::kFloat16: return 0x1p-10;
    case DType::kInt8:
    case DType::kUInt8: break;
  }
  return 0.0;
}
double smallest(DType d) {
  switch (d) {
    case DType::kFloat32: return 0x1p-149;
    case DType::kFloat64: return 0x1p-1074;
    case DType::kBFloat16: return 0x1p-133;
    case DType::kFloat16: return 0x1p-24;
    case DType::kInt8:
    case DType::kUInt8: break;
  }
  return 0.0;
}

// [note: lamb tolerance] LAMB is not elementwise: its trust ratio |p| / |u| comes from two
// per-tensor sums of squares, which the CPU adds in opmath lanes of <= 32 terms and in double,
// then roots in double, while the CUDA kernels add in opmath trees and root in opmath. Every
// other quantity is elementwise, so m, v, the step counts, and the params of tensors that do
// not adapt (ratio 1) must still be equal bit for bit. By [note: norm tolerance] a backend's
// norm is within (k * u / 2 + u) of the exact one, so its ratio (two norms and a division)
// within k * u + 3u: delta = (k_cuda + 32 + 6) * u for the two backends apart. An adapted
// param x = p - lr * (u * r) then differs by at most delta * |x - p| plus one rounding of x
// in each backend: 2 ulp of x in its storage. Each step starts both backends from the same
// (the CPU's) state, so that the differences do not compound over steps.
bool lamb_close(const Buffer& cuda, const Buffer& cpu, const Buffer& before, double delta) {
  const double eps = epsilon(cpu.dtype()), tiny = smallest(cpu.dtype());
  for (int64_t k = 0; k < cpu.numel(); ++k) {
    const double a = cuda.get(k), b = cpu.get(k);
    const double bound = delta * std::fabs(b - before.get(k)) +
                         2 * eps * std::max(std::fabs(a), std::fabs(b)) + tiny;
    if (!(std::fabs(a - b) <= bound)) {
      std::fprintf(stderr, "element %lld: cuda %.17g, cpu %.17g (bound %.3g)\n",
                   static_cast<long long>(k), a, b, bound);
      return false;
    }
  }
  return true;
}

/// The fp32 masters of tensor i of a world with compact masters (join_master).
std::unique_ptr<Buffer> joined(const World& w, size_t i) {
  auto out = std::make_unique<Buffer>(DType::kFloat32, w.params[i]->numel(), false);
  for (int64_t k = 0; k < out->numel(); ++k)
    out->set(k, join_master(w.params[i]->bits(k), static_cast<int16_t>(w.masters[i]->bits(k))));
  return out;
}

/// [note: lamb tolerance] for Kahan masters ([note: kahan master]): the masters p + c of the
/// two backends, within lamb_close's bound of the fp32 values the update ran on, plus what
/// the Kahan store may then lose on each side: one ulp of c from its rounding and one from
/// the tie rule (2 eps16 |c| each, and a subnormal c's spacing): nearby fp32 values may store
/// as p + c pairs one ulp of c apart.
bool kahan_close(const Buffer& cuda_p, const Buffer& cuda_c, const Buffer& cpu_p,
                 const Buffer& cpu_c, const Buffer& before_p, const Buffer& before_c,
                 double delta) {
  const double eps16 = epsilon(cpu_p.dtype()), tiny16 = smallest(cpu_p.dtype());
  for (int64_t k = 0; k < cpu_p.numel(); ++k) {
    const double ca = cuda_c.get(k), cb = cpu_c.get(k);
    const double a = static_cast<double>(static_cast<float>(cuda_p.get(k)) + static_cast<float>(ca));
    const double b = static_cast<double>(static_cast<float>(cpu_p.get(k)) + static_cast<float>(cb));
    const double was = static_cast<double>(static_cast<float>(before_p.get(k)) +
                                           static_cast<float>(before_c.get(k)));
    const double bound = delta * std::fabs(b - was) + 2 * 0x1p-23 * std::max(std::fabs(a), std::fabs(b)) +
                         2 * eps16 * (std::fabs(ca) + std::fabs(cb)) + 2 * tiny16 + 0x1p-149;
    if (!(std::fabs(a - b) <= bound)) {
      std::fprintf(stderr, "element %lld: cuda %.17g, cpu %.17g (bound %.3g)\n",
                   static_cast<long long>(k), a, b, bound);
      return false;
    }
  }
  return true;
}

/// The LAMB comparison of [note: lamb tolerance]; then cuda takes cpu's state.
bool lamb_matches(const StepCase& c, World& cuda, const World& cpu, const World& before,
                  const std::string& what) {
  const Variant& v = *c.variant;
  const double u = c.storage.param == DType::kFloat64 ? 0x1p-53 : 0x1p-24;
  int64_t max_chunks = 0;
  for (const Shape& s : *c.shapes) max_chunks = std::max(max_chunks, mt::chunk_count(s.numel));
  const int64_t n = static_cast<int64_t>(c.shapes->size());
  const double delta = (cuda_chain(max_chunks, n) + 32 + 6) * u;
  bool ok = std::memcmp(cuda.steps.data(), cpu.steps.data(),
                        cuda.steps.size() * sizeof(float)) == 0;
  for (size_t i = 0; i < cpu.params.size(); ++i) {
    const bool wd = v.hyper[3] != 0.0 && !(v.zero_every_third == 3 && i % 3 == 1);
    const bool adapts = wd || v.flags[3];
    for (size_t k = 0; k < cpu.states.size(); ++k)
      ok &= cuda.states[k][i]->same_bits(*cpu.states[k][i]);
    if (adapts) {
      ok &= lamb_close(*cuda.params[i], *cpu.params[i], *before.params[i], delta);
      if (c.storage.compact) {
        ok &= lamb_close(*joined(cuda, i), *joined(cpu, i), *joined(before, i), delta);
      } else if (c.storage.kahan) {
        ok &= kahan_close(*cuda.params[i], *cuda.masters[i], *cpu.params[i], *cpu.masters[i],
                          *before.params[i], *before.masters[i], delta);
      } else if (!cpu.masters.empty()) {
        ok &= lamb_close(*cuda.masters[i], *cpu.masters[i], *before.masters[i], delta);
      }
    } else {
      ok &= cuda.params[i]->same_bits(*cpu.params[i]);
      if (!cpu.masters.empty()) ok &= cuda.masters[i]->same_bits(*cpu.masters[i]);
    }
    if (!ok) {
      std::fprintf(stderr, "%s: tensor %zu differs beyond [note: lamb tolerance]\n",
                   what.c_str(), i);
      break;
    }
  }
  cuda.copy_from(cpu);
  return ok;
}

/// Runs a case on both backends step by step; after every step both worlds must hold the
/// same bits, a skipped step must change nothing at all, and a step that runs must move
/// some param (so that two backends that both do nothing cannot pass).
void run_step_case(const StepCase& c, std::mt19937& rng) {
  World cpu_world(c), cuda_world(c), before(c);
  initialize(cpu_world, c, rng);
  cuda_world.copy_from(cpu_world);
  emu::set_schedule(c.schedule);
  emu::set_capturing(c.scalars->capturing);
  for (int s = 0; s < c.steps; ++s) {
    const std::string what = name(c) + " step " + std::to_string(s + 1);
    if (c.storage.master) {
      write_params(cpu_world, s);
      write_params(cuda_world, s);
    }
    before.copy_from(cuda_world);
    step(c, cpu_world, s, false);
    step(c, cuda_world, s, true);
    if (c.scalars->found_inf[s] > 0) {
      CHECK(cuda_world.same_bits(before, what + " (skipped by found_inf)"));
      CHECK(cpu_world.same_bits(before, what + " (cpu, skipped by found_inf)"));
      continue;
    }
    bool moved = false;
    for (size_t i = 0; i < before.params.size(); ++i)
      moved |= !cuda_world.params[i]->same_bits(*before.params[i]);
    if (!moved) std::fprintf(stderr, "%s: no param moved\n", what.c_str());
    CHECK(moved);
    if (c.variant->op == Op::kLamb) {
      CHECK(lamb_matches(c, cuda_world, cpu_world, before, what));
    } else {
      CHECK(cuda_world.same_bits(cpu_world, what));
    }
  }
  emu::set_schedule(emu::Schedule::kForward);
  emu::set_capturing(false);
}

/// A storage the CUDA backend does not build ([note: state dtype], kCudaStateStorage in
/// csrc/cuda/step.cuh): the op (adamw, lamb, lion, sgd) throws std::invalid_argument naming
/// the dtypes, before any buffer or step count changes.
void refuse_state_storage_case(const StepCase& c, std::mt19937& rng) {
  World cuda_world(c), before(c);
  initialize(cuda_world, c, rng);
  before.copy_from(cuda_world);
  bool refused = false;
  try {
    step(c, cuda_world, 0, true);
  } catch (const std::invalid_argument& e) {
    refused = std::string(e.what()).find("not built for the cuda backend") != std::string::npos;
    if (!refused) std::fprintf(stderr, "%s: %s\n", name(c).c_str(), e.what());
  }
  if (!refused) std::fprintf(stderr, "%s: not refused\n", name(c).c_str());
  CHECK(refused);
  CHECK(cuda_world.same_bits(before, name(c) + " (refused)"));
}

int test_step_ops() {
  std::mt19937 rng(7);
  int cases = 0;
  for (const Variant& v : kVariants) {
    for (const Storage& st : kStorages) {
      // Semantics: every variant x storage x scalars, small tensors, three steps. The
      // schedule alternates, so that kernels with barriers run under both orders.
      for (const Scalars& sc : kScalars) {
        const auto order = cases % 2 ? emu::Schedule::kReverse : emu::Schedule::kForward;
        run_step_case({&v, st, &sc, &kSmall, 3, order}, rng);
        ++cases;
      }
      // Traversal: chunk boundaries, several chunks, vector path and tails, for each
      // variant that changes the slots or the kernels (the first of each op, AMSGrad's
      // third state, SGD with buffers, LAMB with per-tensor adaptation), two steps.
      const bool traversal = &v == &kVariants[0] || &v == &kVariants[2] ||
                             &v == &kVariants[6] || &v == &kVariants[9] ||
                             &v == &kVariants[11] || &v == &kVariants[15] ||
                             &v == &kVariants[20];
      if (traversal) {
        run_step_case({&v, st, &kScalars[3], &kLarge, 2, emu::Schedule::kForward}, rng);
        ++cases;
      }
    }
    // [note: state dtype]: the ops with free state dtypes; an SGD call without buffers has
    // no state to store (nothing to refuse either).
    if (!free_state_dtypes(v.op) || state_count(v) == 0) continue;
    for (const Storage& st : kStateStorages) {
      for (const Scalars& sc : kScalars) {
        const auto order = cases % 2 ? emu::Schedule::kReverse : emu::Schedule::kForward;
        run_step_case({&v, st, &sc, &kSmall, 3, order}, rng);
        ++cases;
      }
      // Traversal: the first variant of each op, AMSGrad's third state.
      if (&v == &kVariants[0] || &v == &kVariants[2] || &v == &kVariants[5] ||
          &v == &kVariants[9] || &v == &kVariants[16]) {
        run_step_case({&v, st, &kScalars[3], &kLarge, 2, emu::Schedule::kForward}, rng);
        ++cases;
      }
    }
    for (const Storage& st : kRefusedStateStorages) {
      refuse_state_storage_case({&v, st, &kScalars[0], &kSmall, 1, emu::Schedule::kForward},
                                rng);
      ++cases;
    }
  }
  return cases;
}

/// [note: master sync], semantics on the CUDA side itself (the comparisons above only say
/// that CUDA and CPU agree): each op with lr 0 leaves every master as it was, except that
/// with master_sync an element written into the param takes the param's value; without it,
/// the master alone counts and the param is rebuilt from it.
int test_master_sync() {
  std::mt19937 rng(5);
  int cases = 0;
  for (const Variant* base : {&kVariants[0], &kVariants[5], &kVariants[9], &kVariants[11]}) {
    for (const bool sync : {true, false}) {
      Variant v = *base;
      v.lr = 0.0;
      const StepCase c{&v, {DType::kBFloat16, DType::kBFloat16, true, sync}, &kScalars[0],
                       &kSmall, 1, emu::Schedule::kForward};
      World w(c), before(c);
      initialize(w, c, rng);
      write_params(w, 0);
      before.copy_from(w);
      step(c, w, 0, true);
      bool ok = true;
      for (size_t i = 0; i < w.params.size(); ++i) {
        for (int64_t k = 0; k < w.params[i]->numel(); ++k) {
          const bool written = k % 4 == 0;
          const double expected =
              sync && written ? before.params[i]->get(k) : before.masters[i]->get(k);
          const double got = w.masters[i]->get(k);
          ok &= got == expected;  // by value: with lr 0, -0 - (+-0) may give +0
          ok &= w.params[i]->get(k) == static_cast<double>(bf16_to_float(float_to_bf16(
                                           static_cast<float>(got))));
        }
      }
      if (!ok) std::fprintf(stderr, "master sync: %s sync=%d\n", v.name, int(sync));
      CHECK(ok);
      ++cases;
    }
  }
  return cases;
}

// ---------------------------------------------------------------------------------------
// Non-finite edges (issue #13) on both backends, against exact hand-computed values: Lion's
// sign(NaN) = 0, [note: zero weight decay], and an fp64 clip_coef read in fp64 ([note:
// opmath scalars]). The values are chosen so that every result is exact in fp32.

/// One tensor per slot (param, grad, then the states), with the given values.
struct EdgeCall {
  DType dtype;
  int64_t numel;
  std::vector<std::unique_ptr<Buffer>> slots;
  std::vector<void*> data;  // one pointer per slot: each slot's 1-tensor list
  float step = 0.0f;
  float* step_ptr = &step;
  EdgeCall(DType d, const std::vector<std::vector<double>>& values)
      : dtype(d), numel(static_cast<int64_t>(values[0].size())) {
    for (const auto& v : values) {
      slots.push_back(std::make_unique<Buffer>(d, numel, false));
      for (size_t k = 0; k < v.size(); ++k) slots.back()->set(static_cast<int64_t>(k), v[k]);
    }
    for (auto& b : slots) data.push_back(b->data());
  }
  TensorSlot slot(size_t k) { return {&data[k], dtype}; }
  std::vector<double> hypers;  // the one row of the hyperparameter table
  int32_t group = 0;
  StepLists lists(bool with_step, std::vector<double> row) {
    hypers = std::move(row);
    StepLists l;
    l.num_tensors = 1;
    l.numels = &numel;
    l.params = slot(0);
    l.grads = slot(1);
    l.steps = with_step ? &step_ptr : nullptr;
    l.hypers = {hypers.data(), static_cast<int64_t>(hypers.size()), &group};
    return l;
  }
  /// Slot s equals `want` element for element (inf included; NaN where want is NaN).
  bool holds(size_t s, const std::vector<double>& want) const {
    for (size_t k = 0; k < want.size(); ++k) {
      const double got = slots[s]->get(static_cast<int64_t>(k));
      if (std::isnan(want[k]) ? !std::isnan(got) : got != want[k]) return false;
    }
    return true;
  }
};

int test_edge_values() {
  int cases = 0;
  for (DType d : {DType::kFloat32, DType::kFloat64}) {
    for (bool cuda : {false, true}) {
      CudaContext cuda_ctx;
      const ExecContext ctx = cuda ? cuda_ctx.ctx : ExecContext{};
      const std::string where = std::string(cuda ? "cuda " : "cpu ") + dtype_short(d);
      // Lion, lr 0.125, wd 0.5 (decay 0.9375), beta1 0.5, beta2 0.75: a NaN in c = b1*m +
      // (1-b1)*g has sign 0, so p only decays; its moment becomes NaN.
      {
        EdgeCall e(d, {{1.0, -2.0, 0.5, 3.0, -1.0},
                       {NAN, 0.25, NAN, -1.0, 2.0},
                       {0.5, -0.5, NAN, 0.125, 0.0}});
        const double lr = 0.125, b1 = 0.5, b2 = 0.75, wd = 0.5;
        LionCall a;
        a.lists = e.lists(false, {lr, b1, b2, wd});
        a.exp_avgs = e.slot(2);
        cuda ? cuda::lion(a, ctx) : cpu::lion(a, ctx);
        const bool ok = e.holds(0, {0.9375, -1.75, 0.46875, 2.9375, -1.0625}) &&
                        e.holds(2, {NAN, -0.3125, NAN, -0.15625, 0.5});
        if (!ok) std::fprintf(stderr, "%s: lion with a NaN grad\n", where.c_str());
        CHECK(ok);
      }
      // Adam (L2), wd = 0, lr 0.5, beta1 0.5, beta2 0.75, eps 0.5, t = 1: m = 0.25,
      // v = 0.0625, denom = 0.25/0.5 + 0.5 = 1, p -= 0.25; infinite params stay infinite.
      // AdamW, wd = 0, lr = inf: p = 1 - inf*0.25 = -inf, not 1*(1 - inf*0) = NaN.
      for (bool decoupled : {false, true}) {
        EdgeCall e(d, {decoupled ? std::vector<double>{1.0, 1.0, -2.0}
                                 : std::vector<double>{-INFINITY, 1.0, INFINITY},
                       {0.5, 0.5, 0.5},
                       {0.0, 0.0, 0.0},
                       {0.0, 0.0, 0.0}});
        const double lr = decoupled ? INFINITY : 0.5, b1 = 0.5, b2 = 0.75, eps = 0.5, wd = 0.0;
        AdamWCall a;
        a.lists = e.lists(true, {lr, b1, b2, eps, wd});
        a.exp_avgs = e.slot(2);
        a.exp_avg_sqs = e.slot(3);
        a.decoupled = decoupled;
        cuda ? cuda::adamw(a, ctx) : cpu::adamw(a, ctx);
        const std::vector<double> want_p =
            decoupled ? std::vector<double>{-INFINITY, -INFINITY, -INFINITY}
                      : std::vector<double>{-INFINITY, 0.75, INFINITY};
        const bool ok = e.holds(0, want_p) && e.holds(2, {0.25, 0.25, 0.25}) &&
                        e.holds(3, {0.0625, 0.0625, 0.0625});
        if (!ok)
          std::fprintf(stderr, "%s: %s with wd = 0\n", where.c_str(),
                       decoupled ? "adamw (lr inf)" : "adam l2 (inf param)");
        CHECK(ok);
      }
      // SGD, lr 1, clip_coef = 1/3 in the opmath type: p = 1 - 3 * (1/3) exactly in that
      // type (fp64: 0; an fp32 coefficient would leave -3e-8 in an fp64 param).
      {
        EdgeCall e(d, {{1.0}, {3.0}});
        const double lr = 1.0, zero = 0.0;
        const float third32 = 1.0f / 3.0f;
        const double third64 = 1.0 / 3.0;
        SgdCall a;
        a.lists = e.lists(false, {lr, zero, zero, zero});
        a.lists.scalars.clip_coef = d == DType::kFloat64 ? static_cast<const void*>(&third64)
                                                         : &third32;
        cuda ? cuda::sgd(a, ctx) : cpu::sgd(a, ctx);
        const double want = d == DType::kFloat64 ? 1.0 - 3.0 * third64
                                                 : static_cast<double>(1.0f - 3.0f * third32);
        const bool ok = e.holds(0, {want});
        if (!ok) std::fprintf(stderr, "%s: sgd with clip_coef 1/3\n", where.c_str());
        CHECK(ok);
      }
      cases += 4;
    }
  }
  return cases;
}

// ---------------------------------------------------------------------------------------
// scale_: bit for bit, found_inf included.

int test_scale() {
  std::mt19937 rng(11);
  std::normal_distribution<double> normal;
  struct Tensor {
    DType dtype;
    int64_t numel;
    bool misaligned;
  };
  const std::vector<Tensor> tensors = {
      {DType::kFloat32, 0, false},          {DType::kBFloat16, 5, true},
      {DType::kFloat16, kChunk + 1, true},  {DType::kFloat32, 3 * kChunk + 1, false},
      {DType::kFloat64, 33, false},         {DType::kFloat64, kChunk - 1, true},
      {DType::kBFloat16, kChunk, false},
  };
  // found_inf: absent, 0, already 1 (never cleared); a non-finite input: none, inf, NaN.
  const float kFound[] = {-1.0f, 0.0f, 1.0f};
  const double kPoison[] = {0.0, INFINITY, NAN};
  int cases = 0;
  for (float found0 : kFound) {
    for (double poison : kPoison) {
      std::vector<std::unique_ptr<Buffer>> a, b;
      std::vector<void*> pa, pb;
      std::vector<int64_t> numels;
      std::vector<DType> dtypes;
      for (const Tensor& t : tensors) {
        a.push_back(std::make_unique<Buffer>(t.dtype, t.numel, t.misaligned));
        b.push_back(std::make_unique<Buffer>(t.dtype, t.numel, t.misaligned));
        for (int64_t k = 0; k < t.numel; ++k) a.back()->set(k, normal(rng));
        if (poison != 0.0 && t.numel > 1000) a.back()->set(t.numel - 1, poison);
        b.back()->copy_from(*a.back());
        pa.push_back(a.back()->data());
        pb.push_back(b.back()->data());
        numels.push_back(t.numel);
        dtypes.push_back(t.dtype);
      }
      const float scale = 0.375f;
      float found_a = found0, found_b = found0;
      ScaleCall call;
      call.num_tensors = static_cast<int64_t>(tensors.size());
      call.numels = numels.data();
      call.dtypes = dtypes.data();
      call.scale = &scale;
      call.data = pa.data();
      call.found_inf = found0 >= 0 ? &found_a : nullptr;
      cpu::scale(call, ExecContext{});
      call.data = pb.data();
      call.found_inf = found0 >= 0 ? &found_b : nullptr;
      CudaContext ctx;
      cuda::scale(call, ctx.ctx);
      for (size_t i = 0; i < tensors.size(); ++i) CHECK(b[i]->same_bits(*a[i]));
      CHECK(std::memcmp(&found_a, &found_b, sizeof(float)) == 0);
      if (found0 >= 0) CHECK(found_b == (found0 == 1.0f || poison != 0.0 ? 1.0f : 0.0f));
      ++cases;
    }
  }
  return cases;
}

// ---------------------------------------------------------------------------------------
// grad_norm: an error bound, the contract's meaning, and determinism.


struct NormCase {
  const char* name;
  std::vector<DType> dtypes;  // cycled over the tensors
  std::vector<Shape> shapes;
  bool inf_norm, per_tensor;
  float grad_scale;  // 0: absent
  bool poison;       // one element is inf
};

int test_grad_norm() {
  std::vector<Shape> many;  // 70 tensors: more than the finishing block's 32 warps
  for (int i = 0; i < 70; ++i) many.push_back({i * 37 % 301, i % 4 == 1});
  const std::vector<Shape> mixed = {{0, false}, {kChunk + 1, true}, {1, true},  {130, false},
                                    {0, true},  {3 * kChunk + 5, false}, {kChunk - 1, true}};
  // One tensor of 40 chunks: more than the 32 lanes that sum a tensor's chunk partials.
  const std::vector<Shape> long_tensor = {{3, false}, {40 * kChunk - 7, true}};
  const std::vector<DType> f32 = {DType::kFloat32};
  const std::vector<DType> f64 = {DType::kFloat64};
  const std::vector<DType> mix = {DType::kFloat32, DType::kBFloat16, DType::kFloat16,
                                  DType::kFloat64};
  const NormCase cases[] = {
      {"f32 mixed sizes", f32, mixed, false, true, 0.0f, false},
      {"mixed dtypes", mix, mixed, false, true, 4.0f, false},
      {"mixed dtypes, no per-tensor", mix, mixed, false, false, 0.0f, false},
      {"f64", f64, mixed, false, true, 2.0f, false},
      {"f64 inf norm", f64, mixed, true, true, 0.0f, false},
      {"mixed inf norm", mix, mixed, true, true, 8.0f, false},
      {"many tensors", mix, many, false, true, 0.0f, false},
      {"many tensors inf norm", mix, many, true, true, 0.0f, false},
      {"long tensor", f32, long_tensor, false, true, 0.0f, false},
      {"non-finite", mix, mixed, false, true, 0.0f, true},
      {"non-finite inf norm", f32, mixed, true, false, 0.0f, true},
  };
  std::mt19937 rng(13);
  std::normal_distribution<double> normal;
  int count = 0;
  for (const NormCase& c : cases) {
    const int failures_before = g_failures;
    const size_t n = c.shapes.size();
    std::vector<std::unique_ptr<Buffer>> tensors;
    std::vector<const void*> data;
    std::vector<int64_t> numels;
    std::vector<DType> dtypes;
    bool all_fp64 = true;
    int64_t max_chunks = 0, total = 0;
    for (size_t i = 0; i < n; ++i) {
      const DType d = c.dtypes[i % c.dtypes.size()];
      all_fp64 &= d == DType::kFloat64;
      tensors.push_back(std::make_unique<Buffer>(d, c.shapes[i].numel, c.shapes[i].misaligned));
      // Magnitudes that differ per tensor, so that per-tensor norms are told apart.
      for (int64_t k = 0; k < c.shapes[i].numel; ++k) tensors[i]->set(k, normal(rng) * (1 + i % 5));
      if (c.poison && c.shapes[i].numel > 1000) tensors[i]->set(c.shapes[i].numel / 2, INFINITY);
      data.push_back(tensors[i]->data());
      numels.push_back(c.shapes[i].numel);
      dtypes.push_back(d);
      max_chunks = std::max(max_chunks, mt::chunk_count(c.shapes[i].numel));
      total += c.shapes[i].numel;
    }
    const DType out = all_fp64 ? DType::kFloat64 : DType::kFloat32;
    const float grad_scale = c.grad_scale;
    // The backends' outputs as doubles: [0] total, [1..n] per tensor, and found_inf.
    struct Result {
      std::vector<unsigned char> bits;
      std::vector<double> values;
      float found_inf;
    };
    auto run = [&](bool cuda, emu::Schedule order) {
      const size_t size = static_cast<size_t>(dtype_size(out));
      Buffer outputs(out, static_cast<int64_t>(n) + 1, false);
      Result r;
      r.found_inf = -1.0f;
      GradNormCall call;
      call.num_tensors = static_cast<int64_t>(n);
      call.numels = numels.data();
      call.data = data.data();
      call.dtypes = dtypes.data();
      call.inf_norm = c.inf_norm;
      call.per_tensor = c.per_tensor;
      call.grad_scale = grad_scale > 0 ? &grad_scale : nullptr;
      call.out_dtype = out;
      call.total_norm = outputs.data();
      call.per_tensor_norms = static_cast<unsigned char*>(outputs.data()) + size;
      call.found_inf = &r.found_inf;
      if (cuda) {
        emu::set_schedule(order);
        CudaContext ctx;
        cuda::grad_norm(call, ctx.ctx);
        emu::set_schedule(emu::Schedule::kForward);
      } else {
        cpu::grad_norm(call, ExecContext{});
      }
      const auto* p = static_cast<const unsigned char*>(outputs.data());
      r.bits.assign(p, p + (c.per_tensor ? outputs.bytes() : size));
      for (size_t i = 0; i <= (c.per_tensor ? n : 0); ++i) r.values.push_back(outputs.get(i));
      return r;
    };
    const Result cpu = run(false, emu::Schedule::kForward);
    const Result cuda = run(true, emu::Schedule::kForward);
    const Result again = run(true, emu::Schedule::kForward);
    const Result reverse = run(true, emu::Schedule::kReverse);
    // Deterministic ([note: deterministic norm]): the same bits every run, whatever the
    // order in which threads and blocks run.
    CHECK(cuda.bits == again.bits && cuda.found_inf == again.found_inf);
    CHECK(cuda.bits == reverse.bits && cuda.found_inf == reverse.found_inf);
    CHECK(cuda.found_inf == cpu.found_inf);
    CHECK(cuda.found_inf == (c.poison ? 1.0f : 0.0f));

    // The contract: per-tensor norms of tensors[i] / grad_scale, the total over all.
    const double u = all_fp64 ? 0x1p-53 : 0x1p-24;
    const double tol_cuda = cuda_chain(max_chunks, static_cast<int64_t>(n)) * u / 2 + u;
    const double tol_cpu = 32 * u / 2 + (total / 32.0 + n) * 0x1p-53 + u;
    const double scale = grad_scale > 0 ? grad_scale : 1.0;
    std::vector<double> exact(n + 1, 0.0);  // sums of squares, or maxima
    for (size_t i = 0; i < n; ++i) {
      for (int64_t k = 0; k < numels[i]; ++k) {
        const double x = tensors[i]->get(k);
        // The terms exactly as both backends form them (fusedopt/math/norm.h, in opmath).
        double term;
        if (all_fp64) {
          term = c.inf_norm ? std::fabs(x / scale) : (x / scale) * (x / scale);
        } else {
          const float y = static_cast<float>(x) / static_cast<float>(scale);
          term = c.inf_norm ? std::fabs(y) : static_cast<double>(y * y);
        }
        exact[i + 1] = c.inf_norm ? std::max(exact[i + 1], term) : exact[i + 1] + term;
      }
      exact[0] = c.inf_norm ? std::max(exact[0], exact[i + 1]) : exact[0] + exact[i + 1];
    }
    for (size_t i = 0; i < cpu.values.size(); ++i) {
      const double want = c.inf_norm ? exact[i] : std::sqrt(exact[i]);
      if (!std::isfinite(want)) {
        CHECK(!std::isfinite(cuda.values[i]) && !std::isfinite(cpu.values[i]));
      } else if (c.inf_norm) {
        // A maximum does not depend on the order: exact on both.
        CHECK(cuda.values[i] == want && cpu.values[i] == want);
      } else {
        CHECK_NEAR(cuda.values[i], want, tol_cuda);
        CHECK_NEAR(cpu.values[i], want, tol_cpu);
        CHECK_NEAR(cuda.values[i], cpu.values[i], tol_cuda + tol_cpu);
      }
    }
    if (g_failures > failures_before)
      std::fprintf(stderr, "in grad_norm case \"%s\"\n", c.name);
    ++count;
  }
  return count;
}

// ---------------------------------------------------------------------------------------
// The emulator's own semantics, which the comparisons above rely on: a shuffle returns lane
// l + delta's value (its own past lane 31), an xor shuffle lane l ^ mask's, a barrier makes
// every write before it visible after it, __syncthreads_or ORs over the block; under both
// schedules.

constexpr int kProbeThreads = 128;

void probe_kernel(int* out) {
  __shared__ int slots[kProbeThreads];
  const int t = static_cast<int>(threadIdx.x);
  const int lane = t % 32;
  int& result = out[blockIdx.x * kProbeThreads + t];
  const int shuffled = __shfl_down_sync(0xffffffffu, 1000 * t, 5);
  result = shuffled - (lane + 5 < 32 ? 1000 * (t + 5) : 1000 * t);  // 0 when right
  result |= __shfl_xor_sync(0xffffffffu, 1000 * t, 6) != 1000 * (t - lane + (lane ^ 6));
  slots[t] = t * static_cast<int>(blockIdx.x + 1);
  __syncthreads();
  const int next = (t + 1) % kProbeThreads;
  result |= slots[next] != next * static_cast<int>(blockIdx.x + 1);
  result |= __syncthreads_or(t == 77) != 1 || __syncthreads_or(0) != 0;
}

int test_emulator() {
  for (emu::Schedule order : {emu::Schedule::kForward, emu::Schedule::kReverse}) {
    emu::set_schedule(order);
    std::vector<int> out(3 * kProbeThreads, -1);
    emu::launch(probe_kernel, dim3(3), dim3(kProbeThreads), nullptr, out.data());
    CHECK(cudaGetLastError() == cudaSuccess);
    CHECK(std::all_of(out.begin(), out.end(), [](int x) { return x == 0; }));
    // An empty grid is an invalid configuration on CUDA: the launch must report it.
    emu::launch(probe_kernel, dim3(0), dim3(kProbeThreads), nullptr, out.data());
    CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration);
  }
  emu::set_schedule(emu::Schedule::kForward);
  return 4;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// adafactor_ ([note: adafactor passes] in math/adafactor.h): its states are not param-shaped
// ([note: factored layouts]), so it has a world of its own. CUDA and CPU sum a factor's
// terms in the same chunks and order in double ([note: adafactor sums] in math/adafactor.h)
// and share the math, so the factors, variances and step counts must agree bit for bit; sum
// p^2 and sum u^2 are reductions in different orders (CPU: lanes widened to double per
// block, then double; CUDA: per chunk a thread's terms in opmath, then a tree over 256
// threads, the chunks then added in double: a thread adds at most max(2^16, cols) / 256 <=
// numel / 256 terms), each within (numel / 256 + 8) u + 32 u of the exact sum by
// [note: norm tolerance], and the step size alpha / clip takes half of each (square roots):
// a param x = p - step * u differs by at most delta * |x - p| plus one rounding in each.
// Each step starts both from the CPU's state.

struct AdafactorShape {
  std::vector<int64_t> dims;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : dims) n *= d;
    return n;
  }
  bool factored() const { return dims.size() >= 2; }
  int64_t rows() const { return factored() ? dims[dims.size() - 2] : 0; }
  int64_t cols() const { return factored() ? dims.back() : 0; }
  int64_t batches() const { return factored() && numel() ? numel() / (rows() * cols()) : 0; }
};

struct AdafactorWorld {
  std::vector<std::unique_ptr<Buffer>> params, grads, masters, rows, cols, vars;
  std::vector<float> steps;
  AdafactorWorld(const std::vector<AdafactorShape>& shapes, const Storage& st) {
    const DType sd = st.master ? DType::kFloat32 : st.param;
    for (size_t i = 0; i < shapes.size(); ++i) {
      const AdafactorShape& s = shapes[i];
      const bool odd = i % 2 == 1;  // misaligned views
      params.push_back(std::make_unique<Buffer>(st.param, s.numel(), odd));
      grads.push_back(std::make_unique<Buffer>(st.grad, s.numel(), odd));
      if (st.master) {
        const DType md = st.kahan ? st.param : DType::kFloat32;  // compact: run as fp32 here
        masters.push_back(std::make_unique<Buffer>(md, s.numel(), odd));
      }
      rows.push_back(std::make_unique<Buffer>(sd, s.batches() * s.rows(), false));
      cols.push_back(std::make_unique<Buffer>(sd, s.batches() * s.cols(), false));
      vars.push_back(std::make_unique<Buffer>(sd, s.factored() ? 0 : s.numel(), odd));
    }
    steps.assign(shapes.size(), 0.0f);
  }
  std::vector<std::vector<std::unique_ptr<Buffer>>*> all() {
    return {&params, &grads, &masters, &rows, &cols, &vars};
  }
  void copy_from(AdafactorWorld& o) {
    auto mine = all(), theirs = o.all();
    for (size_t k = 0; k < mine.size(); ++k)
      for (size_t i = 0; i < mine[k]->size(); ++i) (*mine[k])[i]->copy_from(*(*theirs[k])[i]);
    steps = o.steps;
  }
};

void adafactor_step(const std::vector<AdafactorShape>& shapes, const Storage& st,
                    AdafactorWorld& w, bool maximize, float found_inf, bool cuda) {
  const size_t n = shapes.size();
  std::vector<int64_t> numels, dims;
  std::vector<void*> p, g, m, r, c, v;
  std::vector<float*> steps;
  for (size_t i = 0; i < n; ++i) {
    numels.push_back(shapes[i].numel());
    dims.push_back(shapes[i].rows());
    dims.push_back(shapes[i].cols());
    p.push_back(w.params[i]->data());
    g.push_back(w.grads[i]->data());
    if (st.master) m.push_back(w.masters[i]->data());
    r.push_back(w.rows[i]->data());
    c.push_back(w.cols[i]->data());
    v.push_back(w.vars[i]->data());
    steps.push_back(&w.steps[i]);
  }
  // lr 0.5 (rho = 1/sqrt(t) from t = 5), beta2_decay, eps1 None, eps2, d 1 (the clip acts),
  // weight decay; the second row (odd tensors) with eps1 given and no decay.
  const double hypers[12] = {0.5, -0.8, -1.0, 1e-3, 1.0, 0.1, 0.5, -0.5, 1e-10, 1e-2, 1.5, 0.0};
  std::vector<int32_t> group;
  for (size_t i = 0; i < n; ++i) group.push_back(static_cast<int32_t>(i % 2));
  const DType sd = st.master ? DType::kFloat32 : st.param;
  AdafactorCall a;
  a.lists.num_tensors = static_cast<int64_t>(n);
  a.lists.numels = numels.data();
  a.lists.params = {p.data(), st.param};
  a.lists.grads = {g.data(), st.grad};
  if (st.master) a.lists.master_params = {m.data(), st.kahan ? st.param : DType::kFloat32};
  a.lists.master_sync = st.sync;
  a.lists.kahan_master = st.kahan;
  a.lists.steps = steps.data();
  a.lists.hypers = {hypers, 6, group.data()};
  a.lists.factor_dims = dims.data();
  const float scale = 4.0f;
  const double scale64 = 4.0;
  const bool fp64 = st.param == DType::kFloat64;
  a.lists.scalars.grad_scale = fp64 ? static_cast<const void*>(&scale64) : &scale;
  if (found_inf >= 0) a.lists.scalars.found_inf = &found_inf;
  const std::vector<int64_t> sr_key = sr_key_of(n, 0);
  if (st.stochastic) a.lists.scalars.sr_key = sr_key.data();
  a.row_vars = {r.data(), sd};
  a.col_vars = {c.data(), sd};
  a.variances = {v.data(), sd};
  a.maximize = maximize;
  CudaContext cuda_ctx;
  if (cuda) {
    cuda::adafactor(a, cuda_ctx.ctx);
  } else {
    cpu::adafactor(a, ExecContext{});
  }
}

int test_adafactor() {
  // Matrices (one across two reduction chunks, one batched, one batched with two chunks per
  // batch), a column, an empty matrix, vectors (one across three chunks), a scalar.
  const std::vector<AdafactorShape> shapes = {
      {{5, 7}}, {{2, 3, 4}}, {{9, 1}}, {{3, 0}}, {{1029}}, {{}}, {{300, 257}},
      {{2 * kChunk + 5}}, {{0}}, {{3, 70, 1000}}};
  std::mt19937 rng(11);
  std::normal_distribution<double> normal;
  int cases = 0;
  for (const Storage& st : kStorages) {
    for (const bool maximize : {false, true}) {
      AdafactorWorld cpu_w(shapes, st), cuda_w(shapes, st), before(shapes, st);
      for (size_t i = 0; i < shapes.size(); ++i) {
        for (int64_t k = 0; k < shapes[i].numel(); ++k) {
          const double x = normal(rng);
          cpu_w.params[i]->set(k, st.master ? static_cast<float>(x) : x);
          if (st.kahan) {
            cpu_w.masters[i]->set(k, static_cast<float>(x) - cpu_w.params[i]->get(k));
          } else if (st.master) {
            cpu_w.masters[i]->set(k, x);
          }
          cpu_w.grads[i]->set(k, 4.0 * normal(rng));
        }
        for (auto* states : {&cpu_w.rows, &cpu_w.cols, &cpu_w.vars})  // torch's zeros
          for (int64_t k = 0; k < (*states)[i]->numel(); ++k) (*states)[i]->set(k, 0.0);
      }
      cuda_w.copy_from(cpu_w);
      const float found[3] = {-1.0f, 1.0f, 0.0f};
      for (int s = 0; s < 3; ++s) {
        const std::string what = std::string("adafactor ") + dtype_name(st.param) + "/" +
                                 dtype_name(st.grad) +
                                 (st.kahan ? " kahan" : st.master ? " master" : "") +
                                 (st.stochastic ? " sr" : "") +
                                 (maximize ? " maximize" : "") + " step " + std::to_string(s);
        before.copy_from(cpu_w);
        adafactor_step(shapes, st, cpu_w, maximize, found[s], false);
        adafactor_step(shapes, st, cuda_w, maximize, found[s], true);
        bool ok = std::memcmp(cpu_w.steps.data(), cuda_w.steps.data(),
                              cpu_w.steps.size() * sizeof(float)) == 0;
        for (auto states : {&AdafactorWorld::rows, &AdafactorWorld::cols, &AdafactorWorld::vars})
          for (size_t i = 0; i < shapes.size(); ++i)
            ok &= (cpu_w.*states)[i]->same_bits(*(cuda_w.*states)[i]);
        if (found[s] > 0) {  // skipped: nothing moved on either side
          for (size_t i = 0; i < shapes.size(); ++i)
            ok &= cpu_w.params[i]->same_bits(*before.params[i]) &&
                  cuda_w.params[i]->same_bits(*before.params[i]);
        } else {
          const double u = st.param == DType::kFloat64 ? 0x1p-53 : 0x1p-24;
          bool moved = false;
          for (size_t i = 0; i < shapes.size(); ++i) {
            const double delta = (static_cast<double>(shapes[i].numel()) / 256 + 8 + 32 + 6) * u;
            // A Kahan master is compared as param + compensation ([note: kahan master]).
            const bool fp32 = st.master && !st.kahan;
            auto& x = fp32 ? cpu_w.masters : cpu_w.params;
            auto& y = fp32 ? cuda_w.masters : cuda_w.params;
            auto& b = fp32 ? before.masters : before.params;
            ok &= lamb_close(*y[i], *x[i], *b[i], delta);
            if (st.kahan)
              ok &= kahan_close(*cuda_w.params[i], *cuda_w.masters[i], *cpu_w.params[i],
                                *cpu_w.masters[i], *before.params[i], *before.masters[i], delta);
            if (st.master) ok &= lamb_close(*cuda_w.params[i], *cpu_w.params[i],
                                            *before.params[i], delta);
            moved |= !x[i]->same_bits(*b[i]);
          }
          ok &= moved;
        }
        if (!ok) std::fprintf(stderr, "%s: cuda and cpu differ\n", what.c_str());
        CHECK(ok);
        cuda_w.copy_from(cpu_w);
        ++cases;
      }
    }
  }
  return cases;
}

/// The step ops with 8-bit states ([note: 8-bit states] in fusedopt/quant8.py): adamw_
/// (int8 m, uint8 v), lion_ (int8 m), sgd_ (int8 buffers; the odd tensors' group has
/// momentum 0, which keeps their codes: [note: sgd momentum 0]) and lamb_ (int8 m, uint8 v;
/// the odd tensors' group has weight decay 0: they adapt only under always_adapt).
enum class Q8Op { kAdamW, kLion, kSgd, kLamb };

/// [note: lamb tolerance] for lamb_direction_'s sums of squares with 8-bit moments: a CUDA
/// lane adds 8 terms per quantization block its warp owns ([note: q8 warps] in quant8.cuh:
/// every 8th of its CUDA block's, so at most 8 ceil(B / 8) <= B + 7 terms for the tensor's
/// block count B = `max_blocks`), then the trees and the fold of cuda_chain; the CPU lanes
/// of <= 32 terms and double sums. Sums of squares: relative error <= (k_cuda + 32 + 1) u
/// apart.
double lamb_q8_chain(int64_t max_blocks, int64_t max_chunks, int64_t n) {
  return cuda_chain(max_chunks, n) - kChunk / 256 + max_blocks + 7;
}

/// An op with 8-bit states: rows shorter than, equal to and longer than a quantization
/// block, a vector across two chunks (blocks that straddle a chunk boundary), an empty
/// tensor and a scalar, every storage but fp64 (refused by the binding), three steps (the
/// last skipped by found_inf; the second with the op's other flags): codes, scales,
/// params, masters and steps bit for bit the CPU launcher's. lamb_ runs those three as its
/// two passes (lamb_direction_, then lamb_apply_ on the CPU's sums on both backends, so
/// that everything is bit for bit; the sums themselves within [note: lamb tolerance]), then
/// a fourth step through lamb_ itself: codes, scales, steps and the params of tensors that
/// do not adapt bit for bit, the others within lamb_close's bound.
int test_q8(Q8Op op) {
  struct Q8Shape {
    int64_t rows, cols;  // a 0-d param: rows 1, cols 1
  };
  const std::vector<Q8Shape> shapes = {{3, 7},   {4, 300}, {2, 256}, {1, 2 * kChunk + 300},
                                       {0, 5},   {1, 1},   {70, 1100}};
  const bool lamb = op == Q8Op::kLamb;
  const std::vector<bool> is_signed = op == Q8Op::kAdamW || lamb ? std::vector<bool>{true, false}
                                                                 : std::vector<bool>{true};
  const char* name = op == Q8Op::kAdamW ? "adamw"
                     : op == Q8Op::kLion ? "lion"
                     : op == Q8Op::kSgd  ? "sgd"
                                         : "lamb";
  const size_t n_states = is_signed.size();
  std::mt19937 rng(17);
  std::normal_distribution<double> normal;
  int cases = 0;
  for (const Storage& st : kStorages) {
    if (st.param == DType::kFloat64) continue;
    struct Q8World {
      std::vector<std::unique_ptr<Buffer>> p, g, master;
      std::vector<std::vector<std::unique_ptr<Buffer>>> codes, scales;  // [state][tensor]
      std::vector<float> steps;
    } w[2];
    for (auto& x : w) {
      x.codes.resize(n_states);
      x.scales.resize(n_states);
      for (const Q8Shape& s : shapes) {
        const int64_t n = s.rows * s.cols, blocks = s.rows * ((s.cols + 255) / 256);
        x.p.push_back(std::make_unique<Buffer>(st.param, n, false));
        x.g.push_back(std::make_unique<Buffer>(st.grad, n, false));
        if (st.master)
          x.master.push_back(std::make_unique<Buffer>(
              st.compact ? DType::kBFloat16 : DType::kFloat32, n, false));
        for (size_t k = 0; k < n_states; ++k) {
          x.codes[k].push_back(
              std::make_unique<Buffer>(is_signed[k] ? DType::kInt8 : DType::kUInt8, n, false));
          x.scales[k].push_back(std::make_unique<Buffer>(DType::kFloat32, blocks, false));
        }
        x.steps.push_back(2.0f);
      }
    }
    for (size_t i = 0; i < shapes.size(); ++i) {
      for (int64_t k = 0; k < w[0].p[i]->numel(); ++k) {
        const double p = normal(rng);
        if (st.compact) {
          const CompactMaster c = split_master(static_cast<float>(p));
          w[0].p[i]->set_bits(k, c.param);
          w[0].master[i]->set_bits(k, static_cast<uint16_t>(c.remainder));
        } else {
          if (st.master) w[0].master[i]->set(k, p);
          w[0].p[i]->set(k, st.master ? static_cast<float>(p) : p);
        }
        w[0].g[i]->set(k, 4.0 * normal(rng));
        for (size_t j = 0; j < n_states; ++j)
          w[0].codes[j][i]->set(k, is_signed[j]
                                       ? static_cast<double>(static_cast<int>(rng() % 255) - 127)
                                       : static_cast<double>(rng() % 256));
      }
      for (size_t j = 0; j < n_states; ++j)
        for (int64_t b = 0; b < w[0].scales[j][i]->numel(); ++b)
          w[0].scales[j][i]->set(b, (is_signed[j] ? 0.01 : 1e-4) * std::fabs(normal(rng)));
      w[1].p[i]->copy_from(*w[0].p[i]);
      w[1].g[i]->copy_from(*w[0].g[i]);
      if (st.master) w[1].master[i]->copy_from(*w[0].master[i]);
      for (size_t j = 0; j < n_states; ++j) {
        w[1].codes[j][i]->copy_from(*w[0].codes[j][i]);
        w[1].scales[j][i]->copy_from(*w[0].scales[j][i]);
      }
    }
    const float found[4] = {-1.0f, 0.0f, 1.0f, -1.0f};
    Q8World before;  // lamb_'s fourth step: the params and masters it starts from
    for (size_t i = 0; i < shapes.size(); ++i) {
      before.p.push_back(std::make_unique<Buffer>(st.param, w[0].p[i]->numel(), false));
      if (st.master)
        before.master.push_back(
            std::make_unique<Buffer>(w[0].master[i]->dtype(), w[0].master[i]->numel(), false));
    }
    // lamb_'s sq_norms per side: lamb_direction_ writes them; lamb_apply_ takes the CPU's.
    const int64_t n_tensors = static_cast<int64_t>(shapes.size());
    std::unique_ptr<Buffer> sq[2];
    for (auto& norms : sq) norms = std::make_unique<Buffer>(DType::kFloat32, 2 * n_tensors, false);
    int64_t max_blocks = 0, max_chunks = 0;
    for (const Q8Shape& s : shapes) {
      max_blocks = std::max(max_blocks, s.rows * ((s.cols + 255) / 256));
      max_chunks = std::max(max_chunks, mt::chunk_count(s.rows * s.cols));
    }
    const double u = 0x1p-24, chain = lamb_q8_chain(max_blocks, max_chunks, n_tensors);
    const double sums_delta = (chain + 32 + 1) * u;
    const int n_steps = lamb ? 4 : 3;
    for (int s = 0; s < n_steps; ++s) {
      const bool passes = lamb && s < 3;  // else lamb_ in one call
      if (lamb && s == 3) {
        for (size_t i = 0; i < shapes.size(); ++i) {
          before.p[i]->copy_from(*w[0].p[i]);
          if (st.master) before.master[i]->copy_from(*w[0].master[i]);
        }
      }
      // cpu then cuda, for each pass (lamb_'s two: direction, then apply)
      for (int call = 0; call < (passes ? 4 : 2); ++call) {
        const int side = call % 2, pass = call / 2;  // side 0: cpu, 1: cuda
        if (passes && call == 2) {  // the sums agree; both apply passes take the CPU's
          bool close = true;
          for (int64_t k = 0; k < 2 * n_tensors; ++k) {
            const double a = sq[1]->get(k), b = sq[0]->get(k);
            close &= std::fabs(a - b) <= sums_delta * std::max(std::fabs(a), std::fabs(b));
          }
          if (!close)
            std::fprintf(stderr, "lamb q8 %s/%s step %d: sq_norms beyond [note: lamb tolerance]\n",
                         dtype_name(st.param), dtype_name(st.grad), s);
          CHECK(close);
          sq[1]->copy_from(*sq[0]);
        }
        Q8World& x = w[side];
        std::vector<int64_t> numels, rows;
        std::vector<void*> p, g, master;
        std::vector<std::vector<void*>> codes(n_states), scales(n_states);
        std::vector<float*> steps;
        for (size_t i = 0; i < shapes.size(); ++i) {
          numels.push_back(shapes[i].rows * shapes[i].cols);
          rows.push_back(shapes[i].cols);
          p.push_back(x.p[i]->data());
          g.push_back(x.g[i]->data());
          if (st.master) master.push_back(x.master[i]->data());
          for (size_t j = 0; j < n_states; ++j) {
            codes[j].push_back(x.codes[j][i]->data());
            scales[j].push_back(x.scales[j][i]->data());
          }
          steps.push_back(&x.steps[i]);
        }
        // Two rows of hyperparameters; odd tensors: the second. adamw: lr, beta1, beta2,
        // eps, weight decay; lion: lr, beta1, beta2, weight decay; sgd: lr, momentum,
        // dampening, weight decay (the second row's momentum 0).
        const double adamw_hypers[10] = {1e-2, 0.9, 0.99, 1e-8, 0.1, 3e-3, 0.8, 0.999, 1e-6, 0.0};
        const double lion_hypers[8] = {1e-3, 0.9, 0.99, 0.1, 3e-4, 0.8, 0.999, 0.0};
        const double sgd_hypers[8] = {1e-2, 0.9, 0.1, 0.1, 3e-3, 0.0, 0.0, 0.0};
        // lamb: lr, beta1, beta2, eps, weight decay (the second row's 0: no adaptation but
        // under always_adapt)
        const double lamb_hypers[10] = {1e-2, 0.9, 0.99, 1e-6, 0.1, 3e-3, 0.8, 0.999, 1e-6, 0.0};
        std::vector<int32_t> group;
        for (size_t i = 0; i < shapes.size(); ++i) group.push_back(static_cast<int32_t>(i % 2));
        StepLists lists;
        lists.num_tensors = static_cast<int64_t>(shapes.size());
        lists.numels = numels.data();
        lists.params = {p.data(), st.param};
        lists.grads = {g.data(), st.grad};
        if (st.master)
          lists.master_params = {master.data(), st.compact ? DType::kBFloat16 : DType::kFloat32};
        lists.compact_master = st.compact;
        lists.master_sync = st.sync;
        lists.steps = op == Q8Op::kLion ? nullptr : steps.data();
        lists.row_lengths = rows.data();
        const float scale = 4.0f;
        lists.scalars.grad_scale = &scale;
        float found_inf = found[s];
        if (found_inf >= 0) lists.scalars.found_inf = &found_inf;
        const TensorSlot code0{codes[0].data(), is_signed[0] ? DType::kInt8 : DType::kUInt8};
        const TensorSlot scale0{scales[0].data(), DType::kFloat32};
        CudaContext cuda_ctx;
        if (op == Q8Op::kAdamW) {
          AdamWCall a;
          a.lists = lists;
          a.lists.hypers = {adamw_hypers, 5, group.data()};
          a.exp_avgs = code0;
          a.exp_avg_scales = scale0;
          a.exp_avg_sqs = {codes[1].data(), DType::kUInt8};
          a.exp_avg_sq_scales = {scales[1].data(), DType::kFloat32};
          a.decoupled = s != 1;  // AdamW, then Adam's L2 decay
          a.maximize = s == 1;
          side == 1 ? cuda::adamw(a, cuda_ctx.ctx) : cpu::adamw(a, ExecContext{});
        } else if (op == Q8Op::kLion) {
          LionCall a;
          a.lists = lists;
          a.lists.hypers = {lion_hypers, 4, group.data()};
          a.exp_avgs = code0;
          a.exp_avg_scales = scale0;
          a.maximize = s == 1;
          side == 1 ? cuda::lion(a, cuda_ctx.ctx) : cpu::lion(a, ExecContext{});
        } else if (lamb) {
          LambCall a;
          a.lists = lists;
          a.lists.hypers = {lamb_hypers, 5, group.data()};
          a.exp_avgs = code0;
          a.exp_avg_scales = scale0;
          a.exp_avg_sqs = {codes[1].data(), DType::kUInt8};
          a.exp_avg_sq_scales = {scales[1].data(), DType::kFloat32};
          a.grad_averaging = s != 1;  // the second step: every other flag
          a.bias_correction = s != 1;
          a.trust_clip = s == 1;
          a.always_adapt = s == 1;
          if (!passes) {
            side == 1 ? cuda::lamb(a, cuda_ctx.ctx) : cpu::lamb(a, ExecContext{});
          } else if (pass == 0) {
            std::memset(sq[side]->data(), 0, sq[side]->bytes());  // as the binding hands them
            side == 1 ? cuda::lamb_direction({a, sq[side]->data()}, cuda_ctx.ctx)
                      : cpu::lamb_direction({a, sq[side]->data()}, ExecContext{});
          } else {
            side == 1 ? cuda::lamb_apply({a, sq[side]->data()}, cuda_ctx.ctx)
                      : cpu::lamb_apply({a, sq[side]->data()}, ExecContext{});
          }
        } else {
          SgdCall a;
          a.lists = lists;
          a.lists.hypers = {sgd_hypers, 4, group.data()};
          a.momentum_buffers = code0;
          a.momentum_buffer_scales = scale0;
          a.nesterov = s == 1;  // the first row's dampening is 0.1: nesterov's math anyway
          a.maximize = s == 1;
          side == 1 ? cuda::sgd(a, cuda_ctx.ctx) : cpu::sgd(a, ExecContext{});
        }
      }
      bool ok = std::memcmp(w[0].steps.data(), w[1].steps.data(),
                            w[0].steps.size() * sizeof(float)) == 0;
      for (size_t i = 0; i < shapes.size(); ++i) {
        for (size_t j = 0; j < n_states; ++j)
          ok &= w[0].codes[j][i]->same_bits(*w[1].codes[j][i]) &&
                w[0].scales[j][i]->same_bits(*w[1].scales[j][i]);
        // lamb_'s fourth step took each backend's own sums: a tensor that adapts (the even
        // ones: weight decay 0.1) within [note: lamb tolerance]
        if (lamb && s == 3 && i % 2 == 0) {
          const double delta = (chain + 32 + 6) * u;
          ok &= lamb_close(*w[1].p[i], *w[0].p[i], *before.p[i], delta);
          if (st.compact) {
            auto joined = [&](const Q8World& x) {
              auto out = std::make_unique<Buffer>(DType::kFloat32, x.p[i]->numel(), false);
              for (int64_t k = 0; k < out->numel(); ++k)
                out->set(k, join_master(x.p[i]->bits(k),
                                        static_cast<int16_t>(x.master[i]->bits(k))));
              return out;
            };
            ok &= lamb_close(*joined(w[1]), *joined(w[0]), *joined(before), delta);
          } else if (st.master) {
            ok &= lamb_close(*w[1].master[i], *w[0].master[i], *before.master[i], delta);
          }
          continue;
        }
        ok &= w[0].p[i]->same_bits(*w[1].p[i]);
        if (st.master) ok &= w[0].master[i]->same_bits(*w[1].master[i]);
      }
      if (!ok)
        std::fprintf(stderr, "%s q8 %s/%s%s step %d: cuda and cpu differ\n", name,
                     dtype_name(st.param), dtype_name(st.grad),
                     st.compact ? " compact" : st.master ? " master" : "", s);
      CHECK(ok);
      ++cases;
    }
  }
  return cases;
}

int main(int argc, char** argv) {
  // `test_cuda_emulated q8`: the 8-bit state cases only (a quick run while working on them).
  if (argc > 1 && std::string(argv[1]) == "q8") {
    const int cases = test_q8(Q8Op::kAdamW) + test_q8(Q8Op::kLion) + test_q8(Q8Op::kSgd) +
                      test_q8(Q8Op::kLamb);
    std::printf("%d 8-bit state cases\n", cases);
    return check_result();
  }
  const int emulator_cases = test_emulator();
  const int step_cases = test_step_ops() + test_master_sync();
  const int scale_cases = test_scale();
  const int norm_cases = test_grad_norm();
  const int edge_cases = test_edge_values() + test_adafactor() + test_q8(Q8Op::kAdamW) +
                         test_q8(Q8Op::kLion) + test_q8(Q8Op::kSgd) + test_q8(Q8Op::kLamb);
  const emu::Stats s = emu::stats();
  std::printf(
      "%d emulator, %d step-op, %d scale_, %d grad_norm, %d edge-value cases; emulated %llu "
      "launches, %llu blocks, %llu threads, %llu fiber switches\n",
      emulator_cases, step_cases, scale_cases, norm_cases, edge_cases,
      static_cast<unsigned long long>(s.launches), static_cast<unsigned long long>(s.blocks),
      static_cast<unsigned long long>(s.threads), static_cast<unsigned long long>(s.switches));
  return check_result();
}
