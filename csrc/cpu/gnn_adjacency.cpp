// CPU kernels of fastmeta::gnn_adjacency (math in csrc/math/gnn.h): the
// pairwise MLP runs on tiles of unordered pairs (i < j, across episodes; only
// the last node's pairs with last_row), each layer one matrix product on the
// tile, so the [B, n, n, F] differences exist only for one tile at a time;
// the logits of a pair fill both (i, j) and (j, i), then each row takes its
// softmax (with last_row the last row does, and the others are 0). The hidden
// activations go to the kept `hidden` when asked (the backward then reads
// them) and to the tile's scratch otherwise. The backward goes over tiles of
// pairs, each thread summing the nodes' gradients. With kept activations it
// writes every pair's layer gradients into shared buffers, and the weights'
// gradients are then one product per layer over all pairs, the threads
// taking rows of them; else each thread recomputes a tile's activations in
// its own buffers and adds the tile's products to its sums of the weights'
// gradients (a tile stays in cache, which buffers of every pair do not).
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
#include "recycled_buffers.h"
#include "row_math.h"

namespace fastmeta::cpu {
namespace {

constexpr int64_t kTilePairs = 128;

// Rows per thread of a pass over the adjacency's rows: small adjacencies (up
// to 2^15 entries) run on one thread.
int64_t row_grain(int64_t n) { return std::max<int64_t>(64, (int64_t{1} << 15) / std::max<int64_t>(n, 1)); }

// The first row r (at most out) of a [out, in] matrix whose first entry,
// r * in, is at index e or later.
int64_t rows_from(int64_t e, int64_t in, int64_t out) {
  return e <= 0 ? 0 : std::min(out, (e + in - 1) / in);
}

// Weight entries per thread of the backward's products over every pair.
constexpr int64_t kWeightGrain = 1 << 13;

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
  FASTMETA_INLINE static void run(T* g, const T* acts, T* __restrict__ bias_grad, int64_t count, int64_t out,
                                  T slope) {
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
  FASTMETA_INLINE static void run(T* __restrict__ g, T* __restrict__ w_grad, const T* w, const T* act, T gp,
                                  int64_t H) {
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

// The forward's scratch of one tile: every layer's activations. acts[0]
// holds the differences; the hidden layers' acts[l] point at the scratch or,
// by place_in, at the tile's rows of the kept activations.
template <typename T>
struct TileScratch {
  at::Tensor storage;  // not zero-filled: every value is written before it is read
  std::vector<T*> acts;
  explicit TileScratch(const GnnOperands& o) {
    const int64_t L = o.weights.size();
    int64_t total = 0;
    for (int64_t l = 0; l < L; ++l) total += kTilePairs * o.widths[l];
    storage = empty_recycled({total}, c10::CppTypeToScalarType<T>::value);
    T* p = storage.mutable_data_ptr<T>();
    for (int64_t l = 0; l < L; ++l) acts.push_back(p), p += kTilePairs * o.widths[l];
  }

  void place_in(const GnnOperands& o, T* hidden, int64_t first) {
    for (size_t l = 1; l + 1 < o.widths.size(); ++l)
      acts[l] = hidden + o.hidden_offset(l) + first * o.widths[l];
  }
};

std::tuple<at::Tensor, at::Tensor> gnn_adjacency(const at::Tensor& nodes, at::TensorList weights,
                                                 at::TensorList biases, double negative_slope, bool last_row,
                                                 bool keep_hidden) {
  const GnnOperands o = gnn_operands(nodes, weights, biases, negative_slope, last_row);
  const int64_t B = o.B, n = o.n, L = o.weights.size(), H = o.widths[L - 1];
  const int64_t total = o.pairs(), size = tile_pairs(total), tiles = (total + size - 1) / size;
  at::Tensor adjacency = at::empty({B, n, n}, o.nodes.options());
  at::Tensor hidden = empty_recycled({keep_hidden ? o.hidden_values() : 0}, o.nodes.scalar_type());
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
      for (int64_t row = begin; row < end; ++row) adjacency_row(logits + row * n, row % n, n, last_row);
    });
  });
  return {adjacency, hidden};
}

// The backward's buffers for C consecutive pairs (every pair when the
// activations are kept, else one tile's): per layer l the activations
// acts[l] [C, H_l] (acts[0] the differences; the hidden layers' in the kept
// activations, or recomputed here) and the gradients grads[l] [C, H_l] of
// the hidden layers' inputs (before the leaky ReLU).
template <typename T>
struct PairBuffers {
  at::Tensor storage;
  std::vector<T*> acts, grads;

  PairBuffers(const GnnOperands& o, int64_t C, bool kept) {
    const int64_t L = o.weights.size();
    int64_t per_pair = o.F;
    for (int64_t l = 1; l < L; ++l) per_pair += (kept ? 1 : 2) * o.widths[l];
    storage = empty_recycled({C * per_pair}, c10::CppTypeToScalarType<T>::value);
    T* p = storage.mutable_data_ptr<T>();
    acts.assign(L, nullptr), grads.assign(L, nullptr);
    acts[0] = p, p += C * o.F;
    for (int64_t l = 1; l < L; ++l) {
      grads[l] = p, p += C * o.widths[l];
      if (kept)
        acts[l] = const_cast<T*>(o.hidden.const_data_ptr<T>()) + o.hidden_offset(l);
      else
        acts[l] = p, p += C * o.widths[l];
    }
  }
};

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> gnn_adjacency_backward(
    const at::Tensor& grad, const at::Tensor& adjacency, const at::Tensor& hidden, const at::Tensor& nodes,
    at::TensorList weights, at::TensorList biases, double negative_slope, bool last_row) {
  const GnnOperands o =
      gnn_backward_operands(grad, adjacency, hidden, nodes, weights, biases, negative_slope, last_row);
  const int64_t B = o.B, n = o.n, F = o.F, L = o.weights.size(), H = o.widths[L - 1];
  const int64_t total = o.pairs(), size = tile_pairs(total), tiles = (total + size - 1) / size;
  const bool kept = o.hidden.numel() > 0;
  at::Tensor grad_logits = o.grad.clone();
  std::vector<at::Tensor> grad_weights, grad_biases;
  // With kept activations the hidden layers' weight gradients are products
  // over every pair, written after the tiles; else each thread sums its
  // tiles' products.
  auto gradient_like = kept ? empty_recycled : zeros_recycled;
  for (int64_t l = 0; l < L; ++l) {
    grad_weights.push_back(l + 1 < L ? gradient_like(o.weights[l].sizes(), o.weights[l].scalar_type())
                                     : zeros_recycled(o.weights[l].sizes(), o.weights[l].scalar_type()));
    grad_biases.push_back(zeros_recycled(o.biases[l].sizes(), o.biases[l].scalar_type()));
  }
  at::Tensor grad_nodes = zeros_recycled(o.nodes.sizes(), o.nodes.scalar_type());
  // Each thread's sums, in this order: the nodes' gradients, the biases',
  // the last layer's weights', then (recomputing) the other weights'.
  std::vector<at::Tensor> summed{grad_nodes};
  for (const at::Tensor& b : grad_biases) summed.push_back(b);
  summed.push_back(grad_weights[L - 1]);
  for (int64_t l = 0; !kept && l + 1 < L; ++l) summed.push_back(grad_weights[l]);
  int64_t sum_values = 0, hidden_weight_values = 0;
  for (const at::Tensor& t : summed) sum_values += t.numel();
  for (int64_t l = 0; l + 1 < L; ++l) hidden_weight_values += o.weights[l].numel();
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
    const T* w_last = o.weights[L - 1].const_data_ptr<T>();
    // Kept activations: every pair's layer gradients go to shared buffers.
    // Recomputed: each thread's buffers hold one tile, which stays in cache.
    std::unique_ptr<PairBuffers<T>> shared;
    if (kept) shared = std::make_unique<PairBuffers<T>>(o, total, true);
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      std::unique_ptr<PairBuffers<T>> own;
      if (!kept) own = std::make_unique<PairBuffers<T>>(o, size, false);
      const PairBuffers<T>& buffers = kept ? *shared : *own;
      at::Tensor scratch = empty_recycled({kTilePairs * F + sum_values}, c10::CppTypeToScalarType<T>::value);
      T* grad_diff = scratch.mutable_data_ptr<T>();  // d loss / d a tile's differences
      T* sums = grad_diff + kTilePairs * F;
      std::fill(sums, sums + sum_values, T(0));
      std::vector<T*> gb(L), gw(L);
      T* gx = sums;
      T* next = gx + B * n * F;
      for (int64_t l = 0; l < L; ++l) gb[l] = next, next += o.biases[l].numel();
      gw[L - 1] = next, next += H;
      for (int64_t l = 0; !kept && l + 1 < L; ++l) gw[l] = next, next += o.weights[l].numel();
      Tile<T> tile;
      std::vector<T*> acts(L);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r0 = kept ? t * size : 0;  // the tile's first row in the buffers
        for (int64_t l = 0; l < L; ++l) acts[l] = buffers.acts[l] + r0 * o.widths[l];
        tile.load(o, t * size, size, x, acts[0]);
        if (!kept) hidden_layers(o, tile.count, acts, slope);
        const int64_t count = tile.count;
        // The last layer: one output per pair, from both (i, j) and (j, i).
        T* g = L > 1 ? buffers.grads[L - 1] + r0 * H : grad_diff;
        for (int64_t r = 0; r < count; ++r) {
          const int64_t b = tile.b[r], i = tile.i[r], j = tile.j[r];
          const T gp = gl[(b * n + i) * n + j] + gl[(b * n + j) * n + i];
          gb[L - 1][0] += gp;
          const T* act = acts[L - 1] + r * H;
          run_loop<LastLayerBackward>(g + r * H, gw[L - 1], w_last, act, gp, H);
        }
        // The hidden layers, last first: g is d loss / d acts[l], then d loss / d its input.
        for (int64_t l = L - 1; l >= 1; --l) {
          const int64_t in = o.widths[l - 1], out = o.widths[l];
          run_loop<LeakyReluBackward>(g, static_cast<const T*>(acts[l]), gb[l - 1], count, out, slope);
          if (!kept)
            gemm_atb_acc(out, in, count, g, out, static_cast<const T*>(acts[l - 1]), in, gw[l - 1], in);
          T* g_in = l > 1 ? buffers.grads[l - 1] + r0 * in : grad_diff;
          gemm(false, false, count, in, out, g, out, o.weights[l - 1].const_data_ptr<T>(), in, T(0), g_in,
               in);
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
      const T* mine = sums;
      for (const at::Tensor& output : summed) {
        run_loop<Accumulate>(output.mutable_data_ptr<T>(), mine, output.numel());
        mine += output.numel();
      }
    });
    if (!kept) return;
    // The hidden layers' weight gradients from every pair's: each thread
    // takes the rows of every layer whose first entry is in its range of
    // all those weights' entries.
    at::parallel_for(0, hidden_weight_values, kWeightGrain, [&](int64_t begin, int64_t end) {
      for (int64_t l = 0, offset = 0; l + 1 < L; offset += o.weights[l].numel(), ++l) {
        const int64_t in = o.widths[l], out = o.widths[l + 1];
        const int64_t r0 = rows_from(begin - offset, in, out), r1 = rows_from(end - offset, in, out);
        if (r0 < r1)
          gemm(true, false, r1 - r0, in, total, static_cast<const T*>(shared->grads[l + 1] + r0), out,
               static_cast<const T*>(shared->acts[l]), in, T(0),
               grad_weights[l].mutable_data_ptr<T>() + r0 * in, in);
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
