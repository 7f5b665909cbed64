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
// gates for the backward, which runs the steps in reverse. Each thread runs
// its blocks of queries through all the steps (QueryBlocks); in the backward
// it also sums its blocks' weight and support gradients, added at its end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "../math/lstm.h"
#include "../operands/matching.h"
#include "gemm.h"
#include "row_math.h"

namespace fastmeta::cpu {
namespace {

// One step's gates over rows [begin, end): `gates` holds the read terms and
// receives the activated gates; `constant` the input terms and bias;
// `recurrent` (row stride `stride`) the recurrent terms; writes the new cell
// and hidden states.
struct GatesForward {
  template <typename T>
  FASTMETA_INLINE static void run(int64_t begin, int64_t end, int64_t D, T* gates, const T* constant,
                                  const T* recurrent, int64_t stride, const T* cell_prev, T* cell,
                                  const T* query, T* hidden) {
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
                          g[3 * D + d] + a[3 * D + d] + rec[3 * D + d], cell_prev[r * D + d], g[d], g[D + d],
                          g[2 * D + d], g[3 * D + d], c[d], h[d]);
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
  FASTMETA_INLINE static void run(int64_t begin, int64_t end, int64_t D, const T* gates, const T* cell,
                                  const T* cell_prev, const T* grad_hidden, T* grad_cell, T* grad_gates,
                                  int64_t stride) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gates + r * 4 * D;
      T* dg = grad_gates + r * stride;
      const T* c = cell + r * D;
      const T* dh = grad_hidden + r * D;
      T* dc = grad_cell + r * D;
#pragma GCC ivdep
      for (int64_t d = 0; d < D; ++d) {
        lstm_unit_backward(g[d], g[D + d], g[2 * D + d], g[3 * D + d], cell_prev[r * D + d], c[d], dh[d],
                           dc[d], dg[d], dg[D + d], dg[2 * D + d], dg[3 * D + d], dc[d]);
      }
    }
  }
};

// Softmax of rows [0, n) of the attention logits (row stride `ld`) into
// `attention` [n, S].
struct AttentionSoftmax {
  template <typename T>
  FASTMETA_INLINE static void run(int64_t n, int64_t S, const T* logits, int64_t ld, T* attention) {
    for (int64_t r = 0; r < n; ++r) {
      const T* l = logits + r * ld;
      T* a = attention + r * S;
      T top = -std::numeric_limits<T>::infinity();
      for (int64_t j = 0; j < S; ++j) top = l[j] > top ? l[j] : top;
      T sum = 0;
      for (int64_t j = 0; j < S; ++j) {
        a[j] = exp_fast(l[j] - top);
        sum += a[j];
      }
      const T scale = T(1) / sum;
      for (int64_t j = 0; j < S; ++j) a[j] *= scale;
    }
  }
};

// Its backward for rows [0, n): logit gradients a * (g - sum_j a_j g_j)
// (row stride `ld`) from the attention [n, S] and its gradient [n, S].
struct AttentionSoftmaxBackward {
  template <typename T>
  FASTMETA_INLINE static void run(int64_t n, int64_t S, const T* attention, const T* grad_attention,
                                  T* grad_logits, int64_t ld) {
    for (int64_t r = 0; r < n; ++r) {
      const T* a = attention + r * S;
      const T* g = grad_attention + r * S;
      T* out = grad_logits + r * ld;
      T dot = 0;
      for (int64_t j = 0; j < S; ++j) dot += a[j] * g[j];
      for (int64_t j = 0; j < S; ++j) out[j] = a[j] * (g[j] - dot);
    }
  }
};

// The recurrence runs each query's rows independently of the others', so
// each thread takes blocks of one episode's queries through all K steps
// with single-threaded products: no synchronisation between steps. Blocks
// of at most kMaxBlockRows queries, of equal sizes, and (with fewer episodes
// than threads) a multiple of the threads' share of an episode in number, so
// that every thread gets the same number of rows.
constexpr int64_t kMaxBlockRows = 128;

struct QueryBlocks {
  int64_t Q, per_episode, rows, count;

  QueryBlocks(int64_t B, int64_t Q) : Q(Q) {
    const int64_t share = std::max<int64_t>(1, (at::get_num_threads() + B - 1) / std::max<int64_t>(B, 1));
    const int64_t needed = std::max<int64_t>(1, (Q + kMaxBlockRows - 1) / kMaxBlockRows);
    const int64_t blocks = (needed + share - 1) / share * share;
    rows = std::max<int64_t>(1, (Q + blocks - 1) / blocks);
    per_episode = (Q + rows - 1) / rows;
    count = B * per_episode;
  }

  // Block i: its episode, first query and number of queries.
  std::tuple<int64_t, int64_t, int64_t> block(int64_t i) const {
    const int64_t q0 = (i % per_episode) * rows;
    return {i / per_episode, q0, std::min(rows, Q - q0)};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> matching_attention_lstm(
    const at::Tensor& query_in, const at::Tensor& support_in, const at::Tensor& weight_ih_in,
    const at::Tensor& weight_hh_in, const at::Tensor& bias_in, int64_t steps) {
  const AttentionLstmOperands o =
      attention_lstm_operands(query_in, support_in, weight_ih_in, weight_hh_in, bias_in, steps);
  const int64_t B = o.B, Q = o.Q, S = o.S, D = o.D, K = o.K, R = B * Q, F = 4 * D + S;
  const at::Tensor &query = o.query, &support = o.support;
  const at::Tensor constant = at::addmm(o.bias, query.view({R, D}), o.weight_ih.narrow(1, 0, D).t());
  const at::Tensor support_gates = at::matmul(support, o.weight_ih.narrow(1, D, D).t()).contiguous();
  // Per episode [W_hh^T, g^T] [D, 4D + S]: recurrent gates and attention logits in one product.
  const at::Tensor keys =
      at::cat({o.weight_hh.t().unsqueeze(0).expand({B, D, 4 * D}), support.transpose(1, 2)}, 2);
  at::Tensor hiddens = at::empty({K, B, Q, D}, query.options());
  at::Tensor cells = at::empty({K, B, Q, D}, query.options());
  at::Tensor attention = at::empty({K, B, Q, S}, query.options());
  at::Tensor gates = at::empty({K, B, Q, 4 * D}, query.options());
  at::Tensor hidden = at::empty_like(query);
  if (K == 0) hidden.copy_(query);
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "fastmeta::matching_attention_lstm", [&] {
    using T = scalar_t;
    const T* q_all = query.const_data_ptr<T>();
    const T* constant_all = constant.const_data_ptr<T>();
    const T* keys_all = keys.const_data_ptr<T>();
    const T* support_gates_all = support_gates.const_data_ptr<T>();
    T* hiddens_all = hiddens.mutable_data_ptr<T>();
    T* cells_all = cells.mutable_data_ptr<T>();
    T* attention_all = attention.mutable_data_ptr<T>();
    T* gates_all = gates.mutable_data_ptr<T>();
    T* out_all = hidden.mutable_data_ptr<T>();
    const QueryBlocks blocks(B, Q);
    at::parallel_for(0, blocks.count, 1, [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) {
        const auto [b, q0, n] = blocks.block(i);
        const int64_t row = b * Q + q0;  // first row of the block in [B * Q]
        std::vector<T> both(n * F), zero_cell(n * D, T(0));
        const T* q = q_all + row * D;
        if (K) std::copy(q, q + n * D, hiddens_all + row * D);
        for (int64_t k = 0; k < K; ++k) {
          const int64_t at_k = k * R + row;
          const T* h = hiddens_all + at_k * D;
          T* a = attention_all + at_k * S;
          T* g = gates_all + at_k * 4 * D;
          gemm(false, false, n, F, D, h, D, keys_all + b * D * F, F, T(0), both.data(), F);
          run_loop<AttentionSoftmax>(n, S, static_cast<const T*>(both.data() + 4 * D), F, a);
          gemm(false, false, n, 4 * D, S, static_cast<const T*>(a), S, support_gates_all + b * S * 4 * D,
               4 * D, T(0), g, 4 * D);
          T* next = k + 1 < K ? hiddens_all + (at_k + R) * D : out_all + row * D;
          run_loop<GatesForward>(int64_t{0}, n, D, g, constant_all + row * 4 * D,
                                 static_cast<const T*>(both.data()), F,
                                 static_cast<const T*>(k ? cells_all + (at_k - R) * D : zero_cell.data()),
                                 cells_all + at_k * D, q, next);
        }
      }
    });
  });
  return {hidden, hiddens, cells, attention, gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> matching_attention_lstm_backward(
    const at::Tensor& grad_in, const at::Tensor& query_in, const at::Tensor& support_in,
    const at::Tensor& weight_ih_in, const at::Tensor& weight_hh_in, const at::Tensor& hiddens_in,
    const at::Tensor& cells_in, const at::Tensor& attention_in, const at::Tensor& gates_in) {
  const AttentionLstmOperands o =
      attention_lstm_backward_operands(grad_in, query_in, support_in, weight_ih_in, weight_hh_in, hiddens_in,
                                       cells_in, attention_in, gates_in);
  const int64_t B = o.B, Q = o.Q, S = o.S, D = o.D, K = o.K, R = B * Q, F = 4 * D + S;
  const at::Tensor &query = o.query, &support = o.support;
  const at::Tensor weight_read = o.weight_ih.narrow(1, D, D);
  // Recomputed rather than saved: [B, S, 4D] is one small product.
  const at::Tensor support_gates = at::matmul(support, weight_read.t()).contiguous();
  const at::Tensor keys_t =
      at::cat({o.weight_hh.unsqueeze(0).expand({B, 4 * D, D}), support}, 1);  // [B, 4D + S, D]
  at::Tensor grad_query = at::empty_like(query);
  // The gates' gradients summed over the steps: those of constant = query W_q^T + b.
  at::Tensor grad_constant = at::zeros({B, Q, 4 * D}, query.options());
  // Sums over steps and queries, each thread's added at its end.
  at::Tensor grad_weight_hh = at::zeros({4 * D, D}, query.options());
  at::Tensor grad_support = at::zeros_like(support);
  at::Tensor grad_support_gates = at::zeros({B, S, 4 * D}, query.options());
  std::mutex reduce;
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "fastmeta::matching_attention_lstm_backward", [&] {
    using T = scalar_t;
    const T* grad_all = o.grad.const_data_ptr<T>();
    const T* keys_t_all = keys_t.const_data_ptr<T>();
    const T* support_gates_all = support_gates.const_data_ptr<T>();
    const T* hiddens_all = o.hiddens.const_data_ptr<T>();
    const T* cells_all = o.cells.const_data_ptr<T>();
    const T* attention_all = o.attention.const_data_ptr<T>();
    const T* gates_all = o.gates.const_data_ptr<T>();
    T* grad_query_all = grad_query.mutable_data_ptr<T>();
    T* grad_constant_all = grad_constant.mutable_data_ptr<T>();
    const T* weight_query = o.weight_ih.const_data_ptr<T>();  // [4D, D] of [4D, 2D]
    const QueryBlocks blocks(B, Q);
    at::parallel_for(0, blocks.count, 1, [&](int64_t first, int64_t last) {
      std::vector<T> gw_hh(4 * D * D, T(0)), gs(B * S * D, T(0)), gsg(B * S * 4 * D, T(0));
      for (int64_t i = first; i < last; ++i) {
        const auto [b, q0, n] = blocks.block(i);
        const int64_t row = b * Q + q0;
        std::vector<T> grad_hidden(grad_all + row * D, grad_all + (row + n) * D);
        std::vector<T> grad_cell(n * D, T(0)), zero_cell(n * D, T(0)), grad_attention(n * S);
        // The step's gradients of the gates and of the attention logits, side
        // by side as the forward's product h [W_hh^T, g^T] produced them.
        std::vector<T> grad_both(n * F);
        T* dg = grad_both.data();
        T* dq = grad_query_all + row * D;
        T* gc = grad_constant_all + row * 4 * D;
        std::fill(dq, dq + n * D, T(0));
        for (int64_t k = K - 1; k >= 0; --k) {
          const int64_t at_k = k * R + row;
          const T* h = hiddens_all + at_k * D;
          const T* a = attention_all + at_k * S;
          for (int64_t e = 0; e < n * D; ++e) dq[e] += grad_hidden[e];  // h_{k+1} = ... + query
          run_loop<GatesBackward>(int64_t{0}, n, D, gates_all + at_k * 4 * D, cells_all + at_k * D,
                                  k ? cells_all + (at_k - R) * D : static_cast<const T*>(zero_cell.data()),
                                  static_cast<const T*>(grad_hidden.data()), grad_cell.data(), dg, F);
          for (int64_t r = 0; r < n; ++r)
            for (int64_t c = 0; c < 4 * D; ++c) gc[r * 4 * D + c] += dg[r * F + c];
          gemm(false, true, n, S, 4 * D, static_cast<const T*>(dg), F, support_gates_all + b * S * 4 * D,
               4 * D, T(0), grad_attention.data(), S);
          run_loop<AttentionSoftmaxBackward>(n, S, a, static_cast<const T*>(grad_attention.data()),
                                             dg + 4 * D, F);
          gemm(false, false, n, D, F, static_cast<const T*>(dg), F, keys_t_all + b * F * D, D, T(0),
               grad_hidden.data(), D);
          // W_hh from the recurrent gates, the support from the logits h g^T,
          // the support's gate terms a (g W_r^T) from the reads
          gemm_atb_acc(4 * D, D, n, static_cast<const T*>(dg), F, h, D, gw_hh.data(), D);
          gemm_atb_acc(S, D, n, static_cast<const T*>(dg + 4 * D), F, h, D, gs.data() + b * S * D, D);
          gemm_atb_acc(S, 4 * D, n, a, S, static_cast<const T*>(dg), F, gsg.data() + b * S * 4 * D, 4 * D);
        }
        for (int64_t e = 0; e < n * D; ++e) dq[e] += grad_hidden[e];  // h_0 = query
        gemm_ab_acc(n, D, 4 * D, static_cast<const T*>(gc), 4 * D, weight_query, 2 * D, dq, D);
      }
      std::lock_guard<std::mutex> lock(reduce);
      for (auto [sum, part] : {std::pair{&grad_weight_hh, &gw_hh}, std::pair{&grad_support, &gs},
                               std::pair{&grad_support_gates, &gsg}}) {
        T* out = sum->template mutable_data_ptr<T>();
        for (size_t e = 0; e < part->size(); ++e) out[e] += (*part)[e];
      }
    });
  });
  // support_gates = support W_r^T
  grad_support.view({B * S, D}).addmm_(grad_support_gates.view({B * S, 4 * D}), weight_read);
  const at::Tensor grad_weight_ih =
      at::cat({at::mm(grad_constant.view({R, 4 * D}).t(), query.view({R, D})),
               at::mm(grad_support_gates.view({B * S, 4 * D}).t(), support.view({B * S, D}))},
              1);
  return {grad_query, grad_support, grad_weight_ih, grad_weight_hh, grad_constant.sum(at::IntArrayRef{0, 1})};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("matching_attention_lstm", &matching_attention_lstm);
  m.impl("matching_attention_lstm_backward", &matching_attention_lstm_backward);
}

}  // namespace fastmeta::cpu
