// The operand prologue of mlp_task_derivatives, shared by its CPU kernel and
// CUDA glue: checks, contiguous operands and the outputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "../math/mlp.h"
#include "common.h"

namespace fastmeta {

// The operands of mlp_task_derivatives: params [T, P], x [T, N, width[0]],
// target [T, N, C] (MSE) or int64 labels [T, N] (cross-entropy), direction
// [T, P] or undefined. Returns the learner's shape. Label values are checked
// where the kernels read them (on CUDA by a device-side assertion).
inline MlpShape check_mlp_operands(const at::Tensor& params, const at::Tensor& x, const at::Tensor& target,
                                   const at::Tensor& direction, at::IntArrayRef widths,
                                   c10::ArrayRef<c10::string_view> activations, c10::string_view loss) {
  TORCH_CHECK(params.scalar_type() == at::kFloat || params.scalar_type() == at::kDouble,
              "fastmeta: params must be float32 or float64, got ", params.scalar_type());
  check_operand(params, "params", 2, params);
  check_operand(x, "x", 3, params);
  check_size(x, "x", 0, params.size(0), "the number of tasks T in params");
  const int64_t layers = static_cast<int64_t>(widths.size()) - 1;
  TORCH_CHECK(layers >= 1 && layers <= kMaxMlpLayers, "fastmeta: the learner must have 1 to ", kMaxMlpLayers,
              " linear layers, got widths ", widths);
  TORCH_CHECK(static_cast<int64_t>(activations.size()) == layers, "fastmeta: ", layers,
              " linear layers need ", layers, " activations, got ", activations.size());
  MlpShape s{};
  s.layers = static_cast<int>(layers);
  for (int64_t l = 0; l <= layers; ++l) {
    TORCH_CHECK(widths[l] >= 1, "fastmeta: layer widths must be positive, got ", widths);
    s.width[l] = widths[l];
  }
  for (int64_t l = 0; l < layers; ++l) {
    const c10::string_view f = activations[l];
    s.activation[l] = f == "identity"  ? Activation::Identity
                      : f == "relu"    ? Activation::ReLU
                      : f == "tanh"    ? Activation::Tanh
                      : f == "sigmoid" ? Activation::Sigmoid
                      : f == "elu"     ? Activation::ELU
                                       : static_cast<Activation>(-1);
    TORCH_CHECK(static_cast<int>(s.activation[l]) >= 0, "fastmeta: unknown activation '", f,
                "'; expected one of 'identity', 'relu', 'tanh', 'sigmoid', 'elu'");
  }
  TORCH_CHECK(loss == "mse" || loss == "cross_entropy", "fastmeta: unknown loss '", loss,
              "'; expected 'mse' or 'cross_entropy'");
  s.loss = loss == "mse" ? MlpLoss::MSE : MlpLoss::CrossEntropy;
  s.N = x.size(1);
  // The sizes below are computed in int64: estimate them in floating point
  // first, so that huge widths get an error rather than an overflow.
  double parameters = 0, activations_size = 0;
  for (int64_t l = 0; l < layers; ++l) {
    parameters += double(widths[l + 1]) * (double(widths[l]) + 1);
    activations_size += double(s.N) * double(widths[l + 1]);
  }
  TORCH_CHECK(parameters < 1e15 && 6 * activations_size + double(s.N) < 1e15,
              "fastmeta: a learner of widths ", widths, " on N = ", s.N,
              " points per task is too large (more parameters or activations than any memory holds)");
  check_size(params, "params", 1, s.num_params(), "the number of parameters of the learner");
  check_size(x, "x", 2, s.width[0], "the learner's input size");
  if (s.loss == MlpLoss::MSE) {
    check_operand(target, "target", 3, params);
    check_size(target, "target", 2, s.outputs(), "the learner's output size");
  } else {
    check_index(target, "target", params);
    TORCH_CHECK(target.dim() == 2, "fastmeta: cross-entropy targets must be labels [T, N], got shape ",
                target.sizes());
  }
  check_size(target, "target", 0, x.size(0), "the number of tasks T in x");
  check_size(target, "target", 1, s.N, "the number of points N in x");
  if (direction.defined()) {
    check_operand(direction, "direction", 2, params);
    check_size(direction, "direction", 0, params.size(0), "the number of tasks T in params");
    check_size(direction, "direction", 1, params.size(1), "the number of parameters P");
  }
  return s;
}

// mlp_task_derivatives' operands, checked and contiguous, and its outputs;
// the outputs not asked for have 0 tasks.
struct MlpOperands {
  MlpShape shape;
  // params' rows are contiguous but may repeat: params_stride is the row
  // stride (0 for the initial parameters expanded over tasks).
  at::Tensor params, x, target, direction;  // direction undefined without one
  int64_t params_stride;
  at::Tensor loss, grad, grad_input, hvp, hvp_input;

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {loss, grad, grad_input, hvp, hvp_input};
  }
};

inline MlpOperands mlp_operands(const at::Tensor& params, const at::Tensor& x, const at::Tensor& target,
                                const std::optional<at::Tensor>& direction, at::IntArrayRef widths,
                                c10::ArrayRef<c10::string_view> activations, c10::string_view loss,
                                bool input_grad) {
  MlpOperands o;
  o.direction = direction.has_value() ? direction->contiguous() : at::Tensor();
  o.shape = check_mlp_operands(params, x, target, o.direction, widths, activations, loss);
  o.params = params.stride(1) == 1 ? params : params.contiguous();
  o.params_stride = o.params.stride(0);
  o.x = x.contiguous();
  o.target = target.contiguous();
  const int64_t T = o.params.size(0), P = o.params.size(1), N = o.shape.N;
  const int64_t with_input = input_grad ? T : 0, with_direction = o.direction.defined() ? T : 0;
  const auto options = o.params.options();
  o.loss = at::empty({T}, options);
  o.grad = at::empty({T, P}, options);
  o.grad_input = at::empty({with_input, N, o.shape.width[0]}, options);
  o.hvp = at::empty({with_direction, P}, options);
  o.hvp_input = at::empty({std::min(with_input, with_direction), N, o.shape.width[0]}, options);
  return o;
}

// The data of an output, or null for one not asked for.
inline void* data_or_null(const at::Tensor& t) { return t.numel() ? t.mutable_data_ptr() : nullptr; }

}  // namespace fastmeta
