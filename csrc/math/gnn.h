// Per-element math of the few-shot GNN adjacency (Garcia & Bruna 2018),
// written once for the CPU and CUDA kernels.
//
// For the nodes x [n, F] of an episode, the adjacency is
//   A[i, j] = softmax_{j != i}(mlp(|x_i - x_j|)),  A[i, i] = 0,
// where mlp is linear layers with leaky ReLU between them and one output.
// mlp(|x_i - x_j|) is symmetric in (i, j), so the kernels evaluate it once
// per unordered pair i < j: pair p of an episode of n nodes is (i, j) in
// row-major order of the upper triangle. With last_row, only the last row
// of A is computed (the other rows are 0).
#pragma once

#include "common.h"

namespace fastmeta {

template <typename T>
FASTMETA_HOST_DEVICE T leaky_relu(T v, T slope) {
  return v > T(0) ? v : v * slope;
}

// d leaky_relu / d input, from the output (the same sign for slope >= 0).
template <typename T>
FASTMETA_HOST_DEVICE T leaky_relu_grad(T out, T slope) {
  return out > T(0) ? T(1) : slope;
}

// The d / d x_i factor of |x_i - x_j|: sign(x_i - x_j), 0 where equal (as
// torch.abs's gradient).
template <typename T>
FASTMETA_HOST_DEVICE T abs_diff_grad(T xi, T xj) {
  return xi > xj ? T(1) : (xi < xj ? T(-1) : T(0));
}

// The unordered pair (i, j), i < j, of index p among an episode's n (n - 1) / 2.
FASTMETA_HOST_DEVICE void pair_of(int64_t p, int64_t n, int64_t& i, int64_t& j) {
  // Row i holds n - 1 - i pairs; rows before i hold i (2n - i - 1) / 2.
  i = 0;
  int64_t start = 0;
  while (start + (n - 1 - i) <= p) {
    start += n - 1 - i;
    ++i;
  }
  j = i + 1 + (p - start);
}

// An episode's pairs: every unordered pair, or with last_row only the last
// node's n - 1 pairs (i, n - 1), i < n - 1, for models that read only the
// last node's row of the adjacency.
FASTMETA_HOST_DEVICE int64_t pairs_per_episode(int64_t n, bool last_row) {
  if (n < 2) return 0;
  return last_row ? n - 1 : n * (n - 1) / 2;
}

FASTMETA_HOST_DEVICE void episode_pair(int64_t p, int64_t n, bool last_row, int64_t& i, int64_t& j) {
  if (last_row) {
    i = p, j = n - 1;
  } else {
    pair_of(p, n, i, j);
  }
}

// Row i of the adjacency from its logits (diagonal excluded), in place:
// softmax over j != i, 0 at j = i. A row of one node is 0, and with
// last_row every row but the last.
template <typename T>
FASTMETA_HOST_DEVICE void adjacency_row(T* row, int64_t i, int64_t n, bool last_row) {
  if (last_row && i != n - 1) {
    for (int64_t j = 0; j < n; ++j) row[j] = T(0);
    return;
  }
  T top = -INFINITY;
  for (int64_t j = 0; j < n; ++j)
    if (j != i) top = row[j] > top ? row[j] : top;
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    row[j] = j == i ? T(0) : exp_fast(row[j] - top);
    sum += row[j];
  }
  for (int64_t j = 0; j < n; ++j) row[j] = j == i ? T(0) : row[j] / sum;
}

// d loss / d logits of row i, in place over grad: A (g - sum_k A_k g_k);
// 0 for the rows adjacency_row sets to 0 with last_row.
template <typename T>
FASTMETA_HOST_DEVICE void adjacency_row_backward(const T* a, T* grad, int64_t i, int64_t n, bool last_row) {
  if (last_row && i != n - 1) {
    for (int64_t j = 0; j < n; ++j) grad[j] = T(0);
    return;
  }
  T dot = 0;
  for (int64_t j = 0; j < n; ++j) dot += a[j] * grad[j];
  for (int64_t j = 0; j < n; ++j) grad[j] = a[j] * (grad[j] - dot);
}

}  // namespace fastmeta
