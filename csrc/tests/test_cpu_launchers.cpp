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
  float totals[4], per[4][5], found[4];
  for (int threads = 1; threads <= 4; ++threads) {
    GradNormCall call;
    call.num_tensors = static_cast<int64_t>(numels.size());
    call.numels = numels.data();
    call.data = data.data();
    call.dtypes = dtypes.data();
    call.per_tensor = true;
    call.grad_scale = &grad_scale;
    call.total_norm = &totals[threads - 1];
    call.per_tensor_norms = per[threads - 1];
    call.found_inf = &found[threads - 1];
    ExecContext ctx;
    ctx.num_threads = threads;
    cpu::grad_norm(call, ctx);
  }
  for (int t = 1; t < 4; ++t) {
    CHECK(std::memcmp(&totals[t], &totals[0], sizeof(float)) == 0);
    CHECK(std::memcmp(per[t], per[0], sizeof(per[0])) == 0);
  }
  CHECK(found[0] == 0.0f);
  CHECK(per[0][0] == 0.0f);
  // fp32 lane sums of 32 terms, combined in double: ~1e-7 relative at most.
  CHECK_NEAR(totals[0], std::sqrt(exact), 1e-6);
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
  call.lr = &lr;
  call.beta1 = &b1;
  call.beta2 = &b2;
  call.eps = &eps;
  call.weight_decay = &wd;
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
  test_adamw_master_and_found_inf();
  if (g_failures) std::fprintf(stderr, "%d check(s) failed\n", g_failures);
  return g_failures != 0;
}
