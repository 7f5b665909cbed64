// CPU kernels of fastmeta::attention_readout, softmax(scale * s(x, y)) @ values,
// and its backward: online softmax over tiles of keys, no [B, Q, N] buffer.
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../op_checks.h"
#include "similarity_tiles.h"

namespace fastmeta::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_readout(const at::Tensor& x_in,
                                                     const at::Tensor& y_in,
                                                     const at::Tensor& values_in,
                                                     const at::Tensor& scale_in,
                                                     c10::string_view metric_name) {
  Metric metric = parse_metric(metric_name);
  check_metric_operands(x_in, y_in, scale_in);
  check_values(values_in, x_in, y_in);
  at::Tensor x = x_in.contiguous(), y = y_in.contiguous(), scale = scale_in.contiguous();
  at::Tensor values = values_in.contiguous();
  const int64_t B = x.size(0), Q = x.size(1), N = y.size(1), D = x.size(2), V = values.size(2);
  at::Tensor out = at::zeros({B, Q, V}, x.options());
  at::Tensor lse = at::empty({B, Q}, x.options());
  at::Tensor ay_t = at::empty({B, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmeta::attention_readout", [&] {
    FASTMETA_DISPATCH_METRIC(metric, [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      const scalar_t* vp = values.const_data_ptr<scalar_t>();
      const scalar_t* sp = scale.const_data_ptr<scalar_t>();
      scalar_t* ay = ay_t.mutable_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      scalar_t* lsep = lse.mutable_data_ptr<scalar_t>();
      key_row_stats<M>(yp, B, N, D, ay, nullptr);
      for_each_query_block(B, Q, [&](int64_t b, int64_t q0, int64_t q1) {
        const int64_t qb = q1 - q0;
        const scalar_t* xb = xp + (b * Q + q0) * D;
        scalar_t* ob = op + (b * Q + q0) * V;
        scalar_t ax[kQueryBlock], running_max[kQueryBlock], running_sum[kQueryBlock],
            tile_max[kQueryBlock];
        row_stats<M>(xb, qb, D, ax, nullptr);
        for (int64_t i = 0; i < qb; ++i) {
          running_max[i] = -std::numeric_limits<scalar_t>::infinity();
          running_sum[i] = 0;
        }
        std::vector<scalar_t> P(qb * std::min(N, kKeyBlock));
        for (int64_t n0 = 0; n0 < N; n0 += kKeyBlock) {
          const int64_t nb = std::min(kKeyBlock, N - n0);
          logits_tile<M>(xb, qb, yp + (b * N + n0) * D, nb, D, ax, ay + b * N + n0,
                         sp + b * Q + q0, P.data(), nb, tile_max);
          for (int64_t i = 0; i < qb; ++i) {
            scalar_t* p = P.data() + i * nb;
            const scalar_t new_max = std::max(running_max[i], tile_max[i]);
            // The tile's weights are exp(logit - new_max); earlier tiles are rescaled.
            const scalar_t rescale = new_max == -std::numeric_limits<scalar_t>::infinity()
                                         ? scalar_t(1)
                                         : std::exp(running_max[i] - new_max);
            running_sum[i] = running_sum[i] * rescale + exp_affine_sum(p, nb, scalar_t(1), new_max);
            running_max[i] = new_max;
            if (rescale != scalar_t(1)) {
              for (int64_t v = 0; v < V; ++v) ob[i * V + v] *= rescale;
            }
          }
          gemm_ab_acc(qb, V, nb, P.data(), nb, vp + (b * N + n0) * V, V, ob, V);
        }
        for (int64_t i = 0; i < qb; ++i) {
          lsep[b * Q + q0 + i] = running_max[i] + std::log(running_sum[i]);
          if (N == 0) continue;
          const scalar_t inv = scalar_t(1) / running_sum[i];
          for (int64_t v = 0; v < V; ++v) ob[i * V + v] *= inv;
        }
      });
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_readout_backward(
    const at::Tensor& grad_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& values_in,
    const at::Tensor& scale_in, c10::string_view metric_name) {
  Metric metric = parse_metric(metric_name);
  check_metric_operands(x_in, y_in, scale_in);
  check_values(values_in, x_in, y_in);
  at::Tensor x = x_in.contiguous(), y = y_in.contiguous(), scale = scale_in.contiguous();
  at::Tensor values = values_in.contiguous(), grad = grad_in.contiguous();
  at::Tensor out = out_in.contiguous(), lse = lse_in.contiguous();
  const int64_t B = x.size(0), Q = x.size(1), N = y.size(1), D = x.size(2), V = values.size(2);
  at::Tensor gx = at::empty_like(x), gy, gvalues;
  at::Tensor gscale = at::zeros({B, Q}, x.options());
  at::Tensor ay_t = at::empty({B, N}, x.options()), cy_t = at::empty({B, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmeta::attention_readout_backward", [&] {
    KeyGradAccumulator<scalar_t> keys(B, Q, N, {D, 1, V}, x.options());
    FASTMETA_DISPATCH_METRIC(metric, [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      const scalar_t* vp = values.const_data_ptr<scalar_t>();
      const scalar_t* sp = scale.const_data_ptr<scalar_t>();
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      const scalar_t* op = out.const_data_ptr<scalar_t>();
      const scalar_t* lsep = lse.const_data_ptr<scalar_t>();
      scalar_t* ay = ay_t.mutable_data_ptr<scalar_t>();
      scalar_t* cy = cy_t.mutable_data_ptr<scalar_t>();
      scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
      scalar_t* gsp = gscale.mutable_data_ptr<scalar_t>();
      key_row_stats<M>(yp, B, N, D, ay, cy);
      keys.run(Q, [&](int64_t b, int64_t q0, int64_t q1, scalar_t* const* key_rows) {
        const int64_t qb = q1 - q0;
        const scalar_t* xb = xp + (b * Q + q0) * D;
        const scalar_t* gb = gp + (b * Q + q0) * V;
        scalar_t* gxb = gxp + (b * Q + q0) * D;
        std::fill(gxb, gxb + (q1 - q0) * D, scalar_t(0));
        scalar_t ax[kQueryBlock], cx[kQueryBlock], gx_stat[kQueryBlock] = {};
        scalar_t grad_dot_out[kQueryBlock];
        row_stats<M>(xb, qb, D, ax, cx);
        for (int64_t i = 0; i < qb; ++i) {
          grad_dot_out[i] = row_dot(gb + i * V, op + (b * Q + q0 + i) * V, V);
        }
        const int64_t tile = qb * std::min(N, kKeyBlock);
        std::vector<scalar_t> S(tile), P(tile), W(tile);
        for (int64_t n0 = 0; n0 < N; n0 += kKeyBlock) {
          const int64_t nb = std::min(kKeyBlock, N - n0);
          const scalar_t* values_tile = vp + (b * N + n0) * V;
          similarity_tile<M>(xb, qb, yp + (b * N + n0) * D, nb, D, ax, ay + b * N + n0, S.data(),
                             nb);
          std::copy(S.begin(), S.begin() + qb * nb, P.begin());
          for (int64_t i = 0; i < qb; ++i) {
            const int64_t row = b * Q + q0 + i;
            exp_affine_sum(P.data() + i * nb, nb, sp[row], lsep[row]);
          }
          // W = d loss / d P = grad @ values_tile^T; values get P^T @ grad.
          gemm_abt(qb, nb, V, gb, V, values_tile, V, W.data(), nb);
          gemm_atb_acc(nb, V, qb, P.data(), nb, gb, V, key_rows[2] + n0 * V, V);
          for (int64_t i = 0; i < qb; ++i) {
            const int64_t row = b * Q + q0 + i;
            scalar_t* w = W.data() + i * nb;
            const scalar_t* p = P.data() + i * nb;
            for (int64_t j = 0; j < nb; ++j) w[j] = p[j] * (w[j] - grad_dot_out[i]);
            scalar_t gscale_acc = row_dot(w, S.data() + i * nb, nb);
            for (int64_t j = 0; j < nb; ++j) w[j] *= sp[row];
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
    gvalues = keys.reduce(2);
  });
  return {gx, gy, gvalues, gscale};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("attention_readout", &attention_readout);
  m.impl("attention_readout_backward", &attention_readout_backward);
}

}  // namespace fastmeta::cpu
