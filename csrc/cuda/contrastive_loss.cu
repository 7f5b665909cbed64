// CUDA kernels of fastmeta::contrastive_loss and its backward: one warp per pair.
#include "../math/metric.h"
#include "cuda_common.cuh"

namespace fastmeta::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename T>
__device__ acc_t<T> pair_distance(const T* x1, const T* x2, int64_t D, int lane) {
  acc_t<T> sum = 0;
  for (int64_t d = lane; d < D; d += 32) {
    const acc_t<T> diff = to_acc(x1[d]) - to_acc(x2[d]);
    sum += diff * diff;
  }
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  return sqrt(sum);
}

template <typename T>
__global__ void contrastive_kernel(const T* x1, const T* x2, const T* same, acc_t<T> margin, int64_t M,
                                   int64_t D, acc_t<T>* loss) {
  const int64_t i = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / 32;
  if (i >= M) return;
  const acc_t<T> d = pair_distance(x1 + i * D, x2 + i * D, D, threadIdx.x % 32);
  if (threadIdx.x % 32 == 0) loss[i] = contrastive_pair_loss(d, to_acc(same[i]), margin);
}

template <typename T>
__global__ void contrastive_backward_kernel(const T* grad, const T* x1, const T* x2, const T* same,
                                            acc_t<T> margin, int64_t M, int64_t D, acc_t<T>* g1, acc_t<T>* g2,
                                            acc_t<T>* gsame) {
  using A = acc_t<T>;
  const int64_t i = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= M) return;
  const A d = pair_distance(x1 + i * D, x2 + i * D, D, lane);
  const A g = to_acc(grad[i]);
  if (lane == 0) gsame[i] = g * contrastive_pair_d_same(d, margin);
  // d distance / d x1 = (x1 - x2) / d, taken as 0 where d = 0 (as torch.cdist).
  const A coeff = d > A(0) ? g * contrastive_pair_d_distance(d, to_acc(same[i]), margin) / d : A(0);
  for (int64_t k = lane; k < D; k += 32) {
    const A diff = coeff * (to_acc(x1[i * D + k]) - to_acc(x2[i * D + k]));
    g1[i * D + k] = diff;
    g2[i * D + k] = -diff;
  }
}

}  // namespace

void contrastive_loss_forward(DType dtype, const void* x1, const void* x2, const void* same, double margin,
                              int64_t M, int64_t D, void* loss, cudaStream_t stream) {
  if (M == 0) return;
  FASTMETA_DISPATCH_DTYPE(dtype, [&] {
    contrastive_kernel<T><<<blocks_for(M, kWarpsPerBlock), kWarpsPerBlock * 32, 0, stream>>>(
        static_cast<const T*>(x1), static_cast<const T*>(x2), static_cast<const T*>(same),
        static_cast<acc_t<T>>(margin), M, D, static_cast<acc_t<T>*>(loss));
    check_launch("contrastive_loss");
  });
}

void contrastive_loss_backward(DType dtype, const void* grad, const void* x1, const void* x2,
                               const void* same, double margin, int64_t M, int64_t D, void* grad_x1,
                               void* grad_x2, void* grad_same, cudaStream_t stream) {
  if (M == 0) return;
  FASTMETA_DISPATCH_DTYPE(dtype, [&] {
    using A = acc_t<T>;
    contrastive_backward_kernel<T><<<blocks_for(M, kWarpsPerBlock), kWarpsPerBlock * 32, 0, stream>>>(
        static_cast<const T*>(grad), static_cast<const T*>(x1), static_cast<const T*>(x2),
        static_cast<const T*>(same), static_cast<A>(margin), M, D, static_cast<A*>(grad_x1),
        static_cast<A*>(grad_x2), static_cast<A*>(grad_same));
    check_launch("contrastive_loss_backward");
  });
}

}  // namespace fastmeta::cuda
