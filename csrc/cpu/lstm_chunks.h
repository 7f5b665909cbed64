// Building blocks of the CPU coordinatewise LSTM kernels. Coordinates are
// processed in chunks of kChunk; within a chunk every per-coordinate quantity
// is a row of kChunk values (coordinates minor, as in the state), so an LSTM
// layer is one matrix product W [4H, in + H] x [input; h_prev] [in + H, kChunk]
// (BLAS) followed by vectorised per-unit loops over the chunk. c_prev is read
// from the state and the new h and c written to the new state in place.
// Nothing of size P x 4H is ever allocated.
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

// Rows of up to kChunk values, row r at data + r * ld: rows of the state
// ([..., P], ld = P) or of a chunk's buffers (ld = kChunk).
template <typename T>
struct Rows {
  T* data;
  int64_t ld;

  T* row(int64_t r) const { return data + r * ld; }
  operator Rows<const T>() const { return {data, ld}; }
};

// The activations of one LSTM layer over a chunk, kept for its backward: its
// input and h_prev (copied next to each other, for one matrix product), the
// gates, and where c_prev and the new c are (rows of the state, or the
// chunk's own buffer).
template <typename T>
struct LayerChunk {
  int64_t in = 0, H = 0;
  std::vector<T> xh;            // [in + H, kChunk]: the input rows, then h_prev
  std::vector<T> gates;         // [4H, kChunk]: activated i, f, g, o (d pre-activations in backward)
  std::vector<T> c_own, h_own;  // [H, kChunk] each: c and h where the caller keeps no copy
  Rows<const T> c_prev{}, c{};

  LayerChunk(int64_t in_size, int64_t hidden)
      : in(in_size),
        H(hidden),
        xh((in_size + hidden) * kChunk),
        gates(4 * hidden * kChunk),
        c_own(hidden * kChunk),
        h_own(hidden * kChunk) {}

  Rows<T> own_c() { return {c_own.data(), kChunk}; }
  Rows<T> own_h() { return {h_own.data(), kChunk}; }
  int64_t width() const { return in + H; }
};

// Copies `rows` rows of n values from src (row stride ld_src) to dst (row stride ld_dst).
template <typename T>
void copy_rows(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) std::copy(src + r * ld_src, src + r * ld_src + n, dst + r * ld_dst);
}

struct LstmUnitsForward {
  // gates: W [x; h_prev] in, activated gates out; writes c and h. Two passes
  // (the gates, then the cells), each with few live values, so that 16 vector
  // registers (AVX2) hold them. c and h may alias c_prev and the layer's
  // h_prev: each element is read before it is written.
  template <typename T>
  FASTMETA_INLINE static void run(T* gates, const T* bias, Rows<const T> c_prev, Rows<T> c, Rows<T> h,
                                  int64_t H, int64_t n) {
    for (int64_t r = 0; r < 4 * H; ++r) {
      T* row = gates + r * kChunk;
      const T b = bias[r];
      if (r >= 2 * H && r < 3 * H) {
#pragma GCC ivdep
        for (int64_t j = 0; j < n; ++j) row[j] = tanh_fast(row[j] + b);
      } else {
#pragma GCC ivdep
        for (int64_t j = 0; j < n; ++j) row[j] = sigmoid(row[j] + b);
      }
    }
    for (int64_t k = 0; k < H; ++k) {
      const T* gi = gates + k * kChunk;
      const T* gf = gates + (H + k) * kChunk;
      const T* gg = gates + (2 * H + k) * kChunk;
      const T* go = gates + (3 * H + k) * kChunk;
      const T* cp = c_prev.row(k);
      T* ck = c.row(k);
      T* hk = h.row(k);
#pragma GCC ivdep
      for (int64_t j = 0; j < n; ++j) lstm_cell(gi[j], gf[j], gg[j], go[j], cp[j], ck[j], hk[j]);
    }
  }
};

struct LstmUnitsBackward {
  // gates: activated gates in, d pre-activations out. dh [H, kChunk].
  template <typename T>
  FASTMETA_INLINE static void run(T* gates, Rows<const T> c_prev, Rows<const T> c, const T* dh,
                                  Rows<const T> dc, Rows<T> dc_prev, int64_t H, int64_t n) {
    for (int64_t k = 0; k < H; ++k) {
      T* gi = gates + k * kChunk;
      T* gf = gates + (H + k) * kChunk;
      T* gg = gates + (2 * H + k) * kChunk;
      T* go = gates + (3 * H + k) * kChunk;
      const T* cp = c_prev.row(k);
      const T* ck = c.row(k);
      const T* dhk = dh + k * kChunk;
      const T* dck = dc.row(k);
      T* dcp = dc_prev.row(k);
#pragma GCC ivdep
      for (int64_t j = 0; j < n; ++j)
        lstm_unit_backward(gi[j], gf[j], gg[j], go[j], cp[j], ck[j], dhk[j], dck[j], gi[j], gf[j], gg[j],
                           go[j], dcp[j]);
    }
  }
};

// out[j] = a * (b + sum_k w[k] rows[k][j]).
struct WeightedRowSum {
  template <typename T>
  FASTMETA_INLINE static void run(const T* w, Rows<const T> rows, int64_t K, T b, T a, T* out, int64_t n) {
    T acc[kChunk];
    for (int64_t j = 0; j < n; ++j) acc[j] = b;
    for (int64_t k = 0; k < K; ++k) {
      const T wk = w[k];
      const T* row = rows.row(k);
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

// One LSTM layer forward over n coordinates: gates = W [x; h_prev] + bias, then
// the units, writing c and h (the layer's own buffers, or rows of the new
// state, which may be the old state: the in-place step). Keeps what
// layer_backward needs.
template <typename T>
void layer_forward(LayerChunk<T>& layer, const T* W, const T* bias, Rows<const T> x, Rows<const T> h_prev,
                   Rows<const T> c_prev, int64_t n, Rows<T> c, Rows<T> h) {
  const int64_t H = layer.H, K = layer.width();
  layer.c_prev = c_prev, layer.c = c;
  T* xh = layer.xh.data();
  copy_rows(x.data, x.ld, xh, kChunk, layer.in, n);
  copy_rows(h_prev.data, h_prev.ld, xh + layer.in * kChunk, kChunk, H, n);
  gemm(false, false, 4 * H, n, K, W, K, xh, kChunk, T(0), layer.gates.data(), kChunk);
  run_loop<LstmUnitsForward>(layer.gates.data(), bias, c_prev, c, h, H, n);
}

// Its backward: dh [H, kChunk] is d loss / d h_new; dc d loss / d c_new. Writes
// d c_prev, d h_prev and dxh [in + H, kChunk] (d x in its first `in` rows);
// adds the weight and bias gradients to dW [4H, in + H] and db [4H].
template <typename T>
void layer_backward(LayerChunk<T>& layer, const T* W, const T* dh, Rows<const T> dc, Rows<T> dc_prev,
                    Rows<T> dh_prev, int64_t n, T* dxh, T* dW, T* db) {
  const int64_t H = layer.H, K = layer.width();
  run_loop<LstmUnitsBackward>(layer.gates.data(), layer.c_prev, layer.c, dh, dc, dc_prev, H, n);
  const T* d_pre = layer.gates.data();
  for (int64_t r = 0; r < 4 * H; ++r) db[r] += row_sum(d_pre + r * kChunk, n);
  gemm(false, true, 4 * H, K, n, d_pre, kChunk, layer.xh.data(), kChunk, T(1), dW, K);
  gemm(true, false, K, n, 4 * H, W, K, d_pre, kChunk, T(0), dxh, kChunk);
  copy_rows(dxh + layer.in * kChunk, kChunk, dh_prev.data, dh_prev.ld, H, n);
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
