// CPU kernels of fastmeta::similarity_cross_entropy, its backward, and the fused
// forward-and-gradient of its reduced loss: tiles of keys, so no [B, Q, N]
// buffer is ever allocated.
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>

#include "../operands/metric.h"
#include "similarity_tiles.h"

namespace fastmeta::cpu {
namespace {

void check_target_value(int64_t t, int64_t b, int64_t q, int64_t N) {
  TORCH_CHECK(t >= 0 && t < N, "fastmeta: target[", b, ", ", q, "] = ", t, " is out of range for ", N,
              " classes");
}

std::tuple<at::Tensor, at::Tensor> similarity_cross_entropy(const at::Tensor& x_in, const at::Tensor& y_in,
                                                            const at::Tensor& target_in,
                                                            const at::Tensor& scale_in,
                                                            c10::string_view metric) {
  const SimilarityOperands o = cross_entropy_operands(x_in, y_in, target_in, scale_in, metric);
  const int64_t B = o.B, Q = o.Q, N = o.N, D = o.D;
  at::Tensor loss = at::empty({B, Q}, o.x.options());
  at::Tensor lse = at::empty({B, Q}, o.x.options());
  at::Tensor ay_t = at::empty({B, N}, o.x.options());
  const int64_t* tp = o.target.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(o.x.scalar_type(), "fastmeta::similarity_cross_entropy", [&] {
    FASTMETA_DISPATCH_METRIC(o.metric, [&] {
      const scalar_t* xp = o.x.const_data_ptr<scalar_t>();
      const scalar_t* yp = o.y.const_data_ptr<scalar_t>();
      const scalar_t* sp = o.scale.const_data_ptr<scalar_t>();
      scalar_t* ay = ay_t.mutable_data_ptr<scalar_t>();
      scalar_t* lossp = loss.mutable_data_ptr<scalar_t>();
      scalar_t* lsep = lse.mutable_data_ptr<scalar_t>();
      key_row_stats<M>(yp, B, N, D, ay, nullptr);
      for_each_query_block(B, Q, [&](int64_t b, int64_t q0, int64_t q1) {
        const int64_t qb = q1 - q0;
        const scalar_t* xb = xp + (b * Q + q0) * D;
        const int64_t* targets = tp + b * Q + q0;
        scalar_t ax[kQueryBlock], target_logit[kQueryBlock];
        for (int64_t i = 0; i < qb; ++i) check_target_value(targets[i], b, q0 + i, N);
        const auto softmax = online_softmax_over_keys<M>(
            xb, qb, ax, yp + b * N * D, ay + b * N, N, D, sp + b * Q + q0,
            [&](int64_t n0, int64_t nb, const scalar_t* logits) {
              for (int64_t i = 0; i < qb; ++i)
                if (targets[i] >= n0 && targets[i] < n0 + nb)
                  target_logit[i] = logits[i * nb + targets[i] - n0];
            },
            [](int64_t, int64_t, const scalar_t*, const scalar_t*) {});
        for (int64_t i = 0; i < qb; ++i) {
          lsep[b * Q + q0 + i] = softmax.logsumexp(i);
          lossp[b * Q + q0 + i] = lsep[b * Q + q0 + i] - target_logit[i];
        }
      });
    });
  });
  return {loss, lse};
}

// Fills block.W for the tile of keys n0 .. n0 + nb with d loss / d s, from
// the similarities S (leading dimension lds), and adds to grad_scale; the
// first tile sets each row's center (scale_gradient_center).
// g is d loss / d loss_row; arrays are offset to the block's first row.
template <typename Block, typename T>
void cross_entropy_tile_grad(Block& block, int64_t n0, int64_t nb, const T* S, int64_t lds, const T* scale,
                             const T* g, const T* lse, const int64_t* target, T* center, T* gscale) {
  for (int64_t i = 0; i < block.qb; ++i) {
    const T* s = S + i * lds;
    T* w = block.W.data() + i * nb;
    if (n0 == 0) center[i] = scale_gradient_center(s, nb, scale[i]);
    // d loss / d logit = g * (softmax - one_hot(target)); w is that times the scale.
    T gscale_acc = g[i] * run_loop<SoftmaxGradRow>(w, s, nb, scale[i], lse[i], g[i] * scale[i], center[i]);
    const int64_t t = target[i] - n0;
    if (t >= 0 && t < nb) {
      gscale_acc -= g[i] * (s[t] - center[i]);
      w[t] -= g[i] * scale[i];
    }
    gscale[i] += gscale_acc;
  }
}

// The targets of a block of queries, checked.
template <typename Block>
const int64_t* checked_targets(const SimilarityOperands& o, const Block& block) {
  const int64_t* t = o.target.const_data_ptr<int64_t>() + block.row;
  for (int64_t i = 0; i < block.qb; ++i) check_target_value(t[i], block.b, block.q0 + i, block.N);
  return t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> similarity_cross_entropy_backward(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& target_in,
    const at::Tensor& scale_in, const at::Tensor& lse_in, c10::string_view metric) {
  const SimilarityOperands o =
      cross_entropy_backward_operands(grad_in, x_in, y_in, target_in, scale_in, lse_in, metric);
  at::Tensor gscale = at::zeros_like(o.scale);
  auto g = similarity_backward(o, {}, [&](auto& block) {
    using T = typename std::decay_t<decltype(block)>::Scalar;
    const int64_t* target = checked_targets(o, block);
    T center[kQueryBlock];
    for (int64_t n0 = 0; n0 < block.N; n0 += kKeyBlock) {
      const int64_t nb = std::min(kKeyBlock, block.N - n0);
      const T* S = block.similarities(n0, nb);
      cross_entropy_tile_grad(block, n0, nb, S, nb, o.scale.const_data_ptr<T>() + block.row,
                              o.grad.const_data_ptr<T>() + block.row, o.lse.const_data_ptr<T>() + block.row,
                              target, center, gscale.mutable_data_ptr<T>() + block.row);
      block.apply(n0, nb, S, nb);
    }
  });
  return {g.gx, g.gy, gscale};
}

// The most similarities the fused op keeps per thread.
constexpr int64_t kFusedBufferValues = int64_t(1) << 22;

// Forward and gradient at once, for a loss that is weight * the sum of the
// per-query losses of each task: per task loss [B], and its gradients. The
// similarities of a block of queries to all keys are computed once, kept in a
// [block, N] buffer per thread (at most 4M values: blocks of fewer queries for
// many keys), and used for the log-sum-exp and the gradient: one matrix
// product fewer than forward and backward apart.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> similarity_cross_entropy_with_grad(
    const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& target_in, const at::Tensor& scale_in,
    c10::string_view metric, double weight) {
  const SimilarityOperands o = cross_entropy_operands(x_in, y_in, target_in, scale_in, metric);
  at::Tensor row_loss = at::empty_like(o.scale), gscale = at::zeros_like(o.scale);
  auto g = similarity_backward(
      o, {},
      [&](auto& block) {
        using T = typename std::decay_t<decltype(block)>::Scalar;
        const int64_t N = block.N;
        const int64_t* target = checked_targets(o, block);
        const T* sc = o.scale.const_data_ptr<T>() + block.row;
        std::vector<T> S(block.qb * N);
        block.similarities_into(0, N, S.data(), N);
        T lse[kQueryBlock], g[kQueryBlock], center[kQueryBlock];
        T* loss = row_loss.mutable_data_ptr<T>() + block.row;
        for (int64_t i = 0; i < block.qb; ++i) {
          const T* s = S.data() + i * N;
          lse[i] = run_loop<ScaledLogSumExp>(s, N, sc[i]);
          loss[i] = lse[i] - sc[i] * s[target[i]];
          g[i] = T(weight);
        }
        for (int64_t n0 = 0; n0 < N; n0 += kKeyBlock) {
          const int64_t nb = std::min(kKeyBlock, N - n0);
          cross_entropy_tile_grad(block, n0, nb, S.data() + n0, N, sc, static_cast<const T*>(g),
                                  static_cast<const T*>(lse), target, center,
                                  gscale.mutable_data_ptr<T>() + block.row);
          block.apply(n0, nb, S.data() + n0, N);
        }
      },
      std::max<int64_t>(1, kFusedBufferValues / std::max<int64_t>(o.N, 1)));
  return {row_loss.sum(1).mul_(weight), g.gx, g.gy, gscale};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("similarity_cross_entropy", &similarity_cross_entropy);
  m.impl("similarity_cross_entropy_backward", &similarity_cross_entropy_backward);
  m.impl("similarity_cross_entropy_with_grad", &similarity_cross_entropy_with_grad);
}

}  // namespace fastmeta::cpu
