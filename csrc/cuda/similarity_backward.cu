// CUDA kernels of the similarity ops' backwards (pairwise_distance,
// similarity_log_softmax, similarity_cross_entropy, attention_readout): one
// kernel over blocks of queries, one over blocks of keys, specialised per op
// (helpers in similarity_kernels.cuh).
#include "similarity_kernels.cuh"

namespace fastmeta::cuda {
namespace {

// d loss / d logit of the pair (query q, key n) with similarity s, and the
// softmax probability p where the op has one.
template <SimilarityOp OP, typename T, typename A>
__device__ __forceinline__ A pair_dlogit(const SimilarityArgs& a, const SimilarityGrads& g, int64_t b,
                                         int64_t q, int64_t n, A s, A sc, A& p) {
  const int64_t row = b * a.Q + q;
  const T* grad = static_cast<const T*>(g.grad);
  if constexpr (OP == SimilarityOp::PairwiseDistance) {
    p = 0;
    return -to_acc(grad[row * a.N + n]);  // d distance = -d s
  } else if constexpr (OP == SimilarityOp::LogSoftmax) {
    p = exp_acc(static_cast<const A*>(g.out)[row * a.N + n]);
    return to_acc(grad[row * a.N + n]) - p * static_cast<const A*>(g.row_weight)[row];
  } else if constexpr (OP == SimilarityOp::CrossEntropy) {
    FASTMETA_DEVICE_ASSERT(a.target[row] >= 0 && a.target[row] < a.N &&
                           "similarity_cross_entropy: a target is out of range");
    p = exp_acc(sc * s - static_cast<const A*>(g.lse)[row]);
    return to_acc(grad[row]) * (p - (n == a.target[row] ? A(1) : A(0)));
  } else {
    p = exp_acc(sc * s - static_cast<const A*>(g.lse)[row]);
    const T* values = static_cast<const T*>(a.values) + (b * a.N + n) * a.V;
    A dp = 0;
    for (int64_t v = 0; v < a.V; ++v) dp += to_acc(grad[row * a.V + v]) * to_acc(values[v]);
    return p * (dp - static_cast<const A*>(g.row_weight)[row]);
  }
}

// KEY_SIDE = false: blocks of queries, accumulating grad_x and grad_scale;
// KEY_SIDE = true: blocks of keys, accumulating grad_y and grad_values.
template <SimilarityOp OP, Metric M, typename T, bool KEY_SIDE>
__global__ void __launch_bounds__(kThreads) similarity_backward_kernel(SimilarityArgs a, SimilarityGrads g) {
  using A = acc_t<T>;
  __shared__ TileStorage<A> smem;
  __shared__ A probs[kRows][kCols + 1];
  const int r = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const int64_t own_count = KEY_SIDE ? a.N : a.Q, other_count = KEY_SIDE ? a.Q : a.N;
  const int64_t blocks = (own_count + kRows - 1) / kRows;
  const int64_t b = blockIdx.x / blocks, r0 = (blockIdx.x % blocks) * int64_t(kRows), own = r0 + r;
  const bool valid_own = own < own_count;
  const T* x = static_cast<const T*>(a.x) + b * a.Q * a.D;
  const T* y = static_cast<const T*>(a.y) + b * a.N * a.D;
  const T* own_rows = KEY_SIDE ? y : x;
  const T* other_rows = KEY_SIDE ? x : y;
  const A* x_stat = static_cast<const A*>(a.x_stat) + b * a.Q;
  const A* y_stat = static_cast<const A*>(a.y_stat) + b * a.N;
  A stat_grad = 0, scale_grad = 0;
  A* grad_own = static_cast<A*>(KEY_SIDE ? g.grad_y : g.grad_x) + (b * own_count + own) * a.D;

  for (int64_t c0 = 0; c0 < other_count; c0 += kCols) {
    A dots[kColsPerThread];
    dot_tile(own_rows, own_count, r0, other_rows, other_count, c0, a.D, smem, dots);
    for (int i = 0; i < kColsPerThread; ++i) {
      const int c = lane + kLanes * i;
      const int64_t other = c0 + c;
      A weight = 0, p = 0;
      if (valid_own && other < other_count) {
        const int64_t q = KEY_SIDE ? other : own, n = KEY_SIDE ? own : other;
        const A ax = x_stat[q], ay = y_stat[n];
        const A s = similarity<M>(dots[i], ax, ay);
        const A sc =
            OP == SimilarityOp::PairwiseDistance ? A(1) : to_acc(static_cast<const T*>(a.scale)[b * a.Q + q]);
        const A dlogit = pair_dlogit<OP, T, A>(a, g, b, q, n, s, sc, p);
        const A w = dlogit * sc;  // d loss / d s
        const SimilarityPartials<A> partials = similarity_partials<M>(s, ax, ay);
        stat_grad += w * (KEY_SIDE ? partials.d_ay : partials.d_ax);
        scale_grad += dlogit * s;
        weight = w * partials.d_dot;
      }
      smem.weights[r][c] = weight;
      if constexpr (KEY_SIDE && OP == SimilarityOp::AttentionReadout) probs[r][c] = p;
    }
    __syncthreads();
    accumulate_weighted_rows(smem, other_rows, other_count, c0, a.D, grad_own, valid_own);
    if constexpr (KEY_SIDE && OP == SimilarityOp::AttentionReadout) {
      __syncthreads();
      for (int i = 0; i < kColsPerThread; ++i)
        smem.weights[r][lane + kLanes * i] = probs[r][lane + kLanes * i];
      __syncthreads();
      accumulate_weighted_rows(smem, static_cast<const T*>(g.grad) + b * a.Q * a.V, a.Q, c0, a.V,
                               static_cast<A*>(g.grad_values) + (b * a.N + own) * a.V, valid_own);
    }
    __syncthreads();
  }
  stat_grad = group_sum(stat_grad);
  scale_grad = group_sum(scale_grad);
  if (!valid_own) return;
  const A coeff = (KEY_SIDE ? static_cast<const A*>(a.y_coeff) + b * a.N
                            : static_cast<const A*>(a.x_coeff) + b * a.Q)[own];
  // Skipped where the factor is 0, as on the CPU: an infinite entry would
  // otherwise turn 0 * inf into NaN.
  const A factor = coeff * stat_grad;
  if (factor != A(0))
    for (int64_t d = lane; d < a.D; d += kLanes) grad_own[d] += factor * to_acc(own_rows[own * a.D + d]);
  if (!KEY_SIDE && OP != SimilarityOp::PairwiseDistance && lane == 0)
    static_cast<A*>(g.grad_scale)[b * a.Q + own] = scale_grad;
}

template <SimilarityOp OP>
void launch_similarity_backward(const SimilarityArgs& a, const SimilarityGrads& g, cudaStream_t stream) {
  if (a.B == 0) return;
  FASTMETA_DISPATCH_DTYPE(a.dtype, [&] {
    FASTMETA_DISPATCH_METRIC(a.metric, [&] {
      if (a.Q > 0) {
        similarity_backward_kernel<OP, M, T, false>
            <<<grid_blocks((a.Q + kRows - 1) / kRows * a.B), kThreads, 0, stream>>>(a, g);
        check_launch("similarity_backward (queries)");
      }
      if (a.N > 0) {
        similarity_backward_kernel<OP, M, T, true>
            <<<grid_blocks((a.N + kRows - 1) / kRows * a.B), kThreads, 0, stream>>>(a, g);
        check_launch("similarity_backward (keys)");
      }
    });
  });
}

}  // namespace

void similarity_backward(SimilarityOp op, const SimilarityArgs& a, const SimilarityGrads& g,
                         cudaStream_t stream) {
  switch (op) {
    case SimilarityOp::PairwiseDistance:
      return launch_similarity_backward<SimilarityOp::PairwiseDistance>(a, g, stream);
    case SimilarityOp::LogSoftmax:
      return launch_similarity_backward<SimilarityOp::LogSoftmax>(a, g, stream);
    case SimilarityOp::CrossEntropy:
      return launch_similarity_backward<SimilarityOp::CrossEntropy>(a, g, stream);
    case SimilarityOp::AttentionReadout:
      return launch_similarity_backward<SimilarityOp::AttentionReadout>(a, g, stream);
  }
}

}  // namespace fastmeta::cuda
