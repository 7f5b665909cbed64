// Per-task loss, gradient and Hessian-vector product of an MLP learner (the
// fused path of batched second-order MAML), written once for the CPU and
// CUDA kernels.
//
// The learner: L linear layers z = a_prev W^T + b (W [out, in] as in
// nn.Linear), each followed by an elementwise activation (or none); the loss
// is the mean squared error or the cross-entropy of the last layer's output.
// A task's parameters are one flat vector: per layer W (row-major), then b.
//
// The Hessian-vector product is Pearlmutter's R-operator (forward-over-
// reverse): a tangent forward pass along the direction v, then the tangent of
// the backward pass. Activation derivatives are taken from the activation's
// output, so the forward pass keeps one buffer per layer.
//
// `mlp_task` runs the passes through a `Team` that owns the loops: a serial
// one on the CPU (one task per thread), the threads of one block on CUDA.
#pragma once

#include <cmath>

#include "common.h"

namespace fastmeta {

enum class Activation : int { Identity = 0, ReLU = 1, Tanh = 2, Sigmoid = 3, ELU = 4 };
enum class MlpLoss : int { MSE = 0, CrossEntropy = 1 };

constexpr int kMaxMlpLayers = 8;

template <typename T>
FASTMETA_HOST_DEVICE T activate(Activation f, T z) {
  switch (f) {
    case Activation::ReLU:
      return z < T(0) ? T(0) : z;  // NaN stays NaN
    case Activation::Tanh:
      return std::tanh(z);
    case Activation::Sigmoid:
      return T(1) / (T(1) + std::exp(-z));
    case Activation::ELU:
      return z > T(0) ? z : std::expm1(z);
    default:
      return z;
  }
}

// f'(z), from a = f(z). PyTorch's conventions at the kinks: relu'(0) = 0, elu'(0) = 1.
template <typename T>
FASTMETA_HOST_DEVICE T activation_slope(Activation f, T a) {
  switch (f) {
    case Activation::ReLU:
      return a <= T(0) ? T(0) : T(1);
    case Activation::Tanh:
      return T(1) - a * a;
    case Activation::Sigmoid:
      return a * (T(1) - a);
    case Activation::ELU:
      return a > T(0) ? T(1) : a + T(1);
    default:
      return T(1);
  }
}

// f''(z), from a = f(z); elu''(0) = 0, as PyTorch's double backward.
template <typename T>
FASTMETA_HOST_DEVICE T activation_curvature(Activation f, T a) {
  switch (f) {
    case Activation::Tanh:
      return T(-2) * a * (T(1) - a * a);
    case Activation::Sigmoid:
      return a * (T(1) - a) * (T(1) - T(2) * a);
    case Activation::ELU:
      return a >= T(0) ? T(0) : a + T(1);
    default:
      return T(0);
  }
}

// with_activation(a, f) calls f(ActivationConstant<a>{}): an element loop
// written inside f, calling activate(f_constant, ...) and its derivatives, is
// compiled once per activation, without the switch in the loop (which keeps
// the CPU compiler from vectorising it).
template <Activation A>
struct ActivationConstant {
  FASTMETA_HOST_DEVICE constexpr operator Activation() const { return A; }
};

template <typename F>
FASTMETA_HOST_DEVICE void with_activation(Activation a, F f) {
  switch (a) {
    case Activation::ReLU:
      f(ActivationConstant<Activation::ReLU>{});
      break;
    case Activation::Tanh:
      f(ActivationConstant<Activation::Tanh>{});
      break;
    case Activation::Sigmoid:
      f(ActivationConstant<Activation::Sigmoid>{});
      break;
    case Activation::ELU:
      f(ActivationConstant<Activation::ELU>{});
      break;
    default:
      f(ActivationConstant<Activation::Identity>{});
      break;
  }
}

// Layer sizes, activations and loss of the learner; N points per task.
struct MlpShape {
  int layers;
  int64_t width[kMaxMlpLayers + 1];  // width[0] inputs ... width[layers] outputs
  Activation activation[kMaxMlpLayers];
  MlpLoss loss;
  int64_t N;

  FASTMETA_HOST_DEVICE int64_t outputs() const { return width[layers]; }
  FASTMETA_HOST_DEVICE int64_t weight_offset(int l) const {
    int64_t offset = 0;
    for (int m = 0; m < l; ++m) offset += width[m + 1] * (width[m] + 1);
    return offset;
  }
  FASTMETA_HOST_DEVICE int64_t bias_offset(int l) const { return weight_offset(l) + width[l + 1] * width[l]; }
  FASTMETA_HOST_DEVICE int64_t num_params() const { return weight_offset(layers); }
  // Offset of layer l's activations [N, width[l + 1]] in one activation buffer.
  FASTMETA_HOST_DEVICE int64_t activation_offset(int l) const {
    int64_t offset = 0;
    for (int m = 0; m < l; ++m) offset += N * width[m + 1];
    return offset;
  }
  FASTMETA_HOST_DEVICE int64_t activation_size() const { return activation_offset(layers); }
  // Values of scratch one task needs: six activation buffers and N row losses.
  FASTMETA_HOST_DEVICE int64_t workspace_size() const { return 6 * activation_size() + N; }
  // The loss is the mean over N points (and over outputs, for MSE).
  template <typename T>
  FASTMETA_HOST_DEVICE T loss_scale() const {
    return T(1) / T(loss == MlpLoss::MSE ? N * outputs() : N);
  }
};

// One point's loss; g = d loss / d output. MSE targets are y[C]; cross-entropy
// targets the label.
template <typename T>
FASTMETA_HOST_DEVICE T loss_row_forward(const MlpShape& s, const T* out, const T* y, int64_t label, T* g) {
  const int64_t C = s.outputs();
  const T scale = s.loss_scale<T>();
  if (s.loss == MlpLoss::MSE) {
    T sum = 0;
    for (int64_t c = 0; c < C; ++c) {
      const T d = out[c] - y[c];
      sum += d * d;
      g[c] = T(2) * scale * d;
    }
    return scale * sum;
  }
  T m = out[0];
  for (int64_t c = 1; c < C; ++c) m = out[c] > m ? out[c] : m;
  T sum = 0;
  for (int64_t c = 0; c < C; ++c) sum += std::exp(out[c] - m);
  const T lse = m + std::log(sum);
  for (int64_t c = 0; c < C; ++c) g[c] = scale * (std::exp(out[c] - lse) - (c == label ? T(1) : T(0)));
  return scale * (lse - out[label]);
}

// The tangent of g along the output tangent `out_dot`: (d^2 loss / d output^2) out_dot.
template <typename T>
FASTMETA_HOST_DEVICE void loss_row_tangent(const MlpShape& s, const T* out, const T* out_dot, const T* g,
                                           int64_t label, T* g_dot) {
  const int64_t C = s.outputs();
  const T scale = s.loss_scale<T>();
  if (s.loss == MlpLoss::MSE) {
    for (int64_t c = 0; c < C; ++c) g_dot[c] = T(2) * scale * out_dot[c];
    return;
  }
  // softmax p = g / scale + onehot; g_dot = scale * p * (out_dot - p . out_dot).
  T mean = 0;
  for (int64_t c = 0; c < C; ++c) mean += (g[c] / scale + (c == label ? T(1) : T(0))) * out_dot[c];
  for (int64_t c = 0; c < C; ++c) g_dot[c] = (g[c] + (c == label ? scale : T(0))) * (out_dot[c] - mean);
}

// One task's operands. Outputs that are not wanted are null: grad_input
// (d loss / d x), hvp and hvp_input (without a direction).
template <typename T>
struct MlpTaskArgs {
  const T* params;        // [P]
  const T* x;             // [N, width[0]]
  const T* y;             // MSE targets [N, C]
  const int64_t* labels;  // cross-entropy targets [N]
  const T* direction;     // [P], or null
  T* loss;                // [1]
  T* grad;                // [P]
  T* grad_input;          // [N, width[0]]
  T* hvp;                 // [P]: (d^2 loss / d params^2) direction
  T* hvp_input;           // [N, width[0]]: (d^2 loss / d x d params) direction
  T* work;                // [workspace_size()]
};

// Team interface (all loops over a task's small matrices, then no implied sync):
//   for_each(n, f): f(i) for i in [0, n), split among the team;
//   sync(): a barrier;
//   linear(out, in1, W1, in2, W2, bias, N, n_in, n_out):
//       out[N, n_out] = in1 W1^T (+ in2 W2^T) (+ bias);
//   backprop(out, D1, W1, D2, W2, N, n_in, n_out): out[N, n_in] = D1 W1 (+ D2 W2);
//   outer(gW, gb, D1, in1, D2, in2, N, n_in, n_out):
//       gW[n_out, n_in] = D1^T in1 (+ D2^T in2), gb = column sums of D1.
// The second operand pair is skipped where its pointer is null.
template <typename T, typename Team>
FASTMETA_HOST_DEVICE void mlp_task(const MlpShape& s, const MlpTaskArgs<T>& a, Team& team) {
  const int L = s.layers;
  const int64_t N = s.N, C = s.outputs(), S = s.activation_size();
  T* act = a.work;              // activations a_l
  T* g_act = act + S;           // d loss / d a_l
  T* g_pre = g_act + S;         // d loss / d z_l
  T* pre_dot = g_pre + S;       // tangents of z_l
  T* act_dot = pre_dot + S;     // tangents of a_l
  T* g_act_dot = act_dot + S;   // tangents of d loss / d a_l, then of d loss / d z_l
  T* row_loss = g_act_dot + S;  // [N]
  auto layer = [&](T* buffer, int l) { return buffer + s.activation_offset(l); };
  auto input_of = [&](int l) -> const T* { return l == 0 ? a.x : layer(act, l - 1); };
  auto W = [&](const T* p, int l) { return p + s.weight_offset(l); };
  auto b = [&](const T* p, int l) { return p + s.bias_offset(l); };
  const T* out = layer(act, L - 1);

  // Forward and loss.
  for (int l = 0; l < L; ++l) {
    const int64_t n_in = s.width[l], n_out = s.width[l + 1];
    T* a_l = layer(act, l);
    team.linear(a_l, input_of(l), W(a.params, l), static_cast<const T*>(nullptr),
                static_cast<const T*>(nullptr), b(a.params, l), N, n_in, n_out);
    team.sync();
    with_activation(s.activation[l], [&](auto f) {
      team.for_each(N * n_out, [&](int64_t i) { a_l[i] = activate<T>(f, a_l[i]); });
    });
    team.sync();
  }
  T* g_out = layer(g_act, L - 1);
  team.for_each(N, [&](int64_t i) {
    row_loss[i] =
        loss_row_forward(s, out + i * C, a.y ? a.y + i * C : a.y, a.labels ? a.labels[i] : 0, g_out + i * C);
  });
  team.sync();
  team.for_each(1, [&](int64_t) {
    T sum = 0;
    for (int64_t i = 0; i < N; ++i) sum += row_loss[i];
    *a.loss = sum;
  });

  // Backward.
  for (int l = L - 1; l >= 0; --l) {
    const int64_t n_in = s.width[l], n_out = s.width[l + 1];
    const T *a_l = layer(act, l), *g_a = layer(g_act, l);
    T* g_z = layer(g_pre, l);
    with_activation(s.activation[l], [&](auto f) {
      team.for_each(N * n_out, [&](int64_t i) { g_z[i] = g_a[i] * activation_slope<T>(f, a_l[i]); });
    });
    team.sync();
    team.outer(a.grad + s.weight_offset(l), a.grad + s.bias_offset(l), g_z, input_of(l),
               static_cast<const T*>(nullptr), static_cast<const T*>(nullptr), N, n_in, n_out);
    T* g_in = l > 0 ? layer(g_act, l - 1) : a.grad_input;
    if (g_in)
      team.backprop(g_in, g_z, W(a.params, l), static_cast<const T*>(nullptr), static_cast<const T*>(nullptr),
                    N, n_in, n_out);
    team.sync();
  }
  if (!a.direction) return;

  // Tangent forward along the direction.
  for (int l = 0; l < L; ++l) {
    const int64_t n_in = s.width[l], n_out = s.width[l + 1];
    T *z_dot = layer(pre_dot, l), *a_dot = layer(act_dot, l);
    const T* a_l = layer(act, l);
    team.linear(z_dot, input_of(l), W(a.direction, l), l > 0 ? layer(act_dot, l - 1) : nullptr,
                W(a.params, l), b(a.direction, l), N, n_in, n_out);
    team.sync();
    with_activation(s.activation[l], [&](auto f) {
      team.for_each(N * n_out, [&](int64_t i) { a_dot[i] = activation_slope<T>(f, a_l[i]) * z_dot[i]; });
    });
    team.sync();
  }
  T* g_out_dot = layer(g_act_dot, L - 1);
  const T* out_dot = layer(act_dot, L - 1);
  team.for_each(N, [&](int64_t i) {
    loss_row_tangent(s, out + i * C, out_dot + i * C, g_out + i * C, a.labels ? a.labels[i] : 0,
                     g_out_dot + i * C);
  });
  team.sync();

  // Tangent backward.
  for (int l = L - 1; l >= 0; --l) {
    const int64_t n_in = s.width[l], n_out = s.width[l + 1];
    const T *a_l = layer(act, l), *g_a = layer(g_act, l), *z_dot = layer(pre_dot, l);
    const T* g_z = layer(g_pre, l);
    T* g_z_dot = layer(g_act_dot, l);
    with_activation(s.activation[l], [&](auto f) {
      team.for_each(N * n_out, [&](int64_t i) {
        g_z_dot[i] = g_z_dot[i] * activation_slope<T>(f, a_l[i]) +
                     g_a[i] * activation_curvature<T>(f, a_l[i]) * z_dot[i];
      });
    });
    team.sync();
    // The input's tangent is zero for the first layer.
    team.outer(a.hvp + s.weight_offset(l), a.hvp + s.bias_offset(l), g_z_dot, input_of(l),
               l > 0 ? g_z : nullptr, l > 0 ? layer(act_dot, l - 1) : nullptr, N, n_in, n_out);
    T* g_in_dot = l > 0 ? layer(g_act_dot, l - 1) : a.hvp_input;
    if (g_in_dot) team.backprop(g_in_dot, g_z_dot, W(a.params, l), g_z, W(a.direction, l), N, n_in, n_out);
    team.sync();
  }
}

}  // namespace fastmeta
