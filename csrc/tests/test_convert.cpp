// Storage conversions (fusedopt/dtype.h and the vectorised CPU loops of csrc/cpu/convert.h)
// against independent references: every bf16 and fp16 value round-trips; float -> bf16/fp16
// agrees with a round-to-nearest-even computed from distances in double, over a sweep of
// ~1M float bit patterns (all exponents, ties included); the F16C and auto-vectorised block
// loops agree with the scalar functions bit for bit.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../cpu/convert.h"
#include "check.h"
#include "fusedopt/dtype.h"
#include "fusedopt/philox.h"

using namespace fusedopt;

/// The nearest of two candidate encodings by distance in double; ties to the even encoding.
template <typename Decode>
static uint16_t nearest_even(double x, uint16_t lo, uint16_t hi, Decode decode) {
  const double dlo = std::fabs(x - decode(lo)), dhi = std::fabs(x - decode(hi));
  if (dlo != dhi) return dlo < dhi ? lo : hi;
  return (lo & 1u) ? hi : lo;
}

static uint16_t bf16_reference(float f) {
  if (std::isnan(f)) return 0x7FC0;
  const uint32_t u = float_bits(f);
  const uint16_t lo = static_cast<uint16_t>(u >> 16);
  if ((u & 0xFFFFu) == 0) return lo;
  // Past the largest finite bf16 the next "encoding" is inf, which IEEE rounding treats as
  // the value 2^128 (overflow happens at or beyond the halfway point to it).
  return nearest_even(static_cast<double>(f), lo, static_cast<uint16_t>(lo + 1), [](uint16_t h) {
    if ((h & 0x7FFFu) == 0x7F80u) return std::copysign(std::ldexp(1.0, 128), bf16_to_float(h));
    return static_cast<double>(bf16_to_float(h));
  });
}

static uint16_t fp16_reference(float f) {
  if (std::isnan(f)) return static_cast<uint16_t>(((float_bits(f) >> 16) & 0x8000u) | 0x7E00u);
  const double x = std::fabs(static_cast<double>(f));
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  if (x >= 65520.0) return sign | 0x7C00;  // halfway between 65504 and 2^16 and beyond
  // Largest encoding not above x, by scanning the monotone positive encodings.
  uint16_t lo = 0;
  for (int step = 1 << 14; step > 0; step >>= 1)
    if (lo + step <= 0x7BFF && fp16_to_float(static_cast<uint16_t>(lo + step)) <= x) lo += step;
  if (fp16_to_float(lo) == x) return sign | lo;
  return sign | nearest_even(x, lo, static_cast<uint16_t>(lo + 1),
                             [](uint16_t h) { return static_cast<double>(fp16_to_float(h)); });
}

static void test_round_trips() {
  for (uint32_t h = 0; h <= 0xFFFF; ++h) {
    const uint16_t b = static_cast<uint16_t>(h);
    const float fb = bf16_to_float(b), fh = fp16_to_float(b);
    if (!std::isnan(fb)) CHECK(float_to_bf16(fb) == b);
    if (!std::isnan(fh)) CHECK(float_to_fp16(fh) == b);
  }
}

static void test_known_values() {
  CHECK(float_to_bf16(1.0f) == 0x3F80);
  CHECK(float_to_bf16(1.00390625f) == 0x3F80);  // 1 + 2^-8: a tie, to even
  CHECK(float_to_bf16(1.01171875f) == 0x3F82);  // 1 + 3*2^-8: a tie, to even (up)
  CHECK(float_to_bf16(NAN) == 0x7FC0);
  CHECK(float_to_fp16(65504.0f) == 0x7BFF);
  CHECK(float_to_fp16(65519.99f) == 0x7BFF);
  CHECK(float_to_fp16(65520.0f) == 0x7C00);
  CHECK(float_to_fp16(std::ldexp(1.0f, -24)) == 0x0001);
  CHECK(float_to_fp16(std::ldexp(1.0f, -25)) == 0x0000);     // tie with 0: to even
  CHECK(float_to_fp16(std::ldexp(1.5f, -25)) == 0x0001);
  CHECK(float_to_fp16(std::ldexp(3.0f, -25)) == 0x0002);     // 1.5 * 2^-24: tie, to even
  CHECK(float_to_fp16(-0.0f) == 0x8000);
  CHECK(fp16_to_float(0x3C00) == 1.0f && fp16_to_float(0x0001) == std::ldexp(1.0f, -24));
}

static void test_against_references_and_vector_loops() {
  std::vector<float> values;
  for (uint64_t u = 0; u <= 0xFFFFFFFFull; u += 4093)
    values.push_back(bits_float(static_cast<uint32_t>(u)));
  // Exact ties and their neighbours for both formats.
  for (uint32_t h = 0; h < 0x7C00; h += 7) {
    const float a = fp16_to_float(static_cast<uint16_t>(h));
    const float b = fp16_to_float(static_cast<uint16_t>(h + 1));
    values.push_back(static_cast<float>((static_cast<double>(a) + b) / 2));
    values.push_back(-static_cast<float>((static_cast<double>(a) + b) / 2));
  }
  for (uint32_t h = 0; h < 0x7F80; h += 5) values.push_back(bits_float((h << 16) | 0x8000u));
  const int64_t n = static_cast<int64_t>(values.size());
  std::vector<uint16_t> vb(n), vh(n);
  cpu::store_values(vb.data(), DType::kBFloat16, values.data(), n);
  cpu::store_values(vh.data(), DType::kFloat16, values.data(), n);
  int bad_b = 0, bad_h = 0, bad_vb = 0, bad_vh = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float f = values[i];
    bad_b += float_to_bf16(f) != bf16_reference(f);
    bad_h += float_to_fp16(f) != fp16_reference(f);
    bad_vb += vb[i] != float_to_bf16(f);
    if (!std::isnan(f)) bad_vh += vh[i] != float_to_fp16(f);  // F16C keeps NaN payloads
  }
  CHECK(bad_b == 0);
  CHECK(bad_h == 0);
  CHECK(bad_vb == 0);
  CHECK(bad_vh == 0);
  std::vector<float> back(n);
  cpu::load_values(back.data(), vh.data(), DType::kFloat16, n);
  int bad_load = 0;
  for (int64_t i = 0; i < n; ++i)
    bad_load += float_bits(back[i]) != float_bits(fp16_to_float(vh[i])) && !std::isnan(back[i]);
  CHECK(bad_load == 0);
}

// [note: compact master] (fusedopt/_contract.py), over all 2^32 fp32 bit patterns: the
// join of the split is the master bit for bit (a NaN: a NaN), and the param is the nearest
// bf16 with ties away from zero: float_to_bf16's (nearest even) except at the ties whose
// upper half is even. And over all 2^32 (param, remainder) pairs, what a write into the
// param meets: the join rounds back to the param (a written value is adopted within half an
// ulp), and is finite beside a finite param.
static void test_compact_master_all_patterns() {
  uint64_t bad_join = 0, bad_param = 0, bad_written = 0, bad_finite = 0;
  for (uint64_t x = 0; x <= 0xFFFFFFFFull; ++x) {
    const uint32_t u = static_cast<uint32_t>(x);
    const float master = bits_float(u);
    const CompactMaster c = split_master(master);
    const float joined = join_master(c.param, c.remainder);
    if (std::isnan(master)) {
      bad_join += !std::isnan(joined) || c.param != 0x7FC0;
    } else {
      bad_join += float_bits(joined) != u;
      const bool even_tie = (u & 0xFFFFu) == 0x8000u && ((u >> 16) & 1u) == 0;
      bad_param += (c.param != float_to_bf16(master)) != even_tie;
      bad_param += even_tie && c.param != static_cast<uint16_t>((u >> 16) + 1);
    }
    const uint16_t param = static_cast<uint16_t>(u >> 16);
    const float adopted = join_master(param, static_cast<int16_t>(u & 0xFFFFu));
    if (!std::isnan(bf16_to_float(param))) {
      bad_written += split_master(adopted).param != param;
      bad_finite += std::isfinite(bf16_to_float(param)) && !std::isfinite(adopted);
    }
  }
  CHECK(bad_join == 0);
  CHECK(bad_param == 0);
  CHECK(bad_written == 0);
  CHECK(bad_finite == 0);
  CHECK(split_master(1.00390625f).param == 0x3F81);  // a tie beside an even param: away
  CHECK(split_master(1.00390625f).remainder == -0x8000);
  CHECK(split_master(-0.0f).param == 0x8000 && split_master(-0.0f).remainder == 0);
  CHECK(float_bits(join_master(0x0000, -1)) == 0);           // +0 written over r < 0
  CHECK(join_master(0x7F80, 1) == INFINITY);                 // inf written over r > 0
  CHECK(float_bits(join_master(0x7F80, -1)) == 0x7F7FFFFFu);  // the largest finite master
}

/// Philox4x32-10 on Random123's published known-answer vectors (kat_vectors: counter, key,
/// output), and the stream's key layout ([note: stochastic rounding] in fusedopt/dtype.h).
static void test_philox_known_answers() {
  struct Kat {
    Philox4x32 counter;
    uint32_t k0, k1;
    Philox4x32 out;
  };
  const Kat kats[] = {
      {{{0, 0, 0, 0}}, 0, 0, {{0x6627E8D5u, 0xE169C58Du, 0xBC57AC4Cu, 0x9B00DBD8u}}},
      {{{0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu}}, 0xFFFFFFFFu, 0xFFFFFFFFu,
       {{0x408F276Du, 0x41C83B0Eu, 0xA20BC7C6u, 0x6D5451FDu}}},
      {{{0x243F6A88u, 0x85A308D3u, 0x13198A2Eu, 0x03707344u}}, 0xA4093822u, 0x299F31D0u,
       {{0xD16CFE09u, 0x94FDCCEBu, 0x5001E420u, 0x24126EA1u}}},
  };
  for (const Kat& k : kats) {
    const Philox4x32 r = philox4x32_10(k.counter, k.k0, k.k1);
    for (int w = 0; w < 4; ++w) CHECK(r.w[w] == k.out.w[w]);
  }
  // rounding_bits: the top half of the first word of counter (element low, element high,
  // tensor, counter) under key (seed low, seed high).
  const RoundingKey key{0x243F6A8885A308D3ull, 0x03707344u, 0x13198A2Eu};
  const Philox4x32 r = philox4x32_10({{0xA4093822u, 0x299F31D0u, 0x13198A2Eu, 0x03707344u}},
                                     0x85A308D3u, 0x243F6A88u);
  CHECK(rounding_bits(key, 0x299F31D0A4093822ll) == r.w[0] >> 16);
  // An sr_key entry is the stream id | the shard's first element << 32 ([note: sharded
  // stochastic rounding] in fusedopt/optim/_plan.py): element e of a shard starting at
  // element 1000 draws element 1000 + e's bits; an entry without the high word is as before.
  const int64_t sr_key[] = {0x243F6A8885A308D3ll, 0x03707344, 0x13198A2E,
                            0x13198A2E | 1000ll << 32};
  const RoundingKey whole = rounding_key(sr_key, 0), shard = rounding_key(sr_key, 1);
  CHECK(whole.tensor == key.tensor && whole.first == 0 && shard.tensor == key.tensor);
  CHECK(shard.first == 1000);
  for (const int64_t e : {0ll, 1ll, 77ll, 0xFFFFFFFFll})
    CHECK(rounding_bits(shard, e) == rounding_bits(whole, 1000 + e));
}

/// float_to_bf16_stochastic ([note: stochastic rounding]): the carry with the probability of
/// the low half, exactly, for every 16-bit random value; the edge cases as chosen.
static void test_stochastic_rounding() {
  // For x = lo + f * ulp (f = low16 / 2^16), exactly low16 of the 2^16 random values round
  // up, for either sign, in a normal and a subnormal binade and across a binade boundary.
  for (const uint32_t u : {0x3F80ABCDu, 0xBF80ABCDu, 0x0000ABCDu, 0x807F0001u, 0x3FFFFFFFu,
                           0x40490FDBu}) {
    uint32_t up = 0;
    for (uint32_t r = 0; r < 0x10000u; ++r) {
      const uint16_t b = float_to_bf16_stochastic(bits_float(u), r);
      CHECK(b == (u >> 16) || b == (u >> 16) + 1);
      up += b == (u >> 16) + 1;
    }
    CHECK(up == (u & 0xFFFFu));
  }
  // Exact bf16 values never move; NaN -> 0x7FC0; infinities stay.
  for (const uint32_t r : {0u, 1u, 0x8000u, 0xFFFFu}) {
    CHECK(float_to_bf16_stochastic(1.0f, r) == 0x3F80);
    CHECK(float_to_bf16_stochastic(bits_float(0x80000000u), r) == 0x8000);
    CHECK(float_to_bf16_stochastic(bits_float(0x7FC00001u), r) == 0x7FC0);
    CHECK(float_to_bf16_stochastic(bits_float(0xFFFFFFFFu), r) == 0x7FC0);
    CHECK(float_to_bf16_stochastic(bits_float(0x7F800000u), r) == 0x7F80);
    CHECK(float_to_bf16_stochastic(bits_float(0xFF800000u), r) == 0xFF80);
  }
  // Above the largest finite bf16 (0x7F7F): below RNE's overflow threshold 0x7F7F8000 SR
  // saturates there (RNE stays finite too); from it on, SR gives the infinity or the largest
  // finite (RNE: the infinity).
  for (const uint32_t sign : {0u, 0x80000000u}) {
    CHECK(float_to_bf16_stochastic(bits_float(sign | 0x7F7F7FFFu), 0xFFFFu) == ((sign >> 16) | 0x7F7Fu));
    CHECK(float_to_bf16(bits_float(sign | 0x7F7F7FFFu)) == ((sign >> 16) | 0x7F7Fu));
    CHECK(float_to_bf16_stochastic(bits_float(sign | 0x7F7F8000u), 0x7FFFu) == ((sign >> 16) | 0x7F7Fu));
    CHECK(float_to_bf16_stochastic(bits_float(sign | 0x7F7F8000u), 0x8000u) == ((sign >> 16) | 0x7F80u));
    CHECK(float_to_bf16(bits_float(sign | 0x7F7F8000u)) == ((sign >> 16) | 0x7F80u));
  }
  // The CPU block loop (csrc/cpu/convert.h) is the scalar function with the element's bits.
  const RoundingKey key{12345, 6, 7};
  std::vector<float> src(300);
  for (size_t i = 0; i < src.size(); ++i) src[i] = 1.0f + 0.001f * static_cast<float>(i);
  std::vector<uint32_t> word_buffer(4 * src.size());
  const std::array<uint32_t*, 4> words{&word_buffer[0], &word_buffer[src.size()],
                                       &word_buffer[2 * src.size()],
                                       &word_buffer[3 * src.size()]};
  const int64_t n = static_cast<int64_t>(src.size());
  cpu::rounding_words_n(words, key, 1000, n);
  for (const uint32_t stream : {0u, 2u, 5u}) {
    std::vector<uint16_t> out(src.size());
    cpu::store_values<Rounding::kStochastic>(out.data(), DType::kBFloat16, src.data(), n,
                                             cpu::stream_bits(words, stream));
    for (size_t i = 0; i < src.size(); ++i)
      CHECK(out[i] == float_to_bf16_stochastic(
                          src[i], rounding_bits(key, 1000 + static_cast<int64_t>(i), stream)));
  }
}

/// [note: vector philox] (csrc/cpu/convert.h): rounding_words_n's words, through
/// stream_bits, are rounding_bits' for every stream, for block lengths that leave a scalar
/// tail or none, and for element counters whose low word wraps inside a vector of 8 (the
/// carry into the high word), with and without a shard's first element in the key.
static void test_rounding_words_match_scalar() {
  constexpr int64_t kMax = 77;
  std::vector<uint32_t> word_buffer(4 * kMax);
  const std::array<uint32_t*, 4> words{&word_buffer[0], &word_buffer[kMax],
                                       &word_buffer[2 * kMax], &word_buffer[3 * kMax]};
  const RoundingKey keys[] = {
      {0x243F6A8885A308D3ull, 0x03707344u, 0x13198A2Eu, 0},
      {0xFFFFFFFFFFFFFFFFull, 0xFFFFFFFFu, 0xFFFFFFFFu, 0},
      {7, 1, 2, 0xFFFFFFF9u},  // a shard whose first element is 2^32 - 7
  };
  const int64_t firsts[] = {0, 3, 0xFFFFFFFBll, 0x1FFFFFFFCll, 0x7FFFFFFFFFFFFFF0ll};
  const int64_t lengths[] = {1, 7, 8, 9, 16, 29, kMax};
  for (const RoundingKey& key : keys)
    for (const int64_t first : firsts)
      for (const int64_t n : lengths) {
        std::fill(word_buffer.begin(), word_buffer.end(), 0u);
        cpu::rounding_words_n(words, key, first, n);
        for (uint32_t stream = 0; stream < 8; ++stream) {
          const cpu::StreamBits bits = cpu::stream_bits(words, stream);
          for (int64_t k = 0; k < n; ++k)
            CHECK(((bits.word[k] >> bits.shift) & 0xFFFFu) ==
                  rounding_bits(key, first + k, stream));
        }
      }
}

int main() {
  test_philox_known_answers();
  test_stochastic_rounding();
  test_rounding_words_match_scalar();
  test_round_trips();
  test_known_values();
  test_against_references_and_vector_loops();
  test_compact_master_all_patterns();
  return check_result();
}
