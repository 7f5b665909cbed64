// Per-coordinate math of the coordinatewise LSTM optimizers, written once for
// the CPU and CUDA kernels: gradient preprocessing, one LSTM unit (PyTorch's
// nn.LSTMCell equations, gate order i, f, g, o) and the Ravi & Larochelle
// parameter update, each with its backward.
//
// Weight layouts (flat vectors, shared by every coordinate):
//   L2O cell:     for each layer l: W_l [4H, in_l + H] (= [weight_ih | weight_hh]),
//                 b_l [4H] (= bias_ih + bias_hh), with in_0 = 2 and in_l = H;
//                 then the head's weight [H] and bias [1].
//   Meta-learner: W [4H, 4 + H], b [4H]; then the forget gate's weight [H + 2]
//                 and bias [1], then the input gate's weight [H + 2] and bias [1].
// Per-coordinate state is stored coordinate-minor, [..., P], so that
// consecutive coordinates (CUDA threads of a warp, CPU vector lanes) read
// consecutive addresses:
//   L2O cell:     [L, 2, H, P]: h then c of each layer.
//   Meta-learner: [2H + 2, P]: h [H], c [H], then the previous forget gate and
//                 input gate.
#pragma once

#include "common.h"

namespace fastmeta {

template <typename T>
FASTMETA_HOST_DEVICE T sigmoid(T x) {
  return T(1) / (T(1) + exp_fast(-x));
}

template <typename T>
FASTMETA_HOST_DEVICE T tanh_fast(T x) {
  return T(1) - T(2) / (T(1) + exp_fast(T(2) * x));
}

// Where things are in the flat weights and the state of the L2O cell.
struct L2oLayout {
  int64_t L, H, P;

  FASTMETA_HOST_DEVICE int64_t in(int64_t l) const { return l == 0 ? 2 : H; }
  FASTMETA_HOST_DEVICE int64_t widest() const { return (H > 2 ? H : 2) + H; }  // of [input; h]
  FASTMETA_HOST_DEVICE int64_t layer_offset(int64_t l) const {
    int64_t offset = 0;
    for (int64_t m = 0; m < l; ++m) offset += 4 * H * (in(m) + H) + 4 * H;
    return offset;
  }
  FASTMETA_HOST_DEVICE int64_t bias_offset(int64_t l) const { return layer_offset(l) + 4 * H * (in(l) + H); }
  FASTMETA_HOST_DEVICE int64_t head_offset() const { return layer_offset(L); }
  FASTMETA_HOST_DEVICE int64_t num_weights() const { return head_offset() + H + 1; }
  // Offset of row 0 of h (which = 0) or c (which = 1) of layer l in the state.
  FASTMETA_HOST_DEVICE int64_t row(int64_t l, int64_t which) const { return (l * 2 + which) * H * P; }
};

// Coordinates per block of the CUDA LSTM kernels (one thread each).
constexpr int kLstmThreads = 64;

// Where the CUDA L2O kernels keep the shared weights and, in the backward,
// the block's weight gradients: in shared memory where it holds them (fastest),
// else in global memory (the weights read through the cache; the gradients
// summed straight into the block's row of partial sums). One plan, used by the
// launcher to size and choose, and by the kernels to lay out their memory.
struct L2oSharedPlan {
  bool weights_shared = true, grads_shared = true;
  int64_t bytes = -1;  // dynamic shared memory per block; -1: does not fit

  // Elements per block: the weights and gradients kept there, then per
  // coordinate the columns of the kernel: forward [input; h] (K), gates (4H),
  // c, h (H each); backward also dh (H), d[input; h] (K) and d update (1).
  static int64_t elements(const L2oLayout& lay, int64_t threads, bool backward, bool weights_shared,
                          bool grads_shared) {
    const int64_t nw = lay.num_weights(), K = lay.widest(), H = lay.H;
    const int64_t columns = backward ? 2 * K + 7 * H + 1 : K + 6 * H;
    return (weights_shared ? nw : 0) + (backward && grads_shared ? nw : 0) + threads * columns;
  }

  // The fastest layout that fits in `limit_bytes` per block: everything in
  // shared memory, then the gradients in global memory, then the weights too.
  static L2oSharedPlan choose(const L2oLayout& lay, int64_t threads, bool backward, int64_t element_bytes,
                              int64_t limit_bytes) {
    for (int level = 0; level < 3; ++level) {
      const bool weights_shared = level < 2, grads_shared = backward && level == 0;
      const int64_t bytes = element_bytes * elements(lay, threads, backward, weights_shared, grads_shared);
      if (bytes <= limit_bytes) return {weights_shared, grads_shared, bytes};
    }
    return {false, false, -1};
  }
};

// The same for the meta-learner, whose LSTM layer reads 4 inputs.
struct MetaLayout {
  static constexpr int64_t kInputs = 4;  // the preprocessed gradient and loss
  int64_t H, P;

  FASTMETA_HOST_DEVICE int64_t bias_offset() const { return 4 * H * (kInputs + H); }
  FASTMETA_HOST_DEVICE int64_t forget_offset() const { return bias_offset() + 4 * H; }
  FASTMETA_HOST_DEVICE int64_t input_offset() const { return forget_offset() + H + 3; }
  FASTMETA_HOST_DEVICE int64_t num_weights() const { return input_offset() + H + 3; }
};

// "log_sign" gradient preprocessing (Andrychowicz et al. 2016, appendix A):
// (log|g| / p, sign g) where |g| >= e^-p, else (-1, e^p g). `threshold` is
// e^-p and `exp_p` is e^p.
template <typename T>
struct LogSign {
  T p, threshold, exp_p;

  static LogSign with_p(double p) { return {T(p), T(std::exp(-p)), T(std::exp(p))}; }

  FASTMETA_HOST_DEVICE void features(T g, T& f0, T& f1) const {
    const T a = g < T(0) ? -g : g;
    if (a >= threshold) {
      f0 = log(a) / p;
      f1 = g > T(0) ? T(1) : T(-1);
    } else {
      f0 = T(-1);
      f1 = exp_p * g;
    }
  }

  // d (d0 * f0 + d1 * f1) / d g.
  FASTMETA_HOST_DEVICE T backward(T g, T d0, T d1) const {
    const T a = g < T(0) ? -g : g;
    return a >= threshold ? d0 / (p * g) : d1 * exp_p;
  }
};

// One LSTM unit: from pre-activations (bias included) and the previous cell
// value, the activated gates, the new cell value and the new hidden value.
template <typename T>
FASTMETA_HOST_DEVICE void lstm_cell(T i, T f, T g, T o, T c_prev, T& c, T& h) {
  c = f * c_prev + i * g;
  h = o * tanh_fast(c);
}

template <typename T>
FASTMETA_HOST_DEVICE void lstm_unit_forward(T pre_i, T pre_f, T pre_g, T pre_o, T c_prev, T& i, T& f, T& g,
                                            T& o, T& c, T& h) {
  i = sigmoid(pre_i);
  f = sigmoid(pre_f);
  g = tanh_fast(pre_g);
  o = sigmoid(pre_o);
  lstm_cell(i, f, g, o, c_prev, c, h);
}

// Its backward: from the activated gates, c_prev, c and the gradients dh, dc
// of h and c, the gradients of the pre-activations and of c_prev.
template <typename T>
FASTMETA_HOST_DEVICE void lstm_unit_backward(T i, T f, T g, T o, T c_prev, T c, T dh, T dc, T& d_pre_i,
                                             T& d_pre_f, T& d_pre_g, T& d_pre_o, T& dc_prev) {
  const T tc = tanh_fast(c);
  const T dc_total = dc + dh * o * (T(1) - tc * tc);
  d_pre_o = dh * tc * o * (T(1) - o);
  d_pre_i = dc_total * g * i * (T(1) - i);
  d_pre_f = dc_total * c_prev * f * (T(1) - f);
  d_pre_g = dc_total * i * (T(1) - g * g);
  dc_prev = dc_total * f;
}

// Ravi & Larochelle's parameter update theta = f * theta_prev - i * grad, from
// the gates' pre-activations without their recurrent and parameter terms
// (w[:H].h + b): f = sigmoid(pre_f + wf_theta theta_prev + wf_gate f_prev).
template <typename T>
struct MetaGates {
  T wf_theta, wf_gate, wi_theta, wi_gate;  // w[H] and w[H + 1] of each gate

  FASTMETA_HOST_DEVICE void forward(T pre_f, T pre_i, T theta_prev, T f_prev, T i_prev, T grad, T& f, T& i,
                                    T& theta) const {
    f = sigmoid(pre_f + wf_theta * theta_prev + wf_gate * f_prev);
    i = sigmoid(pre_i + wi_theta * theta_prev + wi_gate * i_prev);
    theta = f * theta_prev - i * grad;
  }

  // From the gates, the inputs and the gradients of theta, f and i (the new
  // state's), the gradients of both gates' full pre-activations and the direct
  // gradients of theta_prev, f_prev, i_prev and grad.
  FASTMETA_HOST_DEVICE void backward(T f, T i, T theta_prev, T grad, T d_theta, T d_f, T d_i, T& d_pre_f,
                                     T& d_pre_i, T& d_theta_prev, T& d_f_prev, T& d_i_prev, T& d_grad) const {
    d_pre_f = (d_theta * theta_prev + d_f) * f * (T(1) - f);
    d_pre_i = (d_i - d_theta * grad) * i * (T(1) - i);
    d_theta_prev = d_theta * f + d_pre_f * wf_theta + d_pre_i * wi_theta;
    d_f_prev = d_pre_f * wf_gate;
    d_i_prev = d_pre_i * wi_gate;
    d_grad = -d_theta * i;
  }
};

}  // namespace fastmeta
