// csrc/cuda/class_prototypes.cu under emulation: label counts (64-bit
// atomics), member lists, prototypes and their gradient, against direct
// loops in double precision; float32, float64, float16 and bfloat16 inputs.
#include "harness.h"

using namespace harness;
namespace fc = fastmeta::cuda;

template <typename T>
void run(int64_t B, int64_t S, int64_t N, int64_t D) {
  using A = acc_t_of<T>;
  const DType dtype = dtype_of<T>();
  const std::string where = std::string(name_of<T>()) + " B=" + std::to_string(B) +
                            " S=" + std::to_string(S) + " N=" + std::to_string(N) + " D=" + std::to_string(D);
  // Every class present in every task, in a shuffled order.
  std::vector<int64_t> labels(B * S);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int64_t> row(S);
    for (int64_t s = 0; s < S; ++s) row[s] = s < N ? s : int64_t(rng()() % N);
    std::shuffle(row.begin(), row.end(), rng());
    std::copy(row.begin(), row.end(), labels.begin() + b * S);
  }
  const auto support64 = held<T>(normal(B * S * D)), grad64 = held<T>(normal(B * N * D));
  const std::vector<T> support = as<T>(support64), grad = as<T>(grad64);

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
  fc::class_prototypes_forward(dtype, support.data(), members.data(), offsets.data(), counts.data(), B, S, N,
                               D, out.data(), nullptr);
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
  std::vector<int64_t> labels{0, 2, 1};  // N = 2: label 2 is out of range
  if (name == "label") {
    fc::class_label_counts(labels.data(), 1, 3, 2, counts.data(), nullptr);
  } else if (name == "backward-label") {
    // The backward's glue counts the labels first (desk review, finding 4):
    // the backward kernel never reads a gradient row for a label out of range.
    std::vector<float> grad(4, 1.f), grad_support(6);
    fc::class_label_counts(labels.data(), 1, 3, 2, counts.data(), nullptr);
    fc::class_prototypes_backward(DType::Float32, grad.data(), labels.data(), counts.data(), 1, 3, 2, 2,
                                  grad_support.data(), nullptr);
  } else if (name == "empty-class") {
    counts = {3, 0};  // class 1 has no examples
    fc::class_prototypes_forward(DType::Float32, support.data(), members.data(), offsets.data(),
                                 counts.data(), 1, 3, 2, 2, out.data(), nullptr);
  }
  std::printf("no assertion failed\n");
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "--death") return death(argv[2]);
  // Odd sizes, a partial block of 256 threads, several blocks, one class.
  const int64_t shapes[][4] = {{1, 1, 1, 1}, {3, 17, 5, 7}, {2, 40, 9, 33}, {4, 9, 9, 1}, {1, 300, 3, 2}};
  for (const auto& s : shapes) {
    run<float>(s[0], s[1], s[2], s[3]);
    run<double>(s[0], s[1], s[2], s[3]);
  }
  run<__half>(2, 11, 4, 5);
  run<__nv_bfloat16>(2, 11, 4, 5);
  // Empty sizes launch nothing and write nothing.
  std::vector<float> untouched(4, -7.f);
  fc::class_prototypes_forward(DType::Float32, nullptr, nullptr, nullptr, nullptr, 0, 3, 2, 2,
                               untouched.data(), nullptr);
  check(untouched[0] == -7.f, "B = 0 writes nothing");
  return finish("class_prototypes");
}
