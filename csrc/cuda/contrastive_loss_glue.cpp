// PyTorch glue of the CUDA kernels of contrastive_loss (contrastive_loss.cu).
#include <torch/library.h>

#include <tuple>

#include "../operands/metric.h"
#include "glue.h"

namespace fastmeta {
namespace {

at::Tensor contrastive_loss(const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& same,
                            double margin) {
  const PairOperands o = pair_operands(x1, x2, same);
  c10::cuda::CUDAGuard guard(x1.device());
  at::Tensor loss = at::empty({o.M}, acc_options(x1));
  cuda::contrastive_loss_forward(dtype_of(x1), o.x1.const_data_ptr(), o.x2.const_data_ptr(),
                                 o.same.const_data_ptr(), margin, o.M, o.D, loss.mutable_data_ptr(),
                                 current_stream());
  return loss.to(x1.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_loss_backward(const at::Tensor& grad,
                                                                         const at::Tensor& x1,
                                                                         const at::Tensor& x2,
                                                                         const at::Tensor& same,
                                                                         double margin) {
  const PairOperands o = pair_backward_operands(grad, x1, x2, same);
  c10::cuda::CUDAGuard guard(x1.device());
  at::Tensor g1 = at::empty({o.M, o.D}, acc_options(x1)), g2 = at::empty_like(g1);
  at::Tensor gsame = at::empty({o.M}, acc_options(x1));
  cuda::contrastive_loss_backward(dtype_of(x1), o.grad.const_data_ptr(), o.x1.const_data_ptr(),
                                  o.x2.const_data_ptr(), o.same.const_data_ptr(), margin, o.M, o.D,
                                  g1.mutable_data_ptr(), g2.mutable_data_ptr(), gsame.mutable_data_ptr(),
                                  current_stream());
  const auto dtype = x1.scalar_type();
  return {g1.to(dtype), g2.to(dtype), gsame.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CUDA, m) {
  m.impl("contrastive_loss", &contrastive_loss);
  m.impl("contrastive_loss_backward", &contrastive_loss_backward);
}

}  // namespace fastmeta
