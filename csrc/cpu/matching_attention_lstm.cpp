// CPU kernels of fastmeta::matching_attention_lstm, the attention LSTM of
// Matching networks' full-context query embeddings (Vinyals et al. 2016),
// with nn.LSTMCell's gate order (i, f, g, o), for K steps:
//   a_k = softmax(h_k g^T),  r_k = a_k g,
//   gates = W_ih [f, r_k] + W_hh h_k + b,  c_{k+1} = f * c_k + i * g~,
//   h_{k+1} = o * tanh(c_{k+1}) + f(query),   h_0 = f(query), c_0 = 0.
// The read enters the gates only through W_r r_k = a_k (g W_r^T), so g W_r^T
// [S, 4D] and the query's input term are computed once, and each step is one
// product h_k [W_hh^T, g^T] (recurrent gates and attention logits together),
// a softmax, one [Q, S] x [S, 4D] product and a fused gate loop. The forward
// saves each step's input hidden state, cell state, attention and activated
// gates for the backward, which runs the steps in reverse.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../math/lstm.h"
#include "../operands/matching.h"
#include "row_math.h"

namespace fastmeta::cpu {
namespace {

constexpr int64_t kRowsPerTask = 32;

// One step's gates over rows [begin, end): `gates` holds the read terms and
// receives the activated gates; `constant` the input terms and bias;
// `recurrent` (row stride `stride`) the recurrent terms; writes the new cell
// and hidden states.
struct GatesForward {
  template <typename T>
  FASTMETA_INLINE static void run(int64_t begin, int64_t end, int64_t D, T* gates,
                                  const T* constant, const T* recurrent, int64_t stride,
                                  const T* cell_prev, T* cell, const T* query, T* hidden) {
    for (int64_t r = begin; r < end; ++r) {
      T* g = gates + r * 4 * D;
      const T* a = constant + r * 4 * D;
      const T* rec = recurrent + r * stride;
      T* c = cell + r * D;
      T* h = hidden + r * D;
      const T* q = query + r * D;
#pragma GCC ivdep
      for (int64_t d = 0; d < D; ++d) {
        lstm_unit_forward(g[d] + a[d] + rec[d], g[D + d] + a[D + d] + rec[D + d],
                          g[2 * D + d] + a[2 * D + d] + rec[2 * D + d],
                          g[3 * D + d] + a[3 * D + d] + rec[3 * D + d],
                          cell_prev[r * D + d],
                          g[d], g[D + d], g[2 * D + d], g[3 * D + d], c[d], h[d]);
        h[d] += q[d];
      }
    }
  }
};

// Its reverse: from the gradients of the step's output hidden state and of
// its cell state (updated in place to the previous cell state's), the
// gradients of the pre-activation gates (row stride `stride`).
struct GatesBackward {
  template <typename T>
  FASTMETA_INLINE static void run(int64_t begin, int64_t end, int64_t D, const T* gates,
                                  const T* cell, const T* cell_prev, const T* grad_hidden,
                                  T* grad_cell, T* grad_gates, int64_t stride) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gates + r * 4 * D;
      T* dg = grad_gates + r * stride;
      const T* c = cell + r * D;
      const T* dh = grad_hidden + r * D;
      T* dc = grad_cell + r * D;
#pragma GCC ivdep
      for (int64_t d = 0; d < D; ++d) {
        lstm_unit_backward(g[d], g[D + d], g[2 * D + d], g[3 * D + d],
                           cell_prev[r * D + d], c[d], dh[d], dc[d], dg[d],
                           dg[D + d], dg[2 * D + d], dg[3 * D + d], dc[d]);
      }
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> matching_attention_lstm(
    const at::Tensor& query_in, const at::Tensor& support_in, const at::Tensor& weight_ih_in,
    const at::Tensor& weight_hh_in, const at::Tensor& bias_in, int64_t steps) {
  const AttentionLstmOperands o =
      attention_lstm_operands(query_in, support_in, weight_ih_in, weight_hh_in, bias_in, steps);
  const int64_t B = o.B, Q = o.Q, S = o.S, D = o.D, K = o.K, R = B * Q;
  const at::Tensor &query = o.query, &support = o.support;
  const at::Tensor constant =
      at::addmm(o.bias, query.view({R, D}), o.weight_ih.narrow(1, 0, D).t()).view({B, Q, 4 * D});
  const at::Tensor support_gates = at::matmul(support, o.weight_ih.narrow(1, D, D).t());
  const at::Tensor keys =
      at::cat({o.weight_hh.t().unsqueeze(0).expand({B, D, 4 * D}), support.transpose(1, 2)}, 2);
  at::Tensor hiddens = at::empty({K, B, Q, D}, query.options());
  at::Tensor cells = at::empty({K, B, Q, D}, query.options());
  at::Tensor attention = at::empty({K, B, Q, S}, query.options());
  at::Tensor gates = at::empty({K, B, Q, 4 * D}, query.options());
  const at::Tensor zero_cell = at::zeros_like(query);  // c_0, branch-free in the gate loops
  at::Tensor hidden = K ? hiddens[0] : query.clone();
  if (K) hidden.copy_(query);
  for (int64_t k = 0; k < K; ++k) {
    const at::Tensor both = at::bmm(hidden, keys);
    at::Tensor attention_k = attention[k], gates_k = gates[k];
    at::softmax_out(attention_k, both.narrow(2, 4 * D, S), 2);
    at::bmm_out(gates_k, attention_k, support_gates);
    at::Tensor next = k + 1 < K ? hiddens[k + 1] : at::empty_like(query);
    AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "fastmeta::matching_attention_lstm", [&] {
      scalar_t* g = gates_k.mutable_data_ptr<scalar_t>();
      const scalar_t* a = constant.const_data_ptr<scalar_t>();
      const scalar_t* rec = both.const_data_ptr<scalar_t>();
      const scalar_t* c_prev = (k ? cells[k - 1] : zero_cell).const_data_ptr<scalar_t>();
      scalar_t* c = cells[k].mutable_data_ptr<scalar_t>();
      const scalar_t* q = query.const_data_ptr<scalar_t>();
      scalar_t* h = next.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, R, kRowsPerTask, [&](int64_t begin, int64_t end) {
        run_loop<GatesForward>(begin, end, D, g, a, rec, 4 * D + S, c_prev, c, q, h);
      });
    });
    hidden = next;
  }
  return {hidden, hiddens, cells, attention, gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
matching_attention_lstm_backward(const at::Tensor& grad_in, const at::Tensor& query_in,
                                 const at::Tensor& support_in, const at::Tensor& weight_ih_in,
                                 const at::Tensor& weight_hh_in, const at::Tensor& hiddens_in,
                                 const at::Tensor& cells_in, const at::Tensor& attention_in,
                                 const at::Tensor& gates_in) {
  const AttentionLstmOperands o =
      attention_lstm_backward_operands(grad_in, query_in, support_in, weight_ih_in, weight_hh_in,
                                       hiddens_in, cells_in, attention_in, gates_in);
  const int64_t B = o.B, Q = o.Q, S = o.S, D = o.D, K = o.K, R = B * Q;
  const at::Tensor &query = o.query, &support = o.support;
  const at::Tensor weight_query = o.weight_ih.narrow(1, 0, D);
  const at::Tensor weight_read = o.weight_ih.narrow(1, D, D);
  // Recomputed rather than saved: [B, S, 4D] is one small product.
  const at::Tensor support_gates = at::matmul(support, weight_read.t());
  const at::Tensor keys_t =
      at::cat({o.weight_hh.unsqueeze(0).expand({B, 4 * D, D}), support}, 1);  // [B, 4D + S, D]
  // Each step's gradients of the gates and of the attention logits, side by
  // side as the forward's product h [W_hh^T, g^T] produced them.
  at::Tensor grad_both = at::empty({K, B, Q, 4 * D + S}, query.options());
  at::Tensor grad_hidden = o.grad.clone();
  at::Tensor grad_cell = at::zeros_like(grad_hidden);
  const at::Tensor zero_cell = at::zeros_like(query);
  at::Tensor grad_query = at::zeros_like(query);
  for (int64_t k = K - 1; k >= 0; --k) {
    grad_query.add_(grad_hidden);  // h_{k+1} = ... + query
    at::Tensor grad_both_k = grad_both[k];
    AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "fastmeta::matching_attention_lstm_backward",
                               [&] {
      const scalar_t* g = o.gates[k].const_data_ptr<scalar_t>();
      const scalar_t* c = o.cells[k].const_data_ptr<scalar_t>();
      const scalar_t* c_prev = (k ? o.cells[k - 1] : zero_cell).const_data_ptr<scalar_t>();
      const scalar_t* dh = grad_hidden.const_data_ptr<scalar_t>();
      scalar_t* dc = grad_cell.mutable_data_ptr<scalar_t>();
      scalar_t* dg = grad_both_k.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, R, kRowsPerTask, [&](int64_t begin, int64_t end) {
        run_loop<GatesBackward>(begin, end, D, g, c, c_prev, dh, dc, dg, 4 * D + S);
      });
    });
    const at::Tensor attention_k = o.attention[k];
    const at::Tensor grad_attention =
        at::bmm(grad_both_k.narrow(2, 0, 4 * D), support_gates.transpose(1, 2));
    grad_both_k.narrow(2, 4 * D, S)
        .copy_(at::_softmax_backward_data(grad_attention, attention_k, 2,
                                          attention_k.scalar_type()));
    grad_hidden = at::bmm(grad_both_k, keys_t);
  }
  grad_query.add_(grad_hidden);  // h_0 = query
  // Sums over the steps, as single products over all of them.
  const at::Tensor grad_gates = grad_both.narrow(3, 0, 4 * D);
  const at::Tensor grad_logits = grad_both.narrow(3, 4 * D, S);
  const at::Tensor grad_constant = grad_gates.sum(0);  // [B, Q, 4D]
  const at::Tensor grad_weight_hh =
      at::mm(grad_gates.reshape({K * R, 4 * D}).t(), o.hiddens.view({K * R, D}));
  at::Tensor grad_support = at::bmm(grad_logits.reshape({K * B, Q, S}).transpose(1, 2),
                                    o.hiddens.view({K * B, Q, D}))
                                .view({K, B, S, D})
                                .sum(0);
  const at::Tensor grad_support_gates =
      at::bmm(o.attention.view({K * B, Q, S}).transpose(1, 2), grad_gates.reshape({K * B, Q, 4 * D}))
          .view({K, B, S, 4 * D})
          .sum(0);
  // constant = query W_q^T + b and support_gates = support W_r^T
  grad_query.view({R, D}).addmm_(grad_constant.view({R, 4 * D}), weight_query);
  grad_support.view({B * S, D}).addmm_(grad_support_gates.view({B * S, 4 * D}), weight_read);
  const at::Tensor grad_weight_ih =
      at::cat({at::mm(grad_constant.view({R, 4 * D}).t(), query.view({R, D})),
               at::mm(grad_support_gates.view({B * S, 4 * D}).t(), support.view({B * S, D}))},
              1);
  return {grad_query, grad_support, grad_weight_ih, grad_weight_hh,
          grad_constant.sum(at::IntArrayRef{0, 1})};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("matching_attention_lstm", &matching_attention_lstm);
  m.impl("matching_attention_lstm_backward", &matching_attention_lstm_backward);
}

}  // namespace fastmeta::cpu
