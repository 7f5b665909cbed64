// PyTorch glue of the CUDA similarity kernels (similarity_forward.cu,
// similarity_backward.cu): the ops pairwise_distance, similarity_log_softmax,
// similarity_cross_entropy (and its fused forward-and-gradient form) and
// attention_readout, forward and backward.
#include <torch/library.h>

#include <tuple>
#include <utility>

#include "../operands/metric.h"
#include "glue.h"

namespace fastmeta {
namespace {

using cuda::SimilarityArgs;
using cuda::SimilarityGrads;
using cuda::SimilarityOp;

// The kernels' arguments for checked operands, with the row statistics of x
// and y computed.
struct Similarity {
  const SimilarityOperands& o;
  c10::cuda::CUDAGuard guard;
  SimilarityArgs args{};
  at::Tensor x_stat, x_coeff, y_stat, y_coeff;

  explicit Similarity(const SimilarityOperands& operands) : o(operands), guard(operands.x.device()) {
    args.metric = o.metric;
    args.dtype = dtype_of(o.x);
    args.B = o.B, args.Q = o.Q, args.N = o.N, args.D = o.D, args.V = o.V;
    args.x = o.x.const_data_ptr();
    args.y = o.y.const_data_ptr();
    if (o.scale.defined()) args.scale = o.scale.const_data_ptr();
    if (o.target.defined()) args.target = o.target.const_data_ptr<int64_t>();
    if (o.values.defined()) args.values = o.values.const_data_ptr();
    x_stat = at::empty({o.B, o.Q}, acc_options(o.x));
    x_coeff = at::empty_like(x_stat);
    y_stat = at::empty({o.B, o.N}, acc_options(o.x));
    y_coeff = at::empty_like(y_stat);
    args.x_stat = x_stat.mutable_data_ptr();
    args.x_coeff = x_coeff.mutable_data_ptr();
    args.y_stat = y_stat.mutable_data_ptr();
    args.y_coeff = y_coeff.mutable_data_ptr();
    cuda::similarity_row_stats(args, current_stream());
  }

  at::Tensor empty_acc(at::IntArrayRef shape) const { return at::empty(shape, acc_options(o.x)); }
  at::Tensor in_acc(const at::Tensor& t) const { return t.to(acc_options(o.x).dtype()).contiguous(); }
  at::Tensor to_input_dtype(const at::Tensor& t) const { return t.to(o.x.scalar_type()); }

  // Forward: `out` and `lse` are written in the accumulation dtype.
  void forward(SimilarityOp op, at::Tensor& out, const at::Tensor* lse) const {
    cuda::similarity_forward(op, args, out.mutable_data_ptr(), lse ? lse->mutable_data_ptr() : nullptr,
                             current_stream());
  }

  // Backward from d loss / d output (`grad`, the input dtype) and what the
  // op's backward reads besides (forward output, log-sum-exps, row weights).
  // Returns the gradients of x, y, scale and values in the input dtype.
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
      SimilarityOp op, const at::Tensor& grad, const at::Tensor& out = {}, const at::Tensor& lse = {},
      const at::Tensor& row_weight = {}) const {
    const at::Tensor grad_c = grad.contiguous(), out_acc = out.defined() ? in_acc(out) : out;
    const at::Tensor lse_acc = lse.defined() ? in_acc(lse) : lse;
    at::Tensor gx = at::zeros(o.x.sizes(), acc_options(o.x)), gy = at::zeros(o.y.sizes(), acc_options(o.x));
    at::Tensor gscale = o.scale.defined() ? at::zeros(o.scale.sizes(), acc_options(o.x)) : at::Tensor();
    at::Tensor gvalues = o.values.defined() ? at::zeros(o.values.sizes(), acc_options(o.x)) : at::Tensor();
    SimilarityGrads g{};
    g.grad = grad_c.const_data_ptr();
    g.out = out_acc.defined() ? out_acc.const_data_ptr() : nullptr;
    g.lse = lse_acc.defined() ? lse_acc.const_data_ptr() : nullptr;
    g.row_weight = row_weight.defined() ? row_weight.const_data_ptr() : nullptr;
    g.grad_x = gx.mutable_data_ptr();
    g.grad_y = gy.mutable_data_ptr();
    g.grad_scale = gscale.defined() ? gscale.mutable_data_ptr() : nullptr;
    g.grad_values = gvalues.defined() ? gvalues.mutable_data_ptr() : nullptr;
    cuda::similarity_backward(op, args, g, current_stream());
    auto back = [&](const at::Tensor& t) { return t.defined() ? to_input_dtype(t) : t; };
    return {back(gx), back(gy), back(gscale), back(gvalues)};
  }
};

at::Tensor pairwise_distance(const at::Tensor& x, const at::Tensor& y, c10::string_view metric) {
  const SimilarityOperands o = pairwise_distance_operands(x, y, metric);
  const Similarity s(o);
  at::Tensor out = s.empty_acc({o.B, o.Q, o.N});
  s.forward(SimilarityOp::PairwiseDistance, out, nullptr);
  return s.to_input_dtype(out);
}

std::tuple<at::Tensor, at::Tensor> pairwise_distance_backward(const at::Tensor& grad,
                                                              const at::Tensor& distance, const at::Tensor& x,
                                                              const at::Tensor& y, c10::string_view metric) {
  const SimilarityOperands o = pairwise_distance_backward_operands(grad, distance, x, y, metric);
  auto [gx, gy, gscale, gvalues] = Similarity(o).backward(SimilarityOp::PairwiseDistance, o.grad);
  return {gx, gy};
}

at::Tensor similarity_log_softmax(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                                  c10::string_view metric) {
  const SimilarityOperands o = log_softmax_operands(x, y, scale, metric);
  const Similarity s(o);
  at::Tensor out = s.empty_acc({o.B, o.Q, o.N}), lse = s.empty_acc({o.B, o.Q});
  s.forward(SimilarityOp::LogSoftmax, out, &lse);
  return s.to_input_dtype(out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> similarity_log_softmax_backward(
    const at::Tensor& grad, const at::Tensor& log_probs, const at::Tensor& x, const at::Tensor& y,
    const at::Tensor& scale, c10::string_view metric) {
  const SimilarityOperands o = log_softmax_backward_operands(grad, log_probs, x, y, scale, metric);
  const Similarity s(o);
  auto [gx, gy, gscale, gvalues] =
      s.backward(SimilarityOp::LogSoftmax, o.grad, o.out, {}, s.in_acc(o.grad).sum(-1));
  return {gx, gy, gscale};
}

// The per-query losses and log-sum-exps, in the accumulation dtype.
std::pair<at::Tensor, at::Tensor> cross_entropy_forward(const Similarity& s) {
  at::Tensor loss = s.empty_acc({s.o.B, s.o.Q}), lse = s.empty_acc({s.o.B, s.o.Q});
  s.forward(SimilarityOp::CrossEntropy, loss, &lse);
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> similarity_cross_entropy(const at::Tensor& x, const at::Tensor& y,
                                                            const at::Tensor& target, const at::Tensor& scale,
                                                            c10::string_view metric) {
  const SimilarityOperands o = cross_entropy_operands(x, y, target, scale, metric);
  const Similarity s(o);
  auto [loss, lse] = cross_entropy_forward(s);
  return {s.to_input_dtype(loss), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> similarity_cross_entropy_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& target,
    const at::Tensor& scale, const at::Tensor& lse, c10::string_view metric) {
  const SimilarityOperands o = cross_entropy_backward_operands(grad, x, y, target, scale, lse, metric);
  auto [gx, gy, gscale, gvalues] = Similarity(o).backward(SimilarityOp::CrossEntropy, o.grad, {}, o.lse);
  return {gx, gy, gscale};
}

// The CUDA kernels compute the reduced loss and its gradient as a forward and
// a backward with a uniform output gradient (the CPU kernel fuses the two).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> similarity_cross_entropy_with_grad(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& target, const at::Tensor& scale,
    c10::string_view metric, double weight) {
  const SimilarityOperands o = cross_entropy_operands(x, y, target, scale, metric);
  const Similarity s(o);
  auto [loss, lse] = cross_entropy_forward(s);
  auto [gx, gy, gscale, gvalues] =
      s.backward(SimilarityOp::CrossEntropy, at::full_like(o.scale, weight), {}, lse);
  return {s.to_input_dtype(loss.sum(1).mul_(weight)), gx, gy, gscale};
}

std::tuple<at::Tensor, at::Tensor> attention_readout(const at::Tensor& x, const at::Tensor& y,
                                                     const at::Tensor& values, const at::Tensor& scale,
                                                     c10::string_view metric) {
  const SimilarityOperands o = readout_operands(x, y, values, scale, metric);
  const Similarity s(o);
  at::Tensor out = at::zeros({o.B, o.Q, o.V}, acc_options(o.x)), lse = s.empty_acc({o.B, o.Q});
  s.forward(SimilarityOp::AttentionReadout, out, &lse);
  return {s.to_input_dtype(out), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_readout_backward(
    const at::Tensor& grad, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& x,
    const at::Tensor& y, const at::Tensor& values, const at::Tensor& scale, c10::string_view metric) {
  const SimilarityOperands o = readout_backward_operands(grad, out, lse, x, y, values, scale, metric);
  const Similarity s(o);
  auto [gx, gy, gscale, gvalues] = s.backward(SimilarityOp::AttentionReadout, o.grad, o.out, o.lse,
                                              (s.in_acc(o.grad) * s.in_acc(o.out)).sum(-1));
  return {gx, gy, gvalues, gscale};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CUDA, m) {
  m.impl("pairwise_distance", &pairwise_distance);
  m.impl("pairwise_distance_backward", &pairwise_distance_backward);
  m.impl("similarity_log_softmax", &similarity_log_softmax);
  m.impl("similarity_log_softmax_backward", &similarity_log_softmax_backward);
  m.impl("similarity_cross_entropy", &similarity_cross_entropy);
  m.impl("similarity_cross_entropy_backward", &similarity_cross_entropy_backward);
  m.impl("similarity_cross_entropy_with_grad", &similarity_cross_entropy_with_grad);
  m.impl("attention_readout", &attention_readout);
  m.impl("attention_readout_backward", &attention_readout_backward);
}

}  // namespace fastmeta
