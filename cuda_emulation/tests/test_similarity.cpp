// csrc/cuda/similarity_forward.cu and similarity_backward.cu under
// emulation: row statistics, the tiled forward (shared-memory tiles,
// 4-lane shuffle reductions, online softmax) and the two backward kernels,
// for the four ops and four metrics, against direct loops in double
// precision; float32, float64, float16 and bfloat16 inputs; NaN and infinite
// entries.
#include "harness.h"

using namespace harness;
namespace fc = fastmeta::cuda;
using fastmeta::Metric;
using Op = fc::SimilarityOp;

const char* metric_name(Metric m) {
  const char* names[] = {"sqeuclidean", "euclidean", "cosine", "dot"};
  return names[int(m)];
}
const char* op_name(Op op) {
  const char* names[] = {"pairwise_distance", "log_softmax", "cross_entropy", "attention_readout"};
  return names[int(op)];
}

// The similarity s(x, y) and its derivatives ds/dx, ds/dy, straight from the definitions.
struct Pair {
  double s;
  std::vector<double> dx, dy;
};

Pair similarity(Metric m, const double* x, const double* y, int64_t D) {
  Pair p{0, std::vector<double>(D), std::vector<double>(D)};
  double dot = 0, xx = 0, yy = 0, d2 = 0;
  for (int64_t d = 0; d < D; ++d) {
    dot += x[d] * y[d], xx += x[d] * x[d], yy += y[d] * y[d], d2 += (x[d] - y[d]) * (x[d] - y[d]);
  }
  // With an infinite entry, the ops' definition |x|^2 + |y|^2 - 2 x.y
  // (fastmeta.reference), where inf - inf is NaN; clamped at 0, NaN kept.
  if (!std::isfinite(dot) || !std::isfinite(xx) || !std::isfinite(yy)) {
    d2 = xx + yy - 2 * dot;
    if (d2 < 0) d2 = 0;
  }
  const double eps = 1e-8, nx = std::sqrt(xx), ny = std::sqrt(yy);
  const double ax = 1 / std::max(nx, eps), ay = 1 / std::max(ny, eps), dist = std::sqrt(d2);
  for (int64_t d = 0; d < D; ++d) {
    const double diff = x[d] - y[d];
    switch (m) {
      case Metric::SqEuclidean:
        p.dx[d] = -2 * diff, p.dy[d] = 2 * diff;
        break;
      case Metric::Euclidean:
        p.dx[d] = dist > 0 ? -diff / dist : 0, p.dy[d] = dist > 0 ? diff / dist : 0;
        break;
      case Metric::Cosine:
        p.dx[d] = ax * ay * y[d] - (nx > eps ? dot * ay * ax * ax * ax * x[d] : 0);
        p.dy[d] = ax * ay * x[d] - (ny > eps ? dot * ax * ay * ay * ay * y[d] : 0);
        break;
      case Metric::Dot:
        p.dx[d] = y[d], p.dy[d] = x[d];
        break;
    }
  }
  p.s = m == Metric::SqEuclidean ? -d2
        : m == Metric::Euclidean ? -dist
        : m == Metric::Cosine    ? dot * ax * ay
                                 : dot;
  return p;
}

// A non-finite entry in the last task: in one query's row, or in one key's.
enum class Poison { None, NanQuery, InfQuery, InfKey };
const char* poison_name(Poison p) {
  const char* names[] = {"", " NaN query", " inf query", " -inf key"};
  return names[int(p)];
}

template <typename T>
void run(Op op, Metric m, int64_t B, int64_t Q, int64_t N, int64_t D, Poison poison = Poison::None) {
  using A = acc_t_of<T>;
  const int64_t V = 3;
  const std::string where = std::string(op_name(op)) + " " + metric_name(m) + " " + name_of<T>() +
                            " B=" + std::to_string(B) + " Q=" + std::to_string(Q) +
                            " N=" + std::to_string(N) + " D=" + std::to_string(D) + poison_name(poison);
  auto x = held<T>(normal(B * Q * D)), y = held<T>(normal(B * N * D)), values = held<T>(normal(B * N * V));
  auto scale = held<T>(uniform(B * Q, 0.3, 1.5));
  for (int64_t b = 0; b < B; ++b)  // a query equal to a key: distance 0
    std::copy(y.begin() + b * N * D, y.begin() + b * N * D + D, x.begin() + b * Q * D);
  const int64_t bad_row = (B - 1) * Q + (Q > 1 ? 1 : 0);  // the poisoned query row
  if (poison == Poison::NanQuery) x[bad_row * D + D / 2] = NAN;
  if (poison == Poison::InfQuery) x[bad_row * D + D / 2] = INFINITY;
  if (poison == Poison::InfKey) y[((B - 1) * N + N / 2) * D] = -INFINITY;
  std::vector<int64_t> target(B * Q);
  for (auto& t : target) t = int64_t(rng()() % N);
  const bool distance = op == Op::PairwiseDistance;
  const int64_t out_size = op == Op::CrossEntropy       ? B * Q
                           : op == Op::AttentionReadout ? B * Q * V
                                                        : B * Q * N;
  std::vector<double> upstream = held<T>(normal(out_size));

  // Reference forward and backward. With a poisoned entry, the upstream
  // gradient is 0 at the outputs that are not finite (as a loss through
  // torch.nan_to_num has it).
  std::vector<double> out, lse, gx, gy, gscale, gvalues;
  auto reference = [&] {
    out.assign(out_size, 0), lse.assign(B * Q, 0), gx.assign(B * Q * D, 0), gy.assign(B * N * D, 0);
    gscale.assign(B * Q, 0), gvalues.assign(B * N * V, 0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t q = 0; q < Q; ++q) {
        const int64_t row = b * Q + q;
        std::vector<Pair> pairs;
        for (int64_t n = 0; n < N; ++n) pairs.push_back(similarity(m, &x[row * D], &y[(b * N + n) * D], D));
        const double sc = scale[row];
        double top = -INFINITY, sum = 0;
        for (auto& p : pairs) top = std::max(top, sc * p.s);
        for (auto& p : pairs) sum += std::exp(sc * p.s - top);
        lse[row] = top + std::log(sum);
        bool row_nan = false;
        for (auto& p : pairs) row_nan |= std::isnan(p.s);
        if (row_nan) lse[row] = NAN;
        std::vector<double> prob(N), dlogit(N);
        for (int64_t n = 0; n < N; ++n) prob[n] = std::exp(sc * pairs[n].s - lse[row]);
        double sum_grad = 0, grad_dot_out = 0;
        if (op == Op::LogSoftmax)
          for (int64_t n = 0; n < N; ++n) sum_grad += upstream[row * N + n];
        if (op == Op::AttentionReadout)
          for (int64_t v = 0; v < V; ++v) {
            for (int64_t n = 0; n < N; ++n) out[row * V + v] += prob[n] * values[(b * N + n) * V + v];
            grad_dot_out += upstream[row * V + v] * out[row * V + v];
          }
        if (op == Op::CrossEntropy) out[row] = lse[row] - sc * pairs[target[row]].s;
        for (int64_t n = 0; n < N; ++n) {
          double ds;  // d loss / d s
          if (distance) {
            out[row * N + n] = m == Metric::Cosine ? 1 - pairs[n].s : -pairs[n].s;
            ds = -upstream[row * N + n];
          } else {
            if (op == Op::LogSoftmax) {
              out[row * N + n] = sc * pairs[n].s - lse[row];
              dlogit[n] = upstream[row * N + n] - prob[n] * sum_grad;
            } else if (op == Op::CrossEntropy) {
              dlogit[n] = upstream[row] * (prob[n] - (n == target[row]));
            } else {
              double gv = 0;
              for (int64_t v = 0; v < V; ++v) {
                gv += upstream[row * V + v] * values[(b * N + n) * V + v];
                gvalues[(b * N + n) * V + v] += prob[n] * upstream[row * V + v];
              }
              dlogit[n] = prob[n] * (gv - grad_dot_out);
            }
            gscale[row] += dlogit[n] * pairs[n].s;
            ds = dlogit[n] * sc;
          }
          for (int64_t d = 0; d < D; ++d) {
            gx[row * D + d] += ds * pairs[n].dx[d];
            gy[(b * N + n) * D + d] += ds * pairs[n].dy[d];
          }
        }
      }
  };
  reference();
  if (poison != Poison::None) {
    for (int64_t i = 0; i < out_size; ++i)
      if (!std::isfinite(out[i])) upstream[i] = 0;
    reference();
  }

  // The kernels.
  std::vector<T> xt = as<T>(x), yt = as<T>(y), vt = as<T>(values), st = as<T>(scale), gt = as<T>(upstream);
  std::vector<A> x_stat(B * Q), x_coeff(B * Q), y_stat(B * N), y_coeff(B * N);
  fc::SimilarityArgs a{};
  a.dtype = dtype_of<T>(), a.metric = m, a.B = B, a.Q = Q, a.N = N, a.D = D, a.V = V;
  a.x = xt.data(), a.y = yt.data(), a.scale = st.data(), a.target = target.data(), a.values = vt.data();
  a.x_stat = x_stat.data(), a.x_coeff = x_coeff.data(), a.y_stat = y_stat.data(), a.y_coeff = y_coeff.data();
  fc::similarity_row_stats(a, nullptr);
  std::vector<A> got_out(out_size, op == Op::AttentionReadout ? A(0) : A(-7)), got_lse(B * Q, A(-7));
  fc::similarity_forward(op, a, got_out.data(), distance ? nullptr : got_lse.data(), nullptr);
  const double tol = tolerance<A>() * (std::is_same_v<A, double> ? 1 : 10);
  compare(got_out, out, tol, tol, where + " out");
  if (distance && m != Metric::Cosine && poison == Poison::None) {
    bool zero = true;  // a query equal to a key is at distance 0 exactly, as torch.cdist
    for (int64_t b = 0; b < B; ++b) zero &= got_out[b * Q * N] == A(0);
    check(zero, where + " self-distance exactly 0");
  }
  if (!distance) compare(got_lse, lse, tol, tol, where + " lse");

  std::vector<A> row_weight(B * Q, 0);
  for (int64_t row = 0; row < B * Q; ++row) {
    if (op == Op::LogSoftmax)
      for (int64_t n = 0; n < N; ++n) row_weight[row] += A(upstream[row * N + n]);
    if (op == Op::AttentionReadout)
      for (int64_t v = 0; v < V; ++v) row_weight[row] += A(upstream[row * V + v]) * got_out[row * V + v];
  }
  std::vector<A> got_gx(B * Q * D, 0), got_gy(B * N * D, 0), got_gscale(B * Q, 0), got_gvalues(B * N * V, 0);
  fc::SimilarityGrads g{};
  g.grad = gt.data(), g.out = got_out.data(), g.lse = got_lse.data(), g.row_weight = row_weight.data();
  g.grad_x = got_gx.data(), g.grad_y = got_gy.data(), g.grad_scale = got_gscale.data();
  g.grad_values = got_gvalues.data();
  fc::similarity_backward(op, a, g, nullptr);
  // With a poisoned entry, the gradients of what it does not touch: the other
  // tasks, and the other queries' rows where a query is poisoned. (Where it
  // does, the kernels skip a term whose factor is 0, as the CPU's do, so
  // their NaN differ from the direct reference's.)
  auto untouched = [&](int64_t rows, int64_t per_task, int64_t width, bool query_side) {
    std::vector<size_t> at;
    for (int64_t row = 0; row < rows; ++row) {
      const bool last_task = row / per_task == B - 1;
      if (poison != Poison::None && last_task && (!query_side || poison == Poison::InfKey || row == bad_row))
        continue;
      for (int64_t j = 0; j < width; ++j) at.push_back(size_t(row * width + j));
    }
    return at;
  };
  auto compare_at = [&](const std::vector<A>& got, const std::vector<double>& want,
                        const std::vector<size_t>& at, const std::string& what) {
    compare(picked(got, at), picked(want, at), tol, tol, where + what);
  };
  compare_at(got_gx, gx, untouched(B * Q, Q, D, true), " grad x");
  compare_at(got_gy, gy, untouched(B * N, N, D, false), " grad y");
  if (!distance) compare_at(got_gscale, gscale, untouched(B * Q, Q, 1, true), " grad scale");
  if (op == Op::AttentionReadout)
    compare_at(got_gvalues, gvalues, untouched(B * N, N, V, false), " grad values");
  // A key whose distances are all infinite or NaN has cotangents 0 and, as on
  // the CPU, gradient 0, not 0 * inf = NaN (desk review, finding 5a).
  if (poison == Poison::InfKey && distance && m == Metric::SqEuclidean) {
    const int64_t key = (B - 1) * N + N / 2;
    bool zero = true;
    for (int64_t d = 0; d < D; ++d) zero &= got_gy[key * D + d] == A(0);
    check(zero, where + " gradient 0 for a key at infinite distances");
  }
}

// A target out of range must fail a device-side assertion, forward and
// backward (run in a process of their own: a failed assertion ends it).
int death(const std::string& name) {
  std::vector<float> x(4, 1.f), y(6, 1.f), scale(2, 1.f), stats(10), out(2), lse(2), grad(2, 1.f), g(12);
  std::vector<int64_t> target{0, 3};  // N = 3
  fc::SimilarityArgs a{};
  a.dtype = DType::Float32, a.metric = Metric::Dot, a.B = 1, a.Q = 2, a.N = 3, a.D = 2, a.V = 0;
  a.x = x.data(), a.y = y.data(), a.scale = scale.data(), a.target = target.data();
  a.x_stat = stats.data(), a.x_coeff = stats.data() + 2, a.y_stat = stats.data() + 4,
  a.y_coeff = stats.data() + 7;
  if (name == "target-forward") fc::similarity_forward(Op::CrossEntropy, a, out.data(), lse.data(), nullptr);
  if (name == "target-backward") {
    fc::SimilarityGrads gr{};
    gr.grad = grad.data(), gr.lse = lse.data(), gr.grad_x = g.data(), gr.grad_y = g.data() + 4;
    gr.grad_scale = g.data() + 10;
    fc::similarity_backward(Op::CrossEntropy, a, gr, nullptr);
  }
  std::printf("no assertion failed\n");
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "--death") return death(argv[2]);
  // One of each; odd sizes; queries over two blocks of 32 rows, keys over
  // two tiles of 32 columns, features over two chunks of 32; many keys.
  const int64_t shapes[][4] = {{1, 1, 1, 1}, {2, 3, 5, 7}, {2, 33, 37, 35}, {1, 5, 70, 3}};
  const Op ops[] = {Op::PairwiseDistance, Op::LogSoftmax, Op::CrossEntropy, Op::AttentionReadout};
  const Metric metrics[] = {Metric::SqEuclidean, Metric::Euclidean, Metric::Cosine, Metric::Dot};
  for (Op op : ops)
    for (Metric m : metrics) {
      if (op == Op::PairwiseDistance && m == Metric::Dot) continue;
      for (const auto& s : shapes) {
        run<float>(op, m, s[0], s[1], s[2], s[3]);
        run<double>(op, m, s[0], s[1], s[2], s[3]);
      }
      run<__half>(op, m, 1, 33, 37, 35);
      run<__nv_bfloat16>(op, m, 2, 3, 5, 7);
      for (Poison poison : {Poison::NanQuery, Poison::InfQuery, Poison::InfKey})
        run<double>(op, m, 2, 3, 4, 5, poison);
    }
  return finish("similarity");
}
