// Host entry points of the CUDA kernels. This header and the .cu files use no
// PyTorch headers (raw pointers, sizes, cudaStream_t), so the kernels compile
// with nvcc alone; each <kernel file>_glue.cpp is its PyTorch-facing glue.
//
// Floating inputs are of `dtype`; every floating output and the row
// statistics are of the accumulation type (float, or double for float64
// inputs), which the glue converts back.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../math/gnn.h"
#include "../math/mann.h"
#include "../math/metric.h"
#include "../math/mlp.h"

namespace fastmeta::cuda {

enum class DType { Float32, Float64, Float16, BFloat16 };

// The similarity ops share one kernel family; `SimilarityOp` picks what a
// forward kernel does with each tile of logits and what a backward kernel
// takes as d loss / d logit.
enum class SimilarityOp { PairwiseDistance, LogSoftmax, CrossEntropy, AttentionReadout };

// Operands of a similarity op; pointers that an op does not use may be null.
// Cross-entropy targets out of range fail a device-side assertion.
struct SimilarityArgs {
  DType dtype;
  Metric metric;
  int64_t B, Q, N, D, V;
  const void* x;          // [B, Q, D]
  const void* y;          // [B, N, D]
  const void* scale;      // [B, Q] (dtype)
  const int64_t* target;  // [B, Q]          cross entropy
  const void* values;     // [B, N, V]       attention readout
  void* x_stat;           // [B, Q] row statistics and gradient coefficients
  void* x_coeff;
  void* y_stat;  // [B, N]
  void* y_coeff;
};

// Row statistics of x and y (see math/metric.h).
void similarity_row_stats(const SimilarityArgs& a, cudaStream_t stream);

// Forward: `out` is [B, Q, N] (distance, log-softmax), [B, Q] (cross-entropy
// loss) or [B, Q, V] (readout, zero-initialised); `lse` [B, Q] the
// log-sum-exp of the logits, where the op has one.
void similarity_forward(SimilarityOp op, const SimilarityArgs& a, void* out, void* lse, cudaStream_t stream);

// Backward inputs, of the accumulation type where computed by the forward.
struct SimilarityGrads {
  const void* grad;        // d loss / d out (dtype): [B, Q, N], [B, Q] or [B, Q, V]
  const void* out;         // forward output: distance, log-probs or readout (acc)
  const void* lse;         // [B, Q] (acc)
  const void* row_weight;  // [B, Q] (acc): sum_n grad (log-softmax), grad . out (readout)
  void* grad_x;            // [B, Q, D] (acc, zero-initialised)
  void* grad_y;            // [B, N, D] (acc, zero-initialised)
  void* grad_scale;        // [B, Q] (acc, zero-initialised)
  void* grad_values;       // [B, N, V] (acc, zero-initialised)
};

// Two kernels: one over blocks of queries (grad_x, grad_scale), one over
// blocks of keys (grad_y, grad_values); no atomics, so results are
// deterministic.
void similarity_backward(SimilarityOp op, const SimilarityArgs& a, const SimilarityGrads& g,
                         cudaStream_t stream);

// class_prototypes: class_label_counts fills counts [B, N] (int64, zeroed by
// the caller), which the forward (prototypes [B, N, D], acc) and backward
// use. Labels out of range and classes without examples fail device-side
// assertions.
void class_label_counts(const int64_t* labels, int64_t B, int64_t S, int64_t N, int64_t* counts,
                        cudaStream_t stream);
// class_members lists each task's examples by class into members [B, S]:
// class c's indices, in order, from offsets[b, c] (the exclusive prefix sum
// of counts over classes, from the caller) on.
void class_members(const int64_t* labels, const int64_t* offsets, int64_t B, int64_t S, int64_t N,
                   int64_t* members, cudaStream_t stream);
void class_prototypes_forward(DType dtype, const void* support, const int64_t* members,
                              const int64_t* offsets, const int64_t* counts, int64_t B, int64_t S, int64_t N,
                              int64_t D, void* out, cudaStream_t stream);
void class_prototypes_backward(DType dtype, const void* grad, const int64_t* labels, const int64_t* counts,
                               int64_t B, int64_t S, int64_t N, int64_t D, void* grad_support,
                               cudaStream_t stream);

// contrastive_loss over M pairs of size D.
void contrastive_loss_forward(DType dtype, const void* x1, const void* x2, const void* same, double margin,
                              int64_t M, int64_t D, void* loss, cudaStream_t stream);
void contrastive_loss_backward(DType dtype, const void* grad, const void* x1, const void* x2,
                               const void* same, double margin, int64_t M, int64_t D, void* grad_x1,
                               void* grad_x2, void* grad_same, cudaStream_t stream);

// Coordinatewise LSTM optimizers, float32 and float64 (layouts in
// math/lstm.h). grad [P], state [L, 2, H, P], flat weights.
struct L2oArgs {
  DType dtype;
  int64_t L, H, P;
  double preprocess_p, output_scale;
  const void* grad;
  const void* state;
  const void* weights;
};

// Rows of the scratch buffer `partial` of the backward launchers: the
// per-block weight-gradient sums.
int64_t lstm_grad_blocks(int64_t P);

// new_state may be state (the in-place step); update is written, or added to
// when accumulate.
void l2o_lstm_forward(const L2oArgs& a, void* new_state, void* update, bool accumulate, cudaStream_t stream);
// partial: lstm_grad_blocks(P) x (number of weights) elements.
void l2o_lstm_backward(const L2oArgs& a, const void* grad_update, const void* grad_state, void* d_grad,
                       void* d_state, void* d_weights, void* partial, cudaStream_t stream);

// Ravi & Larochelle meta-learner: grad, theta [P], loss [] (on the device),
// state [2H + 2, P].
struct MetaArgs {
  DType dtype;
  int64_t H, P;
  double preprocess_p;
  const void* grad;
  const void* loss;
  const void* theta;
  const void* state;
  const void* weights;
};

void meta_lstm_forward(const MetaArgs& a, void* theta_out, void* new_state, cudaStream_t stream);
// partial: (lstm_grad_blocks(P) + 1) x (number of weights + 2) elements.
void meta_lstm_backward(const MetaArgs& a, const void* grad_theta, const void* grad_state, void* d_grad,
                        void* d_loss, void* d_theta, void* d_state, void* d_weights, void* partial,
                        cudaStream_t stream);

// Batched MLP derivatives (math/mlp.h): one block per task. Outputs that
// are not wanted are null; all floating operands are of `dtype` (float32 or
// float64).
struct MlpArgs {
  DType dtype;
  MlpShape shape;
  int64_t T;
  const void* params;  // [T, P], rows params_stride apart
  int64_t params_stride;
  const void* x;          // [T, N, width[0]]
  const void* y;          // [T, N, C] (MSE) or null
  const int64_t* labels;  // [T, N] (cross-entropy) or null
  const void* direction;  // [T, P] or null
  void* loss;             // [T]
  void* grad;             // [T, P]
  void* grad_input;       // [T, N, width[0]]
  void* hvp;              // [T, P]
  void* hvp_input;        // [T, N, width[0]]
};

// Bytes of global scratch the kernel needs: 0 when a task's workspace fits
// in the shared memory of one block on the current device.
int64_t mlp_global_workspace_bytes(const MlpArgs& a);
void mlp_task_derivatives(const MlpArgs& a, void* global_workspace, cudaStream_t stream);

// MANN's LRUA memory over T steps (math/mann.h), float32 or float64 only:
// one thread per episode, its scratch in `scratch` [B, sizes.*_scratch()].
struct MannArgs {
  DType dtype;
  MannSizes sizes;
  int64_t B;
  const void* memory;        // [B, S, W]
  const void* usage;         // [B, S]
  const void* read_weights;  // [B, H, S]
  const void* keys;          // [B, T, H, W]
  const void* gates;         // [B, T, H]
  const void* strengths;     // [B, T, H]
};

void mann_memory_forward(const MannArgs& a, double decay, void* reads, void* memory_out, void* weights_out,
                         void* usage_out, void* memories, void* history, int64_t* slots, void* scratch,
                         cudaStream_t stream);

// Gradients of the reads [B, T, H, W] and of the final memory [B, S, W] and
// read weights [B, H, S]; a.memory and a.usage are unused. Slots out of
// range fail a device-side assertion.
void mann_memory_backward(const MannArgs& a, const void* grad_reads, const void* grad_memory,
                          const void* grad_weights, const void* memories, const void* history,
                          const int64_t* slots, void* grad_memory0, void* grad_weights0, void* grad_keys,
                          void* grad_gates, void* grad_strengths, void* scratch, cudaStream_t stream);

// Few-shot GNN adjacency (math/gnn.h), float32 or float64 only. The glue
// runs the pair MLP's matrix products; these kernels do the rest, on a tile
// of `count` unordered pairs from pair `first` (pairs [count, 3] int64:
// episode, i, j).
struct GnnArgs {
  DType dtype;
  int64_t B, n, F;
  bool last_row;  // only the last node's pairs and row (csrc/math/gnn.h)
};
void gnn_pairs(const GnnArgs& a, int64_t first, int64_t count, int64_t* pairs, cudaStream_t stream);
// diff [count, F] = |x_i - x_j|.
void gnn_pair_differences(const GnnArgs& a, const void* nodes, const int64_t* pairs, int64_t count,
                          void* diff, cudaStream_t stream);
// logits [B, n, n] at (i, j) and (j, i) from the tile's [count].
void gnn_scatter_logits(const GnnArgs& a, const void* tile_logits, const int64_t* pairs, int64_t count,
                        void* logits, cudaStream_t stream);
// In place over [B, n, n]: the rows' softmax over j != i; its backward
// (grad becomes d loss / d logits given the adjacency). With last_row the
// other rows become 0.
void gnn_adjacency_rows(const GnnArgs& a, void* logits, cudaStream_t stream);
void gnn_adjacency_rows_backward(const GnnArgs& a, const void* adjacency, void* grad, cudaStream_t stream);
// pair_grad [count] = grad_logits[i, j] + grad_logits[j, i].
void gnn_pair_grads(const GnnArgs& a, const void* grad_logits, const int64_t* pairs, int64_t count,
                    void* pair_grad, cudaStream_t stream);
// grad_nodes [B, n, F] (zero-initialised) += the differences' gradient [count, F].
void gnn_pair_differences_backward(const GnnArgs& a, const void* grad_diff, const void* nodes,
                                   const int64_t* pairs, int64_t count, void* grad_nodes,
                                   cudaStream_t stream);

}  // namespace fastmeta::cuda
