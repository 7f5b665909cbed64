// Operand prologue of the relation pair pooling (fastmeta::relation_pair_pool
// and its backward): queries [B, Q, H, W, C] and prototypes [B, N, H, W, C],
// channels last; the backward's grad is [B, Q, N, ceil(H/2), ceil(W/2), C].
#pragma once

#include "common.h"

namespace fastmeta {

struct PairPoolOperands {
  int64_t B = 0, Q = 0, N = 0, H = 0, W = 0, C = 0, OH = 0, OW = 0;
  at::Tensor queries, prototypes, grad;
};

inline PairPoolOperands pair_pool_operands(const at::Tensor& queries, const at::Tensor& prototypes) {
  PairPoolOperands o;
  check_floating(queries, "queries");
  check_operand(queries, "queries", 5, queries);
  check_operand(prototypes, "prototypes", 5, queries);
  o.B = queries.size(0), o.Q = queries.size(1), o.N = prototypes.size(1);
  o.H = queries.size(2), o.W = queries.size(3), o.C = queries.size(4);
  check_size(prototypes, "prototypes", 0, o.B, "the number of episodes in queries");
  for (int64_t dim = 2; dim < 5; ++dim) {
    check_size(prototypes, "prototypes", dim, queries.size(dim), "queries' map size");
  }
  o.OH = (o.H + 1) / 2, o.OW = (o.W + 1) / 2;
  o.queries = queries.contiguous();
  o.prototypes = prototypes.contiguous();
  return o;
}

inline PairPoolOperands pair_pool_backward_operands(const at::Tensor& grad, const at::Tensor& queries,
                                                    const at::Tensor& prototypes) {
  PairPoolOperands o = pair_pool_operands(queries, prototypes);
  check_operand(grad, "grad", 6, queries);
  const int64_t sizes[6] = {o.B, o.Q, o.N, o.OH, o.OW, o.C};
  for (int64_t dim = 0; dim < 6; ++dim) {
    check_size(grad, "grad", dim, sizes[dim], "the output's [B, Q, N, ceil(H/2), ceil(W/2), C]");
  }
  o.grad = grad.contiguous();
  return o;
}

}  // namespace fastmeta
