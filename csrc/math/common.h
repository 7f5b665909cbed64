// What the per-element math headers share: the host/device qualifier and a
// fast exp (vectorisable on the CPU).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define FASTMETA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTMETA_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace fastmeta {

// exp(x) for float32 within 2 ulp for x <= 88 (Cephes' polynomial on
// [-ln2/2, ln2/2]); 0 below -87 and for -inf; NaN for NaN. libm's expf does
// not vectorise; this does.
FASTMETA_HOST_DEVICE float exp_polynomial(float x) {
  const float clamped = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // Round t to the nearest integer by adding 1.5 * 2^23 (exact for |t| < 2^22).
  const float shifted = clamped * 1.44269504088896341f + 12582912.0f;
  int32_t shifted_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(float));
  const int32_t n = shifted_bits - 0x4B400000;
  const float nf = shifted - 12582912.0f;
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
  // A multiplication rather than a select: both vectorise, only this one with AVX2.
  return p * two_n * static_cast<float>(x >= -87.0f);
}

// exp: the polynomial for float32 on the CPU, the library exp otherwise.
template <typename T>
FASTMETA_HOST_DEVICE T exp_fast(T x) {
#if defined(__CUDA_ARCH__)
  return exp(x);
#else
  if constexpr (std::is_same_v<T, float>) {
    return exp_polynomial(x);
  } else {
    return std::exp(x);
  }
#endif
}

}  // namespace fastmeta
