// CPU kernels of fastmeta::gnn_adjacency (math in csrc/math/gnn.h): the
// pairwise MLP runs on tiles of unordered pairs (i < j, across episodes; only
// the last node's pairs with last_row), each layer one matrix product on the
// tile, so the [B, n, n, F] differences exist only for one tile at a time;
// the logits of a pair fill both (i, j) and (j, i), then each row takes its
// softmax (with last_row the last row does, and the others are 0). The hidden
// activations go to the kept `hidden` when asked (the backward then reads
// them) and to the tile's scratch otherwise (the backward then recomputes
// each tile). The backward sums the weights' and nodes' gradients per thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <vector>

#include "../math/gnn.h"
#include "../operands/gnn.h"
#include "gemm.h"
#include "row_math.h"

namespace fastmeta::cpu {
namespace {

constexpr int64_t kTilePairs = 128;

// Rows per thread of a pass over the adjacency's rows: small adjacencies (up
// to 2^15 entries) run on one thread.
int64_t row_grain(int64_t n) {
  return std::max<int64_t>(64, (int64_t{1} << 15) / std::max<int64_t>(n, 1));
}

// Pairs per tile: at most kTilePairs, and as many tiles on every thread.
int64_t tile_pairs(int64_t total) {
  if (total == 0) return 1;
  const int64_t threads = at::get_num_threads();
  const int64_t per_thread = (total + threads - 1) / threads;
  const int64_t tiles_per_thread = (per_thread + kTilePairs - 1) / kTilePairs;
  return (per_thread + tiles_per_thread - 1) / tiles_per_thread;
}

// The tiles' loops between the matrix products, compiled for each
// instruction set (row_math.h).

// d = |x_i - x_j|, one pair's row.
struct AbsDifference {
  template <typename T>
  FASTMETA_INLINE static void run(T* d, const T* xi, const T* xj, int64_t F) {
    for (int64_t c = 0; c < F; ++c) d[c] = std::abs(xi[c] - xj[c]);
  }
};

// gi += g sign(x_i - x_j) and gj -= the same, one pair's row.
struct AbsDifferenceBackward {
  template <typename T>
  FASTMETA_INLINE static void run(const T* g, const T* xi, const T* xj, T* __restrict__ gi,
                                  T* __restrict__ gj, int64_t F) {
    for (int64_t c = 0; c < F; ++c) {
      const T v = g[c] * abs_diff_grad(xi[c], xj[c]);
      gi[c] += v;
      gj[c] -= v;
    }
  }
};

// acts [count, out] = leaky_relu(acts + bias).
struct BiasLeakyRelu {
  template <typename T>
  FASTMETA_INLINE static void run(T* acts, const T* bias, int64_t count, int64_t out, T slope) {
    for (int64_t r = 0; r < count; ++r, acts += out)
      for (int64_t c = 0; c < out; ++c) acts[c] = leaky_relu(acts[c] + bias[c], slope);
  }
};

// g [count, out] times leaky_relu's derivative at its outputs acts; the
// columns of g summed into bias_grad.
struct LeakyReluBackward {
  template <typename T>
  FASTMETA_INLINE static void run(T* g, const T* acts, T* __restrict__ bias_grad, int64_t count,
                                  int64_t out, T slope) {
    for (int64_t r = 0; r < count; ++r, g += out, acts += out)
      for (int64_t c = 0; c < out; ++c) {
        g[c] *= leaky_relu_grad(acts[c], slope);
        bias_grad[c] += g[c];
      }
  }
};

// The one-output last layer of a pair with d loss / d output gp: g = gp w
// (d loss / d its input act) and w_grad += gp act.
struct LastLayerBackward {
  template <typename T>
  FASTMETA_INLINE static void run(T* __restrict__ g, T* __restrict__ w_grad, const T* w, const T* act,
                                  T gp, int64_t H) {
    for (int64_t c = 0; c < H; ++c) {
      g[c] = gp * w[c];
      w_grad[c] += gp * act[c];
    }
  }
};

// sum += part.
struct Accumulate {
  template <typename T>
  FASTMETA_INLINE static void run(T* __restrict__ sum, const T* part, int64_t count) {
    for (int64_t e = 0; e < count; ++e) sum[e] += part[e];
  }
};

// The pairs of a tile, (episode, i, j) each, and their |x_i - x_j|.
template <typename T>
struct Tile {
  int64_t count = 0;
  std::vector<int64_t> b, i, j;
  Tile() : b(kTilePairs), i(kTilePairs), j(kTilePairs) {}

  void load(const GnnOperands& o, int64_t first, int64_t size, const T* nodes, T* diff) {
    const int64_t per_episode = pairs_per_episode(o.n, o.last_row), F = o.F;
    count = std::min(size, o.pairs() - first);
    int64_t eb = first / per_episode, ep = first % per_episode, ei, ej;
    episode_pair(ep, o.n, o.last_row, ei, ej);
    for (int64_t r = 0; r < count; ++r) {
      b[r] = eb, i[r] = ei, j[r] = ej;
      run_loop<AbsDifference>(diff + r * F, nodes + (eb * o.n + ei) * F, nodes + (eb * o.n + ej) * F, F);
      if (++ep == per_episode) {  // the next episode's first pair
        ++eb, ep = 0, ei = 0, ej = o.last_row ? o.n - 1 : 1;
      } else if (o.last_row) {
        ++ei;
      } else if (++ej == o.n) {
        ++ei, ej = ei + 1;
      }
    }
  }
};

// The hidden layers on a tile: acts[l] [count, H_l] from acts[l-1]; acts[0]
// holds the differences. Returns the last hidden activations.
template <typename T>
void hidden_layers(const GnnOperands& o, int64_t count, std::vector<T*>& acts, T slope) {
  const int64_t L = o.weights.size();
  for (int64_t l = 1; l < L; ++l) {
    const int64_t in = o.widths[l - 1], out = o.widths[l];
    gemm_abt(count, out, in, acts[l - 1], in, o.weights[l - 1].const_data_ptr<T>(), in, acts[l], out);
    run_loop<BiasLeakyRelu>(acts[l], o.biases[l - 1].const_data_ptr<T>(), count, out, slope);
  }
}

// The scratch of one tile: every layer's activations (only two are needed
// forward, all of them backward) and two gradient buffers. acts[0] holds the
// differences; the hidden layers' acts[l] point at the scratch or, by
// place_in, at the tile's rows of the kept activations.
template <typename T>
struct TileScratch {
  std::unique_ptr<T[]> storage;  // not zero-filled: every value is written before it is read
  std::vector<T*> acts;
  T *grad_a, *grad_b;
  explicit TileScratch(const GnnOperands& o) {
    const int64_t L = o.weights.size();
    int64_t total = 2 * kTilePairs * o.max_width();
    for (int64_t l = 0; l < L; ++l) total += kTilePairs * o.widths[l];
    storage.reset(new T[total]);
    T* p = storage.get();
    for (int64_t l = 0; l < L; ++l) acts.push_back(p), p += kTilePairs * o.widths[l];
    grad_a = p, grad_b = p + kTilePairs * o.max_width();
  }

  void place_in(const GnnOperands& o, T* hidden, int64_t first) {
    for (size_t l = 1; l + 1 < o.widths.size(); ++l)
      acts[l] = hidden + o.hidden_offset(l) + first * o.widths[l];
  }
};

std::tuple<at::Tensor, at::Tensor> gnn_adjacency(const at::Tensor& nodes, at::TensorList weights,
                                                 at::TensorList biases, double negative_slope,
                                                 bool last_row, bool keep_hidden) {
  const GnnOperands o = gnn_operands(nodes, weights, biases, negative_slope, last_row);
  const int64_t B = o.B, n = o.n, L = o.weights.size(), H = o.widths[L - 1];
  const int64_t total = o.pairs(), size = tile_pairs(total), tiles = (total + size - 1) / size;
  at::Tensor adjacency = at::empty({B, n, n}, o.nodes.options());
  at::Tensor hidden = at::empty({keep_hidden ? o.hidden_values() : 0}, o.nodes.options());
  AT_DISPATCH_FLOATING_TYPES(o.nodes.scalar_type(), "fastmeta::gnn_adjacency", [&] {
    using T = scalar_t;
    const T slope = T(negative_slope);
    T* logits = adjacency.mutable_data_ptr<T>();
    T* kept = hidden.mutable_data_ptr<T>();
    const T* last = o.weights[L - 1].const_data_ptr<T>();
    const T last_bias = o.biases[L - 1].const_data_ptr<T>()[0];
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      TileScratch<T> scratch(o);
      Tile<T> tile;
      for (int64_t t = begin; t < end; ++t) {
        if (keep_hidden) scratch.place_in(o, kept, t * size);
        tile.load(o, t * size, size, o.nodes.const_data_ptr<T>(), scratch.acts[0]);
        hidden_layers(o, tile.count, scratch.acts, slope);
        for (int64_t r = 0; r < tile.count; ++r) {
          const T logit = row_dot(scratch.acts[L - 1] + r * H, last, H) + last_bias;
          logits[(tile.b[r] * n + tile.i[r]) * n + tile.j[r]] = logit;
          logits[(tile.b[r] * n + tile.j[r]) * n + tile.i[r]] = logit;
        }
      }
    });
    at::parallel_for(0, B * n, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row)
        adjacency_row(logits + row * n, row % n, n, last_row);
    });
  });
  return {adjacency, hidden};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> gnn_adjacency_backward(
    const at::Tensor& grad, const at::Tensor& adjacency, const at::Tensor& hidden,
    const at::Tensor& nodes, at::TensorList weights, at::TensorList biases, double negative_slope,
    bool last_row) {
  const GnnOperands o = gnn_backward_operands(grad, adjacency, hidden, nodes, weights, biases,
                                              negative_slope, last_row);
  const int64_t B = o.B, n = o.n, F = o.F, L = o.weights.size();
  const int64_t total = o.pairs(), size = tile_pairs(total), tiles = (total + size - 1) / size;
  const bool kept = o.hidden.numel() > 0;
  at::Tensor grad_logits = o.grad.clone();
  at::Tensor grad_nodes = at::zeros_like(o.nodes);
  std::vector<at::Tensor> grad_weights, grad_biases;
  for (int64_t l = 0; l < L; ++l) {
    grad_weights.push_back(at::zeros_like(o.weights[l]));
    grad_biases.push_back(at::zeros_like(o.biases[l]));
  }
  // The outputs in the order of each thread's sums: nodes, then each layer's weight and bias.
  std::vector<at::Tensor> outputs{grad_nodes};
  int64_t sum_values = grad_nodes.numel();
  for (int64_t l = 0; l < L; ++l) {
    outputs.push_back(grad_weights[l]);
    outputs.push_back(grad_biases[l]);
    sum_values += grad_weights[l].numel() + grad_biases[l].numel();
  }
  std::mutex reduce;
  AT_DISPATCH_FLOATING_TYPES(o.nodes.scalar_type(), "fastmeta::gnn_adjacency_backward", [&] {
    using T = scalar_t;
    const T slope = T(negative_slope);
    T* gl = grad_logits.mutable_data_ptr<T>();
    const T* a = o.adjacency.const_data_ptr<T>();
    at::parallel_for(0, B * n, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row)
        adjacency_row_backward(a + row * n, gl + row * n, row % n, n, last_row);
    });
    const T* x = o.nodes.const_data_ptr<T>();
    // Only read below; place_in takes the pointer type of the forward's scratch.
    T* kept_hidden = kept ? const_cast<T*>(o.hidden.const_data_ptr<T>()) : nullptr;
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      TileScratch<T> scratch(o);
      Tile<T> tile;
      // This thread's sums, in one buffer: the outputs' gradients, in order.
      std::vector<T> sums(sum_values, T(0));
      std::vector<T*> gw(L), gb(L);
      T* gx = sums.data();
      for (int64_t l = 0, at = B * n * F; l < L; ++l) {
        gw[l] = gx + at, at += o.weights[l].numel();
        gb[l] = gx + at, at += o.biases[l].numel();
      }
      for (int64_t t = begin; t < end; ++t) {
        tile.load(o, t * size, size, x, scratch.acts[0]);
        if (kept)
          scratch.place_in(o, kept_hidden, t * size);
        else
          hidden_layers(o, tile.count, scratch.acts, slope);
        const int64_t count = tile.count, H = o.widths[L - 1];
        // The last layer: one output per pair, from both (i, j) and (j, i).
        const T* w_last = o.weights[L - 1].const_data_ptr<T>();
        T* gw_last = gw[L - 1];
        T g_bias = 0;
        T* g = scratch.grad_a;
        for (int64_t r = 0; r < count; ++r) {
          const int64_t b = tile.b[r], i = tile.i[r], j = tile.j[r];
          const T gp = gl[(b * n + i) * n + j] + gl[(b * n + j) * n + i];
          g_bias += gp;
          run_loop<LastLayerBackward>(g + r * H, gw_last, w_last, scratch.acts[L - 1] + r * H, gp, H);
        }
        gb[L - 1][0] += g_bias;
        // The hidden layers, last first: g is d loss / d acts[l].
        for (int64_t l = L - 1; l >= 1; --l) {
          const int64_t in = o.widths[l - 1], out = o.widths[l];
          run_loop<LeakyReluBackward>(g, static_cast<const T*>(scratch.acts[l]), gb[l - 1], count, out,
                                      slope);
          gemm_atb_acc(out, in, count, g, out, scratch.acts[l - 1], in, gw[l - 1], in);
          T* g_in = g == scratch.grad_a ? scratch.grad_b : scratch.grad_a;
          gemm(false, false, count, in, out, g, out, o.weights[l - 1].const_data_ptr<T>(), in, T(0),
               g_in, in);
          g = g_in;
        }
        // |x_i - x_j|: g is d loss / d the differences.
        for (int64_t r = 0; r < count; ++r) {
          const int64_t at_i = (tile.b[r] * n + tile.i[r]) * F, at_j = (tile.b[r] * n + tile.j[r]) * F;
          run_loop<AbsDifferenceBackward>(static_cast<const T*>(g + r * F), x + at_i, x + at_j, gx + at_i,
                                          gx + at_j, F);
        }
      }
      std::lock_guard<std::mutex> lock(reduce);
      const T* mine = sums.data();
      for (const at::Tensor& output : outputs) {
        run_loop<Accumulate>(output.mutable_data_ptr<T>(), mine, output.numel());
        mine += output.numel();
      }
    });
  });
  return {grad_nodes, grad_weights, grad_biases};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("gnn_adjacency", &gnn_adjacency);
  m.impl("gnn_adjacency_backward", &gnn_adjacency_backward);
}

}  // namespace fastmeta::cpu
