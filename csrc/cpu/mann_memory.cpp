// CPU kernels of fastmeta::mann_memory, MANN's LRUA memory over T steps
// (math in csrc/math/mann.h): the episodes run in parallel, each episode's
// steps in order, with its scratch on the thread's stack of buffers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../operands/mann.h"

namespace fastmeta::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mann_memory(
    const at::Tensor& memory, const at::Tensor& usage, const at::Tensor& read_weights,
    const at::Tensor& keys, const at::Tensor& write_gates, const at::Tensor& key_strengths,
    double decay) {
  const MannOperands o = mann_operands(memory, usage, read_weights, keys, write_gates, key_strengths);
  const MannSizes z = o.sizes;
  const int64_t B = o.B, S = z.S, W = z.W, H = z.H, n = z.least_used();
  at::Tensor reads = at::empty({B, z.T, H, W}, o.memory.options());
  at::Tensor memories = at::empty({B, z.T, S, W}, o.memory.options());
  at::Tensor history = at::empty({B, z.T, H, S}, o.memory.options());
  at::Tensor usage_out = at::empty({B, S}, o.memory.options());
  at::Tensor slots = at::empty({B, z.T, n}, o.memory.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(o.memory.scalar_type(), "fastmeta::mann_memory", [&] {
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(z.forward_scratch());
      for (int64_t b = begin; b < end; ++b) {
        mann_forward_episode<scalar_t>(
            z, o.memory.const_data_ptr<scalar_t>() + b * S * W,
            o.usage.const_data_ptr<scalar_t>() + b * S,
            o.read_weights.const_data_ptr<scalar_t>() + b * H * S,
            o.keys.const_data_ptr<scalar_t>() + b * z.T * H * W,
            o.write_gates.const_data_ptr<scalar_t>() + b * z.T * H,
            o.key_strengths.const_data_ptr<scalar_t>() + b * z.T * H, scalar_t(decay),
            reads.mutable_data_ptr<scalar_t>() + b * z.T * H * W,
            memories.mutable_data_ptr<scalar_t>() + b * z.T * S * W,
            history.mutable_data_ptr<scalar_t>() + b * z.T * H * S,
            usage_out.mutable_data_ptr<scalar_t>() + b * S,
            slots.mutable_data_ptr<int64_t>() + b * z.T * n, scratch.data());
      }
    });
  });
  return {reads, memories, history, usage_out, slots};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mann_memory_backward(
    const at::Tensor& grad_reads, const at::Tensor& grad_memories,
    const at::Tensor& grad_read_weights, const at::Tensor& memory, const at::Tensor& read_weights,
    const at::Tensor& keys, const at::Tensor& write_gates, const at::Tensor& key_strengths,
    const at::Tensor& memories, const at::Tensor& read_weight_history,
    const at::Tensor& least_used) {
  const MannOperands o = mann_backward_operands(grad_reads, grad_memories, grad_read_weights,
                                                memory, read_weights, keys, write_gates,
                                                key_strengths, memories, read_weight_history,
                                                least_used);
  const MannSizes z = o.sizes;
  const int64_t B = o.B, S = z.S, W = z.W, H = z.H, n = z.least_used();
  TORCH_CHECK(o.least_used.numel() == 0 ||
                  (o.least_used.min().item<int64_t>() >= 0 && o.least_used.max().item<int64_t>() < S),
              "fastmeta: least_used must hold slots in [0, ", S, ")");
  at::Tensor grad_memory = at::empty_like(o.memory);
  at::Tensor grad_weights = at::empty_like(o.read_weights);
  at::Tensor grad_keys = at::empty_like(o.keys);
  at::Tensor grad_gates = at::empty_like(o.write_gates);
  at::Tensor grad_strengths = at::empty_like(o.key_strengths);
  AT_DISPATCH_FLOATING_TYPES(o.memory.scalar_type(), "fastmeta::mann_memory_backward", [&] {
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(z.backward_scratch());
      for (int64_t b = begin; b < end; ++b) {
        mann_backward_episode<scalar_t>(
            z, o.grad_reads.const_data_ptr<scalar_t>() + b * z.T * H * W,
            o.grad_memories.const_data_ptr<scalar_t>() + b * z.T * S * W,
            o.grad_read_weights.const_data_ptr<scalar_t>() + b * z.T * H * S,
            o.read_weights.const_data_ptr<scalar_t>() + b * H * S,
            o.keys.const_data_ptr<scalar_t>() + b * z.T * H * W,
            o.write_gates.const_data_ptr<scalar_t>() + b * z.T * H,
            o.key_strengths.const_data_ptr<scalar_t>() + b * z.T * H,
            o.memories.const_data_ptr<scalar_t>() + b * z.T * S * W,
            o.read_weight_history.const_data_ptr<scalar_t>() + b * z.T * H * S,
            o.least_used.const_data_ptr<int64_t>() + b * z.T * n,
            grad_memory.mutable_data_ptr<scalar_t>() + b * S * W,
            grad_weights.mutable_data_ptr<scalar_t>() + b * H * S,
            grad_keys.mutable_data_ptr<scalar_t>() + b * z.T * H * W,
            grad_gates.mutable_data_ptr<scalar_t>() + b * z.T * H,
            grad_strengths.mutable_data_ptr<scalar_t>() + b * z.T * H, scratch.data());
      }
    });
  });
  return {grad_memory, grad_weights, grad_keys, grad_gates, grad_strengths};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("mann_memory", &mann_memory);
  m.impl("mann_memory_backward", &mann_memory_backward);
}

}  // namespace fastmeta::cpu
