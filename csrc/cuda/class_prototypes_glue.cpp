// PyTorch glue of the CUDA kernels of class_prototypes (class_prototypes.cu).
// Labels out of range and classes without examples are device-side
// assertions in the kernels, so no check waits for the GPU.
#include <torch/library.h>

#include "../operands/metric.h"
#include "glue.h"

namespace fastmeta {
namespace {

// The number of examples of each class [B, N] (int64).
at::Tensor label_counts(const PrototypeOperands& o) {
  at::Tensor counts = at::zeros({o.B, o.N}, o.labels.options());
  cuda::class_label_counts(o.labels.const_data_ptr<int64_t>(), o.B, o.S, o.N,
                           counts.mutable_data_ptr<int64_t>(), current_stream());
  return counts;
}

at::Tensor class_prototypes(const at::Tensor& support, const at::Tensor& labels, int64_t num_classes) {
  const PrototypeOperands o = prototype_operands(support, labels, num_classes);
  c10::cuda::CUDAGuard guard(support.device());
  const at::Tensor counts = label_counts(o);
  const at::Tensor offsets = (counts.cumsum(1) - counts).contiguous();
  at::Tensor members = at::empty({o.B, o.S}, o.labels.options());
  cuda::class_members(o.labels.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), o.B, o.S, o.N,
                      members.mutable_data_ptr<int64_t>(), current_stream());
  at::Tensor out = at::empty({o.B, o.N, o.D}, acc_options(support));
  cuda::class_prototypes_forward(dtype_of(support), o.rows.const_data_ptr(),
                                 members.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(),
                                 counts.const_data_ptr<int64_t>(), o.B, o.S, o.N, o.D, out.mutable_data_ptr(),
                                 current_stream());
  return out.to(support.scalar_type());
}

at::Tensor class_prototypes_backward(const at::Tensor& grad, const at::Tensor& labels) {
  const PrototypeOperands o = prototype_backward_operands(grad, labels);
  c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor counts = label_counts(o);
  at::Tensor grad_support = at::empty({o.B, o.S, o.D}, acc_options(grad));
  cuda::class_prototypes_backward(dtype_of(grad), o.rows.const_data_ptr(), o.labels.const_data_ptr<int64_t>(),
                                  counts.const_data_ptr<int64_t>(), o.B, o.S, o.N, o.D,
                                  grad_support.mutable_data_ptr(), current_stream());
  return grad_support.to(grad.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CUDA, m) {
  m.impl("class_prototypes", &class_prototypes);
  m.impl("class_prototypes_backward", &class_prototypes_backward);
}

}  // namespace fastmeta
