// PyTorch glue of the CUDA kernels of l2o_lstm_step, its in-place form and
// its backward (l2o_lstm_step.cu).
#include <torch/library.h>

#include <tuple>

#include "../operands/lstm.h"
#include "glue.h"

namespace fastmeta {
namespace {

cuda::L2oArgs l2o_args(const L2oOperands& o, double p, double scale) {
  return {dtype_of(o.grad),
          o.layout.L,
          o.layout.H,
          o.layout.P,
          p,
          scale,
          o.grad.const_data_ptr(),
          o.state.const_data_ptr(),
          o.weights.const_data_ptr()};
}

std::tuple<at::Tensor, at::Tensor> l2o_lstm_step(const at::Tensor& grad, const at::Tensor& state,
                                                 const at::Tensor& weights, double p, double scale) {
  const L2oOperands o = l2o_operands(grad, state, weights, p);
  c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor update = at::empty_like(o.grad), new_state = at::empty_like(o.state);
  cuda::l2o_lstm_forward(l2o_args(o, p, scale), new_state.mutable_data_ptr(), update.mutable_data_ptr(),
                         false, current_stream());
  return {update, new_state};
}

void l2o_lstm_step_(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& state,
                    const at::Tensor& weights, double p, double scale) {
  const L2oOperands o = l2o_in_place_operands(param, grad, state, weights, p);
  c10::cuda::CUDAGuard guard(grad.device());
  cuda::l2o_lstm_forward(l2o_args(o, p, scale), state.mutable_data_ptr(), param.mutable_data_ptr(), true,
                         current_stream());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> l2o_lstm_step_backward(
    const at::Tensor& grad_update, const at::Tensor& grad_state, const at::Tensor& grad,
    const at::Tensor& state, const at::Tensor& weights, double p, double scale) {
  const L2oOperands o = l2o_backward_operands(grad_update, grad_state, grad, state, weights, p);
  c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor d_grad = at::empty_like(o.grad), d_state = at::empty_like(o.state);
  at::Tensor d_weights = at::empty_like(o.weights);
  at::Tensor partial =
      at::empty({cuda::lstm_grad_blocks(o.layout.P), o.weights.size(0)}, o.weights.options());
  cuda::l2o_lstm_backward(l2o_args(o, p, scale), o.grad_update.const_data_ptr(),
                          o.grad_state.const_data_ptr(), d_grad.mutable_data_ptr(),
                          d_state.mutable_data_ptr(), d_weights.mutable_data_ptr(),
                          partial.mutable_data_ptr(), current_stream());
  return {d_grad, d_state, d_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CUDA, m) {
  m.impl("l2o_lstm_step", &l2o_lstm_step);
  m.impl("l2o_lstm_step_", &l2o_lstm_step_);
  m.impl("l2o_lstm_step_backward", &l2o_lstm_step_backward);
}

}  // namespace fastmeta
