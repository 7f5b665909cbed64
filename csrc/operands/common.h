// Argument checks shared by every op's operand prologue. Each op family has
// one prologue (csrc/operands/<family>.h) that its CPU kernels and its CUDA
// glue both call: it checks every operand the op reads (rank, shape against
// the other operands, dtype, device, sizes) before any memory is touched, and
// returns the operands contiguous.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <utility>

namespace fastmeta {

// Checks that `t` has `dim` dimensions and the dtype and device of `like`.
inline void check_operand(const at::Tensor& t, const char* name, int64_t dim, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == dim, "fastmeta: ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), "fastmeta: ", name, " must be on ", like.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "fastmeta: ", name, " must have dtype ",
              like.scalar_type(), ", got ", t.scalar_type());
}

// Checks that `t` has dtype int64 and the device of `like`.
inline void check_index(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), "fastmeta: ", name, " must be on ", like.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kLong, "fastmeta: ", name, " must have dtype torch.int64, got ",
              t.scalar_type());
}

inline void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t size, const char* what) {
  TORCH_CHECK(t.size(dim) == size, "fastmeta: ", name, " has size ", t.size(dim), " in dimension ", dim,
              " but ", what, " is ", size, " (shape ", t.sizes(), ")");
}

// The dtypes with kernels: float32 and float64, and on CUDA also float16 and
// bfloat16 (computed in float32).
inline void check_floating(const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  const bool full = dtype == at::kFloat || dtype == at::kDouble;
  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  TORCH_CHECK(full || (half && t.is_cuda()), "fastmeta: ", name, " must be a floating-point ",
              "tensor of dtype float32 or float64", t.is_cuda() ? " (or float16, bfloat16)" : "", " on ",
              t.device(), ", got ", dtype);
}

// The dtype kernels accumulate in, and return statistics (log-sum-exps) in.
inline at::ScalarType accumulate_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Rejects an operand written in place that shares memory with another operand.
inline void check_no_alias(const at::Tensor& written, const char* name,
                           std::initializer_list<std::pair<const at::Tensor*, const char*>> others) {
  for (const auto& [other, other_name] : others) {
    TORCH_CHECK(at::get_overlap_status(written, *other) == at::MemOverlapStatus::No, "fastmeta: ", name,
                " is written in place and must not share memory with ", other_name);
  }
}

// Records an in-place change in the autograd version counter, as PyTorch's
// in-place ops do: a graph that saved the old value then refuses to backward.
inline void bump_version(const at::Tensor& t) { t.unsafeGetTensorImpl()->bump_version(); }

}  // namespace fastmeta
