// The CUDA emulation layer's __nv_bfloat16: the top 16 bits of a float.
#pragma once

#include "cuda_runtime.h"

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = uint32_t(h.bits) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest, ties to even (as __float2bfloat16).
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return {uint16_t((x >> 16) | 0x40u)};
  return {uint16_t((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16)};
}
