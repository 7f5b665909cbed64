// CUDA kernels of fastmeta::class_prototypes and its backward.
#include "cuda_common.cuh"

namespace fastmeta::cuda {
namespace {

constexpr int kThreads = 256;

// One block per task: counts its labels, which must be in [0, N).
__global__ void count_labels_kernel(const int64_t* labels, int64_t S, int64_t N, int64_t* counts) {
  const int64_t b = blockIdx.x;
  for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
    const int64_t c = labels[b * S + s];
    FASTMETA_DEVICE_ASSERT(c >= 0 && c < N && "class_prototypes: a label is out of range");
    if (c >= 0 && c < N) atomicAdd(reinterpret_cast<unsigned long long*>(counts + b * N + c), 1ull);
  }
}

// One thread per (task, class): the indices of the class's examples, in
// order, from offsets[b, c] on in the task's row of members [B, S].
__global__ void class_members_kernel(const int64_t* labels, const int64_t* offsets, int64_t B, int64_t S,
                                     int64_t N, int64_t* members) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= B * N) return;
  const int64_t b = i / N, c = i % N;
  int64_t k = offsets[i];
  for (int64_t s = 0; s < S; ++s)
    if (labels[b * S + s] == c) members[b * S + k++] = s;
}

// One thread per (task, class, feature): the mean over that class's examples,
// read through its member list, so the work is O(B S D) (consecutive threads
// read consecutive features), not a scan of every label per output.
template <typename T>
__global__ void prototypes_kernel(const T* support, const int64_t* members, const int64_t* offsets,
                                  const int64_t* counts, int64_t B, int64_t S, int64_t N, int64_t D,
                                  acc_t<T>* out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= B * N * D) return;
  const int64_t d = i % D, bc = i / D, b = bc / N;
  const int64_t count = counts[bc];
  FASTMETA_DEVICE_ASSERT(count > 0 && "class_prototypes: a class has no support examples");
  const int64_t* member = members + b * S + offsets[bc];
  acc_t<T> sum = 0;
  for (int64_t k = 0; k < count; ++k) sum += to_acc(support[(b * S + member[k]) * D + d]);
  out[i] = sum / acc_t<T>(count);
}

template <typename T>
__global__ void prototypes_backward_kernel(const T* grad, const int64_t* labels, const int64_t* counts,
                                           int64_t B, int64_t S, int64_t N, int64_t D,
                                           acc_t<T>* grad_support) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= B * S * D) return;
  const int64_t d = i % D, s = (i / D) % S, b = i / (S * D);
  const int64_t c = labels[b * S + s];
  if (c < 0 || c >= N) return;  // count_labels_kernel has asserted
  grad_support[i] = to_acc(grad[(b * N + c) * D + d]) / acc_t<T>(counts[b * N + c]);
}

}  // namespace

void class_label_counts(const int64_t* labels, int64_t B, int64_t S, int64_t N, int64_t* counts,
                        cudaStream_t stream) {
  if (B == 0 || S == 0) return;
  count_labels_kernel<<<grid_blocks(B), kThreads, 0, stream>>>(labels, S, N, counts);
  check_launch("class_label_counts");
}

void class_members(const int64_t* labels, const int64_t* offsets, int64_t B, int64_t S, int64_t N,
                   int64_t* members, cudaStream_t stream) {
  if (B * N == 0) return;
  class_members_kernel<<<blocks_for(B * N, kThreads), kThreads, 0, stream>>>(labels, offsets, B, S, N,
                                                                             members);
  check_launch("class_members");
}

void class_prototypes_forward(DType dtype, const void* support, const int64_t* members,
                              const int64_t* offsets, const int64_t* counts, int64_t B, int64_t S, int64_t N,
                              int64_t D, void* out, cudaStream_t stream) {
  if (B * N * D == 0) return;
  FASTMETA_DISPATCH_DTYPE(dtype, [&] {
    prototypes_kernel<T><<<blocks_for(B * N * D, kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(support), members, offsets, counts, B, S, N, D, static_cast<acc_t<T>*>(out));
    check_launch("class_prototypes");
  });
}

void class_prototypes_backward(DType dtype, const void* grad, const int64_t* labels, const int64_t* counts,
                               int64_t B, int64_t S, int64_t N, int64_t D, void* grad_support,
                               cudaStream_t stream) {
  if (B * S * D == 0) return;
  FASTMETA_DISPATCH_DTYPE(dtype, [&] {
    prototypes_backward_kernel<T><<<blocks_for(B * S * D, kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(grad), labels, counts, B, S, N, D, static_cast<acc_t<T>*>(grad_support));
    check_launch("class_prototypes_backward");
  });
}

}  // namespace fastmeta::cuda
