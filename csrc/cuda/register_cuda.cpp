// PyTorch glue of the CUDA kernels: argument checks, device guard, current
// stream, output allocation and dtype conversion. Registers the CUDA kernels
// of the ops declared in csrc/ops.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <utility>

#include "../op_checks.h"
#include "launchers.h"

namespace fastmeta {
namespace {

using cuda::DType;
using cuda::SimilarityArgs;
using cuda::SimilarityGrads;
using cuda::SimilarityOp;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default:
      TORCH_CHECK(false, "fastmeta: CUDA kernels take float16, bfloat16, float32 or float64, got ",
                  t.scalar_type());
  }
}

// Kernels accumulate, and write their outputs, in float32 (float64 for float64 inputs).
at::TensorOptions acc_options(const at::Tensor& t) {
  return t.options().dtype(t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
}

// Index of the first true entry of a boolean [B, K] mask, or nothing.
std::optional<std::pair<int64_t, int64_t>> first_true(const at::Tensor& mask) {
  at::Tensor where = at::nonzero(mask);
  if (where.size(0) == 0) return std::nullopt;
  at::Tensor first = where[0].cpu();
  return std::make_pair(first[0].item<int64_t>(), first[1].item<int64_t>());
}

struct Similarity {
  SimilarityArgs args{};
  at::Tensor x, y, scale, target, values, x_stat, x_coeff, y_stat, y_coeff;

  Similarity(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor* scale_in,
             const at::Tensor* target_in, const at::Tensor* values_in, c10::string_view metric) {
    args.metric = parse_metric(metric);
    x = x_in.contiguous();
    y = y_in.contiguous();
    args.dtype = dtype_of(x);
    args.B = x.size(0);
    args.Q = x.size(1);
    args.N = y.size(1);
    args.D = x.size(2);
    args.x = x.const_data_ptr();
    args.y = y.const_data_ptr();
    if (scale_in) {
      scale = scale_in->contiguous();
      args.scale = scale.const_data_ptr();
    }
    if (target_in) {
      target = target_in->contiguous();
      args.target = target.const_data_ptr<int64_t>();
    }
    if (values_in) {
      values = values_in->contiguous();
      args.values = values.const_data_ptr();
      args.V = values.size(2);
    }
    x_stat = at::empty({args.B, args.Q}, acc_options(x));
    x_coeff = at::empty_like(x_stat);
    y_stat = at::empty({args.B, args.N}, acc_options(x));
    y_coeff = at::empty_like(y_stat);
    args.x_stat = x_stat.mutable_data_ptr();
    args.x_coeff = x_coeff.mutable_data_ptr();
    args.y_stat = y_stat.mutable_data_ptr();
    args.y_coeff = y_coeff.mutable_data_ptr();
    cuda::similarity_row_stats(args, stream());
  }

  static cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }
};

// Inputs and gradient buffers of a similarity backward, in the accumulation
// dtype; `to_input_dtype` converts a gradient back.
struct SimilarityBackward {
  SimilarityGrads grads{};
  at::Tensor grad, out, lse, row_weight, gx, gy, gscale, gvalues;
  at::ScalarType dtype;

  SimilarityBackward(const at::Tensor& grad_in, const Similarity& s) : dtype(s.x.scalar_type()) {
    grad = grad_in.to(dtype).contiguous();
    grads.grad = grad.const_data_ptr();
    gx = at::zeros(s.x.sizes(), acc_options(s.x));
    gy = at::zeros(s.y.sizes(), acc_options(s.x));
    grads.grad_x = gx.mutable_data_ptr();
    grads.grad_y = gy.mutable_data_ptr();
    if (s.scale.defined()) {
      gscale = at::zeros(s.scale.sizes(), acc_options(s.x));
      grads.grad_scale = gscale.mutable_data_ptr();
    }
    if (s.values.defined()) {
      gvalues = at::zeros(s.values.sizes(), acc_options(s.x));
      grads.grad_values = gvalues.mutable_data_ptr();
    }
  }

  at::Tensor in_acc(const at::Tensor& t) const { return t.to(gx.scalar_type()).contiguous(); }
  void set_out(const at::Tensor& t) { out = in_acc(t); grads.out = out.const_data_ptr(); }
  void set_lse(const at::Tensor& t) { lse = in_acc(t); grads.lse = lse.const_data_ptr(); }
  void set_row_weight(const at::Tensor& t) { row_weight = in_acc(t); grads.row_weight = row_weight.const_data_ptr(); }
  void run(SimilarityOp op, const Similarity& s) { cuda::similarity_backward(op, s.args, grads, s.stream()); }
  at::Tensor to_input_dtype(const at::Tensor& t) const { return t.to(dtype); }
};

void check_target(const at::Tensor& target, const at::Tensor& x, int64_t N) {
  check_target_shape(target, x);
  if (auto bad = first_true((target < 0) | (target >= N))) {
    TORCH_CHECK(false, "fastmeta: target[", bad->first, ", ", bad->second, "] = ",
                target[bad->first][bad->second].item<int64_t>(), " is out of range for ", N,
                " classes");
  }
}

at::Tensor pairwise_distance(const at::Tensor& x, const at::Tensor& y, c10::string_view metric) {
  TORCH_CHECK(parse_metric(metric) != Metric::Dot, "fastmeta: pairwise_distance has no 'dot' metric");
  check_operand(x, "x", 3, x);
  check_operand(y, "y", 3, x);
  c10::cuda::CUDAGuard guard(x.device());
  Similarity s(x, y, nullptr, nullptr, nullptr, metric);
  at::Tensor out = at::empty({s.args.B, s.args.Q, s.args.N}, acc_options(x));
  cuda::similarity_forward(SimilarityOp::PairwiseDistance, s.args, out.mutable_data_ptr(), nullptr, s.stream());
  return out.to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> pairwise_distance_backward(const at::Tensor& grad,
                                                               const at::Tensor& distance,
                                                               const at::Tensor& x, const at::Tensor& y,
                                                               c10::string_view metric) {
  c10::cuda::CUDAGuard guard(x.device());
  Similarity s(x, y, nullptr, nullptr, nullptr, metric);
  SimilarityBackward bw(grad, s);
  bw.run(SimilarityOp::PairwiseDistance, s);
  return {bw.to_input_dtype(bw.gx), bw.to_input_dtype(bw.gy)};
}

at::Tensor similarity_log_softmax(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                                  c10::string_view metric) {
  check_metric_operands(x, y, scale);
  c10::cuda::CUDAGuard guard(x.device());
  Similarity s(x, y, &scale, nullptr, nullptr, metric);
  at::Tensor out = at::empty({s.args.B, s.args.Q, s.args.N}, acc_options(x));
  at::Tensor lse = at::empty({s.args.B, s.args.Q}, acc_options(x));
  cuda::similarity_forward(SimilarityOp::LogSoftmax, s.args, out.mutable_data_ptr(), lse.mutable_data_ptr(),
                     s.stream());
  return out.to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> similarity_log_softmax_backward(
    const at::Tensor& grad, const at::Tensor& log_probs, const at::Tensor& x, const at::Tensor& y,
    const at::Tensor& scale, c10::string_view metric) {
  check_metric_operands(x, y, scale);
  c10::cuda::CUDAGuard guard(x.device());
  Similarity s(x, y, &scale, nullptr, nullptr, metric);
  SimilarityBackward bw(grad, s);
  bw.set_out(log_probs);
  bw.set_row_weight(bw.in_acc(bw.grad).sum(-1));
  bw.run(SimilarityOp::LogSoftmax, s);
  return {bw.to_input_dtype(bw.gx), bw.to_input_dtype(bw.gy), bw.to_input_dtype(bw.gscale)};
}

// Checks, device guard and row statistics, done once per call of each
// cross-entropy op; the forward and backward kernels below take them as given.
struct CrossEntropyCall {
  c10::cuda::CUDAGuard guard;
  Similarity s;

  CrossEntropyCall(const at::Tensor& x, const at::Tensor& y, const at::Tensor& target,
                   const at::Tensor& scale, c10::string_view metric)
      : guard(checked_device(x, y, target, scale)), s(x, y, &scale, &target, nullptr, metric) {}

  static at::Device checked_device(const at::Tensor& x, const at::Tensor& y,
                                   const at::Tensor& target, const at::Tensor& scale) {
    check_metric_operands(x, y, scale);
    check_target(target, x, y.size(1));
    return x.device();
  }

  // Per-query losses and log-sum-exps, in the accumulation dtype.
  std::pair<at::Tensor, at::Tensor> forward() const {
    at::Tensor loss = at::empty({s.args.B, s.args.Q}, acc_options(s.x));
    at::Tensor lse = at::empty({s.args.B, s.args.Q}, acc_options(s.x));
    cuda::similarity_forward(SimilarityOp::CrossEntropy, s.args, loss.mutable_data_ptr(),
                             lse.mutable_data_ptr(), s.stream());
    return {loss, lse};
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad,
                                                          const at::Tensor& lse) const {
    SimilarityBackward bw(grad, s);
    bw.set_lse(lse);
    bw.run(SimilarityOp::CrossEntropy, s);
    return {bw.to_input_dtype(bw.gx), bw.to_input_dtype(bw.gy), bw.to_input_dtype(bw.gscale)};
  }
};

std::tuple<at::Tensor, at::Tensor> similarity_cross_entropy(const at::Tensor& x, const at::Tensor& y,
                                                            const at::Tensor& target,
                                                            const at::Tensor& scale,
                                                            c10::string_view metric) {
  auto [loss, lse] = CrossEntropyCall(x, y, target, scale, metric).forward();
  return {loss.to(x.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> similarity_cross_entropy_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& target,
    const at::Tensor& scale, const at::Tensor& lse, c10::string_view metric) {
  return CrossEntropyCall(x, y, target, scale, metric).backward(grad, lse);
}

std::tuple<at::Tensor, at::Tensor> attention_readout(const at::Tensor& x, const at::Tensor& y,
                                                     const at::Tensor& values, const at::Tensor& scale,
                                                     c10::string_view metric) {
  check_metric_operands(x, y, scale);
  check_values(values, x, y);
  c10::cuda::CUDAGuard guard(x.device());
  Similarity s(x, y, &scale, nullptr, &values, metric);
  at::Tensor out = at::zeros({s.args.B, s.args.Q, s.args.V}, acc_options(x));
  at::Tensor lse = at::empty({s.args.B, s.args.Q}, acc_options(x));
  cuda::similarity_forward(SimilarityOp::AttentionReadout, s.args, out.mutable_data_ptr(),
                     lse.mutable_data_ptr(), s.stream());
  return {out.to(x.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_readout_backward(
    const at::Tensor& grad, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& x,
    const at::Tensor& y, const at::Tensor& values, const at::Tensor& scale, c10::string_view metric) {
  check_metric_operands(x, y, scale);
  check_values(values, x, y);
  c10::cuda::CUDAGuard guard(x.device());
  Similarity s(x, y, &scale, nullptr, &values, metric);
  SimilarityBackward bw(grad, s);
  bw.set_out(out);
  bw.set_lse(lse);
  bw.set_row_weight((bw.in_acc(bw.grad) * bw.out).sum(-1));
  bw.run(SimilarityOp::AttentionReadout, s);
  return {bw.to_input_dtype(bw.gx), bw.to_input_dtype(bw.gy), bw.to_input_dtype(bw.gvalues),
          bw.to_input_dtype(bw.gscale)};
}

// The CUDA kernels compute the reduced loss and its gradient as a forward and a
// backward with a uniform output gradient (the CPU kernel fuses the two),
// sharing the checks and row statistics.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> similarity_cross_entropy_with_grad(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& target, const at::Tensor& scale,
    c10::string_view metric, double weight) {
  CrossEntropyCall call(x, y, target, scale, metric);
  auto [loss, lse] = call.forward();
  auto [gx, gy, gscale] = call.backward(at::full_like(loss, weight), lse);
  at::Tensor task_loss = loss.sum(1).mul_(weight).to(x.scalar_type());
  return {task_loss, gx, gy, gscale};
}

at::Tensor class_prototypes(const at::Tensor& support_in, const at::Tensor& labels_in, int64_t num_classes) {
  check_operand(support_in, "support", 3, support_in);
  check_index(labels_in, "labels", support_in);
  TORCH_CHECK(num_classes >= 0, "fastmeta: num_classes must be >= 0, got ", num_classes);
  c10::cuda::CUDAGuard guard(support_in.device());
  at::Tensor support = support_in.contiguous(), labels = labels_in.contiguous();
  const int64_t B = support.size(0), S = support.size(1), D = support.size(2);
  if (auto bad = first_true((labels < 0) | (labels >= num_classes))) {
    TORCH_CHECK(false, "fastmeta: labels[", bad->first, ", ", bad->second, "] = ",
                labels[bad->first][bad->second].item<int64_t>(), " is out of range for num_classes = ",
                num_classes);
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor counts = at::zeros({B, num_classes}, labels.options());
  cuda::class_label_counts(labels.const_data_ptr<int64_t>(), B, S, num_classes, counts.mutable_data_ptr<int64_t>(),
                     stream);
  if (auto empty = first_true(counts == 0)) {
    TORCH_CHECK(false, "fastmeta: class_prototypes: class ", empty->second,
                " has no support examples in task ", empty->first);
  }
  at::Tensor out = at::empty({B, num_classes, D}, acc_options(support));
  cuda::class_prototypes_forward(dtype_of(support), support.const_data_ptr(), labels.const_data_ptr<int64_t>(),
                           counts.const_data_ptr<int64_t>(), B, S, num_classes, D, out.mutable_data_ptr(),
                           stream);
  return out.to(support.scalar_type());
}

at::Tensor class_prototypes_backward(const at::Tensor& grad_in, const at::Tensor& labels_in) {
  c10::cuda::CUDAGuard guard(grad_in.device());
  at::Tensor grad = grad_in.contiguous(), labels = labels_in.contiguous();
  const int64_t B = grad.size(0), N = grad.size(1), D = grad.size(2), S = labels.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor counts = at::zeros({B, N}, labels.options());
  cuda::class_label_counts(labels.const_data_ptr<int64_t>(), B, S, N, counts.mutable_data_ptr<int64_t>(), stream);
  at::Tensor grad_support = at::empty({B, S, D}, acc_options(grad));
  cuda::class_prototypes_backward(dtype_of(grad), grad.const_data_ptr(), labels.const_data_ptr<int64_t>(),
                            counts.const_data_ptr<int64_t>(), B, S, N, D, grad_support.mutable_data_ptr(),
                            stream);
  return grad_support.to(grad.scalar_type());
}

at::Tensor contrastive_loss(const at::Tensor& x1_in, const at::Tensor& x2_in, const at::Tensor& same_in,
                            double margin) {
  check_pairs(x1_in, x2_in, same_in);
  c10::cuda::CUDAGuard guard(x1_in.device());
  at::Tensor x1 = x1_in.contiguous(), x2 = x2_in.contiguous(), same = same_in.contiguous();
  at::Tensor loss = at::empty({x1.size(0)}, acc_options(x1));
  cuda::contrastive_loss_forward(dtype_of(x1), x1.const_data_ptr(), x2.const_data_ptr(), same.const_data_ptr(),
                           margin, x1.size(0), x1.size(1), loss.mutable_data_ptr(),
                           c10::cuda::getCurrentCUDAStream());
  return loss.to(x1.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_loss_backward(
    const at::Tensor& grad_in, const at::Tensor& x1_in, const at::Tensor& x2_in, const at::Tensor& same_in,
    double margin) {
  check_pairs(x1_in, x2_in, same_in);
  c10::cuda::CUDAGuard guard(x1_in.device());
  at::Tensor x1 = x1_in.contiguous(), x2 = x2_in.contiguous(), same = same_in.contiguous();
  at::Tensor grad = grad_in.to(x1.scalar_type()).contiguous();
  at::Tensor g1 = at::empty(x1.sizes(), acc_options(x1)), g2 = at::empty(x1.sizes(), acc_options(x1));
  at::Tensor gsame = at::empty(same.sizes(), acc_options(x1));
  cuda::contrastive_loss_backward(dtype_of(x1), grad.const_data_ptr(), x1.const_data_ptr(), x2.const_data_ptr(),
                            same.const_data_ptr(), margin, x1.size(0), x1.size(1), g1.mutable_data_ptr(),
                            g2.mutable_data_ptr(), gsame.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream());
  auto dtype = x1.scalar_type();
  return {g1.to(dtype), g2.to(dtype), gsame.to(dtype)};
}

}  // namespace

// Coordinatewise LSTM optimizers (float32 and float64).
cuda::L2oArgs l2o_args(const at::Tensor& grad, const at::Tensor& state, const at::Tensor& weights,
                       double p, double scale) {
  return {dtype_of(grad), state.size(0), state.size(2), state.size(3), p, scale,
          grad.const_data_ptr(), state.const_data_ptr(), weights.const_data_ptr()};
}

std::tuple<at::Tensor, at::Tensor> l2o_lstm_step(const at::Tensor& grad_in, const at::Tensor& state_in,
                                                 const at::Tensor& weights_in, double p, double scale) {
  check_l2o_operands(grad_in, state_in, weights_in, p);
  c10::cuda::CUDAGuard guard(grad_in.device());
  at::Tensor grad = grad_in.contiguous(), state = state_in.contiguous(), weights = weights_in.contiguous();
  at::Tensor update = at::empty_like(grad), new_state = at::empty_like(state);
  cuda::l2o_lstm_forward(l2o_args(grad, state, weights, p, scale), new_state.mutable_data_ptr(),
                         update.mutable_data_ptr(), false, c10::cuda::getCurrentCUDAStream());
  return {update, new_state};
}

void l2o_lstm_step_(const at::Tensor& param, const at::Tensor& grad_in, const at::Tensor& state,
                    const at::Tensor& weights_in, double p, double scale) {
  check_l2o_in_place(param, grad_in, state, weights_in, p);
  c10::cuda::CUDAGuard guard(grad_in.device());
  at::Tensor grad = grad_in.contiguous(), weights = weights_in.contiguous();
  cuda::l2o_lstm_forward(l2o_args(grad, state, weights, p, scale), state.mutable_data_ptr(),
                         param.mutable_data_ptr(), true, c10::cuda::getCurrentCUDAStream());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> l2o_lstm_step_backward(
    const at::Tensor& grad_update_in, const at::Tensor& grad_state_in, const at::Tensor& grad_in,
    const at::Tensor& state_in, const at::Tensor& weights_in, double p, double scale) {
  check_l2o_operands(grad_in, state_in, weights_in, p);
  check_output_grad(grad_update_in, "grad_update", grad_in);
  check_output_grad(grad_state_in, "grad_state", state_in);
  c10::cuda::CUDAGuard guard(grad_in.device());
  at::Tensor grad = grad_in.contiguous(), state = state_in.contiguous(), weights = weights_in.contiguous();
  at::Tensor d_grad = at::empty_like(grad), d_state = at::empty_like(state);
  at::Tensor d_weights = at::empty_like(weights);
  at::Tensor partial = at::empty({cuda::lstm_grad_blocks(grad.size(0)), weights.size(0)}, weights.options());
  cuda::l2o_lstm_backward(l2o_args(grad, state, weights, p, scale),
                          grad_update_in.contiguous().const_data_ptr(),
                          grad_state_in.contiguous().const_data_ptr(), d_grad.mutable_data_ptr(),
                          d_state.mutable_data_ptr(), d_weights.mutable_data_ptr(),
                          partial.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream());
  return {d_grad, d_state, d_weights};
}

cuda::MetaArgs meta_args(const at::Tensor& grad, const at::Tensor& loss, const at::Tensor& theta,
                         const at::Tensor& state, const at::Tensor& weights, double p) {
  return {dtype_of(grad), state.size(0) / 2 - 1, state.size(1), p, grad.const_data_ptr(),
          loss.const_data_ptr(), theta.const_data_ptr(), state.const_data_ptr(), weights.const_data_ptr()};
}

std::tuple<at::Tensor, at::Tensor> meta_lstm_step(const at::Tensor& grad_in, const at::Tensor& loss_in,
                                                  const at::Tensor& theta_in, const at::Tensor& state_in,
                                                  const at::Tensor& weights_in, double p) {
  check_meta_lstm_operands(grad_in, loss_in, theta_in, state_in, weights_in, p);
  c10::cuda::CUDAGuard guard(grad_in.device());
  at::Tensor grad = grad_in.contiguous(), loss = loss_in.contiguous(), theta = theta_in.contiguous();
  at::Tensor state = state_in.contiguous(), weights = weights_in.contiguous();
  at::Tensor theta_new = at::empty_like(theta), new_state = at::empty_like(state);
  cuda::meta_lstm_forward(meta_args(grad, loss, theta, state, weights, p), theta_new.mutable_data_ptr(),
                          new_state.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream());
  return {theta_new, new_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> meta_lstm_step_backward(
    const at::Tensor& grad_theta_in, const at::Tensor& grad_state_in, const at::Tensor& grad_in,
    const at::Tensor& loss_in, const at::Tensor& theta_in, const at::Tensor& state_in,
    const at::Tensor& weights_in, double p) {
  check_meta_lstm_operands(grad_in, loss_in, theta_in, state_in, weights_in, p);
  check_output_grad(grad_theta_in, "grad_theta", theta_in);
  check_output_grad(grad_state_in, "grad_state", state_in);
  c10::cuda::CUDAGuard guard(grad_in.device());
  at::Tensor grad = grad_in.contiguous(), loss = loss_in.contiguous(), theta = theta_in.contiguous();
  at::Tensor state = state_in.contiguous(), weights = weights_in.contiguous();
  at::Tensor d_grad = at::empty_like(grad), d_loss = at::empty_like(loss), d_theta = at::empty_like(theta);
  at::Tensor d_state = at::empty_like(state), d_weights = at::empty_like(weights);
  at::Tensor partial =
      at::empty({cuda::lstm_grad_blocks(grad.size(0)) + 1, weights.size(0) + 2}, weights.options());
  cuda::meta_lstm_backward(meta_args(grad, loss, theta, state, weights, p),
                           grad_theta_in.contiguous().const_data_ptr(),
                           grad_state_in.contiguous().const_data_ptr(), d_grad.mutable_data_ptr(),
                           d_loss.mutable_data_ptr(), d_theta.mutable_data_ptr(),
                           d_state.mutable_data_ptr(), d_weights.mutable_data_ptr(),
                           partial.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream());
  return {d_grad, d_loss, d_theta, d_state, d_weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_task_derivatives(
    const at::Tensor& params, const at::Tensor& x, const at::Tensor& target,
    const std::optional<at::Tensor>& direction, at::IntArrayRef widths,
    c10::ArrayRef<c10::string_view> activations, c10::string_view loss, bool input_grad) {
  const MlpOperands o =
      mlp_operands(params, x, target, direction, widths, activations, loss, input_grad);
  const MlpShape& s = o.shape;
  c10::cuda::CUDAGuard guard(o.params.device());
  const bool mse = s.loss == MlpLoss::MSE;
  if (!mse && o.target.numel() > 0) {
    const auto [low, high] = at::aminmax(o.target);
    const int64_t lo = low.item<int64_t>(), hi = high.item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < s.outputs(), "fastmeta: target contains label ",
                lo < 0 ? lo : hi, ", out of range for ", s.outputs(), " classes");
  }
  cuda::MlpArgs args{dtype_of(o.params),
                     s,
                     o.params.size(0),
                     o.params.const_data_ptr(),
                     o.params_stride,
                     o.x.const_data_ptr(),
                     mse ? o.target.const_data_ptr() : nullptr,
                     mse ? nullptr : o.target.const_data_ptr<int64_t>(),
                     o.direction.defined() ? o.direction.const_data_ptr() : nullptr,
                     o.loss.mutable_data_ptr(),
                     o.grad.mutable_data_ptr(),
                     data_or_null(o.grad_input),
                     data_or_null(o.hvp),
                     data_or_null(o.hvp_input)};
  const int64_t scratch_bytes = cuda::mlp_global_workspace_bytes(args);
  at::Tensor scratch = at::empty({scratch_bytes}, o.params.options().dtype(at::kByte));
  cuda::mlp_task_derivatives(args, data_or_null(scratch), c10::cuda::getCurrentCUDAStream());
  return o.outputs();
}

TORCH_LIBRARY_IMPL(fastmeta, CUDA, m) {
  m.impl("pairwise_distance", &pairwise_distance);
  m.impl("pairwise_distance_backward", &pairwise_distance_backward);
  m.impl("class_prototypes", &class_prototypes);
  m.impl("class_prototypes_backward", &class_prototypes_backward);
  m.impl("similarity_log_softmax", &similarity_log_softmax);
  m.impl("similarity_log_softmax_backward", &similarity_log_softmax_backward);
  m.impl("similarity_cross_entropy", &similarity_cross_entropy);
  m.impl("similarity_cross_entropy_backward", &similarity_cross_entropy_backward);
  m.impl("similarity_cross_entropy_with_grad", &similarity_cross_entropy_with_grad);
  m.impl("l2o_lstm_step", &l2o_lstm_step);
  m.impl("l2o_lstm_step_", &l2o_lstm_step_);
  m.impl("l2o_lstm_step_backward", &l2o_lstm_step_backward);
  m.impl("meta_lstm_step", &meta_lstm_step);
  m.impl("meta_lstm_step_backward", &meta_lstm_step_backward);
  m.impl("attention_readout", &attention_readout);
  m.impl("attention_readout_backward", &attention_readout_backward);
  m.impl("contrastive_loss", &contrastive_loss);
  m.impl("contrastive_loss_backward", &contrastive_loss_backward);
  m.impl("mlp_task_derivatives", &mlp_task_derivatives);
}

}  // namespace fastmeta
