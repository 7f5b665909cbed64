// CPU kernels of fastmeta::contrastive_loss (pairs x1 [M, D], x2 [M, D],
// same [M]) and its backward.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>

#include "../operands/metric.h"

namespace fastmeta::cpu {
namespace {

template <typename T>
T pair_distance(const T* a, const T* b, int64_t D) {
  T acc = 0;
  for (int64_t d = 0; d < D; ++d) acc += (a[d] - b[d]) * (a[d] - b[d]);
  return std::sqrt(acc);
}

at::Tensor contrastive_loss(const at::Tensor& x1_in, const at::Tensor& x2_in, const at::Tensor& same_in,
                            double margin) {
  const PairOperands o = pair_operands(x1_in, x2_in, same_in);
  const at::Tensor &x1 = o.x1, &x2 = o.x2, &same = o.same;
  const int64_t M = o.M, D = o.D;
  at::Tensor loss = at::empty({M}, x1.options());
  AT_DISPATCH_FLOATING_TYPES(x1.scalar_type(), "fastmeta::contrastive_loss", [&] {
    const scalar_t* ap = x1.const_data_ptr<scalar_t>();
    const scalar_t* bp = x2.const_data_ptr<scalar_t>();
    const scalar_t* sp = same.const_data_ptr<scalar_t>();
    scalar_t* lp = loss.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, M, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t d = pair_distance(ap + i * D, bp + i * D, D);
        lp[i] = contrastive_pair_loss(d, sp[i], scalar_t(margin));
      }
    });
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_loss_backward(const at::Tensor& grad_in,
                                                                         const at::Tensor& x1_in,
                                                                         const at::Tensor& x2_in,
                                                                         const at::Tensor& same_in,
                                                                         double margin) {
  const PairOperands o = pair_backward_operands(grad_in, x1_in, x2_in, same_in);
  const at::Tensor &x1 = o.x1, &x2 = o.x2, &same = o.same, &grad = o.grad;
  const int64_t M = o.M, D = o.D;
  at::Tensor g1 = at::empty_like(x1), g2 = at::empty_like(x2), gsame = at::empty_like(same);
  AT_DISPATCH_FLOATING_TYPES(x1.scalar_type(), "fastmeta::contrastive_loss_backward", [&] {
    const scalar_t* ap = x1.const_data_ptr<scalar_t>();
    const scalar_t* bp = x2.const_data_ptr<scalar_t>();
    const scalar_t* sp = same.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* g1p = g1.mutable_data_ptr<scalar_t>();
    scalar_t* g2p = g2.mutable_data_ptr<scalar_t>();
    scalar_t* gsp = gsame.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, M, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* a = ap + i * D;
        const scalar_t* b = bp + i * D;
        scalar_t d = pair_distance(a, b, D);
        gsp[i] = gp[i] * contrastive_pair_d_same(d, scalar_t(margin));
        // d distance / d x1 = (x1 - x2) / d, taken as 0 where d = 0 (as torch.cdist).
        scalar_t coeff = d > scalar_t(0) ? gp[i] * contrastive_pair_d_distance(d, sp[i], scalar_t(margin)) / d
                                         : scalar_t(0);
        for (int64_t k = 0; k < D; ++k) {
          g1p[i * D + k] = coeff * (a[k] - b[k]);
          g2p[i * D + k] = -g1p[i * D + k];
        }
      }
    });
  });
  return {g1, g2, gsame};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("contrastive_loss", &contrastive_loss);
  m.impl("contrastive_loss_backward", &contrastive_loss_backward);
}

}  // namespace fastmeta::cpu
