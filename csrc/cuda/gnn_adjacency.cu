// CUDA kernels of fastmeta::gnn_adjacency (math in csrc/math/gnn.h): the
// per-pair and per-row steps around the MLP's matrix products, which the
// glue runs with cuBLAS on one tile of pairs at a time.
#include "cuda_common.cuh"

namespace fastmeta::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void pairs_kernel(GnnArgs a, int64_t first, int64_t count, int64_t* pairs) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= count) return;
  const int64_t per_episode = pairs_per_episode(a.n, a.last_row), p = first + r;
  int64_t i, j;
  episode_pair(p % per_episode, a.n, a.last_row, i, j);
  pairs[3 * r] = p / per_episode, pairs[3 * r + 1] = i, pairs[3 * r + 2] = j;
}

template <typename T>
__global__ void differences_kernel(GnnArgs a, const T* nodes, const int64_t* pairs, int64_t count, T* diff) {
  const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (e >= count * a.F) return;
  const int64_t r = e / a.F, c = e % a.F, b = pairs[3 * r];
  const T xi = nodes[(b * a.n + pairs[3 * r + 1]) * a.F + c];
  const T xj = nodes[(b * a.n + pairs[3 * r + 2]) * a.F + c];
  diff[e] = xi > xj ? xi - xj : xj - xi;
}

template <typename T>
__global__ void scatter_kernel(GnnArgs a, const T* tile, const int64_t* pairs, int64_t count, T* logits) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= count) return;
  const int64_t b = pairs[3 * r], i = pairs[3 * r + 1], j = pairs[3 * r + 2], n = a.n;
  logits[(b * n + i) * n + j] = tile[r];
  logits[(b * n + j) * n + i] = tile[r];
}

template <typename T>
__global__ void rows_kernel(GnnArgs a, T* logits) {
  const int64_t row = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (row >= a.B * a.n) return;
  adjacency_row(logits + row * a.n, row % a.n, a.n, a.last_row);
}

template <typename T>
__global__ void rows_backward_kernel(GnnArgs a, const T* adjacency, T* grad) {
  const int64_t row = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (row >= a.B * a.n) return;
  adjacency_row_backward(adjacency + row * a.n, grad + row * a.n, row % a.n, a.n, a.last_row);
}

template <typename T>
__global__ void pair_grads_kernel(GnnArgs a, const T* grad_logits, const int64_t* pairs, int64_t count,
                                  T* pair_grad) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= count) return;
  const int64_t b = pairs[3 * r], i = pairs[3 * r + 1], j = pairs[3 * r + 2], n = a.n;
  pair_grad[r] = grad_logits[(b * n + i) * n + j] + grad_logits[(b * n + j) * n + i];
}

template <typename T>
__global__ void differences_backward_kernel(GnnArgs a, const T* grad_diff, const T* nodes,
                                            const int64_t* pairs, int64_t count, T* grad_nodes) {
  const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (e >= count * a.F) return;
  const int64_t r = e / a.F, c = e % a.F, b = pairs[3 * r];
  const int64_t at_i = (b * a.n + pairs[3 * r + 1]) * a.F + c;
  const int64_t at_j = (b * a.n + pairs[3 * r + 2]) * a.F + c;
  const T v = grad_diff[e] * abs_diff_grad(nodes[at_i], nodes[at_j]);
  atomicAdd(grad_nodes + at_i, v);
  atomicAdd(grad_nodes + at_j, -v);
}

}  // namespace

void gnn_pairs(const GnnArgs& a, int64_t first, int64_t count, int64_t* pairs, cudaStream_t stream) {
  if (count == 0) return;
  pairs_kernel<<<blocks_for(count, kThreads), kThreads, 0, stream>>>(a, first, count, pairs);
  check_launch("gnn_pairs");
}

void gnn_pair_differences(const GnnArgs& a, const void* nodes, const int64_t* pairs, int64_t count,
                          void* diff, cudaStream_t stream) {
  if (count * a.F == 0) return;
  dispatch_float_or_double(a.dtype, "gnn_adjacency", [&](auto zero) {
    using T = decltype(zero);
    differences_kernel<T><<<blocks_for(count * a.F, kThreads), kThreads, 0, stream>>>(
        a, static_cast<const T*>(nodes), pairs, count, static_cast<T*>(diff));
    check_launch("gnn_pair_differences");
  });
}

void gnn_scatter_logits(const GnnArgs& a, const void* tile_logits, const int64_t* pairs, int64_t count,
                        void* logits, cudaStream_t stream) {
  if (count == 0) return;
  dispatch_float_or_double(a.dtype, "gnn_adjacency", [&](auto zero) {
    using T = decltype(zero);
    scatter_kernel<T><<<blocks_for(count, kThreads), kThreads, 0, stream>>>(
        a, static_cast<const T*>(tile_logits), pairs, count, static_cast<T*>(logits));
    check_launch("gnn_scatter_logits");
  });
}

void gnn_adjacency_rows(const GnnArgs& a, void* logits, cudaStream_t stream) {
  if (a.B * a.n == 0) return;
  dispatch_float_or_double(a.dtype, "gnn_adjacency", [&](auto zero) {
    using T = decltype(zero);
    rows_kernel<T><<<blocks_for(a.B * a.n, kThreads), kThreads, 0, stream>>>(a, static_cast<T*>(logits));
    check_launch("gnn_adjacency_rows");
  });
}

void gnn_adjacency_rows_backward(const GnnArgs& a, const void* adjacency, void* grad, cudaStream_t stream) {
  if (a.B * a.n == 0) return;
  dispatch_float_or_double(a.dtype, "gnn_adjacency", [&](auto zero) {
    using T = decltype(zero);
    rows_backward_kernel<T><<<blocks_for(a.B * a.n, kThreads), kThreads, 0, stream>>>(
        a, static_cast<const T*>(adjacency), static_cast<T*>(grad));
    check_launch("gnn_adjacency_rows_backward");
  });
}

void gnn_pair_grads(const GnnArgs& a, const void* grad_logits, const int64_t* pairs, int64_t count,
                    void* pair_grad, cudaStream_t stream) {
  if (count == 0) return;
  dispatch_float_or_double(a.dtype, "gnn_adjacency", [&](auto zero) {
    using T = decltype(zero);
    pair_grads_kernel<T><<<blocks_for(count, kThreads), kThreads, 0, stream>>>(
        a, static_cast<const T*>(grad_logits), pairs, count, static_cast<T*>(pair_grad));
    check_launch("gnn_pair_grads");
  });
}

void gnn_pair_differences_backward(const GnnArgs& a, const void* grad_diff, const void* nodes,
                                   const int64_t* pairs, int64_t count, void* grad_nodes,
                                   cudaStream_t stream) {
  if (count * a.F == 0) return;
  dispatch_float_or_double(a.dtype, "gnn_adjacency", [&](auto zero) {
    using T = decltype(zero);
    differences_backward_kernel<T><<<blocks_for(count * a.F, kThreads), kThreads, 0, stream>>>(
        a, static_cast<const T*>(grad_diff), static_cast<const T*>(nodes), pairs, count,
        static_cast<T*>(grad_nodes));
    check_launch("gnn_pair_differences_backward");
  });
}

}  // namespace fastmeta::cuda
