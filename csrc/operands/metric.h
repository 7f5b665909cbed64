// The operand prologues of the metric ops (similarity ops, class prototypes,
// contrastive loss), shared by their CPU kernels and CUDA glue. Each function
// checks every operand of one op, forward or backward, and returns them
// contiguous.
#pragma once

#include <ATen/core/Tensor.h>

#include <string_view>

#include "../math/metric.h"
#include "common.h"

namespace fastmeta {

inline Metric parse_metric(std::string_view metric) {
  if (metric == "sqeuclidean") return Metric::SqEuclidean;
  if (metric == "euclidean") return Metric::Euclidean;
  if (metric == "cosine") return Metric::Cosine;
  if (metric == "dot") return Metric::Dot;
  TORCH_CHECK(false, "fastmeta: unknown metric '", metric,
              "'; expected one of 'sqeuclidean', 'euclidean', 'cosine', 'dot'");
}

// The operands of a similarity op: queries x [B, Q, D] and keys y [B, N, D],
// and those of the ops that have them (undefined elsewhere).
struct SimilarityOperands {
  Metric metric;
  int64_t B = 0, Q = 0, N = 0, D = 0, V = 0;
  at::Tensor x, y;
  at::Tensor scale;   // [B, Q]
  at::Tensor target;  // [B, Q] int64
  at::Tensor values;  // [B, N, V]
  at::Tensor grad;    // d loss / d output: [B, Q, N], [B, Q] or [B, Q, V]
  at::Tensor out;     // the forward's output: distances, log-probabilities or readout
  at::Tensor lse;     // [B, Q] log-sum-exps of the logits, in the accumulation dtype

  // A tensor of x's dtype and device with leading dimensions [B, Q] (and
  // then N or V), contiguous.
  at::Tensor per_query(const at::Tensor& t, const char* name, int64_t last = -1,
                       const char* last_what = nullptr) const {
    check_operand(t, name, last < 0 ? 2 : 3, x);
    check_size(t, name, 0, B, "the number of tasks B in x");
    check_size(t, name, 1, Q, "the number of queries Q in x");
    if (last >= 0) check_size(t, name, 2, last, last_what);
    return t.contiguous();
  }
};

inline SimilarityOperands similarity_operands(const at::Tensor& x, const at::Tensor& y,
                                              c10::string_view metric, const at::Tensor* scale,
                                              const at::Tensor* target, const at::Tensor* values) {
  SimilarityOperands o;
  o.metric = parse_metric(metric);
  check_floating(x, "x");
  check_operand(x, "x", 3, x);
  check_operand(y, "y", 3, x);
  o.B = x.size(0), o.Q = x.size(1), o.N = y.size(1), o.D = x.size(2);
  check_size(y, "y", 0, o.B, "the number of tasks B in x");
  check_size(y, "y", 2, o.D, "the feature size D of x");
  o.x = x.contiguous();
  o.y = y.contiguous();
  if (scale) o.scale = o.per_query(*scale, "scale");
  if (target) {
    check_index(*target, "target", x);
    TORCH_CHECK(target->dim() == 2 && target->size(0) == o.B && target->size(1) == o.Q,
                "fastmeta: target must have shape [B, Q] = ", x.sizes().slice(0, 2), ", got ",
                target->sizes());
    o.target = target->contiguous();
  }
  if (values) {
    check_operand(*values, "values", 3, x);
    check_size(*values, "values", 0, o.B, "the number of tasks B in x");
    check_size(*values, "values", 1, o.N, "the number of keys N in y");
    o.V = values->size(2);
    o.values = values->contiguous();
  }
  return o;
}

// The log-sum-exps a forward returned: [B, Q] in the accumulation dtype.
inline at::Tensor checked_lse(const SimilarityOperands& o, const at::Tensor& lse) {
  TORCH_CHECK(lse.device() == o.x.device() && lse.scalar_type() == accumulate_type(o.x.scalar_type()) &&
                  lse.sizes() == o.x.sizes().slice(0, 2),
              "fastmeta: logsumexp must be the forward's [B, Q] = ", o.x.sizes().slice(0, 2), " ",
              accumulate_type(o.x.scalar_type()), " tensor on ", o.x.device(), ", got ", lse.sizes(), " ",
              lse.scalar_type(), " on ", lse.device());
  return lse.contiguous();
}

inline SimilarityOperands pairwise_distance_operands(const at::Tensor& x, const at::Tensor& y,
                                                     c10::string_view metric) {
  SimilarityOperands o = similarity_operands(x, y, metric, nullptr, nullptr, nullptr);
  TORCH_CHECK(o.metric != Metric::Dot, "fastmeta: pairwise_distance has no 'dot' metric");
  return o;
}

inline SimilarityOperands pairwise_distance_backward_operands(const at::Tensor& grad,
                                                              const at::Tensor& distance, const at::Tensor& x,
                                                              const at::Tensor& y, c10::string_view metric) {
  SimilarityOperands o = pairwise_distance_operands(x, y, metric);
  o.grad = o.per_query(grad, "grad", o.N, "the number of keys N in y");
  o.out = o.per_query(distance, "distance", o.N, "the number of keys N in y");
  return o;
}

inline SimilarityOperands log_softmax_operands(const at::Tensor& x, const at::Tensor& y,
                                               const at::Tensor& scale, c10::string_view metric) {
  return similarity_operands(x, y, metric, &scale, nullptr, nullptr);
}

inline SimilarityOperands log_softmax_backward_operands(const at::Tensor& grad, const at::Tensor& log_probs,
                                                        const at::Tensor& x, const at::Tensor& y,
                                                        const at::Tensor& scale, c10::string_view metric) {
  SimilarityOperands o = log_softmax_operands(x, y, scale, metric);
  o.grad = o.per_query(grad, "grad", o.N, "the number of keys N in y");
  o.out = o.per_query(log_probs, "log_probs", o.N, "the number of keys N in y");
  return o;
}

// Target values are checked where the kernels read them: on the CPU with a
// message naming the query, on CUDA by a device-side assertion (as PyTorch's
// cross_entropy does), so that no check waits for the GPU.
inline SimilarityOperands cross_entropy_operands(const at::Tensor& x, const at::Tensor& y,
                                                 const at::Tensor& target, const at::Tensor& scale,
                                                 c10::string_view metric) {
  return similarity_operands(x, y, metric, &scale, &target, nullptr);
}

inline SimilarityOperands cross_entropy_backward_operands(const at::Tensor& grad, const at::Tensor& x,
                                                          const at::Tensor& y, const at::Tensor& target,
                                                          const at::Tensor& scale, const at::Tensor& lse,
                                                          c10::string_view metric) {
  SimilarityOperands o = cross_entropy_operands(x, y, target, scale, metric);
  o.grad = o.per_query(grad, "grad");
  o.lse = checked_lse(o, lse);
  return o;
}

inline SimilarityOperands readout_operands(const at::Tensor& x, const at::Tensor& y, const at::Tensor& values,
                                           const at::Tensor& scale, c10::string_view metric) {
  return similarity_operands(x, y, metric, &scale, nullptr, &values);
}

inline SimilarityOperands readout_backward_operands(const at::Tensor& grad, const at::Tensor& out,
                                                    const at::Tensor& lse, const at::Tensor& x,
                                                    const at::Tensor& y, const at::Tensor& values,
                                                    const at::Tensor& scale, c10::string_view metric) {
  SimilarityOperands o = readout_operands(x, y, values, scale, metric);
  o.grad = o.per_query(grad, "grad", o.V, "the value size V of values");
  o.out = o.per_query(out, "out", o.V, "the value size V of values");
  o.lse = checked_lse(o, lse);
  return o;
}

// class_prototypes: support [B, S, D] (in the backward, the gradient of the
// prototypes [B, N, D]) and int64 labels [B, S]. Label values are checked
// where the kernels read them (on CUDA by device-side assertions).
struct PrototypeOperands {
  int64_t B = 0, S = 0, N = 0, D = 0;
  at::Tensor rows, labels;  // rows: support [B, S, D], or grad [B, N, D]
};

inline PrototypeOperands prototype_operands(const at::Tensor& support, const at::Tensor& labels,
                                            int64_t num_classes) {
  PrototypeOperands o;
  check_floating(support, "support");
  check_operand(support, "support", 3, support);
  check_index(labels, "labels", support);
  TORCH_CHECK(labels.dim() == 2, "fastmeta: labels must be [B, S], got shape ", labels.sizes());
  o.B = support.size(0), o.S = support.size(1), o.D = support.size(2), o.N = num_classes;
  check_size(labels, "labels", 0, o.B, "the number of tasks B in support");
  check_size(labels, "labels", 1, o.S, "the number of support examples S in support");
  TORCH_CHECK(num_classes >= 0, "fastmeta: num_classes must be >= 0, got ", num_classes);
  // Every class needs an example, so a task has at least num_classes of them.
  TORCH_CHECK(o.B == 0 || num_classes <= o.S, "fastmeta: class_prototypes: num_classes = ", num_classes,
              " but each task has only S = ", o.S, " support examples, so some class has none");
  o.rows = support.contiguous();
  o.labels = labels.contiguous();
  return o;
}

inline PrototypeOperands prototype_backward_operands(const at::Tensor& grad, const at::Tensor& labels) {
  PrototypeOperands o;
  check_floating(grad, "grad");
  check_operand(grad, "grad", 3, grad);
  check_index(labels, "labels", grad);
  TORCH_CHECK(labels.dim() == 2, "fastmeta: labels must be [B, S], got shape ", labels.sizes());
  o.B = grad.size(0), o.N = grad.size(1), o.D = grad.size(2), o.S = labels.size(1);
  check_size(labels, "labels", 0, o.B, "the number of tasks B in grad");
  TORCH_CHECK(o.B == 0 || o.N <= o.S, "fastmeta: class_prototypes_backward: grad has N = ", o.N,
              " classes but each task has only S = ", o.S, " labels, so some class has none");
  o.rows = grad.contiguous();
  o.labels = labels.contiguous();
  return o;
}

// contrastive_loss: pairs x1 and x2 [M, D], same [M]; the backward's grad [M].
struct PairOperands {
  int64_t M = 0, D = 0;
  at::Tensor x1, x2, same, grad;
};

inline PairOperands pair_operands(const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& same) {
  PairOperands o;
  check_floating(x1, "x1");
  check_operand(x1, "x1", 2, x1);
  check_operand(x2, "x2", 2, x1);
  check_operand(same, "same", 1, x1);
  TORCH_CHECK(x1.sizes() == x2.sizes(), "fastmeta: x1 and x2 must have the same shape, got ", x1.sizes(),
              " and ", x2.sizes());
  o.M = x1.size(0), o.D = x1.size(1);
  check_size(same, "same", 0, o.M, "the number of pairs in x1");
  o.x1 = x1.contiguous();
  o.x2 = x2.contiguous();
  o.same = same.contiguous();
  return o;
}

inline PairOperands pair_backward_operands(const at::Tensor& grad, const at::Tensor& x1, const at::Tensor& x2,
                                           const at::Tensor& same) {
  PairOperands o = pair_operands(x1, x2, same);
  check_operand(grad, "grad", 1, x1);
  check_size(grad, "grad", 0, o.M, "the number of pairs in x1");
  o.grad = grad.contiguous();
  return o;
}

}  // namespace fastmeta
