// CPU kernels of fastmeta::pairwise_distance and its backward.
#include <torch/library.h>

#include "../operands/metric.h"
#include "similarity_tiles.h"

namespace fastmeta::cpu {
namespace {

at::Tensor pairwise_distance(const at::Tensor& x_in, const at::Tensor& y_in, c10::string_view metric) {
  const SimilarityOperands o = pairwise_distance_operands(x_in, y_in, metric);
  const at::Tensor &x = o.x, &y = o.y;
  const int64_t B = o.B, Q = o.Q, N = o.N, D = o.D;
  at::Tensor out = at::empty({B, Q, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmeta::pairwise_distance", [&] {
    FASTMETA_DISPATCH_METRIC(o.metric, [&] {
      at::Tensor ay_t = at::empty({B, N}, x.options());
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      scalar_t* ay = ay_t.mutable_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      key_row_stats<M>(yp, B, N, D, ay, nullptr);
      for_each_query_block(B, Q, [&](int64_t b, int64_t q0, int64_t q1) {
        scalar_t ax[kQueryBlock];
        scalar_t* rows = op + (b * Q + q0) * N;
        similarity_tile<M>(xp + (b * Q + q0) * D, q1 - q0, yp + b * N * D, N, D, ax, ay + b * N, rows, N);
        for (int64_t k = 0; k < (q1 - q0) * N; ++k) rows[k] = distance_from_similarity<M>(rows[k]);
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> pairwise_distance_backward(const at::Tensor& grad_in,
                                                              const at::Tensor& distance_in,
                                                              const at::Tensor& x_in, const at::Tensor& y_in,
                                                              c10::string_view metric) {
  const SimilarityOperands o = pairwise_distance_backward_operands(grad_in, distance_in, x_in, y_in, metric);
  const at::Tensor &grad = o.grad, &distance = o.out;
  const int64_t N = o.N;
  auto g = similarity_backward(o, {}, [&](auto& block) {
    using T = typename std::decay_t<decltype(block)>::Scalar;
    constexpr Metric M = std::decay_t<decltype(block)>::metric;
    for (int64_t n0 = 0; n0 < N; n0 += kKeyBlock) {
      const int64_t nb = std::min(kKeyBlock, N - n0);
      for (int64_t i = 0; i < block.qb; ++i) {
        const T* grad_row = grad.const_data_ptr<T>() + (block.row + i) * N + n0;
        const T* distance_row = distance.const_data_ptr<T>() + (block.row + i) * N + n0;
        for (int64_t j = 0; j < nb; ++j) {
          block.W[i * nb + j] = -grad_row[j];  // d distance = -d s for every metric
          block.S[i * nb + j] = similarity_from_distance<M>(distance_row[j]);
        }
      }
      block.apply(n0, nb, block.S.data(), nb);
    }
  });
  return {g.gx, g.gy};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("pairwise_distance", &pairwise_distance);
  m.impl("pairwise_distance_backward", &pairwise_distance_backward);
}

}  // namespace fastmeta::cpu
