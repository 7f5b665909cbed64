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

// One warp per row, x's rows then y's, in one launch.
template <Metric M, typename T>
__global__ void row_stats_kernel(SimilarityArgs a) {
  using A = acc_t<T>;
  const int64_t x_rows = a.B * a.Q;
  int64_t row = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= x_rows + a.B * a.N) return;
  const bool is_x = row < x_rows;
  row = is_x ? row : row - x_rows;
  const T* v = static_cast<const T*>(is_x ? a.x : a.y) + row * a.D;
  A sum_squares = 0;
  for (int64_t d = lane; d < a.D; d += 32) {
    const A value = to_acc(v[d]);
    sum_squares += value * value;
  }
  for (int offset = 16; offset > 0; offset >>= 1) sum_squares += __shfl_xor_sync(0xffffffffu, sum_squares, offset);
  if (lane == 0) {
    A* stat = static_cast<A*>(is_x ? a.x_stat : a.y_stat);
    A* coeff = static_cast<A*>(is_x ? a.x_coeff : a.y_coeff);
    stat[row] = row_stat<M>(sum_squares);
    coeff[row] = row_stat_coeff<M>(sum_squares, stat[row]);
  }
}

}  // namespace

void similarity_row_stats(const SimilarityArgs& a, cudaStream_t stream) {
  const int64_t rows = a.B * (a.Q + a.N);
  if (rows == 0) return;
  FASTMETA_DISPATCH_DTYPE(a.dtype, [&] {
    FASTMETA_DISPATCH_METRIC(a.metric, [&] {
      row_stats_kernel<M, T><<<blocks_for(rows, kWarpsPerBlock), kWarpsPerBlock * 32, 0, stream>>>(a);
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
