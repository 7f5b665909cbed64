// The operand prologues of the coordinatewise LSTM ops (l2o_lstm_step, its
// in-place form and backward; meta_lstm_step and its backward), shared by
// their CPU kernels and CUDA glue: checks, contiguous operands and outputs.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "../math/lstm.h"
#include "common.h"

namespace fastmeta {

// grad [P], a coordinate-minor state [..., P] of the same dtype and device,
// and the flat shared weights whose size the state's shape implies
// (`num_weights`, or -1 where the shape is too large to be real).
inline void check_coordinate_operands(const at::Tensor& grad, const at::Tensor& state, int64_t state_dim,
                                      const at::Tensor& weights, int64_t num_weights,
                                      const char* state_shape) {
  TORCH_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble,
              "fastmeta: grad must be a float32 or float64 tensor, got ", grad.scalar_type());
  check_operand(grad, "grad", 1, grad);
  check_operand(state, "state", state_dim, grad);
  check_operand(weights, "weights", 1, grad);
  check_size(state, "state", state_dim - 1, grad.size(0), "the number of coordinates P in grad");
  TORCH_CHECK(
      num_weights >= 0 && weights.size(0) == num_weights, "fastmeta: a state of shape ", state.sizes(), " (",
      state_shape, ") needs ", num_weights >= 0 ? std::to_string(num_weights) : std::string("too many"),
      " weights, but weights has ", weights.size(0), "; are the state and the weights from the same LSTM?");
}

// The number of weights of a cell, or -1 if the sizes are too large for any
// cell that fits in memory (a state with P = 0 may claim any L and H).
inline int64_t l2o_num_weights(int64_t L, int64_t H) {
  constexpr double kLimit = 1e15;
  if (L < 1 || H < 1 || double(L) * 4 * double(H) * (2 * double(H) + 3) > kLimit) return -1;
  return L2oLayout{L, H, 0}.num_weights();
}

inline int64_t meta_num_weights(int64_t H) {
  if (H < 1 || 4 * double(H) * (double(H) + 5) > 1e15) return -1;
  return MetaLayout{H, 0}.num_weights();
}

// The gradients of a step's outputs: a per-coordinate one [P] like grad, and
// that of the new state, shaped like the state.
inline void check_output_grads(const at::Tensor& grad_out, const char* name, const at::Tensor& grad_state,
                               const at::Tensor& grad, const at::Tensor& state) {
  check_operand(grad_out, name, 1, grad);
  check_size(grad_out, name, 0, grad.size(0), "the number of coordinates P in grad");
  check_operand(grad_state, "grad_state", state.dim(), grad);
  TORCH_CHECK(grad_state.sizes() == state.sizes(),
              "fastmeta: grad_state must have the shape of "
              "state ",
              state.sizes(), ", got ", grad_state.sizes());
}

inline void check_preprocess_p(double p) {
  TORCH_CHECK(p > 0, "fastmeta: preprocess_p must be positive, got ", p);
}

// l2o_lstm_step: grad [P], state [L, 2, H, P], weights; with the backward's
// gradients of the outputs (update [P] and new state).
struct L2oOperands {
  L2oLayout layout;
  at::Tensor grad, state, weights;
  at::Tensor grad_update, grad_state;  // backward only
};

inline L2oOperands l2o_operands(const at::Tensor& grad, const at::Tensor& state, const at::Tensor& weights,
                                double preprocess_p) {
  TORCH_CHECK(state.dim() == 4 && state.size(1) == 2 && state.size(0) >= 1,
              "fastmeta: state must have shape [num_layers, 2, hidden_size, P], got ", state.sizes());
  const int64_t L = state.size(0), H = state.size(2);
  check_coordinate_operands(grad, state, 4, weights, l2o_num_weights(L, H), "num_layers, 2, hidden_size, P");
  check_preprocess_p(preprocess_p);
  return {{L, H, grad.size(0)}, grad.contiguous(), state.contiguous(), weights.contiguous(), {}, {}};
}

inline L2oOperands l2o_backward_operands(const at::Tensor& grad_update, const at::Tensor& grad_state,
                                         const at::Tensor& grad, const at::Tensor& state,
                                         const at::Tensor& weights, double preprocess_p) {
  L2oOperands o = l2o_operands(grad, state, weights, preprocess_p);
  check_output_grads(grad_update, "grad_update", grad_state, grad, state);
  o.grad_update = grad_update.contiguous();
  o.grad_state = grad_state.contiguous();
  return o;
}

// The in-place step writes param [P] and state, which must be contiguous and
// share no memory with any operand; their autograd versions are bumped.
inline L2oOperands l2o_in_place_operands(const at::Tensor& param, const at::Tensor& grad,
                                         const at::Tensor& state, const at::Tensor& weights,
                                         double preprocess_p) {
  L2oOperands o = l2o_operands(grad, state, weights, preprocess_p);
  check_operand(param, "param", 1, grad);
  check_size(param, "param", 0, o.layout.P, "the number of coordinates P in grad");
  TORCH_CHECK(param.is_contiguous() && state.is_contiguous(),
              "fastmeta: l2o_lstm_step_ needs contiguous param and state");
  check_no_alias(param, "param", {{&grad, "grad"}, {&state, "state"}, {&weights, "weights"}});
  check_no_alias(state, "state", {{&grad, "grad"}, {&weights, "weights"}});
  bump_version(param);
  bump_version(state);
  return o;
}

// meta_lstm_step: grad, theta [P], loss [], state [2H + 2, P], weights; with
// the backward's gradients of the outputs (theta [P] and new state).
struct MetaOperands {
  MetaLayout layout;
  at::Tensor grad, loss, theta, state, weights;
  at::Tensor grad_theta, grad_state;  // backward only
};

inline MetaOperands meta_operands(const at::Tensor& grad, const at::Tensor& loss, const at::Tensor& theta,
                                  const at::Tensor& state, const at::Tensor& weights, double preprocess_p) {
  TORCH_CHECK(state.dim() == 2 && state.size(0) >= 4 && state.size(0) % 2 == 0,
              "fastmeta: state must have shape [2 * hidden_size + 2, P] with hidden_size >= 1, "
              "got ",
              state.sizes());
  const int64_t H = state.size(0) / 2 - 1;
  check_coordinate_operands(grad, state, 2, weights, meta_num_weights(H), "2 * hidden_size + 2, P");
  check_operand(loss, "loss", 0, grad);
  check_operand(theta, "theta", 1, grad);
  check_size(theta, "theta", 0, grad.size(0), "the number of coordinates P in grad");
  check_preprocess_p(preprocess_p);
  return {{H, grad.size(0)},
          grad.contiguous(),
          loss.contiguous(),
          theta.contiguous(),
          state.contiguous(),
          weights.contiguous(),
          {},
          {}};
}

inline MetaOperands meta_backward_operands(const at::Tensor& grad_theta, const at::Tensor& grad_state,
                                           const at::Tensor& grad, const at::Tensor& loss,
                                           const at::Tensor& theta, const at::Tensor& state,
                                           const at::Tensor& weights, double preprocess_p) {
  MetaOperands o = meta_operands(grad, loss, theta, state, weights, preprocess_p);
  check_output_grads(grad_theta, "grad_theta", grad_state, grad, state);
  o.grad_theta = grad_theta.contiguous();
  o.grad_state = grad_state.contiguous();
  return o;
}

}  // namespace fastmeta
