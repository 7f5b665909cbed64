// CPU kernels of fastmeta::mann_memory, MANN's LRUA memory over T steps
// (math in csrc/math/mann.h): the episodes run in parallel, each one's steps
// in order, compiled for the widest instruction set this CPU has.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../operands/mann.h"
#include "row_math.h"

namespace fastmeta::cpu {
namespace {

// One episode's steps, forward or backward (the element type from the
// first tensor argument).
struct MannForward {
  template <typename T, typename... Rest>
  FASTMETA_INLINE static void run(const MannSizes* z, const T* memory0, Rest... rest) {
    mann_forward_episode<T>(*z, memory0, rest...);
  }
};

struct MannBackward {
  template <typename T, typename... Rest>
  FASTMETA_INLINE static void run(const MannSizes* z, const T* grad_reads, Rest... rest) {
    mann_backward_episode<T>(*z, grad_reads, rest...);
  }
};

using Outputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outputs mann_memory(const at::Tensor& memory, const at::Tensor& usage, const at::Tensor& read_weights,
                    const at::Tensor& keys, const at::Tensor& write_gates, const at::Tensor& key_strengths,
                    double decay) {
  const MannOperands o = mann_operands(memory, usage, read_weights, keys, write_gates, key_strengths);
  const MannSizes z = o.sizes;
  const int64_t B = o.B, T = z.T, S = z.S, W = z.W, H = z.H, n = z.least_used();
  const auto options = o.memory.options();
  at::Tensor reads = at::empty({B, T, H, W}, options);
  at::Tensor memory_out = at::empty({B, S, W}, options);
  at::Tensor weights_out = at::empty({B, H, S}, options);
  at::Tensor usage_out = at::empty({B, S}, options);
  at::Tensor memories = at::empty({B, T, S, W}, options);
  at::Tensor history = at::empty({B, T, H, S}, options);
  at::Tensor slots = at::empty({B, T, n}, options.dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(o.memory.scalar_type(), "fastmeta::mann_memory", [&] {
    using F = scalar_t;
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<F> scratch(z.forward_scratch());
      for (int64_t b = begin; b < end; ++b) {
        run_loop<MannForward>(
            &z, o.memory.const_data_ptr<F>() + b * S * W, o.usage.const_data_ptr<F>() + b * S,
            o.read_weights.const_data_ptr<F>() + b * H * S, o.keys.const_data_ptr<F>() + b * T * H * W,
            o.write_gates.const_data_ptr<F>() + b * T * H, o.key_strengths.const_data_ptr<F>() + b * T * H,
            F(decay), reads.mutable_data_ptr<F>() + b * T * H * W,
            memory_out.mutable_data_ptr<F>() + b * S * W, weights_out.mutable_data_ptr<F>() + b * H * S,
            usage_out.mutable_data_ptr<F>() + b * S, memories.mutable_data_ptr<F>() + b * T * S * W,
            history.mutable_data_ptr<F>() + b * T * H * S, slots.mutable_data_ptr<int64_t>() + b * T * n,
            scratch.data());
      }
    });
  });
  return {reads, memory_out, weights_out, usage_out, memories, history, slots};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mann_memory_backward(
    const at::Tensor& grad_reads, const at::Tensor& grad_memory, const at::Tensor& grad_read_weights,
    const at::Tensor& memory, const at::Tensor& read_weights, const at::Tensor& keys,
    const at::Tensor& write_gates, const at::Tensor& key_strengths, const at::Tensor& memories,
    const at::Tensor& read_weight_history, const at::Tensor& least_used) {
  const MannOperands o =
      mann_backward_operands(grad_reads, grad_memory, grad_read_weights, memory, read_weights, keys,
                             write_gates, key_strengths, memories, read_weight_history, least_used);
  const MannSizes z = o.sizes;
  const int64_t B = o.B, T = z.T, S = z.S, W = z.W, H = z.H, n = z.least_used();
  TORCH_CHECK(o.least_used.numel() == 0 ||
                  (o.least_used.min().item<int64_t>() >= 0 && o.least_used.max().item<int64_t>() < S),
              "fastmeta: least_used must hold slots in [0, ", S, ")");
  at::Tensor grad_memory0 = at::empty_like(o.grad_memory);
  at::Tensor grad_weights0 = at::empty_like(o.read_weights);
  at::Tensor grad_keys = at::empty_like(o.keys);
  at::Tensor grad_gates = at::empty_like(o.write_gates);
  at::Tensor grad_strengths = at::empty_like(o.key_strengths);
  AT_DISPATCH_FLOATING_TYPES(o.grad_memory.scalar_type(), "fastmeta::mann_memory_backward", [&] {
    using F = scalar_t;
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<F> scratch(z.backward_scratch());
      for (int64_t b = begin; b < end; ++b) {
        run_loop<MannBackward>(
            &z, o.grad_reads.const_data_ptr<F>() + b * T * H * W,
            o.grad_memory.const_data_ptr<F>() + b * S * W,
            o.grad_read_weights.const_data_ptr<F>() + b * H * S,
            o.read_weights.const_data_ptr<F>() + b * H * S, o.keys.const_data_ptr<F>() + b * T * H * W,
            o.write_gates.const_data_ptr<F>() + b * T * H, o.key_strengths.const_data_ptr<F>() + b * T * H,
            o.memories.const_data_ptr<F>() + b * T * S * W,
            o.read_weight_history.const_data_ptr<F>() + b * T * H * S,
            o.least_used.const_data_ptr<int64_t>() + b * T * n,
            grad_memory0.mutable_data_ptr<F>() + b * S * W, grad_weights0.mutable_data_ptr<F>() + b * H * S,
            grad_keys.mutable_data_ptr<F>() + b * T * H * W, grad_gates.mutable_data_ptr<F>() + b * T * H,
            grad_strengths.mutable_data_ptr<F>() + b * T * H, scratch.data());
      }
    });
  });
  return {grad_memory0, grad_weights0, grad_keys, grad_gates, grad_strengths};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("mann_memory", &mann_memory);
  m.impl("mann_memory_backward", &mann_memory_backward);
}

}  // namespace fastmeta::cpu
