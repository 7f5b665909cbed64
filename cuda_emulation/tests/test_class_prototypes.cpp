// csrc/cuda/class_prototypes.cu under emulation: label counts (64-bit
// atomics), member lists, prototypes and their gradient, against direct
// loops in double precision; float32, float64, float16 and bfloat16 inputs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "harness.h"

using namespace harness;
namespace fc = fastmeta::cuda;

template <typename T>
T from_double(double v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half(float(v));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16(float(v));
  else return static_cast<T>(v);
}
template <typename T>
double to_double(T v) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else return static_cast<double>(v);
}

template <typename T, typename A>
void run(DType dtype, const char* name, int64_t B, int64_t S, int64_t N, int64_t D) {
  const std::string where = std::string(name) + " B=" + std::to_string(B) + " S=" + std::to_string(S) +
                            " N=" + std::to_string(N) + " D=" + std::to_string(D);
  // Every class present in every task, in a shuffled order.
  std::vector<int64_t> labels(B * S);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int64_t> row(S);
    for (int64_t s = 0; s < S; ++s) row[s] = s < N ? s : int64_t(rng()() % N);
    std::shuffle(row.begin(), row.end(), rng());
    std::copy(row.begin(), row.end(), labels.begin() + b * S);
  }
  std::vector<T> support(B * S * D), grad(B * N * D);
  std::vector<double> support64(support.size()), grad64(grad.size());
  auto values = normal(support.size()), grads = normal(grad.size());
  for (size_t i = 0; i < support.size(); ++i) support64[i] = to_double(support[i] = from_double<T>(values[i]));
  for (size_t i = 0; i < grad.size(); ++i) grad64[i] = to_double(grad[i] = from_double<T>(grads[i]));

  std::vector<int64_t> counts(B * N, 0), offsets(B * N), members(B * S, -1);
  fc::class_label_counts(labels.data(), B, S, N, counts.data(), nullptr);
  std::vector<double> want_counts(B * N, 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) want_counts[b * N + labels[b * S + s]] += 1;
  compare(counts, want_counts, 0, 0, where + " counts");
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0, total = 0; c < N; ++c) offsets[b * N + c] = total, total += counts[b * N + c];
  fc::class_members(labels.data(), offsets.data(), B, S, N, members.data(), nullptr);
  bool members_ok = true;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0, k = 0; c < N; ++c)
      for (int64_t s = 0; s < S; ++s)
        if (labels[b * S + s] == c) members_ok &= members[b * S + k++] == s;
  check(members_ok, where + " members");

  std::vector<A> out(B * N * D, A(-7)), grad_support(B * S * D, A(-7));
  fc::class_prototypes_forward(dtype, support.data(), members.data(), offsets.data(), counts.data(), B, S,
                               N, D, out.data(), nullptr);
  fc::class_prototypes_backward(dtype, grad.data(), labels.data(), counts.data(), B, S, N, D,
                                grad_support.data(), nullptr);
  std::vector<double> want(out.size(), 0), want_grad(grad_support.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) {
      const int64_t c = labels[b * S + s];
      for (int64_t d = 0; d < D; ++d) {
        want[(b * N + c) * D + d] += support64[(b * S + s) * D + d] / want_counts[b * N + c];
        want_grad[(b * S + s) * D + d] = grad64[(b * N + c) * D + d] / want_counts[b * N + c];
      }
    }
  compare(out, want, tolerance<A>(), tolerance<A>(), where + " prototypes");
  compare(grad_support, want_grad, tolerance<A>(), tolerance<A>(), where + " gradient");
}

// Values the kernels must refuse with a device-side assertion (run in a
// process of their own: a failed assertion ends it).
int death(const std::string& name) {
  std::vector<int64_t> counts(2, 0), offsets{0, 2}, members{0, 1, 2};
  std::vector<float> support(6, 1.f), out(4);
  if (name == "label") {
    std::vector<int64_t> labels{0, 2, 1};  // N = 2: label 2 is out of range
    fc::class_label_counts(labels.data(), 1, 3, 2, counts.data(), nullptr);
  } else if (name == "empty-class") {
    counts = {3, 0};  // class 1 has no examples
    fc::class_prototypes_forward(DType::Float32, support.data(), members.data(), offsets.data(), counts.data(),
                                 1, 3, 2, 2, out.data(), nullptr);
  }
  std::printf("no assertion failed\n");
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "--death") return death(argv[2]);
  // Odd sizes, a partial block of 256 threads, several blocks, one class.
  const int64_t shapes[][4] = {{1, 1, 1, 1}, {3, 17, 5, 7}, {2, 40, 9, 33}, {4, 9, 9, 1}, {1, 300, 3, 2}};
  for (const auto& s : shapes) {
    run<float, float>(DType::Float32, "float32", s[0], s[1], s[2], s[3]);
    run<double, double>(DType::Float64, "float64", s[0], s[1], s[2], s[3]);
  }
  run<__half, float>(DType::Float16, "float16", 2, 11, 4, 5);
  run<__nv_bfloat16, float>(DType::BFloat16, "bfloat16", 2, 11, 4, 5);
  // Empty sizes launch nothing and write nothing.
  std::vector<float> untouched(4, -7.f);
  fc::class_prototypes_forward(DType::Float32, nullptr, nullptr, nullptr, nullptr, 0, 3, 2, 2,
                               untouched.data(), nullptr);
  check(untouched[0] == -7.f, "B = 0 writes nothing");
  return finish("class_prototypes");
}
