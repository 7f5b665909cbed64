// What the emulated-kernel tests share: seeded inputs, comparisons with a
// double-precision reference computed in the test, and the count of checks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "launchers.h"

namespace harness {

using fastmeta::cuda::DType;

inline int passed = 0, failed = 0;

inline void check(bool ok, const std::string& what) {
  (ok ? passed : failed) += 1;
  if (!ok) std::printf("FAILED: %s\n", what.c_str());
}

// Compares `got` with the double-precision `want`: NaN where it is NaN, an
// infinity where it is one, elsewhere within rtol * |want| + atol * scale
// (scale: the largest finite |want|, at least 1).
template <typename T>
void compare(const std::vector<T>& got, const std::vector<double>& want, double rtol, double atol,
             const std::string& what) {
  if (got.size() != want.size()) return check(false, what + ": size differs");
  double scale = 1;
  for (double w : want)
    if (std::isfinite(w)) scale = std::max(scale, std::fabs(w));
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = static_cast<double>(got[i]), w = want[i];
    const bool ok = std::isnan(w) ? std::isnan(g)
                    : std::isinf(w)
                        ? g == w
                        : std::isfinite(g) && std::fabs(g - w) <= rtol * std::fabs(w) + atol * scale;
    if (!ok) {
      std::printf("  %s[%zu] = %.9g, want %.9g\n", what.c_str(), i, g, w);
      return check(false, what);
    }
  }
  check(true, what);
}

// The entries of v at the indices `at`, as doubles.
template <typename T>
std::vector<double> picked(const std::vector<T>& v, const std::vector<size_t>& at) {
  std::vector<double> out;
  for (size_t i : at) out.push_back(static_cast<double>(v[i]));
  return out;
}

// Tolerances of a result of accumulation type T against double.
template <typename T>
double tolerance() {
  return std::is_same_v<T, double> ? 1e-10 : 2e-5;
}

inline std::mt19937_64& rng() {
  static std::mt19937_64 generator(20261206);
  return generator;
}

inline std::vector<double> normal(size_t n, double scale = 1.0) {
  std::normal_distribution<double> d(0.0, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = d(rng());
  return v;
}

inline std::vector<double> uniform(size_t n, double low, double high) {
  std::uniform_real_distribution<double> d(low, high);
  std::vector<double> v(n);
  for (auto& x : v) x = d(rng());
  return v;
}

// A double rounded to T (float16 and bfloat16 through float), and back.
template <typename T>
T from_double(double v) {
  if constexpr (std::is_same_v<T, __half>)
    return __float2half(float(v));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __float2bfloat16(float(v));
  else
    return static_cast<T>(v);
}
template <typename T>
double to_double(T v) {
  if constexpr (std::is_same_v<T, __half>)
    return __half2float(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __bfloat162float(v);
  else
    return static_cast<double>(v);
}

// Values of type T, and the doubles they hold exactly (what the reference takes).
template <typename T>
std::vector<T> as(const std::vector<double>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = from_double<T>(v[i]);
  return out;
}
template <typename T>
std::vector<double> held(const std::vector<double>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = to_double(from_double<T>(v[i]));
  return out;
}

// The kernels' accumulation type for inputs of type T.
template <typename T>
using acc_t_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, double>)
    return DType::Float64;
  else if constexpr (std::is_same_v<T, __half>)
    return DType::Float16;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return DType::BFloat16;
  else
    return DType::Float32;
}

template <typename T>
const char* name_of() {
  if constexpr (std::is_same_v<T, double>)
    return "float64";
  else if constexpr (std::is_same_v<T, __half>)
    return "float16";
  else if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return "bfloat16";
  else
    return "float32";
}

inline int finish(const char* test) {
  std::printf("%s: %d passed, %d failed\n", test, passed, failed);
  return failed == 0 && passed > 0 ? 0 : 1;
}

}  // namespace harness
