// Operand prologue of MANN's LRUA memory (fastmeta::mann_memory and its
// backward): memory [B, S, W], usage [B, S], read_weights [B, H, S], keys
// [B, T, H, W], write_gates and key_strengths [B, T, H]. The backward takes
// the gradients of the reads and of the final memory and read weights, the
// inputs (the memory only for its shape: the gradients do not depend on it),
// the forward's memories [B, T, S, W], read weights [B, T, H, S] after each
// step and least-used slots [B, T, min(H, S)] (int64).
#pragma once

#include "../math/mann.h"
#include "common.h"

namespace fastmeta {

struct MannOperands {
  MannSizes sizes{0, 0, 0, 0};
  int64_t B = 0;
  at::Tensor memory, usage, read_weights, keys, write_gates, key_strengths;
  at::Tensor grad_reads, grad_memory, grad_read_weights, memories, read_weight_history, least_used;
};

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef want, const char* what) {
  TORCH_CHECK(t.sizes() == want, "fastmeta: ", name, " must have shape ", want, " (", what, "), got ",
              t.sizes());
}

// The checks both ops make: `memory` is the memory or its gradient, [B, S, W].
inline MannOperands mann_step_operands(const at::Tensor& memory, const char* memory_name,
                                       const at::Tensor& read_weights, const at::Tensor& keys,
                                       const at::Tensor& write_gates, const at::Tensor& key_strengths) {
  MannOperands o;
  TORCH_CHECK(memory.scalar_type() == at::kFloat || memory.scalar_type() == at::kDouble,
              "fastmeta: ", memory_name, " must have dtype float32 or float64, got ", memory.scalar_type());
  check_operand(memory, memory_name, 3, memory);
  check_operand(read_weights, "read_weights", 3, memory);
  check_operand(keys, "keys", 4, memory);
  check_operand(write_gates, "write_gates", 3, memory);
  check_operand(key_strengths, "key_strengths", 3, memory);
  o.B = memory.size(0);
  o.sizes = {keys.size(1), memory.size(1), memory.size(2), keys.size(2)};
  const MannSizes& z = o.sizes;
  TORCH_CHECK(z.S >= 1, "fastmeta: ", memory_name, " must have at least one slot, got shape ",
              memory.sizes());
  TORCH_CHECK(z.H >= 1, "fastmeta: keys must have at least one read head, got shape ", keys.sizes());
  check_shape(keys, "keys", {o.B, z.T, z.H, z.W}, "[B, T, H, W] with the memory's B and W");
  check_shape(read_weights, "read_weights", {o.B, z.H, z.S}, "[B, H, S]");
  check_shape(write_gates, "write_gates", {o.B, z.T, z.H}, "keys' [B, T, H]");
  check_shape(key_strengths, "key_strengths", {o.B, z.T, z.H}, "keys' [B, T, H]");
  o.read_weights = read_weights.contiguous();
  o.keys = keys.contiguous();
  o.write_gates = write_gates.contiguous();
  o.key_strengths = key_strengths.contiguous();
  return o;
}

inline MannOperands mann_operands(const at::Tensor& memory, const at::Tensor& usage,
                                  const at::Tensor& read_weights, const at::Tensor& keys,
                                  const at::Tensor& write_gates, const at::Tensor& key_strengths) {
  MannOperands o = mann_step_operands(memory, "memory", read_weights, keys, write_gates, key_strengths);
  check_operand(usage, "usage", 2, memory);
  check_shape(usage, "usage", {o.B, o.sizes.S}, "[B, S]");
  o.memory = memory.contiguous();
  o.usage = usage.contiguous();
  return o;
}

inline MannOperands mann_backward_operands(const at::Tensor& grad_reads, const at::Tensor& grad_memory,
                                           const at::Tensor& grad_read_weights, const at::Tensor& memory,
                                           const at::Tensor& read_weights, const at::Tensor& keys,
                                           const at::Tensor& write_gates, const at::Tensor& key_strengths,
                                           const at::Tensor& memories, const at::Tensor& read_weight_history,
                                           const at::Tensor& least_used) {
  MannOperands o = mann_step_operands(memory, "memory", read_weights, keys, write_gates, key_strengths);
  const MannSizes& z = o.sizes;
  check_operand(grad_memory, "grad_memory", 3, memory);
  check_shape(grad_memory, "grad_memory", memory.sizes(), "memory's shape");
  check_operand(grad_read_weights, "grad_read_weights", 3, memory);
  check_operand(grad_reads, "grad_reads", 4, memory);
  check_operand(memories, "memories", 4, memory);
  check_operand(read_weight_history, "read_weight_history", 4, memory);
  check_index(least_used, "least_used", memory);
  check_shape(grad_read_weights, "grad_read_weights", {o.B, z.H, z.S}, "read_weights' shape");
  check_shape(grad_reads, "grad_reads", {o.B, z.T, z.H, z.W}, "the reads' [B, T, H, W]");
  check_shape(memories, "memories", {o.B, z.T, z.S, z.W}, "[B, T, S, W]");
  check_shape(read_weight_history, "read_weight_history", {o.B, z.T, z.H, z.S}, "[B, T, H, S]");
  check_shape(least_used, "least_used", {o.B, z.T, z.least_used()}, "[B, T, min(H, S)]");
  o.grad_memory = grad_memory.contiguous();
  o.grad_read_weights = grad_read_weights.contiguous();
  o.grad_reads = grad_reads.contiguous();
  o.memories = memories.contiguous();
  o.read_weight_history = read_weight_history.contiguous();
  o.least_used = least_used.contiguous();
  return o;
}

}  // namespace fastmeta
