// CUDA kernels of fastmeta::mann_memory: one thread per episode runs the
// episode's steps with the math the CPU kernel runs (csrc/math/mann.h).
#include "cuda_common.cuh"

namespace fastmeta::cuda {
namespace {

constexpr int kThreads = 32;

template <typename T>
__global__ void mann_forward_kernel(MannArgs a, T decay, T* reads, T* memories, T* history,
                                    T* usage_out, int64_t* slots, T* scratch) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b >= a.B) return;
  const MannSizes z = a.sizes;
  const int64_t S = z.S, W = z.W, H = z.H, TH = z.T * H;
  mann_forward_episode<T>(
      z, static_cast<const T*>(a.memory) + b * S * W, static_cast<const T*>(a.usage) + b * S,
      static_cast<const T*>(a.read_weights) + b * H * S, static_cast<const T*>(a.keys) + b * TH * W,
      static_cast<const T*>(a.gates) + b * TH, static_cast<const T*>(a.strengths) + b * TH, decay,
      reads + b * TH * W, memories + b * z.T * S * W, history + b * TH * S, usage_out + b * S,
      slots + b * z.T * z.least_used(), scratch + b * z.forward_scratch());
}

template <typename T>
__global__ void mann_backward_kernel(MannArgs a, const T* grad_reads, const T* grad_memories,
                                     const T* grad_history, const T* memories, const T* history,
                                     const int64_t* slots, T* grad_memory, T* grad_read_weights,
                                     T* grad_keys, T* grad_gates, T* grad_strengths, T* scratch) {
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
      z, grad_reads + b * TH * W, grad_memories + b * z.T * S * W, grad_history + b * TH * S,
      static_cast<const T*>(a.read_weights) + b * H * S, static_cast<const T*>(a.keys) + b * TH * W,
      static_cast<const T*>(a.gates) + b * TH, static_cast<const T*>(a.strengths) + b * TH,
      memories + b * z.T * S * W, history + b * TH * S, episode_slots, grad_memory + b * S * W,
      grad_read_weights + b * H * S, grad_keys + b * TH * W, grad_gates + b * TH,
      grad_strengths + b * TH, scratch + b * z.backward_scratch());
}

template <typename Body>
void dispatch_full(DType dtype, Body body) {
  if (dtype == DType::Float64) {
    body(double{});
  } else if (dtype == DType::Float32) {
    body(float{});
  } else {
    throw std::runtime_error("fastmeta: mann_memory takes float32 or float64");
  }
}

}  // namespace

void mann_memory_forward(const MannArgs& a, double decay, void* reads, void* memories,
                         void* history, void* usage_out, int64_t* slots, void* scratch,
                         cudaStream_t stream) {
  if (a.B == 0) return;
  dispatch_full(a.dtype, [&](auto zero) {
    using T = decltype(zero);
    mann_forward_kernel<T><<<blocks_for(a.B, kThreads), kThreads, 0, stream>>>(
        a, T(decay), static_cast<T*>(reads), static_cast<T*>(memories), static_cast<T*>(history),
        static_cast<T*>(usage_out), slots, static_cast<T*>(scratch));
    check_launch("mann_memory");
  });
}

void mann_memory_backward(const MannArgs& a, const void* grad_reads, const void* grad_memories,
                          const void* grad_history, const void* memories, const void* history,
                          const int64_t* slots, void* grad_memory, void* grad_read_weights,
                          void* grad_keys, void* grad_gates, void* grad_strengths, void* scratch,
                          cudaStream_t stream) {
  if (a.B == 0) return;
  dispatch_full(a.dtype, [&](auto zero) {
    using T = decltype(zero);
    mann_backward_kernel<T><<<blocks_for(a.B, kThreads), kThreads, 0, stream>>>(
        a, static_cast<const T*>(grad_reads), static_cast<const T*>(grad_memories),
        static_cast<const T*>(grad_history), static_cast<const T*>(memories),
        static_cast<const T*>(history), slots, static_cast<T*>(grad_memory),
        static_cast<T*>(grad_read_weights), static_cast<T*>(grad_keys), static_cast<T*>(grad_gates),
        static_cast<T*>(grad_strengths), static_cast<T*>(scratch));
    check_launch("mann_memory_backward");
  });
}

}  // namespace fastmeta::cuda
