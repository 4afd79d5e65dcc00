// The CPU's block quantizer (csrc/cpu/q8_block.h, AVX2 where built for it) against the
// scalar definition in csrc/include/fusedopt/quant8.h ([note: 8-bit states] in
// fusedopt/quant8.py), bit for bit:
// - the code magnitude on every fp32 |y| in [0, 1] (the only |y| a block's own absmax gives),
//   both tables, block and scalar (quant8.h's closed form, CUDA's quantizer), against the
//   count of midpoints strictly below |y| (the definition), and the scalar one near every
//   midpoint, above 1 and at inf;
// - quantize, dequantize and the absmax on blocks of every length 1..256 (the vector body
//   and the scalar tail) with random values, values at the midpoints times the scale +- a
//   few ulps, 0, -0, NaN, +-inf, denormals, and blocks whose absmax is 0, denormal, inf, NaN;
// - dequantize on every code with scales 0, denormal, 1, large, inf and NaN.
#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "../cpu/q8_block.h"
#include "check.h"

using namespace fusedopt;
namespace block = fusedopt::cpu::q8_block;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNan = std::numeric_limits<float>::quiet_NaN();
constexpr float kDenormal = 1e-40f;

template <bool kSigned>
const q8::CodeTable& table() {
  return kSigned ? q8::kSignedTable : q8::kUnsignedTable;
}

/// Every fp32 |y| in [0, 1] through block::quantize and the scalar q8::quantize with scale 1
/// (y = x / 1 = x), against the running count of midpoints strictly below |y|; signed codes
/// get x negated where the bit pattern is odd, so both signs meet every code. Returns the
/// number of mismatches.
template <bool kSigned>
int64_t sweep_every_magnitude() {
  const q8::CodeTable& t = table<kSigned>();
  constexpr uint32_t kOne = 0x3F800000u;
  constexpr int64_t kChunk = 4096;
  std::vector<float> x(kChunk);
  std::vector<block::Code<kSigned>> codes(kChunk);
  int count = 0;  // midpoints strictly below the current |y|
  int64_t mismatches = 0;
  for (uint64_t start = 0; start <= kOne; start += kChunk) {
    const int64_t n = static_cast<int64_t>(std::min<uint64_t>(kChunk, kOne + 1 - start));
    for (int64_t e = 0; e < n; ++e) {
      const float magnitude = std::bit_cast<float>(static_cast<uint32_t>(start + e));
      x[e] = kSigned && (e & 1) ? -magnitude : magnitude;
    }
    block::quantize<kSigned>(x.data(), n, 1.0f, codes.data());
    for (int64_t e = 0; e < n; ++e) {
      const float magnitude = std::bit_cast<float>(static_cast<uint32_t>(start + e));
      while (count < t.levels && t.mid[count] < magnitude) ++count;
      const int want = kSigned && (e & 1) ? -count : count;
      const int scalar = q8::quantize<kSigned>(x[e], 1.0f);  // CUDA's and the tails'
      if (codes[e] != want || scalar != want) {
        if (mismatches < 10)
          std::fprintf(stderr, "signed %d: |y| %.9g (0x%08x): code %d (scalar %d), want %d\n",
                       kSigned, magnitude, static_cast<unsigned>(start + e), int(codes[e]),
                       scalar, want);
        ++mismatches;
      }
    }
  }
  return mismatches;
}

/// The scalar code_magnitude against the same count, on the midpoints +- 64 ulps.
template <bool kSigned>
void check_scalar_near_midpoints() {
  const q8::CodeTable& t = table<kSigned>();
  constexpr int kPower = kSigned ? q8::kSignedPower : q8::kUnsignedPower;
  for (int j = 0; j < t.levels; ++j) {
    const uint32_t bits = std::bit_cast<uint32_t>(t.mid[j]);
    for (int d = -64; d <= 64; ++d) {
      const float y = std::bit_cast<float>(bits + d);
      int want = 0;
      while (want < t.levels && t.mid[want] < y) ++want;
      CHECK(q8::code_magnitude<kPower>(y, t.mid, t.levels) == want);
    }
  }
  // Above 1 (never a block's own |y|) and inf: the top code, as the count; NaN: 0.
  for (const float y : {1.0f, 1.5f, 1e30f, kInf})
    CHECK(q8::code_magnitude<kPower>(y, t.mid, t.levels) == t.levels);
  CHECK(q8::code_magnitude<kPower>(kNan, t.mid, t.levels) == 0);
}

bool same_bits(float a, float b) {
  return std::bit_cast<uint32_t>(a) == std::bit_cast<uint32_t>(b);
}

/// block::absmax, block::quantize and block::dequantize on x[0, n) against the scalar
/// loops of q8_step.h's former code, bit for bit.
template <bool kSigned>
void check_block(const std::vector<float>& x) {
  const int64_t n = static_cast<int64_t>(x.size());
  float want_scale = 0.0f;
  bool any_nan = false;
  for (const float v : x) q8::fold_absmax(v, want_scale, any_nan);
  want_scale = q8::canonical_absmax(want_scale, any_nan);
  const float scale = block::absmax(x.data(), n);
  CHECK(same_bits(scale, want_scale));
  std::vector<block::Code<kSigned>> codes(n);
  block::quantize<kSigned>(x.data(), n, want_scale, codes.data());
  int mismatches = 0;
  for (int64_t e = 0; e < n; ++e) mismatches += codes[e] != q8::quantize<kSigned>(x[e], want_scale);
  CHECK(mismatches == 0);
  std::vector<float> values(n);
  block::dequantize<kSigned>(codes.data(), n, want_scale, values.data());
  mismatches = 0;
  for (int64_t e = 0; e < n; ++e)
    mismatches += !same_bits(values[e], q8::dequantize<kSigned>(codes[e], want_scale));
  CHECK(mismatches == 0);
}

template <bool kSigned>
void check_blocks() {
  const q8::CodeTable& t = table<kSigned>();
  std::mt19937 rng(kSigned ? 1 : 2);
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> ulps(-4, 4);
  const auto random_value = [&] {
    const float g = normal(rng) * 1e-3f;
    return kSigned ? g : g * g;
  };
  // Every length (the 32-lane body, the 8-lane remainder and the scalar tail).
  for (int64_t n = 1; n <= 256; ++n) {
    std::vector<float> x(n);
    for (float& v : x) v = random_value();
    check_block<kSigned>(x);
  }
  // Values at the midpoints times the block's scale, +- a few ulps: the quotient lands on
  // both sides of the midpoint.
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<float> x(256);
    const float scale = std::abs(normal(rng)) * (trial % 2 ? 1e-6f : 3.0f) + 1e-30f;
    x[0] = scale;
    for (int64_t e = 1; e < 256; ++e) {
      const float mid = t.mid[rng() % t.levels] * scale;
      const float v = std::bit_cast<float>(std::bit_cast<uint32_t>(mid) + ulps(rng));
      x[e] = kSigned && (rng() & 1) ? -v : v;
    }
    check_block<kSigned>(x);
  }
  // Special values within random blocks, and blocks of nothing but them.
  const float specials[] = {0.0f, -0.0f, kNan, -kNan, kInf, -kInf, kDenormal, -kDenormal,
                            std::numeric_limits<float>::max(),
                            std::numeric_limits<float>::min()};
  for (const float special : specials) {
    for (const int64_t n : {5, 8, 40, 255, 256}) {
      std::vector<float> x(n);
      for (float& v : x) v = random_value();
      x[n / 2] = special;
      check_block<kSigned>(x);
      std::vector<float> only(n, special);
      check_block<kSigned>(only);
      std::vector<float> mixed(n);  // absmax `special` (0, denormal, ...) among smaller values
      for (int64_t e = 0; e < n; ++e) mixed[e] = e % 3 ? special : special * 0.5f;
      check_block<kSigned>(mixed);
    }
  }
  std::vector<float> denormals(256);  // an absmax that is a denormal, values below it
  for (int64_t e = 0; e < 256; ++e)
    denormals[e] = std::bit_cast<float>(static_cast<uint32_t>(e * 997 + 1)) * (e % 2 ? -1 : 1);
  check_block<kSigned>(denormals);
  // Every code with scales the absmax can take, and a negative one.
  std::vector<block::Code<kSigned>> codes(256);
  for (int e = 0; e < 256; ++e) codes[e] = static_cast<block::Code<kSigned>>(e);
  for (const float scale : {0.0f, kDenormal, 1.0f, 3.25e-3f, 3e38f, kInf, kNan, -2.0f}) {
    for (const int64_t n : {256, 37}) {
      std::vector<float> values(n);
      block::dequantize<kSigned>(codes.data(), n, scale, values.data());
      int mismatches = 0;
      for (int64_t e = 0; e < n; ++e)
        mismatches += !same_bits(values[e], q8::dequantize<kSigned>(codes[e], scale));
      CHECK(mismatches == 0);
    }
  }
}

}  // namespace

int main() {
  check_scalar_near_midpoints<true>();
  check_scalar_near_midpoints<false>();
  check_blocks<true>();
  check_blocks<false>();
  CHECK(sweep_every_magnitude<true>() == 0);
  CHECK(sweep_every_magnitude<false>() == 0);
  return check_result();
}
