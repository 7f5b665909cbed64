// CPU kernels of fastmeta::similarity_log_softmax and its backward.
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../op_checks.h"
#include "similarity_tiles.h"

namespace fastmeta::cpu {
namespace {

at::Tensor similarity_log_softmax(const at::Tensor& x_in, const at::Tensor& y_in,
                                  const at::Tensor& scale_in, c10::string_view metric_name) {
  Metric metric = parse_metric(metric_name);
  check_metric_operands(x_in, y_in, scale_in);
  at::Tensor x = x_in.contiguous(), y = y_in.contiguous(), scale = scale_in.contiguous();
  const int64_t B = x.size(0), Q = x.size(1), N = y.size(1), D = x.size(2);
  at::Tensor out = at::empty({B, Q, N}, x.options());
  at::Tensor ay_t = at::empty({B, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmeta::similarity_log_softmax", [&] {
    FASTMETA_DISPATCH_METRIC(metric, [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      const scalar_t* sp = scale.const_data_ptr<scalar_t>();
      scalar_t* ay = ay_t.mutable_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      key_row_stats<M>(yp, B, N, D, ay, nullptr);
      for_each_query_block(B, Q, [&](int64_t b, int64_t q0, int64_t q1) {
        const int64_t qb = q1 - q0;
        const scalar_t* xb = xp + (b * Q + q0) * D;
        scalar_t ax[kQueryBlock];
        row_stats<M>(xb, qb, D, ax, nullptr);
        scalar_t* rows = op + (b * Q + q0) * N;
        scalar_t row_max[kQueryBlock];
        logits_tile<M>(xb, qb, yp + b * N * D, N, D, ax, ay + b * N, sp + b * Q + q0, rows, N,
                       row_max);
        std::vector<scalar_t> scratch(N);
        for (int64_t i = 0; i < qb; ++i) {
          scalar_t* logits = rows + i * N;
          const scalar_t max_logit = row_max[i];
          std::copy(logits, logits + N, scratch.begin());
          const scalar_t lse =
              max_logit + std::log(exp_affine_sum(scratch.data(), N, scalar_t(1), max_logit));
          for (int64_t j = 0; j < N; ++j) logits[j] -= lse;
        }
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> similarity_log_softmax_backward(
    const at::Tensor& grad_in, const at::Tensor& log_probs_in, const at::Tensor& x_in,
    const at::Tensor& y_in, const at::Tensor& scale_in, c10::string_view metric_name) {
  Metric metric = parse_metric(metric_name);
  check_metric_operands(x_in, y_in, scale_in);
  at::Tensor x = x_in.contiguous(), y = y_in.contiguous(), scale = scale_in.contiguous();
  at::Tensor grad = grad_in.contiguous(), log_probs = log_probs_in.contiguous();
  const int64_t B = x.size(0), Q = x.size(1), N = y.size(1), D = x.size(2);
  at::Tensor gx = at::empty_like(x), gy;
  at::Tensor gscale = at::zeros({B, Q}, x.options());
  at::Tensor ay_t = at::empty({B, N}, x.options()), cy_t = at::empty({B, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmeta::similarity_log_softmax_backward", [&] {
    KeyGradAccumulator<scalar_t> keys(B, Q, N, {D, 1}, x.options());
    FASTMETA_DISPATCH_METRIC(metric, [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      const scalar_t* sp = scale.const_data_ptr<scalar_t>();
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      const scalar_t* lp = log_probs.const_data_ptr<scalar_t>();
      scalar_t* ay = ay_t.mutable_data_ptr<scalar_t>();
      scalar_t* cy = cy_t.mutable_data_ptr<scalar_t>();
      scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
      scalar_t* gsp = gscale.mutable_data_ptr<scalar_t>();
      key_row_stats<M>(yp, B, N, D, ay, cy);
      keys.run(Q, [&](int64_t b, int64_t q0, int64_t q1, scalar_t* const* key_rows) {
        const int64_t qb = q1 - q0;
        const scalar_t* xb = xp + (b * Q + q0) * D;
        scalar_t* gxb = gxp + (b * Q + q0) * D;
        std::fill(gxb, gxb + (q1 - q0) * D, scalar_t(0));
        scalar_t ax[kQueryBlock], cx[kQueryBlock], gx_stat[kQueryBlock] = {};
        scalar_t grad_sum[kQueryBlock];
        row_stats<M>(xb, qb, D, ax, cx);
        for (int64_t i = 0; i < qb; ++i) {
          const scalar_t* g = gp + (b * Q + q0 + i) * N;
          grad_sum[i] = row_sum(g, N);
        }
        const int64_t tile = qb * std::min(N, kKeyBlock);
        std::vector<scalar_t> S(tile), W(tile);
        for (int64_t n0 = 0; n0 < N; n0 += kKeyBlock) {
          const int64_t nb = std::min(kKeyBlock, N - n0);
          similarity_tile<M>(xb, qb, yp + (b * N + n0) * D, nb, D, ax, ay + b * N + n0, S.data(),
                             nb);
          for (int64_t i = 0; i < qb; ++i) {
            const int64_t row = b * Q + q0 + i;
            const scalar_t sc = sp[row];
            const scalar_t* g = gp + row * N + n0;
            const scalar_t* lpr = lp + row * N + n0;
            const scalar_t* s = S.data() + i * nb;
            scalar_t* w = W.data() + i * nb;
            std::copy(lpr, lpr + nb, w);
            exp_affine_sum(w, nb, scalar_t(1), scalar_t(0));
            for (int64_t j = 0; j < nb; ++j) w[j] = g[j] - w[j] * grad_sum[i];
            scalar_t gscale_acc = row_dot(w, s, nb);
            for (int64_t j = 0; j < nb; ++j) w[j] *= sc;
            gsp[row] += gscale_acc;
          }
          similarity_tile_vjp<M>(W.data(), nb, S.data(), nb, qb, nb, xb, yp + (b * N + n0) * D, D, ax,
                                 ay + b * N + n0, gxb, key_rows[0] + n0 * D, gx_stat,
                                 key_rows[1] + n0);
        }
        finish_row_stat_grad(gxb, xb, cx, gx_stat, qb, D);
      });
    });
    gy = key_grad(keys, y, cy_t);
  });
  return {gx, gy, gscale};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("similarity_log_softmax", &similarity_log_softmax);
  m.impl("similarity_log_softmax_backward", &similarity_log_softmax_backward);
}

}  // namespace fastmeta::cpu
