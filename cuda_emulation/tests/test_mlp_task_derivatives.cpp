// csrc/cuda/mlp_task_derivatives.cu under emulation: one block per task,
// its activations in shared memory (default and opted-in sizes) or in global
// scratch. Loss, gradient and input gradient against a direct
// double-precision forward and backward written here; Hessian-vector
// products against central differences of that gradient.
#include "harness.h"

using namespace harness;
namespace fc = fastmeta::cuda;
using fastmeta::Activation;
using fastmeta::MlpLoss;

double act(Activation f, double z) {
  switch (f) {
    case Activation::ReLU:
      return z > 0 ? z : 0;
    case Activation::Tanh:
      return std::tanh(z);
    case Activation::Sigmoid:
      return 1 / (1 + std::exp(-z));
    case Activation::ELU:
      return z > 0 ? z : std::expm1(z);
    default:
      return z;
  }
}
double act_slope(Activation f, double z) {
  switch (f) {
    case Activation::ReLU:
      return z > 0 ? 1 : 0;
    case Activation::Tanh:
      return 1 - std::tanh(z) * std::tanh(z);
    case Activation::Sigmoid:
      return act(f, z) * (1 - act(f, z));
    case Activation::ELU:
      return z > 0 ? 1 : std::exp(z);
    default:
      return 1;
  }
}

struct Derivatives {
  double loss;
  std::vector<double> grad, grad_input;
};

// One task's loss and its gradients, by a direct forward and backward pass.
Derivatives derivatives(const fastmeta::MlpShape& s, const double* p, const double* x, const double* y,
                        const int64_t* labels) {
  const int64_t N = s.N, L = s.layers;
  std::vector<std::vector<double>> z(L), a(L + 1);
  a[0].assign(x, x + N * s.width[0]);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t in = s.width[l], out = s.width[l + 1];
    const double *W = p + s.weight_offset(int(l)), *b = p + s.bias_offset(int(l));
    z[l].assign(N * out, 0), a[l + 1].assign(N * out, 0);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < out; ++j) {
        double v = b[j];
        for (int64_t k = 0; k < in; ++k) v += W[j * in + k] * a[l][i * in + k];
        z[l][i * out + j] = v, a[l + 1][i * out + j] = act(s.activation[l], v);
      }
  }
  const int64_t C = s.outputs();
  std::vector<double> d(N * C);  // d loss / d output
  double loss = 0;
  for (int64_t i = 0; i < N; ++i) {
    const double* o = &a[L][i * C];
    if (s.loss == MlpLoss::MSE) {
      for (int64_t c = 0; c < C; ++c) {
        loss += (o[c] - y[i * C + c]) * (o[c] - y[i * C + c]) / double(N * C);
        d[i * C + c] = 2 * (o[c] - y[i * C + c]) / double(N * C);
      }
    } else {
      double top = -INFINITY, sum = 0;
      for (int64_t c = 0; c < C; ++c) top = std::max(top, o[c]);
      for (int64_t c = 0; c < C; ++c) sum += std::exp(o[c] - top);
      loss += (top + std::log(sum) - o[labels[i]]) / double(N);
      for (int64_t c = 0; c < C; ++c)
        d[i * C + c] = (std::exp(o[c] - top) / sum - (c == labels[i])) / double(N);
    }
  }
  Derivatives r{loss, std::vector<double>(s.num_params(), 0), {}};
  for (int64_t l = L - 1; l >= 0; --l) {
    const int64_t in = s.width[l], out = s.width[l + 1];
    const double* W = p + s.weight_offset(int(l));
    std::vector<double> back(N * in, 0);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < out; ++j) {
        const double dz = d[i * out + j] * act_slope(s.activation[l], z[l][i * out + j]);
        r.grad[s.bias_offset(int(l)) + j] += dz;
        for (int64_t k = 0; k < in; ++k) {
          r.grad[s.weight_offset(int(l)) + j * in + k] += dz * a[l][i * in + k];
          back[i * in + k] += dz * W[j * in + k];
        }
      }
    d = back;
  }
  r.grad_input = d;
  return r;
}

template <typename T>
void run(std::vector<int64_t> widths, std::vector<Activation> acts, MlpLoss loss, int64_t tasks, int64_t N,
         bool force_global = false) {
  fastmeta::MlpShape s{};
  s.layers = int(acts.size()), s.loss = loss, s.N = N;
  for (size_t l = 0; l < widths.size(); ++l) s.width[l] = widths[l];
  for (size_t l = 0; l < acts.size(); ++l) s.activation[l] = acts[l];
  const int64_t P = s.num_params(), X = N * widths[0], C = s.outputs();
  const std::string where = std::string(name_of<T>()) + (loss == MlpLoss::MSE ? " mse" : " cross-entropy") +
                            " layers=" + std::to_string(s.layers) + " tasks=" + std::to_string(tasks) +
                            " N=" + std::to_string(N);
  auto params = held<T>(normal(tasks * P, 0.5)), x = held<T>(normal(tasks * X)),
       y = held<T>(normal(tasks * N * C));
  auto direction = held<T>(normal(tasks * P));
  std::vector<int64_t> labels(tasks * N);
  for (auto& l : labels) l = int64_t(rng()() % C);
  std::vector<T> pt = as<T>(params), xt = as<T>(x), yt = as<T>(y), dt = as<T>(direction);
  std::vector<T> got_loss(tasks, T(NAN)), grad(tasks * P, T(NAN)), grad_input(tasks * X, T(NAN)),
      hvp(tasks * P, T(NAN)), hvp_input(tasks * X, T(NAN));
  fc::MlpArgs a{dtype_of<T>(),
                s,
                tasks,
                pt.data(),
                P,
                xt.data(),
                loss == MlpLoss::MSE ? yt.data() : nullptr,
                loss == MlpLoss::MSE ? nullptr : labels.data(),
                dt.data(),
                got_loss.data(),
                grad.data(),
                grad_input.data(),
                hvp.data(),
                hvp_input.data()};
  int64_t bytes = fc::mlp_global_workspace_bytes(a);
  if (force_global) bytes = tasks * s.workspace_size() * int64_t(sizeof(T));
  std::vector<T> workspace(bytes / sizeof(T), T(NAN));
  fc::mlp_task_derivatives(a, bytes ? workspace.data() : nullptr, nullptr);

  std::vector<double> want_loss(tasks), want_grad, want_input, want_hvp, want_hvp_input;
  const double h = 1e-5;
  for (int64_t t = 0; t < tasks; ++t) {
    auto at = [&](double step) {
      std::vector<double> p(params.begin() + t * P, params.begin() + (t + 1) * P);
      for (int64_t i = 0; i < P; ++i) p[i] += step * direction[t * P + i];
      return derivatives(s, p.data(), &x[t * X], &y[t * N * C], &labels[t * N]);
    };
    const Derivatives d = at(0), plus = at(h), minus = at(-h);
    want_loss[t] = d.loss;
    want_grad.insert(want_grad.end(), d.grad.begin(), d.grad.end());
    want_input.insert(want_input.end(), d.grad_input.begin(), d.grad_input.end());
    for (int64_t i = 0; i < P; ++i) want_hvp.push_back((plus.grad[i] - minus.grad[i]) / (2 * h));
    for (int64_t i = 0; i < X; ++i)
      want_hvp_input.push_back((plus.grad_input[i] - minus.grad_input[i]) / (2 * h));
  }
  const double tol = tolerance<T>() * 10, fd = std::is_same_v<T, double> ? 1e-6 : 1e-3;
  compare(got_loss, want_loss, tol, tol, where + " loss");
  compare(grad, want_grad, tol, tol, where + " grad");
  compare(grad_input, want_input, tol, tol, where + " grad input");
  compare(hvp, want_hvp, fd, fd, where + " hvp");
  compare(hvp_input, want_hvp_input, fd, fd, where + " hvp input");
}

// A cross-entropy label out of range must fail a device-side assertion (run
// in a process of its own: a failed assertion ends it).
int death(const std::string& name) {
  fastmeta::MlpShape s{};
  s.layers = 1, s.width[0] = 2, s.width[1] = 3, s.activation[0] = Activation::Identity;
  s.loss = MlpLoss::CrossEntropy, s.N = 2;
  std::vector<double> params(9, 0.1), x(4, 1.0), loss(1), grad(9);
  std::vector<int64_t> labels{0, 3};  // 3 classes
  fc::MlpArgs a{DType::Float64, s,       1,           params.data(), 9,       x.data(), nullptr,
                labels.data(),  nullptr, loss.data(), grad.data(),   nullptr, nullptr,  nullptr};
  if (name == "label") fc::mlp_task_derivatives(a, nullptr, nullptr);
  std::printf("no assertion failed\n");
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "--death") return death(argv[2]);
  using A = Activation;
  for (MlpLoss loss : {MlpLoss::MSE, MlpLoss::CrossEntropy}) {
    run<double>({3, 40, 17, 6, 2}, {A::Tanh, A::ELU, A::Sigmoid, A::Identity}, loss, 3, 10);
    run<float>({3, 40, 17, 6, 2}, {A::Tanh, A::ELU, A::Sigmoid, A::Identity}, loss, 3, 10);
    run<double>({1, 5, 1}, {A::ReLU, A::Identity}, loss, 2, 1);
  }
  // Shared memory past the 48 KiB default (opted in), and global scratch.
  run<float>({3, 40, 17, 6, 2}, {A::Tanh, A::ELU, A::Sigmoid, A::Identity}, MlpLoss::MSE, 2, 40);
  run<double>({3, 40, 17, 6, 2}, {A::Tanh, A::ELU, A::Sigmoid, A::Identity}, MlpLoss::MSE, 2, 40);
  run<double>({3, 40, 17, 6, 2}, {A::Tanh, A::ELU, A::Sigmoid, A::Identity}, MlpLoss::CrossEntropy, 2, 10,
              true);
  run<float>({2, 8, 3}, {A::ReLU, A::Identity}, MlpLoss::MSE, 2, 900);
  return finish("mlp_task_derivatives");
}
