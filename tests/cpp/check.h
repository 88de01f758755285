// A tiny assertion helper for the torch-free C++ unit tests (no framework dependency).
#pragma once

#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace lckv_test {

inline int& failures() {
  static int count = 0;
  return count;
}

inline void expect(bool ok, const char* what, const char* file, int line) {
  if (!ok) {
    std::fprintf(stderr, "%s:%d: expectation failed: %s\n", file, line, what);
    ++failures();
  }
}

inline bool close(double a, double b, double atol, double rtol) {
  if (std::isinf(a) || std::isinf(b)) return a == b;
  return std::fabs(a - b) <= atol + rtol * std::fabs(b);
}

inline int finish(const char* name) {
  if (failures() == 0) std::printf("%s: ok\n", name);
  return failures() == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

}  // namespace lckv_test

#define EXPECT(cond) ::lckv_test::expect((cond), #cond, __FILE__, __LINE__)
