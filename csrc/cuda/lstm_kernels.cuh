// Device code shared by the coordinatewise LSTM kernels (l2o_lstm_step.cu,
// meta_lstm_step.cu). One thread per coordinate, kLstmThreads coordinates per
// block; the shared weights live in shared memory, and each thread keeps its
// coordinate's per-layer vectors in its own column of shared-memory matrices
// [rows, kLstmThreads] (conflict-free). State rows are [.., P], so a warp reads
// and writes consecutive addresses.
//
// Backward kernels run a fixed grid of kLstmGradBlocks blocks over the
// coordinates; each block sums its weight gradients in shared memory and
// writes one partial row, and lstm_sum_partials adds the rows in order, so
// results are deterministic.
#pragma once

#include "../math/lstm.h"
#include "cuda_common.cuh"

namespace fastmeta::cuda {

constexpr int kLstmGradBlocks = 256;

// This thread's column of a [rows, kLstmThreads] shared-memory matrix.
template <typename T>
struct Column {
  T* base;
  __device__ T& operator[](int row) const { return base[row * kLstmThreads + threadIdx.x]; }
};

template <typename T>
__device__ void load_shared(T* dst, const T* src, int64_t n) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src ? src[i] : T(0);
}

// One LSTM layer for this thread's coordinate. xh holds [input (in); h_prev (H)];
// c_prev[k * ld] is unit k's previous cell value (not read when inactive).
// Keeps the activated gates and c, and writes h to h_out.
template <typename T>
__device__ void lstm_layer_forward(const T* W, const T* b, int in, int H, Column<T> xh, const T* c_prev,
                                   int64_t ld, bool active, Column<T> gates, Column<T> c, Column<T> h_out) {
  const int K = in + H;
  for (int k = 0; k < H; ++k) {
    T pre[4];
    for (int q = 0; q < 4; ++q) {
      const T* row = W + (q * H + k) * K;
      T acc = b[q * H + k];
      for (int j = 0; j < K; ++j) acc += row[j] * xh[j];
      pre[q] = acc;
    }
    T i, f, g, o, cv, hv;
    lstm_unit_forward(pre[0], pre[1], pre[2], pre[3], active ? c_prev[k * ld] : T(0), i, f, g, o, cv, hv);
    gates[k] = i;
    gates[H + k] = f;
    gates[2 * H + k] = g;
    gates[3 * H + k] = o;
    c[k] = cv;
    h_out[k] = hv;
  }
}

// Its backward: the gates column becomes d pre-activations (0 when inactive),
// d c_prev goes to dc_prev[k * ld] and d xh to dxh.
template <typename T>
__device__ void lstm_layer_backward(const T* W, int in, int H, Column<T> gates, Column<T> c, const T* c_prev,
                                    Column<T> dh, const T* dc, T* dc_prev, int64_t ld, bool active,
                                    Column<T> dxh) {
  for (int k = 0; k < H; ++k) {
    T di = 0, df = 0, dg = 0, dout = 0, dcp = 0;
    if (active)
      lstm_unit_backward(gates[k], gates[H + k], gates[2 * H + k], gates[3 * H + k], c_prev[k * ld], c[k],
                         dh[k], dc[k * ld], di, df, dg, dout, dcp);
    gates[k] = di;
    gates[H + k] = df;
    gates[2 * H + k] = dg;
    gates[3 * H + k] = dout;
    if (active) dc_prev[k * ld] = dcp;
  }
  const int K = in + H;
  for (int j = 0; j < K; ++j) {
    T acc = 0;
    for (int r = 0; r < 4 * H; ++r) acc += W[r * K + j] * gates[r];
    dxh[j] = acc;
  }
}

// Adds the block's sum over coordinates of d_pre[r] * x[j] to dW[r * K + j]
// and of d_pre[r] to db[r] (d_pre [rows, kLstmThreads], x [K, kLstmThreads]).
template <typename T>
__device__ void accumulate_weight_grad(T* dW, T* db, int rows, int K, const T* d_pre, const T* x) {
  __syncthreads();
  for (int w = threadIdx.x; w < rows * (K + 1); w += blockDim.x) {
    const int r = w / (K + 1), j = w % (K + 1);
    T acc = 0;
    for (int t = 0; t < kLstmThreads; ++t)
      acc += d_pre[r * kLstmThreads + t] * (j < K ? x[j * kLstmThreads + t] : T(1));
    if (j < K)
      dW[r * K + j] += acc;
    else
      db[r] += acc;
  }
  __syncthreads();
}

template <typename T>
__global__ void lstm_sum_partials(const T* partial, int blocks, int64_t width, T* out) {
  const int64_t w = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (w >= width) return;
  T acc = 0;
  for (int b = 0; b < blocks; ++b) acc += partial[b * width + w];
  out[w] = acc;
}

// Opts a kernel in to `bytes` of dynamic shared memory, with a clear error
// where the device has less.
template <typename Kernel>
void set_shared_memory(Kernel kernel, size_t bytes, const char* op) {
  const int64_t limit = max_shared_bytes();
  if (bytes > static_cast<size_t>(limit)) {
    throw std::runtime_error(std::string("fastmeta: ") + op + " needs " + std::to_string(bytes) +
                             " bytes of shared memory per block for these weights, more than this "
                             "GPU's " +
                             std::to_string(limit) + "; use a smaller hidden_size");
  }
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

}  // namespace fastmeta::cuda
