// CPU kernels of fastmeta::similarity_cross_entropy and its backward: an online
// log-sum-exp over tiles of keys, so no [B, Q, N] buffer is ever allocated.
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../op_checks.h"
#include "similarity_tiles.h"

namespace fastmeta::cpu {
namespace {

void check_target_value(int64_t t, int64_t b, int64_t q, int64_t N) {
  TORCH_CHECK(t >= 0 && t < N, "fastmeta: target[", b, ", ", q, "] = ", t,
              " is out of range for ", N, " classes");
}

std::tuple<at::Tensor, at::Tensor> similarity_cross_entropy(const at::Tensor& x_in,
                                                            const at::Tensor& y_in,
                                                            const at::Tensor& target_in,
                                                            const at::Tensor& scale_in,
                                                            c10::string_view metric_name) {
  Metric metric = parse_metric(metric_name);
  check_metric_operands(x_in, y_in, scale_in);
  check_target_shape(target_in, x_in);
  at::Tensor x = x_in.contiguous(), y = y_in.contiguous();
  at::Tensor target = target_in.contiguous(), scale = scale_in.contiguous();
  const int64_t B = x.size(0), Q = x.size(1), N = y.size(1), D = x.size(2);
  at::Tensor loss = at::empty({B, Q}, x.options());
  at::Tensor lse = at::empty({B, Q}, x.options());
  at::Tensor ay_t = at::empty({B, N}, x.options());
  const int64_t* tp = target.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmeta::similarity_cross_entropy", [&] {
    FASTMETA_DISPATCH_METRIC(metric, [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      const scalar_t* sp = scale.const_data_ptr<scalar_t>();
      scalar_t* ay = ay_t.mutable_data_ptr<scalar_t>();
      scalar_t* lossp = loss.mutable_data_ptr<scalar_t>();
      scalar_t* lsep = lse.mutable_data_ptr<scalar_t>();
      key_row_stats<M>(yp, B, N, D, ay, nullptr);
      for_each_query_block(B, Q, [&](int64_t b, int64_t q0, int64_t q1) {
        const int64_t qb = q1 - q0;
        const scalar_t* xb = xp + (b * Q + q0) * D;
        scalar_t ax[kQueryBlock], running_max[kQueryBlock], running_sum[kQueryBlock],
            target_logit[kQueryBlock], tile_max[kQueryBlock];
        row_stats<M>(xb, qb, D, ax, nullptr);
        for (int64_t i = 0; i < qb; ++i) {
          check_target_value(tp[b * Q + q0 + i], b, q0 + i, N);
          running_max[i] = -std::numeric_limits<scalar_t>::infinity();
          running_sum[i] = 0;
        }
        std::vector<scalar_t> S(qb * std::min(N, kKeyBlock));
        for (int64_t n0 = 0; n0 < N; n0 += kKeyBlock) {
          const int64_t nb = std::min(kKeyBlock, N - n0);
          logits_tile<M>(xb, qb, yp + (b * N + n0) * D, nb, D, ax, ay + b * N + n0,
                         sp + b * Q + q0, S.data(), nb, tile_max);
          for (int64_t i = 0; i < qb; ++i) {
            scalar_t* logits = S.data() + i * nb;
            const scalar_t new_max = std::max(running_max[i], tile_max[i]);
            const int64_t t = tp[b * Q + q0 + i] - n0;
            if (t >= 0 && t < nb) target_logit[i] = logits[t];
            if (new_max == -std::numeric_limits<scalar_t>::infinity()) continue;
            running_sum[i] = running_sum[i] * std::exp(running_max[i] - new_max) +
                             exp_affine_sum(logits, nb, scalar_t(1), new_max);
            running_max[i] = new_max;
          }
        }
        for (int64_t i = 0; i < qb; ++i) {
          lsep[b * Q + q0 + i] = running_max[i] + std::log(running_sum[i]);
          lossp[b * Q + q0 + i] = lsep[b * Q + q0 + i] - target_logit[i];
        }
      });
    });
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> similarity_cross_entropy_backward(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& y_in,
    const at::Tensor& target_in, const at::Tensor& scale_in, const at::Tensor& lse_in,
    c10::string_view metric_name) {
  Metric metric = parse_metric(metric_name);
  check_metric_operands(x_in, y_in, scale_in);
  check_target_shape(target_in, x_in);
  at::Tensor x = x_in.contiguous(), y = y_in.contiguous(), grad = grad_in.contiguous();
  at::Tensor target = target_in.contiguous(), scale = scale_in.contiguous();
  at::Tensor lse = lse_in.contiguous();
  const int64_t B = x.size(0), Q = x.size(1), N = y.size(1), D = x.size(2);
  at::Tensor gx = at::empty_like(x), gy;
  at::Tensor gscale = at::empty({B, Q}, x.options());
  at::Tensor ay_t = at::empty({B, N}, x.options()), cy_t = at::empty({B, N}, x.options());
  const int64_t* tp = target.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmeta::similarity_cross_entropy_backward", [&] {
    KeyGradAccumulator<scalar_t> keys(B, Q, N, {D, 1}, x.options());
    FASTMETA_DISPATCH_METRIC(metric, [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      const scalar_t* sp = scale.const_data_ptr<scalar_t>();
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      const scalar_t* lsep = lse.const_data_ptr<scalar_t>();
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
        row_stats<M>(xb, qb, D, ax, cx);
        for (int64_t i = 0; i < qb; ++i) {
          check_target_value(tp[b * Q + q0 + i], b, q0 + i, N);
          gsp[b * Q + q0 + i] = 0;
        }
        const int64_t tile = qb * std::min(N, kKeyBlock);
        std::vector<scalar_t> S(tile), W(tile);
        for (int64_t n0 = 0; n0 < N; n0 += kKeyBlock) {
          const int64_t nb = std::min(kKeyBlock, N - n0);
          similarity_tile<M>(xb, qb, yp + (b * N + n0) * D, nb, D, ax, ay + b * N + n0, S.data(),
                             nb);
          for (int64_t i = 0; i < qb; ++i) {
            const int64_t row = b * Q + q0 + i;
            const scalar_t sc = sp[row], g = gp[row], row_lse = lsep[row];
            const scalar_t* s = S.data() + i * nb;
            scalar_t* w = W.data() + i * nb;
            // d loss / d logit = g * (softmax - one_hot(target)); w = that times sc.
            scalar_t gscale_acc = g * run_loop<SoftmaxGradRow>(w, s, nb, sc, row_lse, g * sc);
            const int64_t t = tp[row] - n0;
            if (t >= 0 && t < nb) {
              gscale_acc -= g * s[t];
              w[t] -= g * sc;
            }
            gsp[row] += gscale_acc;
          }
          similarity_tile_vjp<M>(W.data(), S.data(), qb, nb, nb, xb, yp + (b * N + n0) * D, D, ax,
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
  m.impl("similarity_cross_entropy", &similarity_cross_entropy);
  m.impl("similarity_cross_entropy_backward", &similarity_cross_entropy_backward);
}

}  // namespace fastmeta::cpu
