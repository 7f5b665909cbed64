// CPU kernels of fastmeta::attention_readout, softmax(scale * s(x, y)) @ values,
// and its backward: online softmax over tiles of keys, no [B, Q, N] buffer.
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../operands/metric.h"
#include "similarity_tiles.h"

namespace fastmeta::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_readout(const at::Tensor& x_in, const at::Tensor& y_in,
                                                     const at::Tensor& values_in, const at::Tensor& scale_in,
                                                     c10::string_view metric) {
  const SimilarityOperands o = readout_operands(x_in, y_in, values_in, scale_in, metric);
  const at::Tensor &x = o.x, &y = o.y, &scale = o.scale, &values = o.values;
  const int64_t B = o.B, Q = o.Q, N = o.N, D = o.D, V = o.V;
  at::Tensor out = at::zeros({B, Q, V}, x.options());
  at::Tensor lse = at::empty({B, Q}, x.options());
  at::Tensor ay_t = at::empty({B, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmeta::attention_readout", [&] {
    FASTMETA_DISPATCH_METRIC(o.metric, [&] {
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
        scalar_t ax[kQueryBlock];
        row_stats<M>(xb, qb, D, ax, nullptr);
        const auto softmax = online_softmax_over_keys<M>(
            xb, qb, ax, yp + b * N * D, ay + b * N, N, D, sp + b * Q + q0,
            [](int64_t, int64_t, const scalar_t*) {},
            [&](int64_t n0, int64_t nb, const scalar_t* weights, const scalar_t* rescale) {
              for (int64_t i = 0; i < qb; ++i) {
                if (rescale[i] == scalar_t(1)) continue;
                for (int64_t v = 0; v < V; ++v) ob[i * V + v] *= rescale[i];
              }
              gemm_ab_acc(qb, V, nb, weights, nb, vp + (b * N + n0) * V, V, ob, V);
            });
        for (int64_t i = 0; i < qb; ++i) {
          lsep[b * Q + q0 + i] = softmax.logsumexp(i);
          if (N == 0) continue;
          const scalar_t inv = scalar_t(1) / softmax.sum[i];
          for (int64_t v = 0; v < V; ++v) ob[i * V + v] *= inv;
        }
      });
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_readout_backward(
    const at::Tensor& grad_in, const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& x_in,
    const at::Tensor& y_in, const at::Tensor& values_in, const at::Tensor& scale_in,
    c10::string_view metric) {
  const SimilarityOperands o =
      readout_backward_operands(grad_in, out_in, lse_in, x_in, y_in, values_in, scale_in, metric);
  const at::Tensor &scale = o.scale, &values = o.values, &grad = o.grad, &out = o.out, &lse = o.lse;
  const int64_t N = o.N, V = o.V;
  at::Tensor gscale = at::zeros_like(scale);
  auto g = similarity_backward(o, {V}, [&](auto& block) {
    using T = typename std::decay_t<decltype(block)>::Scalar;
    const T* sc = scale.const_data_ptr<T>() + block.row;
    const T* row_lse = lse.const_data_ptr<T>() + block.row;
    const T* grad_rows = grad.const_data_ptr<T>() + block.row * V;
    const T* task_values = values.const_data_ptr<T>() + block.b * N * V;
    T* gsc = gscale.mutable_data_ptr<T>() + block.row;
    T grad_dot_out[kQueryBlock], center[kQueryBlock];
    for (int64_t i = 0; i < block.qb; ++i)
      grad_dot_out[i] = row_dot(grad_rows + i * V, out.const_data_ptr<T>() + (block.row + i) * V, V);
    std::vector<T> P(block.S.size());
    for (int64_t n0 = 0; n0 < N; n0 += kKeyBlock) {
      const int64_t nb = std::min(kKeyBlock, N - n0);
      const T* S = block.similarities(n0, nb);
      for (int64_t i = 0; i < block.qb && n0 == 0; ++i)
        center[i] = scale_gradient_center(S + i * nb, nb, sc[i]);
      std::copy(S, S + block.qb * nb, P.begin());
      for (int64_t i = 0; i < block.qb; ++i) exp_affine_sum(P.data() + i * nb, nb, sc[i], row_lse[i]);
      // W = d loss / d P = grad @ values_tile^T; values get P^T @ grad.
      gemm_abt(block.qb, nb, V, grad_rows, V, task_values + n0 * V, V, block.W.data(), nb);
      gemm_atb_acc(nb, V, block.qb, P.data(), nb, grad_rows, V, block.key_rows[2] + n0 * V, V);
      for (int64_t i = 0; i < block.qb; ++i) {
        T* w = block.W.data() + i * nb;
        const T* p = P.data() + i * nb;
        for (int64_t j = 0; j < nb; ++j) w[j] = p[j] * (w[j] - grad_dot_out[i]);
        gsc[i] += row_dot_shifted(w, S + i * nb, center[i], nb);
        for (int64_t j = 0; j < nb; ++j) w[j] *= sc[i];
      }
      block.apply(n0, nb, S, nb);
    }
  });
  return {g.gx, g.gy, g.extra[0], gscale};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("attention_readout", &attention_readout);
  m.impl("attention_readout_backward", &attention_readout_backward);
}

}  // namespace fastmeta::cpu
