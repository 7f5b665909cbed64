// CPU kernels of fastmeta::l2o_lstm_step (the coordinatewise LSTM optimizer of
// Andrychowicz et al. 2016), its backward and its in-place form. grad [P],
// state [L, 2, H, P]; layouts in csrc/math/lstm.h.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>

#include "../operands/lstm.h"
#include "lstm_chunks.h"
#include "recycled_buffers.h"

namespace fastmeta::cpu {
namespace {

template <typename T>
struct L2oCell : L2oLayout {
  const T* weights;
  LogSign<T> prep;
  T scale;

  const T* W(int64_t l) const { return weights + layer_offset(l); }
  const T* bias(int64_t l) const { return weights + bias_offset(l); }
};

template <typename T>
struct L2oChunk {
  std::vector<LayerChunk<T>> layers;
  std::vector<T> features, dh, dxh, du;  // features [2, kChunk], dh [H, kChunk], dxh [in + H, kChunk]
  Rows<const T> h_last{};

  L2oChunk(int64_t L, int64_t H)
      : features(2 * kChunk), dh(H * kChunk), dxh(L2oLayout{L, H, 0}.widest() * kChunk), du(kChunk) {
    for (int64_t l = 0; l < L; ++l) layers.emplace_back(l == 0 ? 2 : H, H);
  }
};

template <typename T>
L2oCell<T> make_cell(const L2oOperands& o, double p, double scale) {
  return {o.layout, o.weights.const_data_ptr<T>(), LogSign<T>::with_p(p), T(scale)};
}

// The forward of coordinates [p0, p0 + n), reading the state in place: writes
// each layer's new h and c to new_state (which may be state), or keeps them in
// the chunk for the backward where new_state is null.
template <typename T>
void chunk_forward(const L2oCell<T>& cell, L2oChunk<T>& ws, const T* grad, const T* state, T* new_state,
                   int64_t p0, int64_t n) {
  T* f = ws.features.data();
  for (int64_t j = 0; j < n; ++j) cell.prep.features(grad[p0 + j], f[j], f[kChunk + j]);
  Rows<const T> x{f, kChunk};
  for (int64_t l = 0; l < cell.L; ++l) {
    LayerChunk<T>& layer = ws.layers[l];
    const Rows<T> c = new_state ? Rows<T>{new_state + cell.row(l, 1) + p0, cell.P} : layer.own_c();
    const Rows<T> h = new_state ? Rows<T>{new_state + cell.row(l, 0) + p0, cell.P} : layer.own_h();
    layer_forward(layer, cell.W(l), cell.bias(l), x, {state + cell.row(l, 0) + p0, cell.P},
                  {state + cell.row(l, 1) + p0, cell.P}, n, c, h);
    x = h;
  }
  ws.h_last = x;
}

// The update of the chunk's coordinates, from the last layer's h (update += when accumulate).
template <typename T>
void chunk_update(const L2oCell<T>& cell, L2oChunk<T>& ws, T* update, bool accumulate, int64_t p0,
                  int64_t n) {
  const T* head = cell.weights + cell.head_offset();
  T* out = accumulate ? ws.du.data() : update + p0;
  run_loop<WeightedRowSum>(head, ws.h_last, cell.H, head[cell.H], cell.scale, out, n);
  if (accumulate)
    for (int64_t j = 0; j < n; ++j) update[p0 + j] += out[j];
}

template <typename T>
void l2o_forward(const L2oCell<T>& cell, const T* grad, const T* state, T* new_state, T* update,
                 bool accumulate) {
  for_each_chunk(
      cell.P, [&] { return L2oChunk<T>(cell.L, cell.H); },
      [&](L2oChunk<T>& ws, int64_t p0, int64_t p1) {
        chunk_forward(cell, ws, grad, state, new_state, p0, p1 - p0);
        chunk_update(cell, ws, update, accumulate, p0, p1 - p0);
      });
}

std::tuple<at::Tensor, at::Tensor> l2o_lstm_step(const at::Tensor& grad_in, const at::Tensor& state_in,
                                                 const at::Tensor& weights_in, double p, double scale) {
  const L2oOperands o = l2o_operands(grad_in, state_in, weights_in, p);
  at::Tensor update = empty_like_recycled(o.grad), new_state = empty_like_recycled(o.state);
  AT_DISPATCH_FLOATING_TYPES(o.grad.scalar_type(), "fastmeta::l2o_lstm_step", [&] {
    l2o_forward(make_cell<scalar_t>(o, p, scale), o.grad.const_data_ptr<scalar_t>(),
                o.state.const_data_ptr<scalar_t>(), new_state.mutable_data_ptr<scalar_t>(),
                update.mutable_data_ptr<scalar_t>(), false);
  });
  return {update, new_state};
}

// param += update, state = new state, in one pass; param and state must be contiguous.
void l2o_lstm_step_(const at::Tensor& param, const at::Tensor& grad_in, const at::Tensor& state,
                    const at::Tensor& weights_in, double p, double scale) {
  const L2oOperands o = l2o_in_place_operands(param, grad_in, state, weights_in, p);
  AT_DISPATCH_FLOATING_TYPES(o.grad.scalar_type(), "fastmeta::l2o_lstm_step_", [&] {
    scalar_t* s = state.mutable_data_ptr<scalar_t>();
    l2o_forward(make_cell<scalar_t>(o, p, scale), o.grad.const_data_ptr<scalar_t>(), s, s,
                param.mutable_data_ptr<scalar_t>(), true);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> l2o_lstm_step_backward(
    const at::Tensor& grad_update_in, const at::Tensor& grad_state_in, const at::Tensor& grad_in,
    const at::Tensor& state_in, const at::Tensor& weights_in, double p, double scale) {
  const L2oOperands o =
      l2o_backward_operands(grad_update_in, grad_state_in, grad_in, state_in, weights_in, p);
  const at::Tensor &grad = o.grad, &state = o.state, &weights = o.weights;
  const at::Tensor &grad_update = o.grad_update, &grad_state = o.grad_state;
  at::Tensor d_grad = empty_like_recycled(grad), d_state = empty_like_recycled(state);
  at::Tensor d_weights = at::empty_like(weights);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "fastmeta::l2o_lstm_step_backward", [&] {
    using T = scalar_t;
    const L2oCell<T> cell = make_cell<T>(o, p, scale);
    const int64_t L = cell.L, H = cell.H, P = cell.P, width = weights.numel();
    const T* g = grad.const_data_ptr<T>();
    const T* gu = grad_update.const_data_ptr<T>();
    const T* gs = grad_state.const_data_ptr<T>();
    T* dg = d_grad.mutable_data_ptr<T>();
    T* ds = d_state.mutable_data_ptr<T>();
    sum_over_slots(
        P, width, d_weights.mutable_data_ptr<T>(), [&] { return L2oChunk<T>(L, H); },
        [&](L2oChunk<T>& ws, T* dw, int64_t p0, int64_t p1) {
          const int64_t n = p1 - p0;
          chunk_forward(cell, ws, g, state.const_data_ptr<T>(), static_cast<T*>(nullptr), p0, n);
          // The head: update = scale * (w . h_last + b).
          const T* head = cell.weights + cell.head_offset();
          T* dw_head = dw + cell.head_offset();
          for (int64_t j = 0; j < n; ++j) ws.du[j] = cell.scale * gu[p0 + j];
          for (int64_t k = 0; k < H; ++k) dw_head[k] += row_dot(ws.du.data(), ws.h_last.row(k), n);
          dw_head[H] += row_sum(ws.du.data(), n);
          copy_rows(gs + cell.row(L - 1, 0) + p0, P, ws.dh.data(), kChunk, H, n);
          run_loop<AddOuter>(head, ws.du.data(), ws.dh.data(), H, n);
          for (int64_t l = L - 1; l >= 0; --l) {
            layer_backward(ws.layers[l], cell.W(l), ws.dh.data(), {gs + cell.row(l, 1) + p0, P},
                           {ds + cell.row(l, 1) + p0, P}, {ds + cell.row(l, 0) + p0, P}, n, ws.dxh.data(),
                           dw + cell.layer_offset(l), dw + cell.bias_offset(l));
            if (l > 0) {
              const T* upstream = gs + cell.row(l - 1, 0) + p0;
              for (int64_t k = 0; k < H; ++k)
                for (int64_t j = 0; j < n; ++j)
                  ws.dh[k * kChunk + j] = upstream[k * P + j] + ws.dxh[k * kChunk + j];
            } else {
              for (int64_t j = 0; j < n; ++j)
                dg[p0 + j] = cell.prep.backward(g[p0 + j], ws.dxh[j], ws.dxh[kChunk + j]);
            }
          }
        });
  });
  return {d_grad, d_state, d_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("l2o_lstm_step", &l2o_lstm_step);
  m.impl("l2o_lstm_step_", &l2o_lstm_step_);
  m.impl("l2o_lstm_step_backward", &l2o_lstm_step_backward);
}

}  // namespace fastmeta::cpu
