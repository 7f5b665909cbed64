// PyTorch glue of fastmeta::gnn_adjacency on CUDA: the pair MLP's layers as
// cuBLAS products on one tile of unordered pairs at a time (the kernels of
// gnn_adjacency.cu build the tile's differences, place its logits and take
// the rows' softmax), so no [B, n, n, F] buffer exists; the backward reads
// the kept hidden activations or recomputes each tile.
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../operands/gnn.h"
#include "glue.h"

namespace fastmeta {
namespace {

// Pairs per tile: about 2^25 elements of activations.
int64_t tile_pairs(const GnnOperands& o) {
  int64_t per_pair = 0;
  for (int64_t width : o.widths) per_pair += width;
  return std::max<int64_t>(1, (int64_t{1} << 25) / per_pair);
}

struct PairTiles {
  const GnnOperands& o;
  cuda::GnnArgs args;
  int64_t total, size;
  at::Tensor pairs;

  explicit PairTiles(const GnnOperands& operands)
      : o(operands), args{dtype_of(operands.nodes), operands.B, operands.n, operands.F, operands.last_row} {
    total = o.pairs();
    size = std::min(tile_pairs(o), std::max<int64_t>(total, 1));
    pairs = at::empty({size, 3}, o.nodes.options().dtype(at::kLong));
  }

  // The tile from pair `first`: its pairs and differences.
  at::Tensor differences(int64_t first, int64_t count) {
    cuda::gnn_pairs(args, first, count, pairs.mutable_data_ptr<int64_t>(), current_stream());
    at::Tensor diff = at::empty({count, o.F}, o.nodes.options());
    cuda::gnn_pair_differences(args, o.nodes.const_data_ptr(), pairs.const_data_ptr<int64_t>(), count,
                               diff.mutable_data_ptr(), current_stream());
    return diff;
  }

  // The tile's rows [count, H_l] of layer l's kept activations.
  at::Tensor kept(const at::Tensor& hidden, size_t l, int64_t first, int64_t count) {
    const int64_t width = o.widths[l];
    return hidden.narrow(0, o.hidden_offset(l) + first * width, count * width).view({count, width});
  }

  // The tile's differences and hidden activations, computed.
  std::vector<at::Tensor> activations(int64_t first, int64_t count, double slope) {
    std::vector<at::Tensor> acts{differences(first, count)};
    for (size_t l = 0; l + 1 < o.weights.size(); ++l) {
      at::Tensor hidden = at::addmm(o.biases[l], acts.back(), o.weights[l].t());
      acts.push_back(at::leaky_relu_(hidden, slope));
    }
    return acts;
  }
};

std::tuple<at::Tensor, at::Tensor> gnn_adjacency(const at::Tensor& nodes, at::TensorList weights,
                                                 at::TensorList biases, double negative_slope, bool last_row,
                                                 bool keep_hidden) {
  const GnnOperands o = gnn_operands(nodes, weights, biases, negative_slope, last_row);
  c10::cuda::CUDAGuard guard(nodes.device());
  PairTiles tiles(o);
  at::Tensor adjacency = at::empty({o.B, o.n, o.n}, o.nodes.options());
  at::Tensor hidden = at::empty({keep_hidden ? o.hidden_values() : 0}, o.nodes.options());
  for (int64_t first = 0; first < tiles.total; first += tiles.size) {
    const int64_t count = std::min(tiles.size, tiles.total - first);
    const auto acts = tiles.activations(first, count, negative_slope);
    if (keep_hidden)
      for (size_t l = 1; l < acts.size(); ++l) tiles.kept(hidden, l, first, count).copy_(acts[l]);
    const at::Tensor logits = at::addmm(o.biases.back(), acts.back(), o.weights.back().t()).contiguous();
    cuda::gnn_scatter_logits(tiles.args, logits.const_data_ptr(), tiles.pairs.const_data_ptr<int64_t>(),
                             count, adjacency.mutable_data_ptr(), current_stream());
  }
  cuda::gnn_adjacency_rows(tiles.args, adjacency.mutable_data_ptr(), current_stream());
  return {adjacency, hidden};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> gnn_adjacency_backward(
    const at::Tensor& grad, const at::Tensor& adjacency, const at::Tensor& hidden, const at::Tensor& nodes,
    at::TensorList weights, at::TensorList biases, double negative_slope, bool last_row) {
  const GnnOperands o =
      gnn_backward_operands(grad, adjacency, hidden, nodes, weights, biases, negative_slope, last_row);
  c10::cuda::CUDAGuard guard(nodes.device());
  PairTiles tiles(o);
  const int64_t L = o.weights.size();
  at::Tensor grad_logits = o.grad.clone();
  cuda::gnn_adjacency_rows_backward(tiles.args, o.adjacency.const_data_ptr(), grad_logits.mutable_data_ptr(),
                                    current_stream());
  at::Tensor grad_nodes = at::zeros_like(o.nodes);
  std::vector<at::Tensor> grad_weights, grad_biases;
  for (int64_t l = 0; l < L; ++l) {
    grad_weights.push_back(at::zeros_like(o.weights[l]));
    grad_biases.push_back(at::zeros_like(o.biases[l]));
  }
  at::Tensor pair_grad = at::empty({tiles.size}, o.nodes.options());
  for (int64_t first = 0; first < tiles.total; first += tiles.size) {
    const int64_t count = std::min(tiles.size, tiles.total - first);
    std::vector<at::Tensor> acts;
    if (o.hidden.numel() > 0) {
      acts.push_back(tiles.differences(first, count));
      for (int64_t l = 1; l < L; ++l) acts.push_back(tiles.kept(o.hidden, l, first, count));
    } else {
      acts = tiles.activations(first, count, negative_slope);
    }
    cuda::gnn_pair_grads(tiles.args, grad_logits.const_data_ptr(), tiles.pairs.const_data_ptr<int64_t>(),
                         count, pair_grad.mutable_data_ptr(), current_stream());
    const at::Tensor g_out = pair_grad.narrow(0, 0, count).view({count, 1});
    grad_weights[L - 1].addmm_(g_out.t(), acts.back());
    grad_biases[L - 1].add_(g_out.sum(0));
    at::Tensor g = at::mm(g_out, o.weights[L - 1]);
    for (int64_t l = L - 1; l >= 1; --l) {
      g = at::leaky_relu_backward(g, acts[l], negative_slope, /*self_is_result=*/true);
      grad_weights[l - 1].addmm_(g.t(), acts[l - 1]);
      grad_biases[l - 1].add_(g.sum(0));
      g = at::mm(g, o.weights[l - 1]);
    }
    g = g.contiguous();
    cuda::gnn_pair_differences_backward(tiles.args, g.const_data_ptr(), o.nodes.const_data_ptr(),
                                        tiles.pairs.const_data_ptr<int64_t>(), count,
                                        grad_nodes.mutable_data_ptr(), current_stream());
  }
  return {grad_nodes, grad_weights, grad_biases};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CUDA, m) {
  m.impl("gnn_adjacency", &gnn_adjacency);
  m.impl("gnn_adjacency_backward", &gnn_adjacency_backward);
}

}  // namespace fastmeta
