// CUDA kernels of the similarity ops' forwards (pairwise_distance,
// similarity_log_softmax, similarity_cross_entropy, attention_readout): the
// row statistics of x and y, then one kernel, specialised per op, that walks
// over tiles of keys with an online softmax (helpers in similarity_kernels.cuh).
#include "similarity_kernels.cuh"

namespace fastmeta::cuda {
namespace {

constexpr int kRowStatThreads = 128;

// One thread per row, x's rows then y's, in one launch. |v|^2 is one chain of
// fused multiply-adds over d = 0, 1, ..., D - 1, the order of dot_tile's dot
// products, so that the distance of a row to itself is exactly 0.
template <Metric M, typename T>
__global__ void row_stats_kernel(SimilarityArgs a) {
  using A = acc_t<T>;
  const int64_t x_rows = a.B * a.Q;
  int64_t row = blockIdx.x * int64_t(kRowStatThreads) + threadIdx.x;
  if (row >= x_rows + a.B * a.N) return;
  const bool is_x = row < x_rows;
  row = is_x ? row : row - x_rows;
  const T* v = static_cast<const T*>(is_x ? a.x : a.y) + row * a.D;
  A sum_squares = 0;
  for (int64_t d = 0; d < a.D; ++d) {
    const A value = to_acc(v[d]);
    sum_squares = fma(value, value, sum_squares);
  }
  {
    A* stat = static_cast<A*>(is_x ? a.x_stat : a.y_stat);
    A* coeff = static_cast<A*>(is_x ? a.x_coeff : a.y_coeff);
    stat[row] = row_stat<M>(sum_squares);
    coeff[row] = row_stat_coeff<M>(sum_squares, stat[row]);
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
  const A sc =
      (OP != SimilarityOp::PairwiseDistance && valid_q) ? to_acc(static_cast<const T*>(a.scale)[row]) : A(0);
  const int64_t target = (OP == SimilarityOp::CrossEntropy && valid_q) ? a.target[row] : -1;
  if (OP == SimilarityOp::CrossEntropy && valid_q)
    FASTMETA_DEVICE_ASSERT(target >= 0 && target < a.N &&
                           "similarity_cross_entropy: a target is out of range");
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
        tile_max = nan_max(logits[i], tile_max);
      }
    }
    if constexpr (OP != SimilarityOp::PairwiseDistance) {
      tile_max = group_max(tile_max);
      const A new_max = nan_max(tile_max, running_max);
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
        accumulate_weighted_rows(smem, static_cast<const T*>(a.values) + b * a.N * a.V, a.N, n0, a.V, o,
                                 valid_q);
        __syncthreads();
      }
    }
  }
  if constexpr (OP != SimilarityOp::PairwiseDistance) {
    // A row whose logits are all -inf has no softmax: NaN, as in PyTorch
    // (the tiles gave its entries weight 0, as they do the padding columns).
    if (running_max == neg_inf && a.N > 0) running_sum = A(NAN);
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
      if (a.N > 0)
        for (int64_t v = lane; v < a.V; v += kLanes) out[row * a.V + v] /= running_sum;
    }
  }
}

template <SimilarityOp OP>
void launch_similarity_forward(const SimilarityArgs& a, void* out, void* lse, cudaStream_t stream) {
  if (a.B == 0 || a.Q == 0) return;
  FASTMETA_DISPATCH_DTYPE(a.dtype, [&] {
    FASTMETA_DISPATCH_METRIC(a.metric, [&] {
      similarity_forward_kernel<OP, M, T>
          <<<grid_blocks((a.Q + kRows - 1) / kRows * a.B), kThreads, 0, stream>>>(
              a, static_cast<acc_t<T>*>(out), static_cast<acc_t<T>*>(lse));
      check_launch("similarity_forward");
    });
  });
}

}  // namespace

void similarity_row_stats(const SimilarityArgs& a, cudaStream_t stream) {
  const int64_t rows = a.B * (a.Q + a.N);
  if (rows == 0) return;
  FASTMETA_DISPATCH_DTYPE(a.dtype, [&] {
    FASTMETA_DISPATCH_METRIC(a.metric, [&] {
      row_stats_kernel<M, T><<<blocks_for(rows, kRowStatThreads), kRowStatThreads, 0, stream>>>(a);
      check_launch("row_stats");
    });
  });
}

void similarity_forward(SimilarityOp op, const SimilarityArgs& a, void* out, void* lse, cudaStream_t stream) {
  switch (op) {
    case SimilarityOp::PairwiseDistance:
      return launch_similarity_forward<SimilarityOp::PairwiseDistance>(a, out, lse, stream);
    case SimilarityOp::LogSoftmax:
      return launch_similarity_forward<SimilarityOp::LogSoftmax>(a, out, lse, stream);
    case SimilarityOp::CrossEntropy:
      return launch_similarity_forward<SimilarityOp::CrossEntropy>(a, out, lse, stream);
    case SimilarityOp::AttentionReadout:
      return launch_similarity_forward<SimilarityOp::AttentionReadout>(a, out, lse, stream);
  }
}

}  // namespace fastmeta::cuda
