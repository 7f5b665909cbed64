// The kernel family behind pairwise_distance, similarity_log_softmax,
// similarity_cross_entropy and attention_readout.
//
// A block owns kRows rows of one task (queries; keys in the key-side
// backward), kLanes threads per row, and walks over the other side in tiles of
// kCols rows. Each tile of dot products is built from feature chunks staged
// in shared memory; per-row reductions over a tile are shuffles within the
// row's kLanes threads, so the logits never leave registers: nothing of size
// [B, Q, N] is allocated unless the op returns it.
#pragma once

#include <cmath>

#include "../math/similarity.h"
#include "cuda_common.cuh"

namespace fastmeta::cuda {

constexpr int kRows = 32;
constexpr int kLanes = 4;
constexpr int kCols = 32;
constexpr int kChunk = 32;
constexpr int kThreads = kRows * kLanes;
constexpr int kColsPerThread = kCols / kLanes;

template <typename A>
__device__ __forceinline__ A group_max(A v) {
  for (int offset = kLanes / 2; offset > 0; offset >>= 1) {
    A other = __shfl_xor_sync(0xffffffffu, v, offset, kLanes);
    v = other > v ? other : v;
  }
  return v;
}

template <typename A>
__device__ __forceinline__ A group_sum(A v) {
  for (int offset = kLanes / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset, kLanes);
  return v;
}

template <typename A>
__device__ __forceinline__ A exp_acc(A v) {
  return exp(v);
}

template <typename A>
struct TileStorage {
  A rows[kRows][kChunk + 1];
  A cols[kCols][kChunk + 1];
  A weights[kRows][kCols + 1];
};

// dots[i] = row(r0 + r) . col(c0 + lane + kLanes * i), for rows of `rows`
// [num_rows, D] and `cols` [num_cols, D]; out-of-range entries are 0.
template <typename T, typename A>
__device__ void dot_tile(const T* rows, int64_t num_rows, int64_t r0, const T* cols,
                         int64_t num_cols, int64_t c0, int64_t D, TileStorage<A>& smem,
                         A (&dots)[kColsPerThread]) {
  const int r = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  for (int i = 0; i < kColsPerThread; ++i) dots[i] = A(0);
  for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
    for (int idx = threadIdx.x; idx < kRows * kChunk; idx += kThreads) {
      const int rr = idx / kChunk, dd = idx % kChunk;
      smem.rows[rr][dd] = (r0 + rr < num_rows && d0 + dd < D) ? to_acc(rows[(r0 + rr) * D + d0 + dd]) : A(0);
    }
    for (int idx = threadIdx.x; idx < kCols * kChunk; idx += kThreads) {
      const int cc = idx / kChunk, dd = idx % kChunk;
      smem.cols[cc][dd] = (c0 + cc < num_cols && d0 + dd < D) ? to_acc(cols[(c0 + cc) * D + d0 + dd]) : A(0);
    }
    __syncthreads();
    for (int dd = 0; dd < kChunk; ++dd) {
      const A v = smem.rows[r][dd];
      for (int i = 0; i < kColsPerThread; ++i) dots[i] += v * smem.cols[lane + kLanes * i][dd];
    }
    __syncthreads();
  }
}

// out[r][j] += sum_c smem.weights[r][c] * other[c0 + c][j] for j = lane, lane + kLanes, ...
template <typename T, typename A>
__device__ void accumulate_weighted_rows(const TileStorage<A>& smem, const T* other, int64_t num_other,
                                         int64_t c0, int64_t width, A* out_row, bool row_valid) {
  const int r = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  if (!row_valid) return;
  const int cols = static_cast<int>(num_other - c0 < kCols ? num_other - c0 : kCols);
  for (int64_t j = lane; j < width; j += kLanes) {
    A acc = 0;
    for (int c = 0; c < cols; ++c) acc += smem.weights[r][c] * to_acc(other[(c0 + c) * width + j]);
    out_row[j] += acc;
  }
}

template <SimilarityOp OP, Metric M, typename T>
__global__ void __launch_bounds__(kThreads)
similarity_forward_kernel(SimilarityArgs a, acc_t<T>* out, acc_t<T>* lse) {
  using A = acc_t<T>;
  __shared__ TileStorage<A> smem;
  const int r = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const int64_t blocks = (a.Q + kRows - 1) / kRows;
  const int64_t b = blockIdx.x / blocks, r0 = (blockIdx.x % blocks) * int64_t(kRows), q = r0 + r;
  const bool valid_q = q < a.Q;
  const int64_t row = b * a.Q + q;
  const T* x = static_cast<const T*>(a.x) + b * a.Q * a.D;
  const T* y = static_cast<const T*>(a.y) + b * a.N * a.D;
  const A* ay = static_cast<const A*>(a.y_stat) + b * a.N;
  const A ax = valid_q ? static_cast<const A*>(a.x_stat)[row] : A(0);
  const A sc = (OP != SimilarityOp::PairwiseDistance && valid_q) ? to_acc(static_cast<const T*>(a.scale)[row]) : A(0);
  const int64_t target = (OP == SimilarityOp::CrossEntropy && valid_q) ? a.target[row] : -1;
  const A neg_inf = -INFINITY;
  A running_max = neg_inf, running_sum = 0, target_logit = 0;

  for (int64_t n0 = 0; n0 < a.N; n0 += kCols) {
    A dots[kColsPerThread];
    dot_tile(x, a.Q, r0, y, a.N, n0, a.D, smem, dots);
    A logits[kColsPerThread];
    A tile_max = neg_inf;
    for (int i = 0; i < kColsPerThread; ++i) {
      const int64_t n = n0 + lane + kLanes * i;
      const bool valid = valid_q && n < a.N;
      const A s = similarity<M>(dots[i], ax, valid ? ay[n] : A(0));
      if constexpr (OP == SimilarityOp::PairwiseDistance) {
        if (valid) out[row * a.N + n] = distance_from_similarity<M>(s);
      } else {
        logits[i] = valid ? sc * s : neg_inf;
        if (n == target) target_logit = logits[i];
        if constexpr (OP == SimilarityOp::LogSoftmax) {
          if (valid) out[row * a.N + n] = logits[i];
        }
        tile_max = logits[i] > tile_max ? logits[i] : tile_max;
      }
    }
    if constexpr (OP != SimilarityOp::PairwiseDistance) {
      tile_max = group_max(tile_max);
      const A new_max = tile_max > running_max ? tile_max : running_max;
      const A rescale = running_max == neg_inf ? A(0) : exp_acc(running_max - new_max);
      A tile_sum = 0;
      for (int i = 0; i < kColsPerThread; ++i) {
        const A p = new_max == neg_inf ? A(0) : exp_acc(logits[i] - new_max);
        tile_sum += p;
        if constexpr (OP == SimilarityOp::AttentionReadout) smem.weights[r][lane + kLanes * i] = p;
      }
      running_sum = running_sum * rescale + group_sum(tile_sum);
      running_max = new_max;
      if constexpr (OP == SimilarityOp::AttentionReadout) {
        __syncthreads();
        A* o = out + row * a.V;
        if (valid_q)
          for (int64_t v = lane; v < a.V; v += kLanes) o[v] *= rescale;
        accumulate_weighted_rows(smem, static_cast<const T*>(a.values) + b * a.N * a.V, a.N, n0,
                                 a.V, o, valid_q);
        __syncthreads();
      }
    }
  }
  if constexpr (OP != SimilarityOp::PairwiseDistance) {
    const A row_lse = running_max + log(running_sum);
    // Only the lane that met the target column holds its logit.
    const A t = group_sum(target_logit);
    if (!valid_q) return;
    if (lane == 0) lse[row] = row_lse;
    if constexpr (OP == SimilarityOp::CrossEntropy) {
      if (lane == 0) out[row] = row_lse - t;
    } else if constexpr (OP == SimilarityOp::LogSoftmax) {
      for (int64_t n = lane; n < a.N; n += kLanes) out[row * a.N + n] -= row_lse;
    } else {
      if (running_sum > A(0))
        for (int64_t v = lane; v < a.V; v += kLanes) out[row * a.V + v] /= running_sum;
    }
  }
}

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
__global__ void __launch_bounds__(kThreads)
similarity_backward_kernel(SimilarityArgs a, SimilarityGrads g) {
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
        const A sc = OP == SimilarityOp::PairwiseDistance ? A(1)
                                                          : to_acc(static_cast<const T*>(a.scale)[b * a.Q + q]);
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
      for (int i = 0; i < kColsPerThread; ++i) smem.weights[r][lane + kLanes * i] = probs[r][lane + kLanes * i];
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
  for (int64_t d = lane; d < a.D; d += kLanes) grad_own[d] += coeff * stat_grad * to_acc(own_rows[own * a.D + d]);
  if (!KEY_SIDE && OP != SimilarityOp::PairwiseDistance && lane == 0)
    static_cast<A*>(g.grad_scale)[b * a.Q + own] = scale_grad;
}

template <SimilarityOp OP>
void launch_similarity_forward(const SimilarityArgs& a, void* out, void* lse, cudaStream_t stream) {
  if (a.B == 0 || a.Q == 0) return;
  FASTMETA_DISPATCH_DTYPE(a.dtype, [&] {
    FASTMETA_DISPATCH_METRIC(a.metric, [&] {
      similarity_forward_kernel<OP, M, T><<<blocks_for(a.Q, kRows) * a.B, kThreads, 0, stream>>>(
          a, static_cast<acc_t<T>*>(out), static_cast<acc_t<T>*>(lse));
      check_launch("similarity_forward");
    });
  });
}

template <SimilarityOp OP>
void launch_similarity_backward(const SimilarityArgs& a, const SimilarityGrads& g, cudaStream_t stream) {
  if (a.B == 0) return;
  FASTMETA_DISPATCH_DTYPE(a.dtype, [&] {
    FASTMETA_DISPATCH_METRIC(a.metric, [&] {
      if (a.Q > 0) {
        similarity_backward_kernel<OP, M, T, false>
            <<<blocks_for(a.Q, kRows) * a.B, kThreads, 0, stream>>>(a, g);
        check_launch("similarity_backward (queries)");
      }
      if (a.N > 0) {
        similarity_backward_kernel<OP, M, T, true>
            <<<blocks_for(a.N, kRows) * a.B, kThreads, 0, stream>>>(a, g);
        check_launch("similarity_backward (keys)");
      }
    });
  });
}

}  // namespace fastmeta::cuda
