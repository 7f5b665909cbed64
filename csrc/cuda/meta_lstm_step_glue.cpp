// PyTorch glue of the CUDA kernels of meta_lstm_step and its backward
// (meta_lstm_step.cu).
#include <torch/library.h>

#include <tuple>

#include "../operands/lstm.h"
#include "glue.h"

namespace fastmeta {
namespace {

cuda::MetaArgs meta_args(const MetaOperands& o, double p) {
  return {dtype_of(o.grad),
          o.layout.H,
          o.layout.P,
          p,
          o.grad.const_data_ptr(),
          o.loss.const_data_ptr(),
          o.theta.const_data_ptr(),
          o.state.const_data_ptr(),
          o.weights.const_data_ptr()};
}

std::tuple<at::Tensor, at::Tensor> meta_lstm_step(const at::Tensor& grad, const at::Tensor& loss,
                                                  const at::Tensor& theta, const at::Tensor& state,
                                                  const at::Tensor& weights, double p) {
  const MetaOperands o = meta_operands(grad, loss, theta, state, weights, p);
  c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor theta_new = at::empty_like(o.theta), new_state = at::empty_like(o.state);
  cuda::meta_lstm_forward(meta_args(o, p), theta_new.mutable_data_ptr(), new_state.mutable_data_ptr(),
                          current_stream());
  return {theta_new, new_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> meta_lstm_step_backward(
    const at::Tensor& grad_theta, const at::Tensor& grad_state, const at::Tensor& grad,
    const at::Tensor& loss, const at::Tensor& theta, const at::Tensor& state, const at::Tensor& weights,
    double p) {
  const MetaOperands o = meta_backward_operands(grad_theta, grad_state, grad, loss, theta, state, weights, p);
  c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor d_grad = at::empty_like(o.grad), d_loss = at::empty_like(o.loss);
  at::Tensor d_theta = at::empty_like(o.theta), d_state = at::empty_like(o.state);
  at::Tensor d_weights = at::empty_like(o.weights);
  at::Tensor partial =
      at::empty({cuda::lstm_grad_blocks(o.layout.P) + 1, o.weights.size(0) + 2}, o.weights.options());
  cuda::meta_lstm_backward(meta_args(o, p), o.grad_theta.const_data_ptr(), o.grad_state.const_data_ptr(),
                           d_grad.mutable_data_ptr(), d_loss.mutable_data_ptr(), d_theta.mutable_data_ptr(),
                           d_state.mutable_data_ptr(), d_weights.mutable_data_ptr(),
                           partial.mutable_data_ptr(), current_stream());
  return {d_grad, d_loss, d_theta, d_state, d_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CUDA, m) {
  m.impl("meta_lstm_step", &meta_lstm_step);
  m.impl("meta_lstm_step_backward", &meta_lstm_step_backward);
}

}  // namespace fastmeta
