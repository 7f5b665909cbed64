// Loops over one row of a tile, written so that the compiler vectorises them
// at the baseline instruction set: a polynomial exp for float32 (libm's expf
// does not vectorise), and reductions with eight independent accumulators
// (a single accumulator does not vectorise without -ffast-math).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace fastmeta::cpu {

// exp(x) for float32 within 2 ulp (Cephes' polynomial on [-ln2/2, ln2/2]);
// exp(NaN) = NaN, exp(x) = 0 below the smallest normal result, +inf above.
inline float exp_polynomial(float x) {
  const float clamped = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float t = clamped * 1.44269504088896341f;
  const int32_t n = static_cast<int32_t>(t + (t >= 0.0f ? 0.5f : -0.5f));
  const float nf = static_cast<float>(n);
  const float r = clamped - nf * 0.693359375f + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  float result = p * two_n;
  result = x < -87.0f ? 0.0f : result;
  result = x > 88.0f ? std::numeric_limits<float>::infinity() : result;
  return x != x ? x : result;
}

template <typename T>
inline T exp_fast(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return exp_polynomial(x);
  } else {
    return std::exp(x);
  }
}

// v[j] = exp(a * v[j] - shift).
template <typename T>
inline void exp_affine(T* v, int64_t n, T a, T shift) {
  for (int64_t j = 0; j < n; ++j) v[j] = exp_fast(a * v[j] - shift);
}

template <typename T>
inline T row_max(const T* v, int64_t n) {
  constexpr int kLanes = 8;
  T acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] = v[j + l] > acc[l] ? v[j + l] : acc[l];
  for (; j < n; ++j) acc[0] = v[j] > acc[0] ? v[j] : acc[0];
  T m = acc[0];
  for (int l = 1; l < kLanes; ++l) m = acc[l] > m ? acc[l] : m;
  return m;
}

// sum_j a[j] * b[j]; with b == nullptr, sum_j a[j].
template <typename T>
inline T row_dot(const T* a, const T* b, int64_t n) {
  constexpr int kLanes = 8;
  T acc[kLanes] = {};
  int64_t j = 0;
  if (b) {
    for (; j + kLanes <= n; j += kLanes)
      for (int l = 0; l < kLanes; ++l) acc[l] += a[j + l] * b[j + l];
    for (; j < n; ++j) acc[0] += a[j] * b[j];
  } else {
    for (; j + kLanes <= n; j += kLanes)
      for (int l = 0; l < kLanes; ++l) acc[l] += a[j + l];
    for (; j < n; ++j) acc[0] += a[j];
  }
  T s = 0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

}  // namespace fastmeta::cpu
