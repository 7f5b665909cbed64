// Helpers shared by the CUDA kernels: loads with conversion to the
// accumulation type, dtype dispatch, launch checks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cassert>
#include <stdexcept>
#include <string>

#include "launchers.h"

namespace fastmeta::cuda {

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

inline void check_launch(const char* kernel) {
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("fastmeta: CUDA kernel ") + kernel +
                             " failed to launch: " + cudaGetErrorString(error));
  }
}

// The most dynamic shared memory a block can opt in to on the current device.
inline int64_t max_shared_bytes() {
  int device = 0, bytes = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return bytes;
}

// A grid of `blocks` blocks, or an error where that is more than one launch
// can have (never a silently truncated grid).
inline unsigned int grid_blocks(int64_t blocks) {
  constexpr int64_t kMaxBlocks = 2147483647;  // gridDim.x limit
  if (blocks > kMaxBlocks) {
    throw std::runtime_error("fastmeta: the operands are too large for one CUDA launch (" +
                             std::to_string(blocks) + " blocks, at most 2^31 - 1)");
  }
  return static_cast<unsigned int>(blocks);
}

inline unsigned int blocks_for(int64_t n, int threads) { return grid_blocks((n + threads - 1) / threads); }

// A device-side assertion for what depends on tensor values (labels,
// targets), as PyTorch's own kernels do: checking them on the host would
// wait for the GPU on every call. A failed assertion stops the kernel; the
// error surfaces at the next synchronisation.
#if defined(NDEBUG)  // <cassert> declares it only without NDEBUG
extern "C" __host__ __device__ void __assert_fail(const char* assertion, const char* file, unsigned int line,
                                                  const char* function) noexcept
    __attribute__((__noreturn__));
#endif
#define FASTMETA_DEVICE_ASSERT(cond)                                            \
  do {                                                                          \
    if (!(cond)) __assert_fail(#cond, __FILE__, __LINE__, __PRETTY_FUNCTION__); \
  } while (0)

// Calls body(T{}) with T float or double, for kernels without half-precision
// versions; `op` names the op in the error for other dtypes.
template <typename Body>
void dispatch_float_or_double(DType dtype, const char* op, Body body) {
  if (dtype == DType::Float64) {
    body(double{});
  } else if (dtype == DType::Float32) {
    body(float{});
  } else {
    throw std::runtime_error(std::string("fastmeta: ") + op + " takes float32 or float64");
  }
}

// Calls body with T bound to the element type of `dtype`.
#define FASTMETA_DISPATCH_DTYPE(dtype, ...)     \
  [&] {                                         \
    switch (dtype) {                            \
      case ::fastmeta::cuda::DType::Float64: {  \
        using T = double;                       \
        return __VA_ARGS__();                   \
      }                                         \
      case ::fastmeta::cuda::DType::Float16: {  \
        using T = __half;                       \
        return __VA_ARGS__();                   \
      }                                         \
      case ::fastmeta::cuda::DType::BFloat16: { \
        using T = __nv_bfloat16;                \
        return __VA_ARGS__();                   \
      }                                         \
      default: {                                \
        using T = float;                        \
        return __VA_ARGS__();                   \
      }                                         \
    }                                           \
  }()

// Calls body with T bound to float or double (the ops without half-precision kernels).
#define FASTMETA_DISPATCH_FLOAT(dtype, ...)            \
  [&] {                                                \
    if ((dtype) == ::fastmeta::cuda::DType::Float64) { \
      using T = double;                                \
      return __VA_ARGS__();                            \
    }                                                  \
    using T = float;                                   \
    return __VA_ARGS__();                              \
  }()

}  // namespace fastmeta::cuda
