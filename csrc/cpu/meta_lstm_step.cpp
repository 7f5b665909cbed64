// CPU kernels of fastmeta::meta_lstm_step (the LSTM meta-learner of Ravi &
// Larochelle 2017) and its backward. grad, theta [P], loss [], state
// [2H + 2, P]; layouts in csrc/math/lstm.h.
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

constexpr int64_t kInputs = MetaLayout::kInputs;

template <typename T>
struct MetaCell : MetaLayout {
  const T* weights;
  LogSign<T> prep;
  T loss;

  const T* W() const { return weights; }
  const T* bias() const { return weights + bias_offset(); }
  const T* forget() const { return weights + forget_offset(); }  // [H + 2] then bias
  const T* input_gate() const { return weights + input_offset(); }
  MetaGates<T> gates() const { return {forget()[H], forget()[H + 1], input_gate()[H], input_gate()[H + 1]}; }
};

template <typename T>
struct MetaChunk {
  LayerChunk<T> layer;
  std::vector<T> features, f, i, dh, dxh, d_pre_f, d_pre_i;  // features [kInputs, kChunk]
  Rows<const T> h{};

  explicit MetaChunk(int64_t H)
      : layer(kInputs, H),
        features(kInputs * kChunk),
        f(kChunk),
        i(kChunk),
        dh(H * kChunk),
        dxh((kInputs + H) * kChunk),
        d_pre_f(kChunk),
        d_pre_i(kChunk) {}
};

struct MetaUpdateForward {
  // f, i: the gates' w[:H].h + b in, the gates out.
  template <typename T>
  FASTMETA_INLINE static void run(MetaGates<T> gates, T* f, T* i, const T* theta_prev, const T* f_prev,
                                  const T* i_prev, const T* grad, T* theta, int64_t n) {
#pragma GCC ivdep
    for (int64_t j = 0; j < n; ++j)
      gates.forward(f[j], i[j], theta_prev[j], f_prev[j], i_prev[j], grad[j], f[j], i[j], theta[j]);
  }
};

// The forward of coordinates [p0, p0 + n), reading the state in place: writes
// the new h and c to new_state, or keeps them in the chunk for the backward
// where new_state is null.
template <typename T>
void chunk_forward(const MetaCell<T>& cell, MetaChunk<T>& ws, const T* grad, const T* theta, const T* state,
                   T* new_state, int64_t p0, int64_t n, T* theta_out) {
  const int64_t H = cell.H, P = cell.P;
  T* x = ws.features.data();
  T l0, l1;
  cell.prep.features(cell.loss, l0, l1);
  for (int64_t j = 0; j < n; ++j) {
    cell.prep.features(grad[p0 + j], x[j], x[kChunk + j]);
    x[2 * kChunk + j] = l0;
    x[3 * kChunk + j] = l1;
  }
  const Rows<T> h = new_state ? Rows<T>{new_state + p0, P} : ws.layer.own_h();
  const Rows<T> c = new_state ? Rows<T>{new_state + H * P + p0, P} : ws.layer.own_c();
  layer_forward(ws.layer, cell.W(), cell.bias(), {x, kChunk}, {state + p0, P}, {state + H * P + p0, P}, n, c,
                h);
  ws.h = h;
  run_loop<WeightedRowSum>(cell.forget(), ws.h, H, cell.forget()[H + 2], T(1), ws.f.data(), n);
  run_loop<WeightedRowSum>(cell.input_gate(), ws.h, H, cell.input_gate()[H + 2], T(1), ws.i.data(), n);
  run_loop<MetaUpdateForward>(cell.gates(), ws.f.data(), ws.i.data(), theta + p0, state + 2 * H * P + p0,
                              state + (2 * H + 1) * P + p0, grad + p0, theta_out, n);
}

template <typename T>
MetaCell<T> make_cell(const MetaOperands& o, double p) {
  return {o.layout, o.weights.const_data_ptr<T>(), LogSign<T>::with_p(p), o.loss.item<T>()};
}

std::tuple<at::Tensor, at::Tensor> meta_lstm_step(const at::Tensor& grad_in, const at::Tensor& loss,
                                                  const at::Tensor& theta_in, const at::Tensor& state_in,
                                                  const at::Tensor& weights_in, double p) {
  const MetaOperands o = meta_operands(grad_in, loss, theta_in, state_in, weights_in, p);
  const at::Tensor &grad = o.grad, &theta = o.theta, &state = o.state;
  at::Tensor theta_new = empty_like_recycled(theta), new_state = empty_like_recycled(state);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "fastmeta::meta_lstm_step", [&] {
    using T = scalar_t;
    const MetaCell<T> cell = make_cell<T>(o, p);
    const int64_t H = cell.H, P = cell.P;
    T* out = new_state.mutable_data_ptr<T>();
    for_each_chunk(
        P, [&] { return MetaChunk<T>(H); },
        [&](MetaChunk<T>& ws, int64_t p0, int64_t p1) {
          const int64_t n = p1 - p0;
          chunk_forward(cell, ws, grad.const_data_ptr<T>(), theta.const_data_ptr<T>(),
                        state.const_data_ptr<T>(), out, p0, n, theta_new.mutable_data_ptr<T>() + p0);
          std::copy(ws.f.begin(), ws.f.begin() + n, out + 2 * H * P + p0);
          std::copy(ws.i.begin(), ws.i.begin() + n, out + (2 * H + 1) * P + p0);
        });
  });
  return {theta_new, new_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> meta_lstm_step_backward(
    const at::Tensor& grad_theta_in, const at::Tensor& grad_state_in, const at::Tensor& grad_in,
    const at::Tensor& loss, const at::Tensor& theta_in, const at::Tensor& state_in,
    const at::Tensor& weights_in, double p) {
  const MetaOperands o =
      meta_backward_operands(grad_theta_in, grad_state_in, grad_in, loss, theta_in, state_in, weights_in, p);
  const at::Tensor &grad = o.grad, &theta = o.theta, &state = o.state, &weights = o.weights;
  const at::Tensor &grad_theta = o.grad_theta, &grad_state = o.grad_state;
  at::Tensor d_grad = empty_like_recycled(grad), d_theta = empty_like_recycled(theta);
  at::Tensor d_state = empty_like_recycled(state), d_weights = at::empty_like(weights);
  at::Tensor d_loss = at::empty_like(loss);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "fastmeta::meta_lstm_step_backward", [&] {
    using T = scalar_t;
    const MetaCell<T> cell = make_cell<T>(o, p);
    const MetaGates<T> gates = cell.gates();
    const int64_t H = cell.H, P = cell.P, nw = weights.numel(), width = nw + 2;
    const T* g = grad.const_data_ptr<T>();
    const T* th = theta.const_data_ptr<T>();
    const T* s = state.const_data_ptr<T>();
    const T* gt = grad_theta.const_data_ptr<T>();
    const T* gs = grad_state.const_data_ptr<T>();
    T* dg = d_grad.mutable_data_ptr<T>();
    T* dth = d_theta.mutable_data_ptr<T>();
    T* ds = d_state.mutable_data_ptr<T>();
    std::vector<T> total(width);
    sum_over_slots(
        P, width, total.data(), [&] { return MetaChunk<T>(H); },
        [&](MetaChunk<T>& ws, T* dw, int64_t p0, int64_t p1) {
          const int64_t n = p1 - p0;
          chunk_forward(cell, ws, g, th, s, static_cast<T*>(nullptr), p0, n,
                        dth + p0);  // theta_new is not needed
          const T* f_prev = s + 2 * H * P + p0;
          const T* i_prev = s + (2 * H + 1) * P + p0;
          T* df_prev = ds + 2 * H * P + p0;
          T* di_prev = ds + (2 * H + 1) * P + p0;
          for (int64_t j = 0; j < n; ++j)
            gates.backward(ws.f[j], ws.i[j], th[p0 + j], g[p0 + j], gt[p0 + j], gs[2 * H * P + p0 + j],
                           gs[(2 * H + 1) * P + p0 + j], ws.d_pre_f[j], ws.d_pre_i[j], dth[p0 + j],
                           df_prev[j], di_prev[j], dg[p0 + j]);
          T* dwf = dw + cell.forget_offset();
          T* dwi = dw + cell.input_offset();
          for (int64_t k = 0; k < H; ++k) {
            dwf[k] += row_dot(ws.d_pre_f.data(), ws.h.row(k), n);
            dwi[k] += row_dot(ws.d_pre_i.data(), ws.h.row(k), n);
          }
          dwf[H] += row_dot(ws.d_pre_f.data(), th + p0, n);
          dwi[H] += row_dot(ws.d_pre_i.data(), th + p0, n);
          dwf[H + 1] += row_dot(ws.d_pre_f.data(), f_prev, n);
          dwi[H + 1] += row_dot(ws.d_pre_i.data(), i_prev, n);
          dwf[H + 2] += row_sum(ws.d_pre_f.data(), n);
          dwi[H + 2] += row_sum(ws.d_pre_i.data(), n);
          copy_rows(gs + p0, P, ws.dh.data(), kChunk, H, n);
          run_loop<AddOuter>(cell.forget(), ws.d_pre_f.data(), ws.dh.data(), H, n);
          run_loop<AddOuter>(cell.input_gate(), ws.d_pre_i.data(), ws.dh.data(), H, n);
          layer_backward(ws.layer, cell.W(), ws.dh.data(), {gs + H * P + p0, P}, {ds + H * P + p0, P},
                         {ds + p0, P}, n, ws.dxh.data(), dw, dw + cell.bias_offset());
          for (int64_t j = 0; j < n; ++j)
            dg[p0 + j] += cell.prep.backward(g[p0 + j], ws.dxh[j], ws.dxh[kChunk + j]);
          dw[nw] += row_sum(ws.dxh.data() + 2 * kChunk, n);
          dw[nw + 1] += row_sum(ws.dxh.data() + 3 * kChunk, n);
        });
    std::copy(total.begin(), total.begin() + nw, d_weights.mutable_data_ptr<T>());
    d_loss.fill_(cell.prep.backward(cell.loss, total[nw], total[nw + 1]));
  });
  return {d_grad, d_loss, d_theta, d_state, d_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("meta_lstm_step", &meta_lstm_step);
  m.impl("meta_lstm_step_backward", &meta_lstm_step_backward);
}

}  // namespace fastmeta::cpu
