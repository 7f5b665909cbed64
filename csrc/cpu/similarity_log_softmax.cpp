// CPU kernels of fastmeta::similarity_log_softmax and its backward.
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../operands/metric.h"
#include "similarity_tiles.h"

namespace fastmeta::cpu {
namespace {

at::Tensor similarity_log_softmax(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& scale_in,
                                  c10::string_view metric) {
  const SimilarityOperands o = log_softmax_operands(x_in, y_in, scale_in, metric);
  const at::Tensor &x = o.x, &y = o.y, &scale = o.scale;
  const int64_t B = o.B, Q = o.Q, N = o.N, D = o.D;
  at::Tensor out = at::empty({B, Q, N}, x.options());
  at::Tensor ay_t = at::empty({B, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmeta::similarity_log_softmax", [&] {
    FASTMETA_DISPATCH_METRIC(o.metric, [&] {
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
        scalar_t* rows = op + (b * Q + q0) * N;
        scalar_t row_max[kQueryBlock];
        logits_tile<M>(xb, qb, yp + b * N * D, N, D, ax, ay + b * N, sp + b * Q + q0, rows, N, row_max);
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
    const at::Tensor& grad_in, const at::Tensor& log_probs_in, const at::Tensor& x_in, const at::Tensor& y_in,
    const at::Tensor& scale_in, c10::string_view metric) {
  const SimilarityOperands o =
      log_softmax_backward_operands(grad_in, log_probs_in, x_in, y_in, scale_in, metric);
  const at::Tensor &scale = o.scale, &grad = o.grad, &log_probs = o.out;
  const int64_t N = o.N;
  at::Tensor gscale = at::zeros_like(scale);
  auto g = similarity_backward(o, {}, [&](auto& block) {
    using T = typename std::decay_t<decltype(block)>::Scalar;
    const T* sc = scale.const_data_ptr<T>() + block.row;
    const T* grad_rows = grad.const_data_ptr<T>() + block.row * N;
    const T* log_prob_rows = log_probs.const_data_ptr<T>() + block.row * N;
    T* gsc = gscale.mutable_data_ptr<T>() + block.row;
    T grad_sum[kQueryBlock], center[kQueryBlock];
    for (int64_t i = 0; i < block.qb; ++i) grad_sum[i] = row_sum(grad_rows + i * N, N);
    for (int64_t n0 = 0; n0 < N; n0 += kKeyBlock) {
      const int64_t nb = std::min(kKeyBlock, N - n0);
      const T* S = block.similarities(n0, nb);
      for (int64_t i = 0; i < block.qb && n0 == 0; ++i)
        center[i] = scale_gradient_center(S + i * nb, nb, sc[i]);
      for (int64_t i = 0; i < block.qb; ++i) {
        const T* g = grad_rows + i * N + n0;
        T* w = block.W.data() + i * nb;
        // d loss / d logit = grad - softmax * sum(grad); w is that times the scale.
        std::copy(log_prob_rows + i * N + n0, log_prob_rows + i * N + n0 + nb, w);
        exp_affine_sum(w, nb, T(1), T(0));
        for (int64_t j = 0; j < nb; ++j) w[j] = g[j] - w[j] * grad_sum[i];
        gsc[i] += row_dot_shifted(w, S + i * nb, center[i], nb);
        for (int64_t j = 0; j < nb; ++j) w[j] *= sc[i];
      }
      block.apply(n0, nb, S, nb);
    }
  });
  return {g.gx, g.gy, gscale};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("similarity_log_softmax", &similarity_log_softmax);
  m.impl("similarity_log_softmax_backward", &similarity_log_softmax_backward);
}

}  // namespace fastmeta::cpu
