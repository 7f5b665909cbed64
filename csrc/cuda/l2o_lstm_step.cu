// CUDA kernels of fastmeta::l2o_lstm_step, its in-place form and its backward
// (see lstm_kernels.cuh for the thread layout).
#include "lstm_kernels.cuh"

namespace fastmeta::cuda {
namespace {

// One forward of layers 0 .. upto for this thread's coordinate (inputs read
// only when active); leaves layer `upto`'s input, gates, c and h in the columns,
// and writes each layer's h and c to new_state unless it is null. Everything a
// layer reads from the state is read before it is written, so new_state may
// be state (the in-place step).
template <typename T>
__device__ void l2o_forward_layers(const L2oLayout& lay, const T* w, const LogSign<T>& prep, const T* grad,
                                   const T* state, int64_t p, bool active, int upto, Column<T> xh,
                                   Column<T> gates, Column<T> c, Column<T> h, T* new_state) {
  // Padding lanes (p >= P) take features 0, not those of a zero gradient,
  // which are NaN where e^p overflows (0 * inf).
  if (active)
    prep.features(grad[p], xh[0], xh[1]);
  else
    xh[0] = xh[1] = T(0);
  for (int l = 0; l <= upto; ++l) {
    const int in = lay.in(l), H = lay.H;
    if (l > 0)
      for (int k = 0; k < H; ++k) xh[k] = h[k];
    for (int k = 0; k < H; ++k) xh[in + k] = active ? state[lay.row(l, 0) + k * lay.P + p] : T(0);
    lstm_layer_forward(w + lay.layer_offset(l), w + lay.bias_offset(l), in, H, xh, state + lay.row(l, 1) + p,
                       lay.P, active, gates, c, h);
    if (new_state == nullptr) continue;
    for (int k = 0; k < H; ++k) {
      new_state[lay.row(l, 0) + k * lay.P + p] = h[k];
      new_state[lay.row(l, 1) + k * lay.P + p] = c[k];
    }
  }
}

template <typename T>
__global__ void l2o_forward_kernel(L2oLayout lay, int64_t nw, L2oSharedPlan plan, LogSign<T> prep, T scale,
                                   const T* grad, const T* state, const T* weights, T* new_state, T* update,
                                   bool accumulate) {
  extern __shared__ __align__(16) unsigned char shared[];
  const int H = lay.H;
  T* next = reinterpret_cast<T*>(shared);
  const T* w = plan.weights_shared ? next : weights;
  if (plan.weights_shared) {
    load_shared(next, weights, nw);
    next += nw;
  }
  Column<T> xh{next};
  Column<T> gates{xh.base + lay.widest() * kLstmThreads};
  Column<T> c{gates.base + 4 * H * kLstmThreads};
  Column<T> h{c.base + H * kLstmThreads};
  __syncthreads();
  const int64_t p = blockIdx.x * int64_t(kLstmThreads) + threadIdx.x;
  if (p >= lay.P) return;
  l2o_forward_layers(lay, w, prep, grad, state, p, true, lay.L - 1, xh, gates, c, h, new_state);
  const T* head = w + lay.head_offset();
  T u = head[H];
  for (int k = 0; k < H; ++k) u += head[k] * h[k];
  u *= scale;
  update[p] = accumulate ? update[p] + u : u;
}

template <typename T>
__global__ void l2o_backward_kernel(L2oLayout lay, int64_t nw, L2oSharedPlan plan, LogSign<T> prep, T scale,
                                    const T* grad, const T* state, const T* weights, const T* grad_update,
                                    const T* grad_state, T* d_grad, T* d_state, T* partial) {
  extern __shared__ __align__(16) unsigned char shared[];
  const int H = lay.H, K = lay.widest();
  const int64_t P = lay.P;
  // The weights and this block's weight gradients: in shared memory, or
  // (where it is too small, see L2oSharedPlan) the weights in global memory
  // and the gradients summed in this block's row of `partial`.
  T* next = reinterpret_cast<T*>(shared);
  const T* w = plan.weights_shared ? next : weights;
  if (plan.weights_shared) {
    load_shared(next, weights, nw);
    next += nw;
  }
  T* dw = plan.grads_shared ? next : partial + blockIdx.x * nw;
  if (plan.grads_shared) next += nw;
  for (int64_t i = threadIdx.x; i < nw; i += blockDim.x) dw[i] = T(0);
  Column<T> xh{next};
  Column<T> gates{xh.base + K * kLstmThreads};
  Column<T> c{gates.base + 4 * H * kLstmThreads};
  Column<T> h{c.base + H * kLstmThreads};
  Column<T> dh{h.base + H * kLstmThreads};
  Column<T> dxh{dh.base + H * kLstmThreads};
  Column<T> du{dxh.base + K * kLstmThreads};
  __syncthreads();
  const int64_t head = lay.head_offset();
  const int64_t tiles = (P + kLstmThreads - 1) / kLstmThreads;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t p = tile * kLstmThreads + threadIdx.x;
    const bool active = p < P;
    l2o_forward_layers(lay, w, prep, grad, state, p, active, lay.L - 1, xh, gates, c, h,
                       static_cast<T*>(nullptr));
    du[0] = active ? scale * grad_update[p] : T(0);
    for (int k = 0; k < H; ++k)
      dh[k] = active ? w[head + k] * du[0] + grad_state[lay.row(lay.L - 1, 0) + k * P + p] : T(0);
    accumulate_weight_grad(dw + head, dw + head + H, 1, H, du.base, h.base);
    for (int l = lay.L - 1; l >= 0; --l) {
      if (l < lay.L - 1)
        l2o_forward_layers(lay, w, prep, grad, state, p, active, l, xh, gates, c, h,
                           static_cast<T*>(nullptr));
      const int in = lay.in(l);
      const int64_t offset = lay.layer_offset(l);
      lstm_layer_backward(w + offset, in, H, gates, c, state + lay.row(l, 1) + p, dh,
                          grad_state + lay.row(l, 1) + p, d_state + lay.row(l, 1) + p, P, active, dxh);
      accumulate_weight_grad(dw + offset, dw + lay.bias_offset(l), 4 * H, in + H, gates.base, xh.base);
      if (!active) continue;
      for (int k = 0; k < H; ++k) d_state[lay.row(l, 0) + k * P + p] = dxh[in + k];
      if (l > 0) {
        for (int k = 0; k < H; ++k) dh[k] = dxh[k] + grad_state[lay.row(l - 1, 0) + k * P + p];
      } else {
        d_grad[p] = prep.backward(grad[p], dxh[0], dxh[1]);
      }
    }
  }
  if (!plan.grads_shared) return;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < nw; i += blockDim.x) partial[blockIdx.x * nw + i] = dw[i];
}

// The layout of a kernel's memory on this device (error if nothing fits).
template <typename T>
L2oSharedPlan shared_plan(const L2oLayout& lay, bool backward, const char* op) {
  const L2oSharedPlan plan =
      L2oSharedPlan::choose(lay, kLstmThreads, backward, sizeof(T), max_shared_bytes());
  if (plan.bytes < 0) {
    throw std::runtime_error(
        std::string("fastmeta: ") + op + " needs " +
        std::to_string(sizeof(T) * L2oSharedPlan::elements(lay, kLstmThreads, backward, false, false)) +
        " bytes of shared memory per block even with the weights in global memory, more than this "
        "GPU's " +
        std::to_string(max_shared_bytes()) + "; use a smaller hidden_size");
  }
  return plan;
}

}  // namespace

int64_t lstm_grad_blocks(int64_t P) {
  const int64_t tiles = (P + kLstmThreads - 1) / kLstmThreads;
  return tiles < kLstmGradBlocks ? tiles : kLstmGradBlocks;
}

void l2o_lstm_forward(const L2oArgs& a, void* new_state, void* update, bool accumulate, cudaStream_t stream) {
  if (a.P == 0) return;
  const L2oLayout lay{a.L, a.H, a.P};
  const int64_t nw = lay.num_weights();
  FASTMETA_DISPATCH_FLOAT(a.dtype, [&] {
    const L2oSharedPlan plan = shared_plan<T>(lay, false, "l2o_lstm_step");
    set_shared_memory(l2o_forward_kernel<T>, plan.bytes, "l2o_lstm_step");
    l2o_forward_kernel<T><<<blocks_for(a.P, kLstmThreads), kLstmThreads, plan.bytes, stream>>>(
        lay, nw, plan, LogSign<T>::with_p(a.preprocess_p), T(a.output_scale), static_cast<const T*>(a.grad),
        static_cast<const T*>(a.state), static_cast<const T*>(a.weights), static_cast<T*>(new_state),
        static_cast<T*>(update), accumulate);
    check_launch("l2o_lstm_step");
  });
}

void l2o_lstm_backward(const L2oArgs& a, const void* grad_update, const void* grad_state, void* d_grad,
                       void* d_state, void* d_weights, void* partial, cudaStream_t stream) {
  const L2oLayout lay{a.L, a.H, a.P};
  const int64_t nw = lay.num_weights();
  const int64_t blocks = lstm_grad_blocks(a.P);
  FASTMETA_DISPATCH_FLOAT(a.dtype, [&] {
    if (blocks > 0) {
      const L2oSharedPlan plan = shared_plan<T>(lay, true, "l2o_lstm_step backward");
      set_shared_memory(l2o_backward_kernel<T>, plan.bytes, "l2o_lstm_step backward");
      l2o_backward_kernel<T><<<grid_blocks(blocks), kLstmThreads, plan.bytes, stream>>>(
          lay, nw, plan, LogSign<T>::with_p(a.preprocess_p), T(a.output_scale), static_cast<const T*>(a.grad),
          static_cast<const T*>(a.state), static_cast<const T*>(a.weights),
          static_cast<const T*>(grad_update), static_cast<const T*>(grad_state), static_cast<T*>(d_grad),
          static_cast<T*>(d_state), static_cast<T*>(partial));
      check_launch("l2o_lstm_step backward");
    }
    lstm_sum_partials<T><<<blocks_for(nw, 256), 256, 0, stream>>>(
        static_cast<const T*>(partial), static_cast<int>(blocks), nw, static_cast<T*>(d_weights));
    check_launch("l2o_lstm_step backward (weight gradients)");
  });
}

}  // namespace fastmeta::cuda
