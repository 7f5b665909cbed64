// Operand prologue of MANN's LRUA memory (fastmeta::mann_memory and its
// backward): memory [B, S, W], usage [B, S], read_weights [B, H, S], keys
// [B, T, H, W], write_gates and key_strengths [B, T, H]; the backward's
// saved tensors are the forward's memories [B, T, S, W], read weights
// [B, T, H, S] and least-used slots [B, T, min(H, S)] (int64).
#pragma once

#include "../math/mann.h"
#include "common.h"

namespace fastmeta {

struct MannOperands {
  MannSizes sizes{0, 0, 0, 0};
  int64_t B = 0;
  at::Tensor memory, usage, read_weights, keys, write_gates, key_strengths;
  at::Tensor grad_reads, grad_memories, grad_read_weights, memories, read_weight_history, least_used;
};

inline MannOperands mann_operands(const at::Tensor& memory, const at::Tensor& usage,
                                  const at::Tensor& read_weights, const at::Tensor& keys,
                                  const at::Tensor& write_gates, const at::Tensor& key_strengths) {
  MannOperands o;
  TORCH_CHECK(memory.scalar_type() == at::kFloat || memory.scalar_type() == at::kDouble,
              "fastmeta: memory must have dtype float32 or float64, got ", memory.scalar_type());
  check_operand(memory, "memory", 3, memory);
  check_operand(usage, "usage", 2, memory);
  check_operand(read_weights, "read_weights", 3, memory);
  check_operand(keys, "keys", 4, memory);
  check_operand(write_gates, "write_gates", 3, memory);
  check_operand(key_strengths, "key_strengths", 3, memory);
  o.B = memory.size(0);
  o.sizes = {keys.size(1), memory.size(1), memory.size(2), keys.size(2)};
  const MannSizes& z = o.sizes;
  TORCH_CHECK(z.S >= 1, "fastmeta: memory must have at least one slot, got shape ", memory.sizes());
  TORCH_CHECK(z.H >= 1, "fastmeta: keys must have at least one read head, got shape ", keys.sizes());
  check_size(usage, "usage", 0, o.B, "the number of episodes in memory");
  check_size(usage, "usage", 1, z.S, "the number of memory slots");
  check_size(read_weights, "read_weights", 0, o.B, "the number of episodes in memory");
  check_size(read_weights, "read_weights", 1, z.H, "the number of heads in keys");
  check_size(read_weights, "read_weights", 2, z.S, "the number of memory slots");
  check_size(keys, "keys", 0, o.B, "the number of episodes in memory");
  check_size(keys, "keys", 3, z.W, "the memory width");
  const int64_t head_sizes[3] = {o.B, z.T, z.H};
  for (int64_t dim = 0; dim < 3; ++dim) {
    check_size(write_gates, "write_gates", dim, head_sizes[dim], "keys' [B, T, H]");
    check_size(key_strengths, "key_strengths", dim, head_sizes[dim], "keys' [B, T, H]");
  }
  o.memory = memory.contiguous();
  o.usage = usage.contiguous();
  o.read_weights = read_weights.contiguous();
  o.keys = keys.contiguous();
  o.write_gates = write_gates.contiguous();
  o.key_strengths = key_strengths.contiguous();
  return o;
}

inline MannOperands mann_backward_operands(
    const at::Tensor& grad_reads, const at::Tensor& grad_memories,
    const at::Tensor& grad_read_weights, const at::Tensor& memory, const at::Tensor& read_weights,
    const at::Tensor& keys, const at::Tensor& write_gates, const at::Tensor& key_strengths,
    const at::Tensor& memories, const at::Tensor& read_weight_history,
    const at::Tensor& least_used) {
  const at::Tensor usage = at::empty({memory.dim() == 3 ? memory.size(0) : 0,
                                      memory.dim() == 3 ? memory.size(1) : 0}, memory.options());
  MannOperands o = mann_operands(memory, usage, read_weights, keys, write_gates, key_strengths);
  const MannSizes& z = o.sizes;
  auto check_shape = [&](const at::Tensor& t, const char* name, at::IntArrayRef want) {
    TORCH_CHECK(t.sizes() == want, "fastmeta: ", name, " must have shape ", want, ", got ",
                t.sizes());
  };
  check_operand(grad_reads, "grad_reads", 4, memory);
  check_operand(grad_memories, "grad_memories", 4, memory);
  check_operand(grad_read_weights, "grad_read_weights", 4, memory);
  check_operand(memories, "memories", 4, memory);
  check_operand(read_weight_history, "read_weight_history", 4, memory);
  check_index(least_used, "least_used", memory);
  check_shape(grad_reads, "grad_reads", {o.B, z.T, z.H, z.W});
  check_shape(grad_memories, "grad_memories", {o.B, z.T, z.S, z.W});
  check_shape(memories, "memories", {o.B, z.T, z.S, z.W});
  check_shape(grad_read_weights, "grad_read_weights", {o.B, z.T, z.H, z.S});
  check_shape(read_weight_history, "read_weight_history", {o.B, z.T, z.H, z.S});
  check_shape(least_used, "least_used", {o.B, z.T, z.least_used()});
  o.grad_reads = grad_reads.contiguous();
  o.grad_memories = grad_memories.contiguous();
  o.grad_read_weights = grad_read_weights.contiguous();
  o.memories = memories.contiguous();
  o.read_weight_history = read_weight_history.contiguous();
  o.least_used = least_used.contiguous();
  return o;
}

}  // namespace fastmeta
