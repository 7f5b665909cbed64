// What the PyTorch-facing glue of every CUDA op family shares: the dtype
// of a tensor as the kernels name it, and the options of outputs in the
// accumulation dtype. Each <kernel file>_glue.cpp checks its operands with the
// family's prologue (csrc/operands/), sets the device guard, launches on the
// current stream and registers its TORCH_LIBRARY_IMPL.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "launchers.h"

namespace fastmeta {

inline cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cuda::DType::Float32;
    case at::kDouble:
      return cuda::DType::Float64;
    case at::kHalf:
      return cuda::DType::Float16;
    case at::kBFloat16:
      return cuda::DType::BFloat16;
    default:
      TORCH_CHECK(false, "fastmeta: CUDA kernels take float16, bfloat16, float32 or float64, got ",
                  t.scalar_type());
  }
}

// Kernels accumulate, and write their outputs, in float32 (float64 for float64 inputs).
inline at::TensorOptions acc_options(const at::Tensor& t) {
  return t.options().dtype(t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

}  // namespace fastmeta
