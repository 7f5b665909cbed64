// CPU kernels of fastmeta::attention_readout, softmax(scale * s(x, y)) @ values,
// and its backward: online softmax over tiles of keys, no [B, Q, N] buffer.
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../operands/metric.h"
#include "similarity_tiles.h"

namespace fastmeta::cpu {
namespace {

// This op's tiles are transposed, [keys, queries] (similarity_tiles.h): its
// per-query quantities (scale, running maximum and sum) are vectors.

// Logits of a transposed tile L [nb, qb] (L[j, i] = scale_i * s(x_i, y_j),
// from x_i . y_j on entry) and the online softmax's step over it: the logits
// become the weights exp(logit - running maximum), the running maximum and
// sum of each query move on, and rescale[i] gets the factor by which what
// earlier tiles added must be multiplied. NaN logits are skipped by the
// maximum and reach the sum; a query with no finite logit yet gets weights 0.
template <Metric M>
struct SoftmaxColumns {
  template <typename T>
  FASTMETA_INLINE static void run(T* L, int64_t nb, int64_t qb, const T* ax, const T* ay, const T* scale,
                                  T* max, T* sum, T* rescale) {
    constexpr T kNoLogit = -std::numeric_limits<T>::infinity();
    T* tile_max = rescale;
    for (int64_t i = 0; i < qb; ++i) tile_max[i] = kNoLogit;
    for (int64_t j = 0; j < nb; ++j)
      for (int64_t i = 0; i < qb; ++i) {
        T& logit = L[j * qb + i];
        logit = scale[i] * similarity<M>(logit, ax[i], ay[j]);
        tile_max[i] = logit > tile_max[i] ? logit : tile_max[i];
      }
    for (int64_t i = 0; i < qb; ++i) {
      const T new_max = tile_max[i] > max[i] ? tile_max[i] : max[i];
      rescale[i] = new_max == kNoLogit ? T(1) : exp_fast(max[i] - new_max);
      max[i] = new_max;
      sum[i] *= rescale[i];
    }
    for (int64_t j = 0; j < nb; ++j)
      for (int64_t i = 0; i < qb; ++i) {
        T& weight = L[j * qb + i];
        weight = max[i] == kNoLogit ? T(0) : exp_fast(weight - max[i]);
        sum[i] += weight;
      }
  }
};

std::tuple<at::Tensor, at::Tensor> attention_readout(const at::Tensor& x_in, const at::Tensor& y_in,
                                                     const at::Tensor& values_in, const at::Tensor& scale_in,
                                                     c10::string_view metric) {
  const SimilarityOperands o = readout_operands(x_in, y_in, values_in, scale_in, metric);
  const at::Tensor &x = o.x, &y = o.y, &scale = o.scale, &values = o.values;
  const int64_t B = o.B, Q = o.Q, N = o.N, D = o.D, V = o.V;
  at::Tensor out = N == 0 ? at::zeros({B, Q, V}, x.options()) : at::empty({B, Q, V}, x.options());
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
        scalar_t ax[kQueryBlock], max[kQueryBlock], sum[kQueryBlock], rescale[kQueryBlock];
        std::fill(max, max + qb, -std::numeric_limits<scalar_t>::infinity());
        std::fill(sum, sum + qb, scalar_t(0));
        std::vector<scalar_t> tile(std::min(N, kKeyBlock) * qb);
        for (int64_t n0 = 0; n0 < N; n0 += kKeyBlock) {
          const int64_t nb = std::min(kKeyBlock, N - n0);
          query_dots<M>(xb, qb, yp + (b * N + n0) * D, nb, D, tile.data(), qb, true, n0 == 0 ? ax : nullptr);
          run_loop<SoftmaxColumns<M>>(tile.data(), nb, qb, static_cast<const scalar_t*>(ax),
                                      static_cast<const scalar_t*>(ay + b * N + n0), sp + b * Q + q0, max,
                                      sum, rescale);
          for (int64_t i = 0; i < qb && n0 > 0; ++i)
            if (rescale[i] != scalar_t(1)) run_loop<Scale>(ob + i * V, V, rescale[i]);
          gemm(true, false, qb, V, nb, static_cast<const scalar_t*>(tile.data()), qb, vp + (b * N + n0) * V,
               V, scalar_t(n0 == 0 ? 0 : 1), ob, V);
        }
        for (int64_t i = 0; i < qb; ++i) {
          lsep[b * Q + q0 + i] = max[i] + std::log(sum[i]);
          if (N > 0) run_loop<Scale>(ob + i * V, V, scalar_t(1) / sum[i]);
        }
      });
    });
  });
  return {out, lse};
}

// The scale's gradient centers of a transposed tile S [nb, qb] (the first
// of each query): scale_gradient_center for each column.
struct GradientCenterColumns {
  template <typename T>
  FASTMETA_INLINE static void run(const T* S, int64_t nb, int64_t qb, const T* scale, T* center) {
    T best[kQueryBlock];
    for (int64_t i = 0; i < qb; ++i) {
      best[i] = scale[i] * S[i];
      center[i] = S[i];
    }
    for (int64_t j = 1; j < nb; ++j)
      for (int64_t i = 0; i < qb; ++i) {
        const T logit = scale[i] * S[j * qb + i];
        center[i] = logit > best[i] ? S[j * qb + i] : center[i];
        best[i] = logit > best[i] ? logit : best[i];
      }
    for (int64_t i = 0; i < qb; ++i)
      center[i] = std::abs(center[i]) <= std::numeric_limits<T>::max() ? center[i] : T(0);
  }
};

// P[j, i] = exp(scale_i * S[j, i] - lse_i): the softmax weights of a
// transposed tile.
struct ProbabilityColumns {
  template <typename T>
  FASTMETA_INLINE static void run(T* P, const T* S, int64_t nb, int64_t qb, const T* scale, const T* lse) {
    for (int64_t j = 0; j < nb; ++j)
      for (int64_t i = 0; i < qb; ++i) P[j * qb + i] = exp_fast(scale[i] * S[j * qb + i] - lse[i]);
  }
};

// With W [nb, qb] holding d loss / d P on entry: W becomes d loss / d s,
// scale_i * P (W - grad . out_i), and gscale_i gets sum_j of
// P (W - grad . out_i) (S - center_i).
struct ReadoutGradColumns {
  template <typename T>
  FASTMETA_INLINE static void run(T* W, const T* P, const T* S, int64_t nb, int64_t qb, const T* scale,
                                  const T* grad_dot_out, const T* center, T* gscale) {
    for (int64_t j = 0; j < nb; ++j)
      for (int64_t i = 0; i < qb; ++i) {
        const T w = P[j * qb + i] * (W[j * qb + i] - grad_dot_out[i]);
        gscale[i] += w * (S[j * qb + i] - center[i]);
        W[j * qb + i] = w * scale[i];
      }
  }
};

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
    const int64_t qb = block.qb;
    const T* sc = scale.const_data_ptr<T>() + block.row;
    const T* row_lse = lse.const_data_ptr<T>() + block.row;
    const T* grad_rows = grad.const_data_ptr<T>() + block.row * V;
    const T* task_values = values.const_data_ptr<T>() + block.b * N * V;
    T* gsc = gscale.mutable_data_ptr<T>() + block.row;
    T grad_dot_out[kQueryBlock], center[kQueryBlock];
    for (int64_t i = 0; i < qb; ++i)
      grad_dot_out[i] = row_dot(grad_rows + i * V, out.const_data_ptr<T>() + (block.row + i) * V, V);
    std::vector<T> P(block.S.size());
    for (int64_t n0 = 0; n0 < N; n0 += kKeyBlock) {
      const int64_t nb = std::min(kKeyBlock, N - n0);
      const T* S = block.similarities_transposed(n0, nb);
      if (n0 == 0) run_loop<GradientCenterColumns>(S, nb, qb, sc, static_cast<T*>(center));
      run_loop<ProbabilityColumns>(P.data(), S, nb, qb, sc, row_lse);
      // W = d loss / d P = values_tile @ grad^T; values get P @ grad.
      gemm_abt(nb, qb, V, task_values + n0 * V, V, grad_rows, V, block.W.data(), qb);
      gemm(false, false, nb, V, qb, static_cast<const T*>(P.data()), qb, grad_rows, V, T(1),
           block.key_rows[2] + n0 * V, V);
      run_loop<ReadoutGradColumns>(block.W.data(), static_cast<const T*>(P.data()), S, nb, qb, sc,
                                   static_cast<const T*>(grad_dot_out), static_cast<const T*>(center), gsc);
      block.apply_transposed(n0, nb, S);
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
