// CPU kernels of fastmeta::class_prototypes and its backward.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../operands/metric.h"
#include "recycled_buffers.h"

namespace fastmeta::cpu {
namespace {

// Number of support examples of each class in task b; checks the labels.
std::vector<int64_t> class_counts(const int64_t* labels, int64_t b, int64_t S, int64_t num_classes) {
  std::vector<int64_t> counts(num_classes, 0);
  for (int64_t s = 0; s < S; ++s) {
    int64_t c = labels[b * S + s];
    TORCH_CHECK(c >= 0 && c < num_classes, "fastmeta: labels[", b, ", ", s, "] = ", c,
                " is out of range for num_classes = ", num_classes);
    ++counts[c];
  }
  for (int64_t c = 0; c < num_classes; ++c) {
    TORCH_CHECK(counts[c] > 0, "fastmeta: class_prototypes: class ", c, " has no support examples in task ",
                b);
  }
  return counts;
}

at::Tensor class_prototypes(const at::Tensor& support_in, const at::Tensor& labels_in, int64_t num_classes) {
  const PrototypeOperands o = prototype_operands(support_in, labels_in, num_classes);
  const at::Tensor &support = o.rows, &labels = o.labels;
  const int64_t B = o.B, S = o.S, D = o.D;
  at::Tensor out = zeros_recycled({B, num_classes, D}, support.scalar_type());
  const int64_t* lp = labels.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(support.scalar_type(), "fastmeta::class_prototypes", [&] {
    const scalar_t* sp = support.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        std::vector<int64_t> counts = class_counts(lp, b, S, num_classes);
        scalar_t* task_out = op + b * num_classes * D;
        for (int64_t s = 0; s < S; ++s) {
          scalar_t* row = task_out + lp[b * S + s] * D;
          const scalar_t* src = sp + (b * S + s) * D;
          for (int64_t d = 0; d < D; ++d) row[d] += src[d];
        }
        for (int64_t c = 0; c < num_classes; ++c) {
          scalar_t inv = scalar_t(1) / scalar_t(counts[c]);
          for (int64_t d = 0; d < D; ++d) task_out[c * D + d] *= inv;
        }
      }
    });
  });
  return out;
}

at::Tensor class_prototypes_backward(const at::Tensor& grad_in, const at::Tensor& labels_in) {
  const PrototypeOperands o = prototype_backward_operands(grad_in, labels_in);
  const at::Tensor &grad = o.rows, &labels = o.labels;
  const int64_t B = o.B, num_classes = o.N, D = o.D, S = o.S;
  at::Tensor grad_support = empty_recycled({B, S, D}, grad.scalar_type());
  const int64_t* lp = labels.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "fastmeta::class_prototypes_backward", [&] {
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* out = grad_support.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        std::vector<int64_t> counts = class_counts(lp, b, S, num_classes);
        for (int64_t s = 0; s < S; ++s) {
          int64_t c = lp[b * S + s];
          scalar_t inv = scalar_t(1) / scalar_t(counts[c]);
          const scalar_t* src = gp + (b * num_classes + c) * D;
          scalar_t* dst = out + (b * S + s) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * inv;
        }
      }
    });
  });
  return grad_support;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("class_prototypes", &class_prototypes);
  m.impl("class_prototypes_backward", &class_prototypes_backward);
}

}  // namespace fastmeta::cpu
