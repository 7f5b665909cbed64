// PyTorch glue of the CUDA kernels of mann_memory (mann_memory.cu).
#include <torch/library.h>

#include <tuple>

#include "../operands/mann.h"
#include "glue.h"

namespace fastmeta {
namespace {

cuda::MannArgs mann_args(const MannOperands& o, const at::Tensor& memory, const at::Tensor& usage) {
  return {dtype_of(o.read_weights),
          o.sizes,
          o.B,
          memory.const_data_ptr(),
          usage.defined() ? usage.const_data_ptr() : nullptr,
          o.read_weights.const_data_ptr(),
          o.keys.const_data_ptr(),
          o.write_gates.const_data_ptr(),
          o.key_strengths.const_data_ptr()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mann_memory(
    const at::Tensor& memory, const at::Tensor& usage, const at::Tensor& read_weights, const at::Tensor& keys,
    const at::Tensor& write_gates, const at::Tensor& key_strengths, double decay) {
  const MannOperands o = mann_operands(memory, usage, read_weights, keys, write_gates, key_strengths);
  c10::cuda::CUDAGuard guard(memory.device());
  const MannSizes z = o.sizes;
  const auto options = o.memory.options();
  at::Tensor reads = at::empty({o.B, z.T, z.H, z.W}, options);
  at::Tensor memory_out = at::empty({o.B, z.S, z.W}, options);
  at::Tensor weights_out = at::empty({o.B, z.H, z.S}, options);
  at::Tensor usage_out = at::empty({o.B, z.S}, options);
  at::Tensor memories = at::empty({o.B, z.T, z.S, z.W}, options);
  at::Tensor history = at::empty({o.B, z.T, z.H, z.S}, options);
  at::Tensor slots = at::empty({o.B, z.T, z.least_used()}, options.dtype(at::kLong));
  at::Tensor scratch = at::empty({o.B, z.forward_scratch()}, options);
  cuda::mann_memory_forward(mann_args(o, o.memory, o.usage), decay, reads.mutable_data_ptr(),
                            memory_out.mutable_data_ptr(), weights_out.mutable_data_ptr(),
                            usage_out.mutable_data_ptr(), memories.mutable_data_ptr(),
                            history.mutable_data_ptr(), slots.mutable_data_ptr<int64_t>(),
                            scratch.mutable_data_ptr(), current_stream());
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
  c10::cuda::CUDAGuard guard(grad_memory.device());
  at::Tensor grad_memory0 = at::empty_like(o.grad_memory);
  at::Tensor grad_weights0 = at::empty_like(o.read_weights);
  at::Tensor grad_keys = at::empty_like(o.keys);
  at::Tensor grad_gates = at::empty_like(o.write_gates);
  at::Tensor grad_strengths = at::empty_like(o.key_strengths);
  at::Tensor scratch = at::empty({o.B, o.sizes.backward_scratch()}, o.grad_memory.options());
  cuda::mann_memory_backward(mann_args(o, o.grad_memory, at::Tensor()), o.grad_reads.const_data_ptr(),
                             o.grad_memory.const_data_ptr(), o.grad_read_weights.const_data_ptr(),
                             o.memories.const_data_ptr(), o.read_weight_history.const_data_ptr(),
                             o.least_used.const_data_ptr<int64_t>(), grad_memory0.mutable_data_ptr(),
                             grad_weights0.mutable_data_ptr(), grad_keys.mutable_data_ptr(),
                             grad_gates.mutable_data_ptr(), grad_strengths.mutable_data_ptr(),
                             scratch.mutable_data_ptr(), current_stream());
  return {grad_memory0, grad_weights0, grad_keys, grad_gates, grad_strengths};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CUDA, m) {
  m.impl("mann_memory", &mann_memory);
  m.impl("mann_memory_backward", &mann_memory_backward);
}

}  // namespace fastmeta
