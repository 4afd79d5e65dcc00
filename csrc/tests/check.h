// A minimal check harness for the torch-free C++ tests: CHECK records a failure and goes on;
// main() returns the failure count, which ctest reads.
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
