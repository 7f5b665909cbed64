// Building blocks of the CPU coordinatewise LSTM kernels. Coordinates are
// processed in chunks of kChunk; within a chunk every per-coordinate quantity
// is a row of kChunk values (coordinates minor, as in the state), so an LSTM
// layer is one matrix product W [4H, in + H] x [input; h_prev] [in + H, kChunk]
// (BLAS) followed by vectorised per-unit loops over the chunk. Nothing of
// size P x 4H is ever allocated.
//
// Reductions over coordinates (the weight gradients) go through
// sum_over_slots, so results do not depend on the number of threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../math/lstm.h"
#include "gemm.h"
#include "row_math.h"

namespace fastmeta::cpu {

constexpr int64_t kChunk = 256;
constexpr int64_t kMaxSlots = 64;

// The activations of one LSTM layer over a chunk, kept for its backward.
template <typename T>
struct LayerChunk {
  int64_t in = 0, H = 0;
  std::vector<T> xh;      // [in + H, kChunk]: the input rows, then h_prev
  std::vector<T> gates;   // [4H, kChunk]: activated i, f, g, o (d pre-activations in backward)
  std::vector<T> c_prev;  // [H, kChunk]
  std::vector<T> c;       // [H, kChunk]

  LayerChunk(int64_t in_size, int64_t hidden)
      : in(in_size), H(hidden), xh((in_size + hidden) * kChunk), gates(4 * hidden * kChunk),
        c_prev(hidden * kChunk), c(hidden * kChunk) {}

  T* input() { return xh.data(); }
  int64_t width() const { return in + H; }
};

// Copies `rows` rows of n values from src (row stride ld_src) to dst (row stride ld_dst).
template <typename T>
void copy_rows(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) std::copy(src + r * ld_src, src + r * ld_src + n, dst + r * ld_dst);
}

struct LstmUnitsForward {
  // gates: W xh in, activated gates out; writes c and h (h with row stride ld_h).
  template <typename T>
  FASTMETA_INLINE static void run(T* gates, const T* bias, const T* c_prev, T* c, T* h,
                                  int64_t ld_h, int64_t H, int64_t n) {
    for (int64_t k = 0; k < H; ++k) {
      T* gi = gates + k * kChunk;
      T* gf = gates + (H + k) * kChunk;
      T* gg = gates + (2 * H + k) * kChunk;
      T* go = gates + (3 * H + k) * kChunk;
      const T bi = bias[k], bf = bias[H + k], bg = bias[2 * H + k], bo = bias[3 * H + k];
      const T* cp = c_prev + k * kChunk;
      T* ck = c + k * kChunk;
      T* hk = h + k * ld_h;
#pragma GCC ivdep
      for (int64_t j = 0; j < n; ++j)
        lstm_unit_forward(gi[j] + bi, gf[j] + bf, gg[j] + bg, go[j] + bo, cp[j], gi[j], gf[j],
                          gg[j], go[j], ck[j], hk[j]);
    }
  }
};

struct LstmUnitsBackward {
  // gates: activated gates in, d pre-activations out. dh [H, kChunk]; dc and
  // dc_prev with row stride ld.
  template <typename T>
  FASTMETA_INLINE static void run(T* gates, const T* c_prev, const T* c, const T* dh,
                                  const T* dc, T* dc_prev, int64_t ld, int64_t H, int64_t n) {
    for (int64_t k = 0; k < H; ++k) {
      T* gi = gates + k * kChunk;
      T* gf = gates + (H + k) * kChunk;
      T* gg = gates + (2 * H + k) * kChunk;
      T* go = gates + (3 * H + k) * kChunk;
      const T* cp = c_prev + k * kChunk;
      const T* ck = c + k * kChunk;
      const T* dhk = dh + k * kChunk;
      const T* dck = dc + k * ld;
      T* dcp = dc_prev + k * ld;
#pragma GCC ivdep
      for (int64_t j = 0; j < n; ++j)
        lstm_unit_backward(gi[j], gf[j], gg[j], go[j], cp[j], ck[j], dhk[j], dck[j], gi[j], gf[j],
                           gg[j], go[j], dcp[j]);
    }
  }
};

// out[j] = a * (b + sum_k w[k] rows[k][j]) (rows of stride kChunk); out += when accumulate.
struct WeightedRowSum {
  template <typename T>
  FASTMETA_INLINE static void run(const T* w, const T* rows, int64_t K, T b, T a, T* out,
                                  int64_t n) {
    T acc[kChunk];
    for (int64_t j = 0; j < n; ++j) acc[j] = b;
    for (int64_t k = 0; k < K; ++k) {
      const T wk = w[k];
      const T* row = rows + k * kChunk;
#pragma GCC ivdep
      for (int64_t j = 0; j < n; ++j) acc[j] += wk * row[j];
    }
    for (int64_t j = 0; j < n; ++j) out[j] = a * acc[j];
  }
};

// rows[k][j] += w[k] * v[j] (rows of stride kChunk).
struct AddOuter {
  template <typename T>
  FASTMETA_INLINE static void run(const T* w, const T* v, T* rows, int64_t K, int64_t n) {
    for (int64_t k = 0; k < K; ++k) {
      const T wk = w[k];
      T* row = rows + k * kChunk;
#pragma GCC ivdep
      for (int64_t j = 0; j < n; ++j) row[j] += wk * v[j];
    }
  }
};

// One LSTM layer forward over n coordinates: layer.xh's input rows must be
// filled; h_prev and c_prev are state rows (stride ld). Writes the new h to
// h_out (stride ld_out) and keeps the rest in `layer`.
template <typename T>
void layer_forward(LayerChunk<T>& layer, const T* W, const T* bias, const T* h_prev,
                   const T* c_prev, int64_t ld, int64_t n, T* h_out, int64_t ld_out) {
  const int64_t H = layer.H;
  copy_rows(h_prev, ld, layer.xh.data() + layer.in * kChunk, kChunk, H, n);
  copy_rows(c_prev, ld, layer.c_prev.data(), kChunk, H, n);
  gemm(false, false, 4 * H, n, layer.width(), W, layer.width(), layer.xh.data(), kChunk, T(0),
       layer.gates.data(), kChunk);
  run_loop<LstmUnitsForward>(layer.gates.data(), bias, layer.c_prev.data(), layer.c.data(), h_out,
                             ld_out, H, n);
}

// Its backward: dh [H, kChunk] is d loss / d h_new; dc (stride ld) d loss / d c_new.
// Writes d c_prev (stride ld) and dxh [in + H, kChunk]; adds the weight and bias
// gradients to dW [4H, in + H] and db [4H].
template <typename T>
void layer_backward(LayerChunk<T>& layer, const T* W, const T* dh, const T* dc, T* dc_prev,
                    int64_t ld, int64_t n, T* dxh, T* dW, T* db) {
  const int64_t H = layer.H, K = layer.width();
  run_loop<LstmUnitsBackward>(layer.gates.data(), layer.c_prev.data(), layer.c.data(), dh, dc,
                              dc_prev, ld, H, n);
  const T* d_pre = layer.gates.data();
  for (int64_t r = 0; r < 4 * H; ++r) db[r] += row_sum(d_pre + r * kChunk, n);
  gemm(false, true, 4 * H, K, n, d_pre, kChunk, layer.xh.data(), kChunk, T(1), dW, K);
  gemm(true, false, K, n, 4 * H, W, K, d_pre, kChunk, T(0), dxh, kChunk);
}

// Runs fn(workspace, begin, end) over the chunks of [0, P) in parallel, with
// one workspace = make() per thread.
template <typename Make, typename F>
void for_each_chunk(int64_t P, Make make, F fn) {
  const int64_t chunks = (P + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, 4, [&](int64_t first, int64_t last) {
    auto workspace = make();
    for (int64_t c = first; c < last; ++c) fn(workspace, c * kChunk, std::min(P, (c + 1) * kChunk));
  });
}

// A sum over the coordinates [0, P) of `width` values, written to out: fn(workspace,
// partial, begin, end) adds the part of chunk [begin, end) to `partial`. Chunks
// are grouped into at most kMaxSlots slots fixed by P alone, each with its own
// partial sums, which are added in order, so the result does not depend on the
// number of threads.
template <typename T, typename Make, typename F>
void sum_over_slots(int64_t P, int64_t width, T* out, Make make, F fn) {
  const int64_t chunks = (P + kChunk - 1) / kChunk;
  const int64_t slots = std::min(chunks, kMaxSlots);
  std::vector<T> partial(slots * width, T(0));
  const int64_t per_slot = slots == 0 ? 0 : (chunks + slots - 1) / slots;
  at::parallel_for(0, slots, 1, [&](int64_t first, int64_t last) {
    auto workspace = make();
    for (int64_t s = first; s < last; ++s)
      for (int64_t c = s * per_slot; c < std::min(chunks, (s + 1) * per_slot); ++c)
        fn(workspace, partial.data() + s * width, c * kChunk, std::min(P, (c + 1) * kChunk));
  });
  std::fill(out, out + width, T(0));
  for (int64_t s = 0; s < slots; ++s)
    for (int64_t w = 0; w < width; ++w) out[w] += partial[s * width + w];
}

}  // namespace fastmeta::cpu
