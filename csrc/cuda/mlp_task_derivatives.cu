// CUDA kernel of fastmeta::mlp_task_derivatives: one block per task runs
// mlp_task (csrc/math/mlp.h), its threads splitting every product by output
// entry. The task's activations live in shared memory when they fit, in
// global scratch otherwise.
#include "cuda_common.cuh"

namespace fastmeta::cuda {
namespace {

constexpr int kMlpThreads = 128;

// The team of mlp_task on CUDA: the threads of one block, each computing
// whole output entries (dot products), so no two threads write one value.
template <typename T>
struct BlockTeam {
  template <typename F>
  __device__ void for_each(int64_t n, F f) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) f(i);
  }
  __device__ void sync() { __syncthreads(); }

  __device__ void linear(T* out, const T* in1, const T* W1, const T* in2, const T* W2, const T* bias,
                         int64_t N, int64_t n_in, int64_t n_out) {
    for (int64_t e = threadIdx.x; e < N * n_out; e += blockDim.x) {
      const int64_t i = e / n_out, j = e % n_out;
      T acc = bias[j];
      for (int64_t k = 0; k < n_in; ++k) acc += in1[i * n_in + k] * W1[j * n_in + k];
      if (in2)
        for (int64_t k = 0; k < n_in; ++k) acc += in2[i * n_in + k] * W2[j * n_in + k];
      out[e] = acc;
    }
  }

  __device__ void backprop(T* out, const T* D1, const T* W1, const T* D2, const T* W2, int64_t N,
                           int64_t n_in, int64_t n_out) {
    for (int64_t e = threadIdx.x; e < N * n_in; e += blockDim.x) {
      const int64_t i = e / n_in, k = e % n_in;
      T acc = 0;
      for (int64_t j = 0; j < n_out; ++j) acc += D1[i * n_out + j] * W1[j * n_in + k];
      if (D2)
        for (int64_t j = 0; j < n_out; ++j) acc += D2[i * n_out + j] * W2[j * n_in + k];
      out[e] = acc;
    }
  }

  __device__ void outer(T* gW, T* gb, const T* D1, const T* in1, const T* D2, const T* in2, int64_t N,
                        int64_t n_in, int64_t n_out) {
    for (int64_t e = threadIdx.x; e < n_out * (n_in + 1); e += blockDim.x) {
      T acc = 0;
      if (e < n_out * n_in) {
        const int64_t j = e / n_in, k = e % n_in;
        for (int64_t i = 0; i < N; ++i) acc += D1[i * n_out + j] * in1[i * n_in + k];
        if (D2)
          for (int64_t i = 0; i < N; ++i) acc += D2[i * n_out + j] * in2[i * n_in + k];
        gW[e] = acc;
      } else {
        const int64_t j = e - n_out * n_in;
        for (int64_t i = 0; i < N; ++i) acc += D1[i * n_out + j];
        gb[j] = acc;
      }
    }
  }
};

template <typename T>
__device__ T* task_ptr(void* base, int64_t task, int64_t size) {
  return base ? static_cast<T*>(base) + task * size : nullptr;
}

template <typename T>
__device__ const T* task_ptr(const void* base, int64_t task, int64_t size) {
  return base ? static_cast<const T*>(base) + task * size : nullptr;
}

template <typename T>
__global__ void __launch_bounds__(kMlpThreads) mlp_task_kernel(MlpArgs a, T* global_workspace) {
  extern __shared__ __align__(16) unsigned char shared[];
  const MlpShape& s = a.shape;
  const int64_t t = blockIdx.x, P = s.num_params(), X = s.N * s.width[0];
  MlpTaskArgs<T> task{
      task_ptr<T>(a.params, t, a.params_stride),
      task_ptr<T>(a.x, t, X),
      task_ptr<T>(a.y, t, s.N * s.outputs()),
      a.labels ? a.labels + t * s.N : nullptr,
      task_ptr<T>(a.direction, t, P),
      task_ptr<T>(a.loss, t, 1),
      task_ptr<T>(a.grad, t, P),
      task_ptr<T>(a.grad_input, t, X),
      task_ptr<T>(a.hvp, t, P),
      task_ptr<T>(a.hvp_input, t, X),
      global_workspace ? global_workspace + t * s.workspace_size() : reinterpret_cast<T*>(shared)};
  if (task.labels)
    for (int64_t i = threadIdx.x; i < s.N; i += blockDim.x)
      FASTMETA_DEVICE_ASSERT(task.labels[i] >= 0 && task.labels[i] < s.outputs() &&
                             "mlp_task_derivatives: a label is out of range");
  BlockTeam<T> team;
  mlp_task(s, task, team);
}

int64_t element_size(DType dtype) { return dtype == DType::Float64 ? 8 : 4; }

}  // namespace

int64_t mlp_global_workspace_bytes(const MlpArgs& a) {
  const int64_t per_task = a.shape.workspace_size() * element_size(a.dtype);
  return per_task <= max_shared_bytes() ? 0 : a.T * per_task;
}

void mlp_task_derivatives(const MlpArgs& a, void* global_workspace, cudaStream_t stream) {
  if (a.T == 0) return;
  FASTMETA_DISPATCH_FLOAT(a.dtype, [&] {
    const int64_t shared_bytes =
        global_workspace ? 0 : a.shape.workspace_size() * static_cast<int64_t>(sizeof(T));
    if (shared_bytes > 48 * 1024)
      cudaFuncSetAttribute(mlp_task_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(shared_bytes));
    mlp_task_kernel<T><<<grid_blocks(a.T), kMlpThreads, static_cast<size_t>(shared_bytes), stream>>>(
        a, static_cast<T*>(global_workspace));
    check_launch("mlp_task_derivatives");
  });
}

}  // namespace fastmeta::cuda
