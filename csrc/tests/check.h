// A minimal check harness for the torch-free C++ tests: CHECK records a failure and goes on;
// main() returns check_result(), nonzero after a failure, which ctest reads.
#pragma once

#include <cmath>
#include <cstdio>

inline int g_failures = 0;

#define CHECK(cond)                                                                     \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);     \
      ++g_failures;                                                                     \
    }                                                                                   \
  } while (0)

/// |got - want| <= rel * |want|, reported with both values.
#define CHECK_NEAR(got, want, rel)                                                       \
  do {                                                                                   \
    const double got_ = (got), want_ = (want);                                           \
    if (!(std::fabs(got_ - want_) <= (rel) * std::fabs(want_))) {                       \
      std::fprintf(stderr, "%s:%d: %s = %.9g, expected %.9g\n", __FILE__, __LINE__, #got, \
                   got_, want_);                                                         \
      ++g_failures;                                                                      \
    }                                                                                    \
  } while (0)

/// What a test's main() returns: 0 if every check passed, else 1 (after printing the count).
inline int check_result() {
  if (g_failures) std::fprintf(stderr, "%d check(s) failed\n", g_failures);
  return g_failures != 0;
}
