// CUDA kernels of fastmeta::meta_lstm_step and its backward (see
// lstm_kernels.cuh for the thread layout).
#include "lstm_kernels.cuh"

namespace fastmeta::cuda {
namespace {

constexpr int kInputs = MetaLayout::kInputs;

// The LSTM layer and both gates for this thread's coordinate; returns f and i.
template <typename T>
__device__ void meta_forward(const MetaLayout& lay, const T* w, const LogSign<T>& prep, T loss, const T* grad,
                             const T* theta, const T* state, int64_t p, bool active, Column<T> xh,
                             Column<T> gates, Column<T> c, Column<T> h, T& f, T& i, T& theta_new) {
  const int H = lay.H;
  const int64_t P = lay.P;
  const T g = active ? grad[p] : T(0);
  // Padding lanes (p >= P) take features 0, not those of a zero gradient,
  // which are NaN where e^p overflows (0 * inf).
  if (active) {
    prep.features(g, xh[0], xh[1]);
    prep.features(loss, xh[2], xh[3]);
  } else {
    xh[0] = xh[1] = xh[2] = xh[3] = T(0);
  }
  for (int k = 0; k < H; ++k) xh[kInputs + k] = active ? state[k * P + p] : T(0);
  lstm_layer_forward(w, w + lay.bias_offset(), kInputs, H, xh, state + H * P + p, P, active, gates, c, h);
  const T* wf = w + lay.forget_offset();
  const T* wi = w + lay.input_offset();
  T pre_f = wf[H + 2], pre_i = wi[H + 2];
  for (int k = 0; k < H; ++k) {
    pre_f += wf[k] * h[k];
    pre_i += wi[k] * h[k];
  }
  const MetaGates<T> gate{wf[H], wf[H + 1], wi[H], wi[H + 1]};
  const T theta_prev = active ? theta[p] : T(0);
  const T f_prev = active ? state[2 * H * P + p] : T(0);
  const T i_prev = active ? state[(2 * H + 1) * P + p] : T(0);
  gate.forward(pre_f, pre_i, theta_prev, f_prev, i_prev, g, f, i, theta_new);
}

template <typename T>
__global__ void meta_forward_kernel(MetaLayout lay, LogSign<T> prep, const T* grad, const T* loss,
                                    const T* theta, const T* state, const T* weights, T* theta_out,
                                    T* new_state) {
  extern __shared__ __align__(16) unsigned char shared[];
  const int H = lay.H;
  const int64_t P = lay.P;
  T* w = reinterpret_cast<T*>(shared);
  Column<T> xh{w + lay.num_weights()};
  Column<T> gates{xh.base + (kInputs + H) * kLstmThreads};
  Column<T> c{gates.base + 4 * H * kLstmThreads};
  Column<T> h{c.base + H * kLstmThreads};
  load_shared(w, weights, lay.num_weights());
  __syncthreads();
  const int64_t p = blockIdx.x * int64_t(kLstmThreads) + threadIdx.x;
  if (p >= P) return;
  T f, i, theta_new;
  meta_forward(lay, w, prep, *loss, grad, theta, state, p, true, xh, gates, c, h, f, i, theta_new);
  theta_out[p] = theta_new;
  for (int k = 0; k < H; ++k) {
    new_state[k * P + p] = h[k];
    new_state[(H + k) * P + p] = c[k];
  }
  new_state[2 * H * P + p] = f;
  new_state[(2 * H + 1) * P + p] = i;
}

template <typename T>
__global__ void meta_backward_kernel(MetaLayout lay, LogSign<T> prep, const T* grad, const T* loss,
                                     const T* theta, const T* state, const T* weights, const T* grad_theta,
                                     const T* grad_state, T* d_grad, T* d_theta, T* d_state, T* partial) {
  extern __shared__ __align__(16) unsigned char shared[];
  const int H = lay.H;
  const int64_t P = lay.P, nw = lay.num_weights(), width = nw + 2;
  T* w = reinterpret_cast<T*>(shared);
  T* dw = w + nw;  // [nw + 2]: the weights', then the two loss features' gradient sums
  Column<T> xh{dw + width};
  Column<T> gates{xh.base + (kInputs + H) * kLstmThreads};
  Column<T> c{gates.base + 4 * H * kLstmThreads};
  Column<T> h{c.base + H * kLstmThreads};  // rows H, H + 1: theta_prev and f_prev or i_prev
  Column<T> dh{h.base + (H + 2) * kLstmThreads};
  Column<T> dxh{dh.base + H * kLstmThreads};
  Column<T> d_pre{dxh.base + (kInputs + H) * kLstmThreads};  // forget, input
  load_shared(w, weights, nw);
  load_shared(dw, static_cast<const T*>(nullptr), width);
  __syncthreads();
  const T* wf = w + lay.forget_offset();
  const T* wi = w + lay.input_offset();
  const MetaGates<T> gate{wf[H], wf[H + 1], wi[H], wi[H + 1]};
  const int64_t tiles = (P + kLstmThreads - 1) / kLstmThreads;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t p = tile * kLstmThreads + threadIdx.x;
    const bool active = p < P;
    T f, i, theta_new;
    meta_forward(lay, w, prep, *loss, grad, theta, state, p, active, xh, gates, c, h, f, i, theta_new);
    T dpf = 0, dpi = 0, dtheta = 0, df_prev = 0, di_prev = 0, dgrad = 0;
    if (active)
      gate.backward(f, i, theta[p], grad[p], grad_theta[p], grad_state[2 * H * P + p],
                    grad_state[(2 * H + 1) * P + p], dpf, dpi, dtheta, df_prev, di_prev, dgrad);
    d_pre[0] = dpf;
    d_pre[1] = dpi;
    h[H] = active ? theta[p] : T(0);
    h[H + 1] = active ? state[2 * H * P + p] : T(0);
    accumulate_weight_grad(dw + lay.forget_offset(), dw + lay.forget_offset() + H + 2, 1, H + 2, d_pre.base,
                           h.base);
    h[H + 1] = active ? state[(2 * H + 1) * P + p] : T(0);
    accumulate_weight_grad(dw + lay.input_offset(), dw + lay.input_offset() + H + 2, 1, H + 2,
                           d_pre.base + kLstmThreads, h.base);
    for (int k = 0; k < H; ++k) dh[k] = active ? grad_state[k * P + p] + wf[k] * dpf + wi[k] * dpi : T(0);
    lstm_layer_backward(w, kInputs, H, gates, c, state + H * P + p, dh, grad_state + H * P + p,
                        d_state + H * P + p, P, active, dxh);
    accumulate_weight_grad(dw, dw + lay.bias_offset(), 4 * H, kInputs + H, gates.base, xh.base);
    // Sums of d loss-features (rows 2 and 3 of dxh) into dw[nw], dw[nw + 1].
    accumulate_weight_grad(dw, dw + nw, 2, 0, dxh.base + 2 * kLstmThreads, xh.base);
    if (!active) continue;
    for (int k = 0; k < H; ++k) d_state[k * P + p] = dxh[kInputs + k];
    d_state[2 * H * P + p] = df_prev;
    d_state[(2 * H + 1) * P + p] = di_prev;
    d_theta[p] = dtheta;
    d_grad[p] = dgrad + prep.backward(grad[p], dxh[0], dxh[1]);
  }
  __syncthreads();
  for (int64_t k = threadIdx.x; k < width; k += blockDim.x) partial[blockIdx.x * width + k] = dw[k];
}

// d loss from the summed gradients of its two features (in totals[nw], totals[nw + 1]).
template <typename T>
__global__ void meta_loss_grad_kernel(LogSign<T> prep, const T* loss, const T* totals, int64_t nw,
                                      T* d_loss) {
  *d_loss = prep.backward(*loss, totals[nw], totals[nw + 1]);
}

}  // namespace

void meta_lstm_forward(const MetaArgs& a, void* theta_out, void* new_state, cudaStream_t stream) {
  if (a.P == 0) return;
  const MetaLayout lay{a.H, a.P};
  FASTMETA_DISPATCH_FLOAT(a.dtype, [&] {
    const size_t bytes = sizeof(T) * (lay.num_weights() + int64_t(kLstmThreads) * (kInputs + 7 * lay.H));
    set_shared_memory(meta_forward_kernel<T>, bytes, "meta_lstm_step");
    meta_forward_kernel<T><<<blocks_for(a.P, kLstmThreads), kLstmThreads, bytes, stream>>>(
        lay, LogSign<T>::with_p(a.preprocess_p), static_cast<const T*>(a.grad), static_cast<const T*>(a.loss),
        static_cast<const T*>(a.theta), static_cast<const T*>(a.state), static_cast<const T*>(a.weights),
        static_cast<T*>(theta_out), static_cast<T*>(new_state));
    check_launch("meta_lstm_step");
  });
}

void meta_lstm_backward(const MetaArgs& a, const void* grad_theta, const void* grad_state, void* d_grad,
                        void* d_loss, void* d_theta, void* d_state, void* d_weights, void* partial,
                        cudaStream_t stream) {
  const MetaLayout lay{a.H, a.P};
  const int64_t nw = lay.num_weights(), blocks = lstm_grad_blocks(a.P);
  FASTMETA_DISPATCH_FLOAT(a.dtype, [&] {
    T* rows = static_cast<T*>(partial);
    T* totals = rows + blocks * (nw + 2);
    if (blocks > 0) {
      const size_t bytes =
          sizeof(T) * (2 * nw + 2 + int64_t(kLstmThreads) * (2 * (kInputs + lay.H) + 8 * lay.H + 4));
      set_shared_memory(meta_backward_kernel<T>, bytes, "meta_lstm_step backward");
      meta_backward_kernel<T><<<grid_blocks(blocks), kLstmThreads, bytes, stream>>>(
          lay, LogSign<T>::with_p(a.preprocess_p), static_cast<const T*>(a.grad),
          static_cast<const T*>(a.loss), static_cast<const T*>(a.theta), static_cast<const T*>(a.state),
          static_cast<const T*>(a.weights), static_cast<const T*>(grad_theta),
          static_cast<const T*>(grad_state), static_cast<T*>(d_grad), static_cast<T*>(d_theta),
          static_cast<T*>(d_state), rows);
      check_launch("meta_lstm_step backward");
    }
    lstm_sum_partials<T>
        <<<blocks_for(nw + 2, 256), 256, 0, stream>>>(rows, static_cast<int>(blocks), nw + 2, totals);
    check_launch("meta_lstm_step backward (weight gradients)");
    cudaMemcpyAsync(d_weights, totals, sizeof(T) * nw, cudaMemcpyDeviceToDevice, stream);
    meta_loss_grad_kernel<T><<<1, 1, 0, stream>>>(LogSign<T>::with_p(a.preprocess_p),
                                                  static_cast<const T*>(a.loss), totals, nw,
                                                  static_cast<T*>(d_loss));
    check_launch("meta_lstm_step backward (loss gradient)");
  });
}

}  // namespace fastmeta::cuda
