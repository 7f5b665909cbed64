// CPU kernel of fastmeta::mlp_task_derivatives: per-task loss, gradient and
// Hessian-vector product of an MLP learner (csrc/math/mlp.h), one task per
// thread at a time, each task's loops compiled for the widest vector
// instruction set of this CPU.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

#include "../operands/mlp.h"
#include "row_combination.h"
#include "row_math.h"

namespace fastmeta::cpu {
namespace {

// The team of mlp_task on the CPU: one thread runs the whole task. Every
// product is written as rows of the output combining rows of an operand
// (combine_rows), so inner loops read memory in order and vectorise; linear
// first transposes its weights for that, into a cache that outlives the task:
// where tasks share their parameters (before the first inner step), each
// layer is transposed once per thread instead of once per product.
template <typename T, int kBytes>
struct SerialTeam {
  struct Entry {
    const T* source = nullptr;
    int64_t n_in = 0, n_out = 0, last_use = -1;
  };
  std::vector<T> storage;      // [entries, largest layer's weights]
  std::vector<Entry> entries;  // one per layer for the parameters and for a direction
  int64_t largest = 0, uses = 0;

  SerialTeam(const MlpShape& s) : entries(2 * s.layers) {
    for (int l = 0; l < s.layers; ++l) largest = std::max(largest, s.width[l] * s.width[l + 1]);
    storage.resize(entries.size() * largest);
  }

  template <typename F>
  FASTMETA_INLINE void for_each(int64_t n, F f) {
    for (int64_t i = 0; i < n; ++i) f(i);
  }
  FASTMETA_INLINE void sync() {}

  // W [n_out, n_in] transposed, from the cache, else into its least recently used entry.
  FASTMETA_INLINE const T* transpose(const T* W, int64_t n_in, int64_t n_out) {
    size_t slot = 0;
    for (size_t e = 0; e < entries.size(); ++e) {
      const Entry& entry = entries[e];
      if (entry.source == W && entry.n_in == n_in && entry.n_out == n_out) {
        entries[e].last_use = uses++;
        return storage.data() + e * largest;
      }
      if (entry.last_use < entries[slot].last_use) slot = e;
    }
    T* Wt = storage.data() + slot * largest;
    for (int64_t j = 0; j < n_out; ++j)
      for (int64_t k = 0; k < n_in; ++k) Wt[k * n_out + j] = W[j * n_in + k];
    entries[slot] = {W, n_in, n_out, uses++};
    return Wt;
  }

  FASTMETA_INLINE void linear(T* out, const T* in1, const T* W1, const T* in2, const T* W2, const T* bias,
                              int64_t N, int64_t n_in, int64_t n_out) {
    const T* W1t = transpose(W1, n_in, n_out);
    const T* W2t = in2 ? transpose(W2, n_in, n_out) : nullptr;
    combine_rows<kBytes>(out, n_out, N, n_out, bias, {in1, n_in, 1, W1t, n_out, n_in},
                         {in2, n_in, 1, W2t, n_out, in2 ? n_in : 0});
  }

  FASTMETA_INLINE void backprop(T* out, const T* D1, const T* W1, const T* D2, const T* W2, int64_t N,
                                int64_t n_in, int64_t n_out) {
    combine_rows<kBytes>(out, n_in, N, n_in, static_cast<const T*>(nullptr), {D1, n_out, 1, W1, n_in, n_out},
                         {D2, n_out, 1, W2, n_in, D2 ? n_out : 0});
  }

  FASTMETA_INLINE void outer(T* gW, T* gb, const T* D1, const T* in1, const T* D2, const T* in2, int64_t N,
                             int64_t n_in, int64_t n_out) {
    combine_rows<kBytes>(gW, n_in, n_out, n_in, static_cast<const T*>(nullptr), {D1, 1, n_out, in1, n_in, N},
                         {D2, 1, n_out, in2, n_in, D2 ? N : 0});
    for (int64_t j = 0; j < n_out; ++j) gb[j] = 0;
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < n_out; ++j) gb[j] += D1[i * n_out + j];
  }
};

template <typename T>
struct MlpBatch {
  MlpShape shape;
  const T *params, *x, *y, *direction;
  int64_t params_stride;
  const int64_t* labels;
  T *loss, *grad, *grad_input, *hvp, *hvp_input;
};

// Tasks [t0, t1) of a batch, with one workspace.
template <int kBytes>
struct MlpTasks {
  template <typename T>
  FASTMETA_INLINE static void run(MlpBatch<T> b, int64_t t0, int64_t t1, T* work) {
    const MlpShape& s = b.shape;
    const int64_t P = s.num_params(), X = s.N * s.width[0], C = s.outputs();
    SerialTeam<T, kBytes> team(s);
    for (int64_t t = t0; t < t1; ++t) {
      MlpTaskArgs<T> a{b.params + t * b.params_stride,
                       b.x + t * X,
                       b.y ? b.y + t * s.N * C : nullptr,
                       b.labels ? b.labels + t * s.N : nullptr,
                       b.direction ? b.direction + t * P : nullptr,
                       b.loss + t,
                       b.grad + t * P,
                       b.grad_input ? b.grad_input + t * X : nullptr,
                       b.hvp ? b.hvp + t * P : nullptr,
                       b.hvp_input ? b.hvp_input + t * X : nullptr,
                       work};
      mlp_task(s, a, team);
    }
  }
};

// One task's scratch (a std::vector: an uninitialised tensor made the kernel
// 10% slower), with PyTorch's kind of message where memory runs out.
template <typename T>
std::vector<T> workspace(const MlpShape& s) {
  try {
    return std::vector<T>(s.workspace_size());
  } catch (const std::bad_alloc&) {
    TORCH_CHECK(false,
                "fastmeta: mlp_task_derivatives: not enough memory for the workspace of a "
                "task (",
                s.workspace_size() * sizeof(T), " bytes for N = ", s.N, " points)");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_task_derivatives(
    const at::Tensor& params, const at::Tensor& x, const at::Tensor& target,
    const std::optional<at::Tensor>& direction, at::IntArrayRef widths,
    c10::ArrayRef<c10::string_view> activations, c10::string_view loss, bool input_grad) {
  const MlpOperands o = mlp_operands(params, x, target, direction, widths, activations, loss, input_grad);
  const MlpShape& s = o.shape;
  const bool mse = s.loss == MlpLoss::MSE;
  if (!mse) {
    const int64_t* labels = o.target.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < o.target.numel(); ++i)
      TORCH_CHECK(labels[i] >= 0 && labels[i] < s.outputs(), "fastmeta: target[", i / s.N, ", ", i % s.N,
                  "] = ", labels[i], " is out of range for ", s.outputs(), " classes");
  }
  AT_DISPATCH_FLOATING_TYPES(o.params.scalar_type(), "mlp_task_derivatives", [&] {
    MlpBatch<scalar_t> b{s,
                         o.params.const_data_ptr<scalar_t>(),
                         o.x.const_data_ptr<scalar_t>(),
                         mse ? o.target.const_data_ptr<scalar_t>() : nullptr,
                         o.direction.defined() ? o.direction.const_data_ptr<scalar_t>() : nullptr,
                         o.params_stride,
                         mse ? nullptr : o.target.const_data_ptr<int64_t>(),
                         o.loss.mutable_data_ptr<scalar_t>(),
                         o.grad.mutable_data_ptr<scalar_t>(),
                         static_cast<scalar_t*>(data_or_null(o.grad_input)),
                         static_cast<scalar_t*>(data_or_null(o.hvp)),
                         static_cast<scalar_t*>(data_or_null(o.hvp_input))};
    at::parallel_for(0, o.params.size(0), 1, [&](int64_t t0, int64_t t1) {
      run_vector_loop<MlpTasks>(b, t0, t1, workspace<scalar_t>(s).data());
    });
  });
  return o.outputs();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) { m.impl("mlp_task_derivatives", &mlp_task_derivatives); }

}  // namespace fastmeta::cpu
