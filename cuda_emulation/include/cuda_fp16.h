// The CUDA emulation layer's __half: IEEE binary16 bits, converted to and
// from float on the host.
#pragma once

#include "cuda_runtime.h"

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16, exponent = (h.bits >> 10) & 0x1Fu,
                 mantissa = h.bits & 0x3FFu;
  if (exponent == 0x1F) {
    const uint32_t bits = sign | 0x7F800000u | (mantissa << 13);
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  const float magnitude = exponent == 0 ? std::ldexp(float(mantissa), -24)
                                        : std::ldexp(float(mantissa | 0x400u), int(exponent) - 25);
  return sign ? -magnitude : magnitude;
}

// Round to nearest, ties to even (as __float2half_rn).
inline __half __float2half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const uint32_t magnitude = x & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return {uint16_t(sign | 0x7E00u)};   // NaN
  if (magnitude >= 0x477FF000u) return {uint16_t(sign | 0x7C00u)};  // rounds to infinity
  if (magnitude < 0x38800000u) {                                    // subnormal or zero in half
    const float scaled = std::fabs(f) * 16777216.0f;                // units of 2^-24
    return {uint16_t(sign | uint16_t(std::nearbyint(scaled)))};
  }
  const uint32_t rounded = magnitude - 0x38000000u + 0xFFFu + ((magnitude >> 13) & 1u);
  return {uint16_t(sign | uint16_t(rounded >> 13))};
}
