// Row statistics and the dispatch of the similarity ops to their kernels
// (instantiated in pairwise_distance.cu, similarity_log_softmax.cu,
// similarity_cross_entropy.cu and attention_readout.cu).
#include "similarity_kernels.cuh"

namespace fastmeta::cuda {

template <SimilarityOp OP>
void launch_similarity_forward(const SimilarityArgs&, void*, void*, cudaStream_t);
template <SimilarityOp OP>
void launch_similarity_backward(const SimilarityArgs&, const SimilarityGrads&, cudaStream_t);

namespace {

constexpr int kWarpsPerBlock = 8;

// One warp per row.
template <Metric M, typename T>
__global__ void row_stats_kernel(const T* v, int64_t rows, int64_t D, acc_t<T>* stat, acc_t<T>* coeff) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  A sum_squares = 0;
  for (int64_t d = lane; d < D; d += 32) {
    const A value = to_acc(v[row * D + d]);
    sum_squares += value * value;
  }
  for (int offset = 16; offset > 0; offset >>= 1) sum_squares += __shfl_xor_sync(0xffffffffu, sum_squares, offset);
  if (lane == 0) {
    stat[row] = row_stat<M>(sum_squares);
    coeff[row] = row_stat_coeff<M>(sum_squares, stat[row]);
  }
}

}  // namespace

void similarity_row_stats(const SimilarityArgs& a, cudaStream_t stream) {
  FASTMETA_DISPATCH_DTYPE(a.dtype, [&] {
    FASTMETA_DISPATCH_METRIC(a.metric, [&] {
      using A = acc_t<T>;
      const std::pair<const void*, int64_t> sides[2] = {{a.x, a.B * a.Q}, {a.y, a.B * a.N}};
      void* stats[2] = {a.x_stat, a.y_stat};
      void* coeffs[2] = {a.x_coeff, a.y_coeff};
      for (int side = 0; side < 2; ++side) {
        const int64_t rows = sides[side].second;
        if (rows == 0) continue;
        row_stats_kernel<M, T><<<blocks_for(rows, kWarpsPerBlock), kWarpsPerBlock * 32, 0, stream>>>(
            static_cast<const T*>(sides[side].first), rows, a.D, static_cast<A*>(stats[side]),
            static_cast<A*>(coeffs[side]));
        check_launch("row_stats");
      }
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

void similarity_backward(SimilarityOp op, const SimilarityArgs& a, const SimilarityGrads& g, cudaStream_t stream) {
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
