// Op schemas: every fastmeta op is declared here, once. Device kernels register
// implementations beside their kernels: csrc/cpu/<op>.cpp, and the CUDA glue
// of each CUDA kernel file in csrc/cuda/<file>_glue.cpp. Each op family checks its
// operands in one prologue, csrc/operands/<family>.h, which both call.
//
// The ops take the canonical batched form ([B, Q, D] queries, [B, N, D] keys,
// per-query scale [B, Q], per-query losses); the Python wrappers in
// fastmeta/ops/ accept unbatched inputs, float scales and reductions.
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#include "cpu/recycled_buffers.h"
#include "cpu/row_math.h"
#include "math/lstm.h"

TORCH_LIBRARY(fastmeta, m) {
  m.def("pairwise_distance(Tensor x, Tensor y, str metric) -> Tensor");
  m.def(
      "pairwise_distance_backward(Tensor grad, Tensor distance, Tensor x, Tensor y, str metric)"
      " -> (Tensor, Tensor)");
  m.def("class_prototypes(Tensor support, Tensor labels, int num_classes) -> Tensor");
  m.def("class_prototypes_backward(Tensor grad, Tensor labels) -> Tensor");
  m.def("similarity_log_softmax(Tensor x, Tensor y, Tensor scale, str metric) -> Tensor");
  m.def(
      "similarity_log_softmax_backward(Tensor grad, Tensor log_probs, Tensor x, Tensor y,"
      " Tensor scale, str metric) -> (Tensor, Tensor, Tensor)");
  m.def(
      "similarity_cross_entropy(Tensor x, Tensor y, Tensor target, Tensor scale, str metric)"
      " -> (Tensor loss, Tensor logsumexp)");
  m.def(
      "similarity_cross_entropy_backward(Tensor grad, Tensor x, Tensor y, Tensor target,"
      " Tensor scale, Tensor logsumexp, str metric) -> (Tensor, Tensor, Tensor)");
  // The loss weight * sum_q loss_q of each task [B], and its gradients.
  m.def(
      "similarity_cross_entropy_with_grad(Tensor x, Tensor y, Tensor target, Tensor scale,"
      " str metric, float weight) -> (Tensor loss, Tensor grad_x, Tensor grad_y, Tensor grad_scale)");
  m.def(
      "attention_readout(Tensor x, Tensor y, Tensor values, Tensor scale, str metric)"
      " -> (Tensor out, Tensor logsumexp)");
  m.def(
      "attention_readout_backward(Tensor grad, Tensor out, Tensor logsumexp, Tensor x, Tensor y,"
      " Tensor values, Tensor scale, str metric) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("contrastive_loss(Tensor x1, Tensor x2, Tensor same, float margin) -> Tensor");
  m.def(
      "contrastive_loss_backward(Tensor grad, Tensor x1, Tensor x2, Tensor same, float margin)"
      " -> (Tensor, Tensor, Tensor)");
  // Matching networks' attention LSTM (full-context query embeddings), K steps:
  // the final hidden state and, for the backward, each step's input hidden
  // state, cell state, attention and activated gates.
  m.def(
      "matching_attention_lstm(Tensor query, Tensor support, Tensor weight_ih, Tensor weight_hh,"
      " Tensor bias, int steps) -> (Tensor hidden, Tensor hiddens, Tensor cells, Tensor attention,"
      " Tensor gates)");
  m.def(
      "matching_attention_lstm_backward(Tensor grad, Tensor query, Tensor support,"
      " Tensor weight_ih, Tensor weight_hh, Tensor hiddens, Tensor cells, Tensor attention,"
      " Tensor gates) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Relation networks' pair pooling: relu(max_pool2d(q_i + p_j, 2, ceil_mode))
  // of every (query, prototype) pair of maps, channels last.
  m.def("relation_pair_pool(Tensor queries, Tensor prototypes) -> Tensor");
  m.def(
      "relation_pair_pool_backward(Tensor grad, Tensor queries, Tensor prototypes)"
      " -> (Tensor, Tensor)");
  // MANN's LRUA memory over T steps (csrc/math/mann.h): the reads and the
  // state after the last step, and for the backward the memory and read
  // weights after each step and each step's least-used slots.
  m.def(
      "mann_memory(Tensor memory, Tensor usage, Tensor read_weights, Tensor keys,"
      " Tensor write_gates, Tensor key_strengths, float decay) -> (Tensor reads,"
      " Tensor memory_out, Tensor read_weights_out, Tensor usage_out, Tensor memories,"
      " Tensor read_weight_history, Tensor least_used)");
  m.def(
      "mann_memory_backward(Tensor grad_reads, Tensor grad_memory, Tensor grad_read_weights,"
      " Tensor memory, Tensor read_weights, Tensor keys, Tensor write_gates, Tensor key_strengths,"
      " Tensor memories, Tensor read_weight_history, Tensor least_used)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Few-shot GNN adjacency (csrc/math/gnn.h): softmax over j != i of an MLP
  // (leaky ReLU between layers, one output) on |x_i - x_j|, per episode, or
  // only the last node's row (last_row); hidden: the MLP's activations kept
  // for the backward (csrc/operands/gnn.h), empty unless keep_hidden.
  m.def(
      "gnn_adjacency(Tensor nodes, Tensor[] weights, Tensor[] biases, float negative_slope,"
      " bool last_row, bool keep_hidden) -> (Tensor adjacency, Tensor hidden)");
  m.def(
      "gnn_adjacency_backward(Tensor grad, Tensor adjacency, Tensor hidden, Tensor nodes,"
      " Tensor[] weights, Tensor[] biases, float negative_slope, bool last_row)"
      " -> (Tensor, Tensor[], Tensor[])");
  // Coordinatewise LSTM optimizers (layouts in csrc/math/lstm.h).
  m.def(
      "l2o_lstm_step(Tensor grad, Tensor state, Tensor weights, float preprocess_p,"
      " float output_scale) -> (Tensor update, Tensor new_state)");
  m.def(
      "l2o_lstm_step_(Tensor(a!) param, Tensor grad, Tensor(b!) state, Tensor weights,"
      " float preprocess_p, float output_scale) -> ()");
  m.def(
      "l2o_lstm_step_backward(Tensor grad_update, Tensor grad_state, Tensor grad, Tensor state,"
      " Tensor weights, float preprocess_p, float output_scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "meta_lstm_step(Tensor grad, Tensor loss, Tensor theta, Tensor state, Tensor weights,"
      " float preprocess_p) -> (Tensor theta_new, Tensor new_state)");
  m.def(
      "meta_lstm_step_backward(Tensor grad_theta, Tensor grad_state, Tensor grad, Tensor loss,"
      " Tensor theta, Tensor state, Tensor weights, float preprocess_p)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Batched second-order MAML (csrc/math/mlp.h): for T tasks of an MLP
  // learner, each task's loss, its gradient with respect to the task's
  // parameters (and, with input_grad, its inputs), and with a direction the
  // Hessian-vector products. Outputs not asked for are empty.
  m.def(
      "mlp_task_derivatives(Tensor params, Tensor x, Tensor target, Tensor? direction,"
      " int[] widths, str[] activations, str loss, bool input_grad)"
      " -> (Tensor loss, Tensor grad, Tensor grad_input, Tensor hvp, Tensor hvp_input)");
}

// The Python module fastmeta._C: loading it registers the ops above; its
// functions report how the extension was built, which vector instructions the
// CPU kernels use and how the CUDA L2O kernels lay out their shared memory
// (tested on any machine), and free the ops' recycled CPU buffers.
PYBIND11_MODULE(_C, m) {
  m.def(
      "build_info",
      [] {
        pybind11::dict info;
        info["torch_version"] = TORCH_VERSION;
#ifdef FASTMETA_WITH_CUDA
        info["with_cuda"] = true;
#else
        info["with_cuda"] = false;
#endif
        return info;
      },
      "The PyTorch version this extension was built against, and its CUDA support.");
  m.def(
      "cpu_isa",
      [] {
#if defined(__x86_64__)
        switch (fastmeta::cpu::cpu_isa()) {
          case fastmeta::cpu::Isa::Avx512:
            return "avx512";
          case fastmeta::cpu::Isa::Avx2:
            return "avx2";
          default:
            return "baseline";
        }
#else
        return "portable";
#endif
      },
      "The vector instructions the CPU kernels' row loops run with: 'avx512', 'avx2' or "
      "'baseline' (FASTMETA_CPU_ISA caps it), or 'portable' off x86-64.");
  m.def(
      "release_recycled_buffers", [] { return fastmeta::cpu::RecyclingAllocator::instance().release(); },
      "Frees the CPU buffers the ops keep for reuse (see csrc/cpu/recycled_buffers.h); "
      "returns how many bytes that was.");
  m.def(
      "l2o_shared_plan",
      [](int64_t num_layers, int64_t hidden_size, bool backward, int64_t element_bytes, int64_t limit_bytes) {
        const auto plan = fastmeta::L2oSharedPlan::choose(
            {num_layers, hidden_size, 0}, fastmeta::kLstmThreads, backward, element_bytes, limit_bytes);
        return pybind11::make_tuple(plan.weights_shared, plan.grads_shared, plan.bytes);
      },
      "Where the CUDA L2O kernels keep weights and weight gradients for a device with "
      "limit_bytes of shared memory per block: (weights_shared, grads_shared, bytes), bytes -1 "
      "where nothing fits.");
}
