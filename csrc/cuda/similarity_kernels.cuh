// Device code shared by the similarity kernels (similarity_forward.cu,
// similarity_backward.cu), the kernels of pairwise_distance,
// similarity_log_softmax, similarity_cross_entropy and attention_readout.
//
// A block owns kRows rows of one task (queries; keys in the key-side
// backward), kLanes threads per row, and walks over the other side in tiles of
// kCols rows. Each tile of dot products is built from feature chunks staged
// in shared memory; per-row reductions over a tile are shuffles within the
// row's kLanes threads, so the logits never leave registers: nothing of size
// [B, Q, N] is allocated unless the op returns it.
#pragma once

#include <cmath>

#include "../math/metric.h"
#include "cuda_common.cuh"

namespace fastmeta::cuda {

constexpr int kRows = 32;
constexpr int kLanes = 4;
constexpr int kCols = 32;
constexpr int kChunk = 32;
constexpr int kThreads = kRows * kLanes;
constexpr int kColsPerThread = kCols / kLanes;

// max(a, b) where NaN wins, so that a row with a NaN logit has NaN results
// (as on the CPU and in PyTorch) rather than weights of 0.
template <typename A>
__device__ __forceinline__ A nan_max(A a, A b) {
  return (a > b || a != a) ? a : b;
}

template <typename A>
__device__ __forceinline__ A group_max(A v) {
  for (int offset = kLanes / 2; offset > 0; offset >>= 1)
    v = nan_max(__shfl_xor_sync(0xffffffffu, v, offset, kLanes), v);
  return v;
}

template <typename A>
__device__ __forceinline__ A group_sum(A v) {
  for (int offset = kLanes / 2; offset > 0; offset >>= 1)
    v += __shfl_xor_sync(0xffffffffu, v, offset, kLanes);
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
// [num_rows, D] and `cols` [num_cols, D]; out-of-range entries are 0. Each
// dot product is one chain of fused multiply-adds over d = 0, 1, ..., D - 1,
// the order in which the row statistics sum |v|^2, so that a row's distance
// to itself is exactly 0.
template <typename T, typename A>
__device__ void dot_tile(const T* rows, int64_t num_rows, int64_t r0, const T* cols, int64_t num_cols,
                         int64_t c0, int64_t D, TileStorage<A>& smem, A (&dots)[kColsPerThread]) {
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
      for (int i = 0; i < kColsPerThread; ++i) dots[i] = fma(v, smem.cols[lane + kLanes * i][dd], dots[i]);
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

}  // namespace fastmeta::cuda
