// csrc/cuda/gnn_adjacency.cu under emulation: the pair list, differences,
// scatter of the pair logits, row softmax and its backward, pair gradients
// and the differences' backward (atomics), over tiles of pairs as the glue
// runs them, with a linear layer standing in for the pair MLP (the glue's
// cuBLAS products are not emulated), against direct loops in double.
#include "harness.h"

using namespace harness;
namespace fc = fastmeta::cuda;

template <typename T>
void run(int64_t B, int64_t n, int64_t F, bool last_row, int64_t tile) {
  const std::string where = std::string(name_of<T>()) + " B=" + std::to_string(B) +
                            " n=" + std::to_string(n) + " F=" + std::to_string(F) +
                            (last_row ? " last_row" : "") + " tile=" + std::to_string(tile);
  auto nodes = held<T>(normal(B * n * F)), w = held<T>(normal(F)), upstream = held<T>(normal(B * n * n));
  if (n > 2) nodes[F + 1] = nodes[1];  // a tie: |x_i - x_j| has gradient 0 there
  const fc::GnnArgs a{dtype_of<T>(), B, n, F, last_row};
  const int64_t per_episode = n < 2 ? 0 : (last_row ? n - 1 : n * (n - 1) / 2), total = B * per_episode;

  // Reference: logits w . |x_i - x_j|, row softmax over j != i, the gradient
  // of sum(upstream * A) with respect to the nodes.
  std::vector<double> adjacency(B * n * n, 0), grad_nodes(B * n * F, 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < n; ++i) {
      if (n < 2 || (last_row && i != n - 1)) continue;
      std::vector<double> logit(n, -INFINITY);
      double top = -INFINITY, sum = 0, dot = 0;
      for (int64_t j = 0; j < n; ++j) {
        if (j == i) continue;
        logit[j] = 0;
        for (int64_t c = 0; c < F; ++c)
          logit[j] += w[c] * std::fabs(nodes[(b * n + i) * F + c] - nodes[(b * n + j) * F + c]);
        top = std::max(top, logit[j]);
      }
      for (int64_t j = 0; j < n; ++j) sum += j == i ? 0 : std::exp(logit[j] - top);
      double* row = &adjacency[(b * n + i) * n];
      for (int64_t j = 0; j < n; ++j) row[j] = j == i ? 0 : std::exp(logit[j] - top) / sum;
      for (int64_t j = 0; j < n; ++j) dot += row[j] * upstream[(b * n + i) * n + j];
      for (int64_t j = 0; j < n; ++j) {
        if (j == i) continue;
        const double dlogit = row[j] * (upstream[(b * n + i) * n + j] - dot);
        for (int64_t c = 0; c < F; ++c) {
          const double xi = nodes[(b * n + i) * F + c], xj = nodes[(b * n + j) * F + c];
          const double sign = xi > xj ? 1 : (xi < xj ? -1 : 0);
          grad_nodes[(b * n + i) * F + c] += dlogit * w[c] * sign;
          grad_nodes[(b * n + j) * F + c] -= dlogit * w[c] * sign;
        }
      }
    }

  // The kernels, tile by tile as the glue calls them.
  std::vector<T> node_values = as<T>(nodes), logits(B * n * n, T(0)), grad_logits = as<T>(upstream);
  std::vector<T> got_grad_nodes(B * n * F, T(0));
  std::vector<int64_t> all_pairs;
  for (int64_t first = 0; first < total; first += tile) {
    const int64_t count = std::min(tile, total - first);
    std::vector<int64_t> pairs(3 * count, -1);
    std::vector<T> diff(count * F, T(-7)), tile_logits(count);
    fc::gnn_pairs(a, first, count, pairs.data(), nullptr);
    fc::gnn_pair_differences(a, node_values.data(), pairs.data(), count, diff.data(), nullptr);
    for (int64_t r = 0; r < count; ++r) {
      tile_logits[r] = 0;
      for (int64_t c = 0; c < F; ++c) tile_logits[r] += T(w[c]) * diff[r * F + c];
    }
    fc::gnn_scatter_logits(a, tile_logits.data(), pairs.data(), count, logits.data(), nullptr);
    all_pairs.insert(all_pairs.end(), pairs.begin(), pairs.end());
  }
  fc::gnn_adjacency_rows(a, logits.data(), nullptr);
  const double tol = tolerance<T>() * 10;
  compare(logits, adjacency, tol, tol, where + " adjacency");
  fc::gnn_adjacency_rows_backward(a, logits.data(), grad_logits.data(), nullptr);
  for (int64_t first = 0; first < total; first += tile) {
    const int64_t count = std::min(tile, total - first);
    const int64_t* pairs = all_pairs.data() + 3 * first;
    std::vector<T> pair_grad(count), grad_diff(count * F);
    fc::gnn_pair_grads(a, grad_logits.data(), pairs, count, pair_grad.data(), nullptr);
    for (int64_t r = 0; r < count; ++r)
      for (int64_t c = 0; c < F; ++c) grad_diff[r * F + c] = pair_grad[r] * T(w[c]);
    fc::gnn_pair_differences_backward(a, grad_diff.data(), node_values.data(), pairs, count,
                                      got_grad_nodes.data(), nullptr);
  }
  compare(got_grad_nodes, grad_nodes, tol, tol, where + " grad nodes");
}

int main() {
  for (bool last_row : {false, true}) {
    // No pairs (one node), one pair, odd sizes in one tile, many tiles and a partial one.
    run<float>(2, 1, 3, last_row, 64);
    run<double>(1, 2, 1, last_row, 64);
    run<float>(3, 9, 17, last_row, 1000);
    run<double>(3, 9, 17, last_row, 1000);
    run<float>(2, 20, 5, last_row, 37);
    run<double>(2, 20, 5, last_row, 300);
  }
  return finish("gnn_adjacency");
}
