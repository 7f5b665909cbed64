// Operand prologue of the few-shot GNN adjacency (fastmeta::gnn_adjacency
// and its backward): nodes [B, n, F]; an MLP of L layers applied to
// |x_i - x_j|, weights[l] [H_l, H_{l-1}] and biases[l] [H_l] with H_0 = F
// and H_L = 1; the backward's grad and adjacency are [B, n, n]; last_row
// restricts the op to the last node's row (csrc/math/gnn.h).
//
// hidden holds the MLP's hidden activations (after each leaky ReLU) of the P
// pairs (B n (n - 1) / 2, or B (n - 1) with last_row), layer after layer:
// [P, H_1], then [P, H_2], ..., flattened to [P (H_1 + ... + H_{L-1})]. The
// forward fills it when asked to keep them; the backward reads it when it is
// not empty and recomputes the activations otherwise.
#pragma once

#include <vector>

#include "../math/gnn.h"
#include "common.h"

namespace fastmeta {

struct GnnOperands {
  int64_t B = 0, n = 0, F = 0;
  bool last_row = false;
  std::vector<int64_t> widths;  // H_0 = F, ..., H_L = 1
  at::Tensor nodes, grad, adjacency;
  std::vector<at::Tensor> weights, biases;
  at::Tensor hidden;
  int64_t pairs() const { return B * pairs_per_episode(n, last_row); }
  // Elements of the kept hidden activations.
  int64_t hidden_values() const {
    int64_t per_pair = 0;
    for (size_t l = 1; l + 1 < widths.size(); ++l) per_pair += widths[l];
    return pairs() * per_pair;
  }
  // Where layer l's [P, H_l] activations start in hidden (1 <= l < L).
  int64_t hidden_offset(size_t l) const {
    int64_t offset = 0;
    for (size_t k = 1; k < l; ++k) offset += pairs() * widths[k];
    return offset;
  }
};

inline GnnOperands gnn_operands(const at::Tensor& nodes, at::TensorList weights, at::TensorList biases,
                                double negative_slope, bool last_row) {
  GnnOperands o;
  o.last_row = last_row;
  TORCH_CHECK(nodes.scalar_type() == at::kFloat || nodes.scalar_type() == at::kDouble,
              "fastmeta: nodes must have dtype float32 or float64, got ", nodes.scalar_type());
  check_operand(nodes, "nodes", 3, nodes);
  TORCH_CHECK(!weights.empty(), "fastmeta: the adjacency MLP needs at least one layer");
  TORCH_CHECK(weights.size() == biases.size(), "fastmeta: got ", weights.size(), " weights but ",
              biases.size(), " biases");
  TORCH_CHECK(negative_slope >= 0, "fastmeta: negative_slope must be >= 0, got ", negative_slope);
  o.B = nodes.size(0), o.n = nodes.size(1), o.F = nodes.size(2);
  o.widths.push_back(o.F);
  for (size_t l = 0; l < weights.size(); ++l) {
    check_operand(weights[l], "weights[l]", 2, nodes);
    check_operand(biases[l], "biases[l]", 1, nodes);
    TORCH_CHECK(weights[l].size(1) == o.widths.back(), "fastmeta: weights[", l, "] must have ",
                o.widths.back(), " columns (the previous layer's width), got shape ", weights[l].sizes());
    TORCH_CHECK(biases[l].size(0) == weights[l].size(0), "fastmeta: biases[", l, "] must have ",
                weights[l].size(0), " elements like weights[", l, "]'s rows, got shape ", biases[l].sizes());
    o.widths.push_back(weights[l].size(0));
    o.weights.push_back(weights[l].contiguous());
    o.biases.push_back(biases[l].contiguous());
  }
  TORCH_CHECK(o.widths.back() == 1,
              "fastmeta: the adjacency MLP's last layer must have one "
              "output, got ",
              o.widths.back());
  o.nodes = nodes.contiguous();
  return o;
}

inline GnnOperands gnn_backward_operands(const at::Tensor& grad, const at::Tensor& adjacency,
                                         const at::Tensor& hidden, const at::Tensor& nodes,
                                         at::TensorList weights, at::TensorList biases, double negative_slope,
                                         bool last_row) {
  GnnOperands o = gnn_operands(nodes, weights, biases, negative_slope, last_row);
  check_operand(hidden, "hidden", 1, nodes);
  TORCH_CHECK(hidden.numel() == 0 || hidden.numel() == o.hidden_values(),
              "fastmeta: hidden must "
              "be empty or hold the ",
              o.hidden_values(), " kept hidden activations, got shape ", hidden.sizes());
  o.hidden = hidden.contiguous();
  for (const auto& [t, name] : {std::pair{&grad, "grad"}, std::pair{&adjacency, "adjacency"}}) {
    check_operand(*t, name, 3, nodes);
    TORCH_CHECK(t->sizes() == at::IntArrayRef({o.B, o.n, o.n}), "fastmeta: ", name,
                " must have shape [B, n, n] = [", o.B, ", ", o.n, ", ", o.n, "], got ", t->sizes());
  }
  o.grad = grad.contiguous();
  o.adjacency = adjacency.contiguous();
  return o;
}

}  // namespace fastmeta
