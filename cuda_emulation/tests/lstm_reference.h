// Double-precision references of the coordinatewise LSTM steps (the
// formulas of fastmeta.reference.l2o_lstm_step and meta_lstm_step), and
// central differences of a weighted sum of their outputs.
#pragma once

#include <cmath>
#include <functional>
#include <vector>

namespace lstm_reference {

inline double sigmoid(double z) { return 1 / (1 + std::exp(-z)); }

// Andrychowicz et al.'s preprocessing: (log|g| / p, sign g) where |g| >= e^-p, else (-1, e^p g).
inline void log_sign(double g, double p, double* out) {
  if (std::fabs(g) >= std::exp(-p)) {
    out[0] = std::log(std::fabs(g)) / p, out[1] = g > 0 ? 1.0 : -1.0;
  } else {
    out[0] = -1, out[1] = std::exp(p) * g;
  }
}

// nn.LSTMCell with weights [4H, in + H] (input then hidden columns), bias
// [4H], gates i, f, g, o; h and c updated in place.
inline void cell(const double* x, int64_t in, double* h, double* c, const double* W, const double* b,
                 int64_t H) {
  std::vector<double> gates(4 * H);
  for (int64_t r = 0; r < 4 * H; ++r) {
    double v = b[r];
    for (int64_t k = 0; k < in; ++k) v += W[r * (in + H) + k] * x[k];
    for (int64_t k = 0; k < H; ++k) v += W[r * (in + H) + in + k] * h[k];
    gates[r] = v;
  }
  for (int64_t k = 0; k < H; ++k) {
    const double i = sigmoid(gates[k]), f = sigmoid(gates[H + k]), g = std::tanh(gates[2 * H + k]),
                 o = sigmoid(gates[3 * H + k]);
    c[k] = f * c[k] + i * g;
    h[k] = o * std::tanh(c[k]);
  }
}

// d/d input[i] of sum(weight * f(input)) for each i of `at`, by central
// differences of f.
inline std::vector<double> numeric_gradient(std::vector<double>& input, const std::vector<double>& weight,
                                            const std::function<std::vector<double>()>& f,
                                            const std::vector<size_t>& at, double step = 1e-6) {
  std::vector<double> grad;
  for (size_t i : at) {
    const double kept = input[i];
    double sides[2];
    for (int side = 0; side < 2; ++side) {
      input[i] = kept + (side ? -step : step);
      const std::vector<double> out = f();
      sides[side] = 0;
      for (size_t k = 0; k < out.size(); ++k) sides[side] += weight[k] * out[k];
    }
    input[i] = kept;
    grad.push_back((sides[0] - sides[1]) / (2 * step));
  }
  return grad;
}

// Every index below n, or `most` of them spread evenly.
inline std::vector<size_t> some_indices(size_t n, size_t most) {
  std::vector<size_t> at;
  const size_t stride = n > most ? (n + most - 1) / most : 1;
  for (size_t i = 0; i < n; i += stride) at.push_back(i);
  return at;
}

}  // namespace lstm_reference
