// csrc/cuda/contrastive_loss.cu under emulation: one warp per pair with a
// full-mask shuffle reduction, against direct loops in double precision.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "harness.h"

using namespace harness;
namespace fc = fastmeta::cuda;

template <typename T>
void run(int64_t M, int64_t D, double margin, bool special) {
  const std::string where = std::string(name_of<T>()) + " M=" + std::to_string(M) + " D=" + std::to_string(D);
  auto x1 = held<T>(normal(M * D)), x2 = held<T>(normal(M * D)), grad = held<T>(normal(M));
  std::vector<double> same(M);
  for (int64_t i = 0; i < M; ++i) same[i] = double(i % 3 == 0);
  if (M > 1) std::copy(x1.begin(), x1.begin() + D, x2.begin());  // pair 0 at distance 0
  if (special) x1[D + 1] = NAN;  // pair 1: NaN loss and gradients, the others unchanged
  std::vector<T> loss(M), g1(M * D), g2(M * D), gsame(M);
  fc::contrastive_loss_forward(dtype_of<T>(), as<T>(x1).data(), as<T>(x2).data(), as<T>(same).data(), margin,
                               M, D, loss.data(), nullptr);
  fc::contrastive_loss_backward(dtype_of<T>(), as<T>(grad).data(), as<T>(x1).data(), as<T>(x2).data(),
                                as<T>(same).data(), margin, M, D, g1.data(), g2.data(), gsame.data(),
                                nullptr);
  std::vector<double> want(M), w1(M * D), w2(M * D), wsame(M);
  for (int64_t i = 0; i < M; ++i) {
    double sum = 0;
    for (int64_t d = 0; d < D; ++d) sum += (x1[i * D + d] - x2[i * D + d]) * (x1[i * D + d] - x2[i * D + d]);
    const double dist = std::sqrt(sum), hinge = std::max(margin - dist, 0.0);
    want[i] = same[i] * dist * dist + (1 - same[i]) * hinge * hinge;
    wsame[i] = grad[i] * (dist * dist - hinge * hinge);
    const double d_dist = 2 * same[i] * dist - 2 * (1 - same[i]) * hinge;
    // 0 where the distance is 0 (as torch.cdist) or NaN (as the CPU kernel:
    // the NaN then reaches the gradient through x1 - x2 only).
    const double coeff = dist > 0 ? grad[i] * d_dist / dist : 0.0;
    for (int64_t d = 0; d < D; ++d) {
      w1[i * D + d] = coeff * (x1[i * D + d] - x2[i * D + d]);
      w2[i * D + d] = -w1[i * D + d];
    }
  }
  compare(loss, want, tolerance<T>(), tolerance<T>(), where + " loss");
  compare(gsame, wsame, tolerance<T>(), tolerance<T>(), where + " d same");
  compare(g1, w1, tolerance<T>(), tolerance<T>(), where + " d x1");
  compare(g2, w2, tolerance<T>(), tolerance<T>(), where + " d x2");
}

int main() {
  // One pair, a partial warp of features, several blocks of 8 warps and a partial one.
  const int64_t shapes[][2] = {{1, 1}, {3, 5}, {9, 33}, {20, 64}, {17, 100}};
  for (const auto& s : shapes) {
    run<float>(s[0], s[1], 2.0, false);
    run<double>(s[0], s[1], 2.0, false);
  }
  run<float>(5, 7, 1.5, true);
  run<double>(5, 7, 1.5, true);
  return finish("contrastive_loss");
}
