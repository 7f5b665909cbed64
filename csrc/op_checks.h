// Argument handling shared by the CPU kernels and the CUDA glue.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <string_view>

#include "math/lstm.h"
#include "math/mlp.h"
#include "math/similarity.h"

namespace fastmeta {

inline Metric parse_metric(std::string_view metric) {
  if (metric == "sqeuclidean") return Metric::SqEuclidean;
  if (metric == "euclidean") return Metric::Euclidean;
  if (metric == "cosine") return Metric::Cosine;
  if (metric == "dot") return Metric::Dot;
  TORCH_CHECK(false, "fastmeta: unknown metric '", metric,
              "'; expected one of 'sqeuclidean', 'euclidean', 'cosine', 'dot'");
}

// Checks that `t` has `dim` dimensions and the dtype and device of `like`.
inline void check_operand(const at::Tensor& t, const char* name, int64_t dim,
                          const at::Tensor& like) {
  TORCH_CHECK(t.dim() == dim, "fastmeta: ", name, " must have ", dim,
              " dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "fastmeta: ", name,
              " must have dtype ", like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "fastmeta: ", name, " must be on ",
              like.device(), ", got ", t.device());
}

inline void check_index(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kLong, "fastmeta: ", name,
              " must have dtype torch.int64, got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "fastmeta: ", name, " must be on ",
              like.device(), ", got ", t.device());
}

inline void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t size,
                       const char* what) {
  TORCH_CHECK(t.size(dim) == size, "fastmeta: ", name, " has size ", t.size(dim),
              " in dimension ", dim, " but ", what, " is ", size, " (shape ", t.sizes(), ")");
}

// The metric ops' common operands: x [B, Q, D], y [B, N, D], scale [B, Q].
inline void check_metric_operands(const at::Tensor& x, const at::Tensor& y,
                                  const at::Tensor& scale) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "fastmeta: x must be a floating-point tensor, got ", x.scalar_type());
  check_operand(x, "x", 3, x);
  check_operand(y, "y", 3, x);
  check_operand(scale, "scale", 2, x);
  check_size(y, "y", 0, x.size(0), "the number of tasks B in x");
  check_size(y, "y", 2, x.size(2), "the feature size D of x");
  check_size(scale, "scale", 0, x.size(0), "the number of tasks B in x");
  check_size(scale, "scale", 1, x.size(1), "the number of queries Q in x");
}

// Class indices for the queries of x: [B, Q], int64 (values are checked by the kernels).
inline void check_target_shape(const at::Tensor& target, const at::Tensor& x) {
  check_index(target, "target", x);
  TORCH_CHECK(target.dim() == 2 && target.size(0) == x.size(0) && target.size(1) == x.size(1),
              "fastmeta: target must have shape [B, Q] = ", x.sizes().slice(0, 2), ", got ",
              target.sizes());
}

// One row of values per key of y: [B, N, V].
inline void check_values(const at::Tensor& values, const at::Tensor& x, const at::Tensor& y) {
  check_operand(values, "values", 3, x);
  check_size(values, "values", 0, x.size(0), "the number of tasks B in x");
  check_size(values, "values", 1, y.size(1), "the number of keys N in y");
}

// contrastive_loss pairs: x1 and x2 [M, D], same [M].
inline void check_pairs(const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& same) {
  TORCH_CHECK(at::isFloatingType(x1.scalar_type()),
              "fastmeta: x1 must be a floating-point tensor, got ", x1.scalar_type());
  check_operand(x1, "x1", 2, x1);
  check_operand(x2, "x2", 2, x1);
  check_operand(same, "same", 1, x1);
  TORCH_CHECK(x1.sizes() == x2.sizes(), "fastmeta: x1 and x2 must have the same shape, got ",
              x1.sizes(), " and ", x2.sizes());
  check_size(same, "same", 0, x1.size(0), "the number of pairs in x1");
}

// Coordinatewise LSTM operands: a gradient [P] and coordinate-minor state
// [..., P] of the same dtype and device, and the flat shared weights.
inline void check_coordinate_operands(const at::Tensor& grad, const at::Tensor& state,
                                      int64_t state_dim, const at::Tensor& weights,
                                      int64_t num_weights) {
  TORCH_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble,
              "fastmeta: grad must be a float32 or float64 tensor, got ", grad.scalar_type());
  check_operand(grad, "grad", 1, grad);
  check_operand(state, "state", state_dim, grad);
  check_operand(weights, "weights", 1, grad);
  check_size(state, "state", state_dim - 1, grad.size(0), "the number of coordinates P in grad");
  check_size(weights, "weights", 0, num_weights, "the size the state's shape implies");
}

inline void check_l2o_operands(const at::Tensor& grad, const at::Tensor& state,
                               const at::Tensor& weights, double preprocess_p) {
  TORCH_CHECK(state.dim() == 4 && state.size(1) == 2 && state.size(0) >= 1,
              "fastmeta: state must have shape [num_layers, 2, hidden_size, P], got ", state.sizes());
  check_coordinate_operands(grad, state, 4, weights, L2oLayout{state.size(0), state.size(2), 0}.num_weights());
  TORCH_CHECK(preprocess_p > 0, "fastmeta: preprocess_p must be positive, got ", preprocess_p);
}

// The in-place step updates param [P] and state, which must be contiguous.
inline void check_l2o_in_place(const at::Tensor& param, const at::Tensor& grad,
                               const at::Tensor& state, const at::Tensor& weights,
                               double preprocess_p) {
  check_l2o_operands(grad, state, weights, preprocess_p);
  check_operand(param, "param", 1, grad);
  check_size(param, "param", 0, grad.size(0), "the number of coordinates P in grad");
  TORCH_CHECK(param.is_contiguous() && state.is_contiguous(),
              "fastmeta: l2o_lstm_step_ needs contiguous param and state");
}

inline void check_meta_lstm_operands(const at::Tensor& grad, const at::Tensor& loss,
                                     const at::Tensor& theta, const at::Tensor& state,
                                     const at::Tensor& weights, double preprocess_p) {
  TORCH_CHECK(state.dim() == 2 && state.size(0) >= 2 && state.size(0) % 2 == 0,
              "fastmeta: state must have shape [2 * hidden_size + 2, P], got ", state.sizes());
  check_coordinate_operands(grad, state, 2, weights, MetaLayout{state.size(0) / 2 - 1, 0}.num_weights());
  check_operand(loss, "loss", 0, grad);
  check_operand(theta, "theta", 1, grad);
  check_size(theta, "theta", 0, grad.size(0), "the number of coordinates P in grad");
  TORCH_CHECK(preprocess_p > 0, "fastmeta: preprocess_p must be positive, got ", preprocess_p);
}

// The output gradients of a backward op have the shapes of the op's outputs.
inline void check_output_grad(const at::Tensor& g, const char* name, const at::Tensor& output) {
  check_operand(g, name, output.dim(), output);
  TORCH_CHECK(g.sizes() == output.sizes(), "fastmeta: ", name, " must have shape ", output.sizes(),
              ", got ", g.sizes());
}

// The operands of mlp_task_derivatives: params [T, P], x [T, N, width[0]],
// target [T, N, C] (MSE) or int64 labels [T, N] (cross-entropy), direction
// [T, P] or undefined. Returns the learner's shape.
inline MlpShape check_mlp_operands(const at::Tensor& params, const at::Tensor& x,
                                   const at::Tensor& target, const at::Tensor& direction,
                                   at::IntArrayRef widths, c10::ArrayRef<c10::string_view> activations,
                                   c10::string_view loss) {
  TORCH_CHECK(params.scalar_type() == at::kFloat || params.scalar_type() == at::kDouble,
              "fastmeta: params must be float32 or float64, got ", params.scalar_type());
  check_operand(params, "params", 2, params);
  check_operand(x, "x", 3, params);
  check_size(x, "x", 0, params.size(0), "the number of tasks T in params");
  const int64_t layers = static_cast<int64_t>(widths.size()) - 1;
  TORCH_CHECK(layers >= 1 && layers <= kMaxMlpLayers, "fastmeta: the learner must have 1 to ",
              kMaxMlpLayers, " linear layers, got widths ", widths);
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
    s.activation[l] = f == "identity" ? Activation::Identity
                      : f == "relu"   ? Activation::ReLU
                      : f == "tanh"   ? Activation::Tanh
                      : f == "sigmoid" ? Activation::Sigmoid
                      : f == "elu"    ? Activation::ELU
                                      : static_cast<Activation>(-1);
    TORCH_CHECK(static_cast<int>(s.activation[l]) >= 0, "fastmeta: unknown activation '", f,
                "'; expected one of 'identity', 'relu', 'tanh', 'sigmoid', 'elu'");
  }
  TORCH_CHECK(loss == "mse" || loss == "cross_entropy", "fastmeta: unknown loss '", loss,
              "'; expected 'mse' or 'cross_entropy'");
  s.loss = loss == "mse" ? MlpLoss::MSE : MlpLoss::CrossEntropy;
  s.N = x.size(1);
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

inline MlpOperands mlp_operands(const at::Tensor& params, const at::Tensor& x,
                                const at::Tensor& target,
                                const std::optional<at::Tensor>& direction,
                                at::IntArrayRef widths,
                                c10::ArrayRef<c10::string_view> activations,
                                c10::string_view loss, bool input_grad) {
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
