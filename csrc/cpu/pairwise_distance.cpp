// CPU kernels of fastmeta::pairwise_distance and its backward.
#include <torch/library.h>

#include "../op_checks.h"
#include "similarity_tiles.h"

namespace fastmeta::cpu {
namespace {

at::Tensor pairwise_distance(const at::Tensor& x_in, const at::Tensor& y_in,
                             c10::string_view metric_name) {
  Metric metric = parse_metric(metric_name);
  TORCH_CHECK(metric != Metric::Dot, "fastmeta: pairwise_distance has no 'dot' metric");
  check_operand(x_in, "x", 3, x_in);
  check_operand(y_in, "y", 3, x_in);
  at::Tensor x = x_in.contiguous(), y = y_in.contiguous();
  const int64_t B = x.size(0), Q = x.size(1), N = y.size(1), D = x.size(2);
  at::Tensor out = at::empty({B, Q, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmeta::pairwise_distance", [&] {
    FASTMETA_DISPATCH_METRIC(metric, [&] {
      at::Tensor ay_t = at::empty({B, N}, x.options());
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      scalar_t* ay = ay_t.mutable_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      key_row_stats<M>(yp, B, N, D, ay, nullptr);
      for_each_query_block(B, Q, [&](int64_t b, int64_t q0, int64_t q1) {
        scalar_t ax[kQueryBlock];
        row_stats<M>(xp + (b * Q + q0) * D, q1 - q0, D, ax, nullptr);
        scalar_t* rows = op + (b * Q + q0) * N;
        similarity_tile<M>(xp + (b * Q + q0) * D, q1 - q0, yp + b * N * D, N, D, ax, ay + b * N,
                           rows, N);
        for (int64_t k = 0; k < (q1 - q0) * N; ++k) rows[k] = distance_from_similarity<M>(rows[k]);
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> pairwise_distance_backward(
    const at::Tensor& grad_in, const at::Tensor& distance_in, const at::Tensor& x_in,
    const at::Tensor& y_in, c10::string_view metric_name) {
  Metric metric = parse_metric(metric_name);
  at::Tensor x = x_in.contiguous(), y = y_in.contiguous();
  at::Tensor grad = grad_in.contiguous(), distance = distance_in.contiguous();
  const int64_t B = x.size(0), Q = x.size(1), N = y.size(1), D = x.size(2);
  at::Tensor gx = at::empty_like(x), gy;
  at::Tensor ay_t = at::empty({B, N}, x.options()), cy_t = at::empty({B, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmeta::pairwise_distance_backward", [&] {
    KeyGradAccumulator<scalar_t> keys(B, Q, N, {D, 1}, x.options());
    FASTMETA_DISPATCH_METRIC(metric, [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      const scalar_t* dp = distance.const_data_ptr<scalar_t>();
      scalar_t* ay = ay_t.mutable_data_ptr<scalar_t>();
      scalar_t* cy = cy_t.mutable_data_ptr<scalar_t>();
      scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
      key_row_stats<M>(yp, B, N, D, ay, cy);
      keys.run(Q, [&](int64_t b, int64_t q0, int64_t q1, scalar_t* const* key_rows) {
        const int64_t qb = q1 - q0;
        scalar_t ax[kQueryBlock], cx[kQueryBlock], gx_stat[kQueryBlock] = {};
        const scalar_t* xb = xp + (b * Q + q0) * D;
        row_stats<M>(xb, qb, D, ax, cx);
        std::vector<scalar_t> W(qb * N), S(qb * N);
        for (int64_t k = 0; k < qb * N; ++k) {
          // d distance = -d s for every metric.
          W[k] = -gp[(b * Q + q0) * N + k];
          S[k] = similarity_from_distance<M>(dp[(b * Q + q0) * N + k]);
        }
        scalar_t* gxb = gxp + (b * Q + q0) * D;
        std::fill(gxb, gxb + (q1 - q0) * D, scalar_t(0));
        similarity_tile_vjp<M>(W.data(), N, S.data(), N, qb, N, xb, yp + b * N * D, D, ax, ay + b * N,
                               gxb, key_rows[0], gx_stat, key_rows[1]);
        finish_row_stat_grad(gxb, xb, cx, gx_stat, qb, D);
      });
    });
    gy = key_grad(keys, y, cy_t);
  });
  return {gx, gy};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("pairwise_distance", &pairwise_distance);
  m.impl("pairwise_distance_backward", &pairwise_distance_backward);
}

}  // namespace fastmeta::cpu
