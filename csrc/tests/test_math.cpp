// The update math of csrc/include/fusedopt/math against values computed by hand. Inputs are
// chosen so that every intermediate is exact in fp32 (powers of two, perfect squares): an
// expected value is then the exact answer, and equality is required. Where a quotient cannot
// be exact, the test says so and allows one fp32 rounding.
#include "check.h"
#include "fusedopt/math/adamw.h"
#include "fusedopt/math/lamb.h"
#include "fusedopt/math/adan.h"
#include "fusedopt/math/schedulefree_adamw.h"
#include "fusedopt/math/lion.h"
#include "fusedopt/math/muon.h"
#include "fusedopt/math/norm.h"
#include "fusedopt/math/sgd.h"

using namespace fusedopt;

static void test_load_grad() {
  // g / grad_scale * clip_coef, negated for maximize: 2 / 4 * 0.5 = 0.25.
  const float scale = 4.0f, clip = 0.5f;
  CHECK(load_grad(2.0f, make_grad_load<float>(&scale, &clip, false)) == 0.25f);
  CHECK(load_grad(2.0f, make_grad_load<float>(&scale, &clip, true)) == -0.25f);
  CHECK(load_grad(3.0f, make_grad_load<float>(nullptr, nullptr, false)) == 3.0f);
  // True division, not a multiplication by 1/scale: 1/3 rounds differently from 1 * (1/3)
  // for some values; with scale 3 and g = 10 the quotient is the correctly rounded 10/3.
  const float three = 3.0f;
  CHECK(load_grad(10.0f, make_grad_load<float>(&three, nullptr, false)) == 10.0f / 3.0f);
  // [note: opmath scalars]: an fp64 step reads an fp64 coefficient unrounded: 3 * (1/3 in
  // double), not 3 * (1/3 rounded to fp32), which is 1 + 3e-8.
  const double third = 1.0 / 3.0;
  CHECK(load_grad(3.0, make_grad_load<double>(nullptr, &third, false)) == 3.0 * third);
  CHECK(load_grad(3.0, make_grad_load<double>(nullptr, &third, false)) !=
        3.0 * static_cast<double>(static_cast<float>(third)));
}

static void test_bias_correction() {
  CHECK(bias_correction(0.5, 1.0, true) == 0.5);
  CHECK(bias_correction(0.5, 3.0, true) == 0.875);
  CHECK(bias_correction(0.9, 3.0, false) == 1.0);
  // double: 1 - 0.999^1 is 0.001 to ~1e-16 (fp32 would be off by ~1e-5 relative).
  CHECK(std::fabs(bias_correction(0.999, 1.0, true) - 0.001) < 1e-15);
}

static void test_adamw() {
  // AdamW, t = 1: lr 0.5, wd 0.5, beta1 0.5, beta2 0.75, eps 0.5; p 1, g 0.5, m 0.25, v 0.25.
  //   p = 1 * (1 - 0.25) = 0.75;  m = 0.5*0.25 + 0.5*0.5 = 0.375
  //   v = 0.75*0.25 + 0.25*0.25 = 0.25;  bc1 = 0.5, sqrt(bc2) = 0.5
  //   denom = sqrt(0.25)/0.5 + 0.5 = 1.5;  p = 0.75 - (0.5/0.5) * 0.375 / 1.5 = 0.5
  auto s = adamw_scalars<float>(0.5, 0.5, 0.75, 0.5, 0.5, 1.0, true, true);
  float p = 1.0f, m = 0.25f, v = 0.25f, unused = 0.0f;
  adamw_update<float, false>(p, 0.5f, m, v, unused, s);
  CHECK(m == 0.375f);
  CHECK(v == 0.25f);
  CHECK(p == 0.5f);
  CHECK(unused == 0.0f);

  // AMSGrad with vmax 1 > v: denom = sqrt(1)/0.5 + 0.5 = 2.5; p = 0.75 - 0.375/2.5 = 0.6
  // (0.375/2.5 = 0.15 is not exact: one rounding allowed).
  p = 1.0f, m = 0.25f, v = 0.25f;
  float vmax = 1.0f;
  adamw_update<float, true>(p, 0.5f, m, v, vmax, s);
  CHECK(vmax == 1.0f);
  CHECK(v == 0.25f);
  CHECK_NEAR(p, 0.6, 1.2e-7);
  // vmax below v takes v.
  p = 1.0f, m = 0.25f, v = 0.25f, vmax = 0.0f;
  adamw_update<float, true>(p, 0.5f, m, v, vmax, s);
  CHECK(vmax == 0.25f);
  CHECK(p == 0.5f);

  // Adam (L2): g = 0.5 + 0.5*1 = 1; m = 0.125 + 0.5 = 0.625; v = 0.75*0 + 0.25*1 = 0.25;
  // denom = 1.5; p = 1 - 0.625/1.5 = 0.58333... (one rounding).
  s = adamw_scalars<float>(0.5, 0.5, 0.75, 0.5, 0.5, 1.0, false, true);
  p = 1.0f, m = 0.25f, v = 0.0f;
  adamw_update<float, false>(p, 0.5f, m, v, unused, s);
  CHECK(m == 0.625f);
  CHECK(v == 0.25f);
  CHECK_NEAR(p, 1.0 - 0.625 / 1.5, 1.2e-7);

  // Without bias correction, step_size = lr and sqrt_bc2 = 1.
  s = adamw_scalars<float>(0.25, 0.5, 0.75, 0.5, 0.0, 7.0, true, false);
  CHECK(s.step_size == 0.25f && s.sqrt_bc2 == 1.0f && s.decay == 1.0f);

  // [note: zero weight decay]: wd = 0 is no decay. Adam (L2) keeps an infinite param
  // infinite (g + 0*p would be NaN) with finite moments; AdamW with lr = inf does not form
  // 1 - inf*0 (NaN): p = 1 - inf * m/denom = -inf.
  s = adamw_scalars<float>(0.5, 0.5, 0.75, 0.5, 0.0, 1.0, false, true);
  p = -INFINITY, m = 0.25f, v = 0.0f;
  adamw_update<float, false>(p, 0.5f, m, v, unused, s);
  CHECK(p == -INFINITY && m == 0.375f && v == 0.0625f);
  s = adamw_scalars<float>(INFINITY, 0.5, 0.75, 0.5, 0.0, 1.0, true, true);
  CHECK(s.decay == 1.0f);
  p = 1.0f, m = 0.25f, v = 0.0f;
  adamw_update<float, false>(p, 0.5f, m, v, unused, s);
  CHECK(p == -INFINITY);
}

static void test_lamb() {
  // t = 1, beta1 0.5 (averaging: beta3 0.5), beta2 0.75, eps 0.5, wd 0.5, lr 0.5;
  // p 1, g 0.5, m 0.25, v 0.25: m = 0.375, v = 0.25, u = (0.375/0.5)/(0.5/0.5 + 0.5) + 0.5 = 1.
  auto s = lamb_scalars<float>(0.5, 0.5, 0.75, 0.5, 0.5, 1.0, true, true);
  float m = 0.25f, v = 0.25f;
  const float u = lamb_direction(1.0f, 0.5f, m, v, s);
  CHECK(m == 0.375f && v == 0.25f && u == 1.0f);
  // Trust ratio |p| / |u| = 2 / 4; p = 1 - 0.5 * (1 * 0.5) = 0.75.
  const float r = lamb_trust_ratio(2.0f, 4.0f, true, false);
  CHECK(r == 0.5f);
  CHECK(lamb_apply(1.0f, u, r, s) == 0.75f);
  // Either norm 0 -> 1; clipped to 1 with trust_clip; 1 when not adapting.
  CHECK(lamb_trust_ratio(0.0f, 4.0f, true, false) == 1.0f);
  CHECK(lamb_trust_ratio(2.0f, 0.0f, true, false) == 1.0f);
  CHECK(lamb_trust_ratio(8.0f, 2.0f, true, false) == 4.0f);
  CHECK(lamb_trust_ratio(8.0f, 2.0f, true, true) == 1.0f);
  CHECK(lamb_trust_ratio(2.0f, 4.0f, false, false) == 1.0f);
  // Without grad averaging, beta3 = 1: m = 0.125 + 0.5 = 0.625.
  s = lamb_scalars<float>(0.5, 0.5, 0.75, 0.5, 0.0, 1.0, false, true);
  m = 0.25f, v = 0.25f;
  (void)lamb_direction(1.0f, 0.5f, m, v, s);
  CHECK(m == 0.625f);
}

static void test_lion() {
  // lr 0.125, wd 1, beta1 0.5, beta2 0.25; p 1, g 0.5, m -1:
  // p = 1 * 0.875 = 0.875; c = -0.5 + 0.25 = -0.25; p = 0.875 + 0.125 = 1;
  // m = 0.25 * -1 + 0.75 * 0.5 = 0.125.
  const auto s = lion_scalars<float>(0.125, 0.5, 0.25, 1.0);
  float p = 1.0f, m = -1.0f;
  lion_update(p, 0.5f, m, s);
  CHECK(p == 1.0f && m == 0.125f);
  // c = 0 exactly: sign(0) = 0, only the decay moves p.
  p = 1.0f, m = -1.0f;
  lion_update(p, 1.0f, m, s);
  CHECK(p == 0.875f);
  CHECK(sign0(-0.0f) == 0.0f && sign0(3.0f) == 1.0f && sign0(-2.0f) == -1.0f);
  // sign(NaN) = 0, as torch.sign (lion-pytorch): a NaN grad only decays p; m becomes NaN.
  CHECK(sign0(NAN) == 0.0f && sign0(static_cast<double>(NAN)) == 0.0);
  p = 1.0f, m = -1.0f;
  lion_update(p, NAN, m, s);
  CHECK(p == 0.875f && std::isnan(m));
}

static void test_adan() {
  // lr 0.75, betas (0.5, 0.5, 0), eps 0, no weight decay, no_prox. Step 2 (bc1 = bc2 = 0.75,
  // bc3 = 1): p 1, g 1, g_prev 0.5 (npg -0.5), m 0.25, v 0.125, n 7:
  // d = 0.5; m = 0.125 + 0.5 = 0.625; v = 0.0625 + 0.25 = 0.3125; u = 0.25 + 1 = 1.25;
  // n = 0 * 7 + 1 * 1.5625; denom = 1.25; p = 1 - (0.75/0.75) * 0.5 = 0.5;
  // p = 0.5 - (0.75*0.5/0.75) * 0.25 = 0.375; npg = -1.
  auto s = adan_scalars<float>(0.75, 0.5, 0.5, 0.0, 0.0, 0.0, 2.0, true);
  float p = 1.0f, m = 0.25f, v = 0.125f, n = 7.0f, npg = -0.5f;
  adan_update(p, 1.0f, m, v, n, npg, s);
  CHECK(p == 0.375f && m == 0.625f && v == 0.3125f && n == 1.5625f && npg == -1.0f);
  // The same with prox weight decay, lr*wd = 0.5: p = 0.375 / 1.5 = 0.25.
  s = adan_scalars<float>(0.75, 0.5, 0.5, 0.0, 0.0, 2.0 / 3.0, 2.0, false);
  p = 1.0f, m = 0.25f, v = 0.125f, n = 7.0f, npg = -0.5f;
  adan_update(p, 1.0f, m, v, n, npg, s);
  CHECK(p == 0.25f);
  // Step 1 (bc1 = bc2 = 0.5): the stored previous grad is not read (d = 0, even for NaN):
  // m = 0.5, v = 0.25, u = 1, n = 1; p = 1 - 1.5*0.5 - 0.75*0.25 = 0.0625.
  s = adan_scalars<float>(0.75, 0.5, 0.5, 0.0, 0.0, 0.0, 1.0, true);
  p = 1.0f, m = 0.0f, v = 0.5f, n = 3.0f, npg = NAN;
  adan_update(p, 1.0f, m, v, n, npg, s);
  CHECK(p == 0.0625f && m == 0.5f && v == 0.25f && n == 1.0f && npg == -1.0f);
}

static void test_schedulefree_adamw() {
  // lr 0.5, beta1 0.5, beta2 0.5, eps 0, wd 0, ckp1 0.25 (lerp from y), bc2 0.25; y 1, g 1,
  // z 3, v 7: v = 3.5 + 0.5 = 4; u = 1 / (sqrt(4 / 0.25) + 0) = 0.25;
  // y = 1 + 0.25 * (3 - 1) = 1.5; y_step = 0.5 * (0.5 * 0.75 - 1) = -0.3125;
  // y = 1.5 - 0.078125 = 1.421875; z = 3 - 0.5 * 0.25 = 2.875.
  auto s = schedulefree_adamw_scalars<float>(0.5, 0.5, 0.5, 0.0, 0.0, 0.25, 0.25);
  float y = 1.0f, z = 3.0f, v = 7.0f;
  schedulefree_adamw_update(y, 1.0f, z, v, s);
  CHECK(v == 4.0f && y == 1.421875f && z == 2.875f);
  // wd 0.5 at y = 1: u = 0.25 + 0.5 = 0.75; ckp1 0.75 (lerp from z): y = 3 - 2 * 0.25 = 2.5;
  // y_step = 0.5 * (0.5 * 0.25 - 1) = -0.4375; y = 2.5 - 0.328125 = 2.171875;
  // z = 3 - 0.375 = 2.625.
  s = schedulefree_adamw_scalars<float>(0.5, 0.5, 0.5, 0.0, 0.5, 0.75, 0.25);
  y = 1.0f, z = 3.0f, v = 7.0f;
  schedulefree_adamw_update(y, 1.0f, z, v, s);
  CHECK(v == 4.0f && y == 2.171875f && z == 2.625f);
  // ckp1 = 1 (the first step): y = z exactly before its step (z - (z - y) * 0), whatever
  // finite y was; y_step = -lr: y = 3 - 0.5 * 0.25.
  s = schedulefree_adamw_scalars<float>(0.5, 0.5, 0.5, 0.0, 0.0, 1.0, 0.25);
  y = 100.0f, z = 3.0f, v = 7.0f;
  schedulefree_adamw_update(y, 1.0f, z, v, s);
  CHECK(y == 3.0f - 0.125f && z == 2.875f);
}

static void test_sgd() {
  // lr 0.25, momentum 0.5, dampening 0.5, wd 0.5; p 1, g 0.5, buf 2:
  // g = 0.5 + 0.5 = 1; buf = 0.5*2 + 0.5*1 = 1.5; p = 1 - 0.25*1.5 = 0.625.
  auto s = sgd_scalars<float>(0.25, 0.5, 0.5, 0.5, false, false);
  float p = 1.0f, buf = 2.0f;
  sgd_update<float, true>(p, 0.5f, buf, s);
  CHECK(buf == 1.5f && p == 0.625f);
  // Nesterov: update g + mu*buf = 1 + 0.75 = 1.75; p = 1 - 0.4375 = 0.5625.
  s = sgd_scalars<float>(0.25, 0.5, 0.5, 0.5, false, true);
  p = 1.0f, buf = 2.0f;
  sgd_update<float, true>(p, 0.5f, buf, s);
  CHECK(buf == 1.5f && p == 0.5625f);
  // First step: buf = g = 1 (whatever it held); p = 0.75.
  s = sgd_scalars<float>(0.25, 0.5, 0.5, 0.5, true, false);
  p = 1.0f, buf = 123.0f;
  sgd_update<float, true>(p, 0.5f, buf, s);
  CHECK(buf == 1.0f && p == 0.75f);
  // No momentum, no decay: p = 1 - 0.25*0.5.
  s = sgd_scalars<float>(0.25, 0.0, 0.0, 0.0, false, false);
  p = 1.0f;
  float unused = 7.0f;
  sgd_update<float, false>(p, 0.5f, unused, s);
  CHECK(p == 0.875f && unused == 7.0f);
}

static void test_muon() {
  // [note: muon lerp]: both branches give the exact lerp on exact values; which branch runs
  // shows only in the rounding (checked against torch bit for bit in tests/test_optim_muon.py).
  CHECK(torch_lerp(1.0f, 3.0f, 0.25f) == 1.5f);
  CHECK(torch_lerp(1.0f, 3.0f, 0.75f) == 2.5f);
  // Momentum 0.5 (weights exact): buf = lerp(0.5, 1.5, 0.5) = 1.0 (the other branch);
  // Nesterov input = lerp(g = 1.5, buf = 1.0, 0.5) = 1.25; without Nesterov, buf.
  const auto s = muon_scalars<float>(0.5, 0.5, 0.25, 2.0);
  CHECK(s.buf_weight == 0.5f && s.decay == 0.875f && s.step == -1.0f);
  float stored = 0.0f;
  const auto keep = [&](float x) { return stored = x; };
  CHECK((muon_momentum<float, true>(1.5f, 0.5f, s, keep)) == 1.25f && stored == 1.0f);
  CHECK((muon_momentum<float, false>(1.5f, 0.5f, s, keep)) == 1.0f);
  // The stored buffer is what the Nesterov lerp reads: a store that rounds (to 0.75 here)
  // changes the input: lerp(1.5, 0.75, 0.5) = 1.125.
  const auto round_down = [](float) { return 0.75f; };
  CHECK((muon_momentum<float, true>(1.5f, 0.5f, s, round_down)) == 1.125f);
  // p = 2*(1 - 0.5*0.25) - 0.5*2*0.5 = 1.75 - 0.5 = 1.25.
  CHECK(muon_apply(2.0f, 0.5f, s) == 1.25f);
  // Zero decay still multiplies by 1 - lr*0 = 1 (torch.optim.Muon: unconditionally).
  CHECK(muon_scalars<float>(0.5, 0.5, 0.0, 1.0).decay == 1.0f);
}

static void test_norm_terms() {
  CHECK(norm2_term(3.0f, 2.0f) == 2.25f);
  CHECK(norm_inf_term(-3.0f, 2.0f) == 1.5f);
  const float nan = std::nanf("");
  CHECK(std::isnan(nan_max(nan, 1.0f)) && std::isnan(nan_max(1.0f, nan)));
  CHECK(nan_max(1.0f, 2.0f) == 2.0f);
  CHECK(is_finite(1.0f) && !is_finite(INFINITY) && !is_finite(-INFINITY) && !is_finite(nan));
  CHECK(scale_element(3.0f, 0.5f) == 1.5f);
  CHECK(scale_element(3.0, 0.5) == 1.5);
}

int main() {
  test_load_grad();
  test_bias_correction();
  test_adamw();
  test_lamb();
  test_lion();
  test_adan();
  test_schedulefree_adamw();
  test_sgd();
  test_muon();
  test_norm_terms();
  return check_result();
}
