// The CPU launchers through the torch-free interface (fusedopt/launch.h), as the binding
// calls them: grad_norm gives the same bits for every thread count ([note: fixed partition]
// in csrc/cpu/loop.h) and matches a double-precision sum; adamw with master weights writes
// param == bf16(master); a set found_inf leaves params, states and steps untouched.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "fusedopt/launch.h"

using namespace fusedopt;

/// The total norm (out[0]) and per-tensor norms (out[1...]) of one call over `data` (fp32 or
/// bf16 tensors), on `threads` OpenMP threads (0: the OpenMP default); the call finds no inf.
static std::vector<float> norms(const std::vector<int64_t>& numels, const std::vector<void*>& data,
                                const std::vector<DType>& dtypes, bool inf_norm,
                                const float* grad_scale, int threads = 0) {
  std::vector<float> out(1 + numels.size());
  float found = -1.0f;
  GradNormCall call;
  call.num_tensors = static_cast<int64_t>(numels.size());
  call.numels = numels.data();
  call.data = data.data();
  call.dtypes = dtypes.data();
  call.inf_norm = inf_norm;
  call.per_tensor = true;
  call.grad_scale = grad_scale;
  call.total_norm = out.data();
  call.per_tensor_norms = out.data() + 1;
  call.found_inf = &found;
  ExecContext ctx;
  ctx.num_threads = threads;
  cpu::grad_norm(call, ctx);
  CHECK(found == 0.0f);
  return out;
}

static void test_grad_norm_threads() {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  const std::vector<int64_t> numels = {0, 3, 1000, 70001, 200003};
  std::vector<std::vector<float>> f32(numels.size());
  std::vector<std::vector<uint16_t>> bf16(numels.size());
  std::vector<void*> data;
  std::vector<DType> dtypes;
  double exact = 0.0;
  for (size_t i = 0; i < numels.size(); ++i) {
    for (int64_t k = 0; k < numels[i]; ++k) {
      const float x = normal(rng);
      if (i % 2) {
        bf16[i].push_back(float_to_bf16(x));
        const double y = bf16_to_float(bf16[i].back()) / 4.0;
        exact += y * y;
      } else {
        f32[i].push_back(x);
        exact += static_cast<double>(x / 4.0f) * (x / 4.0f);
      }
    }
    data.push_back(i % 2 ? static_cast<void*>(bf16[i].data()) : f32[i].data());
    dtypes.push_back(i % 2 ? DType::kBFloat16 : DType::kFloat32);
  }
  const float grad_scale = 4.0f;
  const std::vector<float> one_thread = norms(numels, data, dtypes, false, &grad_scale, 1);
  for (int threads = 2; threads <= 4; ++threads) {
    const std::vector<float> got = norms(numels, data, dtypes, false, &grad_scale, threads);
    CHECK(std::memcmp(got.data(), one_thread.data(), got.size() * sizeof(float)) == 0);
  }
  CHECK(one_thread[1] == 0.0f);  // the empty tensor
  // fp32 lane sums of 32 terms, combined in double: ~1e-7 relative at most.
  CHECK_NEAR(one_thread[0], std::sqrt(exact), 1e-6);
}

// [note: exact unscale] (csrc/cpu/grad_norm.cpp): a power-of-two grad_scale multiplies by
// its reciprocal instead of dividing. The norms must keep the bits of the division: those of
// the same call over the quotients x / grad_scale (rounded to fp32 one by one) with no scale,
// which adds the same terms in the same order. Quotients normal, subnormal and zero (2^100),
// a scale below 1 (2^-20), GradScaler's 2^16, and 3 (not a power of two: divides).
static void test_grad_norm_unscale_is_a_division() {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  const std::vector<int64_t> numels = {5000, 70001, 3};
  std::vector<std::vector<float>> f32(numels.size());
  std::vector<std::vector<uint16_t>> bf16(numels.size());
  for (size_t i = 0; i < numels.size(); ++i) {
    for (int64_t k = 0; k < numels[i]; ++k) {
      const float x = normal(rng) * std::pow(10.0f, static_cast<float>(k % 20 - 10));
      f32[i].push_back(x);
      bf16[i].push_back(float_to_bf16(x));
    }
  }
  for (const float scale : {0x1p16f, 0x1p100f, 0x1p-20f, 3.0f}) {
    for (const bool from_bf16 : {false, true}) {
      std::vector<std::vector<float>> quotients(numels.size());
      std::vector<void*> data, divided;
      for (size_t i = 0; i < numels.size(); ++i) {
        for (int64_t k = 0; k < numels[i]; ++k) {
          const float x = from_bf16 ? bf16_to_float(bf16[i][k]) : f32[i][k];
          quotients[i].push_back(x / scale);
        }
        data.push_back(from_bf16 ? static_cast<void*>(bf16[i].data()) : f32[i].data());
        divided.push_back(quotients[i].data());
      }
      const std::vector<DType> dtypes(numels.size(),
                                      from_bf16 ? DType::kBFloat16 : DType::kFloat32);
      const std::vector<DType> f32_dtypes(numels.size(), DType::kFloat32);
      for (const bool inf_norm : {false, true}) {
        const std::vector<float> got = norms(numels, data, dtypes, inf_norm, &scale);
        const std::vector<float> want = norms(numels, divided, f32_dtypes, inf_norm, nullptr);
        const bool same = std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0;
        if (!same)
          std::fprintf(stderr, "scale %g, %s, %s norm: total %.9g, divided first %.9g\n",
                       scale, from_bf16 ? "bf16" : "fp32", inf_norm ? "inf" : "L2", got[0],
                       want[0]);
        CHECK(same);
        CHECK(want[0] > 0.0f);  // the comparison sees non-zero terms
      }
    }
  }
}

static void test_adamw_master_and_found_inf() {
  const int64_t n = 100003;
  std::vector<float> master(n), m(n, 0.0f), v(n, 0.0f);
  std::vector<uint16_t> param(n), grad(n);
  for (int64_t k = 0; k < n; ++k) {
    master[k] = std::sin(0.001f * k);
    param[k] = float_to_bf16(master[k]);
    grad[k] = float_to_bf16(std::cos(0.003f * k));
  }
  float step = 0.0f;
  void* p_ptr = param.data();
  void* g_ptr = grad.data();
  void* master_ptr = master.data();
  void* m_ptr = m.data();
  void* v_ptr = v.data();
  float* step_ptr = &step;
  const double lr = 1e-2, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.1;
  AdamWCall call;
  call.lists.num_tensors = 1;
  call.lists.numels = &n;
  call.lists.params = {&p_ptr, DType::kBFloat16};
  call.lists.grads = {&g_ptr, DType::kBFloat16};
  call.lists.master_params = {&master_ptr, DType::kFloat32};
  call.lists.steps = &step_ptr;
  call.exp_avgs = {&m_ptr, DType::kFloat32};
  call.exp_avg_sqs = {&v_ptr, DType::kFloat32};
  const double hypers[] = {lr, b1, b2, eps, wd};  // one row, [note: hyper table]
  const int32_t group = 0;
  call.lists.hypers = {hypers, 5, &group};
  const float found_inf = 1.0f;
  call.lists.scalars.found_inf = &found_inf;
  const std::vector<float> master_before = master;
  cpu::adamw(call, ExecContext{});
  CHECK(step == 0.0f);
  CHECK(master == master_before);
  call.lists.scalars.found_inf = nullptr;
  cpu::adamw(call, ExecContext{});
  CHECK(step == 1.0f);
  int mismatched = 0, unmoved = 0;
  for (int64_t k = 0; k < n; ++k) {
    mismatched += param[k] != float_to_bf16(master[k]);
    unmoved += master[k] == master_before[k];
  }
  CHECK(mismatched == 0);
  CHECK(unmoved < n / 100);  // the first AdamW step moves every element by ~lr
}

int main() {
  test_grad_norm_threads();
  test_grad_norm_unscale_is_a_division();
  test_adamw_master_and_found_inf();
  return check_result();
}
