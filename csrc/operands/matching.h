// Operand prologue of the Matching networks attention LSTM
// (fastmeta::matching_attention_lstm and its backward): query [B, Q, D],
// support [B, S, D], weight_ih [4D, 2D], weight_hh [4D, D], bias [4D]; the
// backward's saved tensors have K = steps leading rows.
#pragma once

#include "common.h"

namespace fastmeta {

struct AttentionLstmOperands {
  int64_t B = 0, Q = 0, S = 0, D = 0, K = 0;
  at::Tensor query, support, weight_ih, weight_hh, bias;
  at::Tensor grad, hiddens, cells, attention, gates;
};

inline AttentionLstmOperands attention_lstm_inputs(const at::Tensor& query, const at::Tensor& support,
                                                   const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                                                   int64_t steps) {
  AttentionLstmOperands o;
  check_floating(query, "query");
  check_operand(query, "query", 3, query);
  check_operand(support, "support", 3, query);
  check_operand(weight_ih, "weight_ih", 2, query);
  check_operand(weight_hh, "weight_hh", 2, query);
  o.B = query.size(0), o.Q = query.size(1), o.D = query.size(2), o.S = support.size(1);
  TORCH_CHECK(steps >= 0, "fastmeta: steps must be >= 0, got ", steps);
  TORCH_CHECK(o.D <= (int64_t{1} << 40), "fastmeta: the feature size ", o.D, " is too large");
  o.K = steps;
  check_size(support, "support", 0, o.B, "the number of episodes in query");
  check_size(support, "support", 2, o.D, "the feature size of query");
  check_size(weight_ih, "weight_ih", 0, 4 * o.D, "4 x the feature size");
  check_size(weight_ih, "weight_ih", 1, 2 * o.D, "2 x the feature size");
  check_size(weight_hh, "weight_hh", 0, 4 * o.D, "4 x the feature size");
  check_size(weight_hh, "weight_hh", 1, o.D, "the feature size");
  o.query = query.contiguous();
  o.support = support.contiguous();
  o.weight_ih = weight_ih.contiguous();
  o.weight_hh = weight_hh.contiguous();
  return o;
}

inline AttentionLstmOperands attention_lstm_operands(const at::Tensor& query, const at::Tensor& support,
                                                     const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                                                     const at::Tensor& bias, int64_t steps) {
  AttentionLstmOperands o = attention_lstm_inputs(query, support, weight_ih, weight_hh, steps);
  check_operand(bias, "bias", 1, query);
  check_size(bias, "bias", 0, 4 * o.D, "4 x the feature size");
  o.bias = bias.contiguous();
  return o;
}

inline AttentionLstmOperands attention_lstm_backward_operands(
    const at::Tensor& grad, const at::Tensor& query, const at::Tensor& support, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const at::Tensor& hiddens, const at::Tensor& cells,
    const at::Tensor& attention, const at::Tensor& gates) {
  check_operand(hiddens, "hiddens", 4, query);
  AttentionLstmOperands o = attention_lstm_inputs(query, support, weight_ih, weight_hh, hiddens.size(0));
  check_operand(grad, "grad", 3, query);
  check_operand(cells, "cells", 4, query);
  check_operand(attention, "attention", 4, query);
  check_operand(gates, "gates", 4, query);
  for (int64_t dim = 0; dim < 3; ++dim) {
    check_size(grad, "grad", dim, query.size(dim), "query's");
  }
  const int64_t rows[3] = {o.K, o.B, o.Q};
  for (int64_t dim = 0; dim < 3; ++dim) {
    check_size(hiddens, "hiddens", dim, rows[dim], "the steps, episodes and queries");
    check_size(cells, "cells", dim, rows[dim], "the steps, episodes and queries");
    check_size(attention, "attention", dim, rows[dim], "the steps, episodes and queries");
    check_size(gates, "gates", dim, rows[dim], "the steps, episodes and queries");
  }
  check_size(hiddens, "hiddens", 3, o.D, "the feature size");
  check_size(cells, "cells", 3, o.D, "the feature size");
  check_size(attention, "attention", 3, o.S, "the support size");
  check_size(gates, "gates", 3, 4 * o.D, "4 x the feature size");
  o.grad = grad.contiguous();
  o.hiddens = hiddens.contiguous();
  o.cells = cells.contiguous();
  o.attention = attention.contiguous();
  o.gates = gates.contiguous();
  return o;
}

}  // namespace fastmeta
