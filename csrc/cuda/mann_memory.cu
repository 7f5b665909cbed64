// CUDA kernels of fastmeta::mann_memory: one thread per episode runs the
// episode's steps with the math the CPU kernel runs (csrc/math/mann.h).
#include "cuda_common.cuh"

namespace fastmeta::cuda {
namespace {

constexpr int kThreads = 32;

template <typename T>
__global__ void mann_forward_kernel(MannArgs a, T decay, T* reads, T* memory_out, T* weights_out,
                                    T* usage_out, T* memories, T* history, int64_t* slots, T* scratch) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b >= a.B) return;
  const MannSizes z = a.sizes;
  const int64_t S = z.S, W = z.W, H = z.H, TH = z.T * H;
  mann_forward_episode<T>(
      z, static_cast<const T*>(a.memory) + b * S * W, static_cast<const T*>(a.usage) + b * S,
      static_cast<const T*>(a.read_weights) + b * H * S, static_cast<const T*>(a.keys) + b * TH * W,
      static_cast<const T*>(a.gates) + b * TH, static_cast<const T*>(a.strengths) + b * TH, decay,
      reads + b * TH * W, memory_out + b * S * W, weights_out + b * H * S, usage_out + b * S,
      memories + b * z.T * S * W, history + b * TH * S, slots + b * z.T * z.least_used(),
      scratch + b * z.forward_scratch());
}

template <typename T>
__global__ void mann_backward_kernel(MannArgs a, const T* grad_reads, const T* grad_memory,
                                     const T* grad_weights, const T* memories, const T* history,
                                     const int64_t* slots, T* grad_memory0, T* grad_weights0, T* grad_keys,
                                     T* grad_gates, T* grad_strengths, T* scratch) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b >= a.B) return;
  const MannSizes z = a.sizes;
  const int64_t S = z.S, W = z.W, H = z.H, TH = z.T * H, n = z.least_used();
  const int64_t* episode_slots = slots + b * z.T * n;
  for (int64_t k = 0; k < z.T * n; ++k) {
    FASTMETA_DEVICE_ASSERT(episode_slots[k] >= 0 && episode_slots[k] < S &&
                           "mann_memory_backward: a least-used slot is out of range");
  }
  mann_backward_episode<T>(
      z, grad_reads + b * TH * W, grad_memory + b * S * W, grad_weights + b * H * S,
      static_cast<const T*>(a.read_weights) + b * H * S, static_cast<const T*>(a.keys) + b * TH * W,
      static_cast<const T*>(a.gates) + b * TH, static_cast<const T*>(a.strengths) + b * TH,
      memories + b * z.T * S * W, history + b * TH * S, episode_slots, grad_memory0 + b * S * W,
      grad_weights0 + b * H * S, grad_keys + b * TH * W, grad_gates + b * TH, grad_strengths + b * TH,
      scratch + b * z.backward_scratch());
}

}  // namespace

void mann_memory_forward(const MannArgs& a, double decay, void* reads, void* memory_out, void* weights_out,
                         void* usage_out, void* memories, void* history, int64_t* slots, void* scratch,
                         cudaStream_t stream) {
  if (a.B == 0) return;
  dispatch_float_or_double(a.dtype, "mann_memory", [&](auto zero) {
    using T = decltype(zero);
    mann_forward_kernel<T><<<blocks_for(a.B, kThreads), kThreads, 0, stream>>>(
        a, T(decay), static_cast<T*>(reads), static_cast<T*>(memory_out), static_cast<T*>(weights_out),
        static_cast<T*>(usage_out), static_cast<T*>(memories), static_cast<T*>(history), slots,
        static_cast<T*>(scratch));
    check_launch("mann_memory");
  });
}

void mann_memory_backward(const MannArgs& a, const void* grad_reads, const void* grad_memory,
                          const void* grad_weights, const void* memories, const void* history,
                          const int64_t* slots, void* grad_memory0, void* grad_weights0, void* grad_keys,
                          void* grad_gates, void* grad_strengths, void* scratch, cudaStream_t stream) {
  if (a.B == 0) return;
  dispatch_float_or_double(a.dtype, "mann_memory", [&](auto zero) {
    using T = decltype(zero);
    mann_backward_kernel<T><<<blocks_for(a.B, kThreads), kThreads, 0, stream>>>(
        a, static_cast<const T*>(grad_reads), static_cast<const T*>(grad_memory),
        static_cast<const T*>(grad_weights), static_cast<const T*>(memories), static_cast<const T*>(history),
        slots, static_cast<T*>(grad_memory0), static_cast<T*>(grad_weights0), static_cast<T*>(grad_keys),
        static_cast<T*>(grad_gates), static_cast<T*>(grad_strengths), static_cast<T*>(scratch));
    check_launch("mann_memory_backward");
  });
}

}  // namespace fastmeta::cuda
