// Building blocks of the CPU similarity kernels: row-major matrix products on
// raw pointers (the BLAS inside PyTorch), per-row statistics, tiles of
// similarities and logits, the vector-Jacobian product of a tile, and the
// accumulation of gradients for the keys.
//
// All kernels work on one task b and a block of queries at a time, so that a
// tile of logits stays in cache and nothing of size [Q, N] is allocated unless
// the op returns it.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "../math/metric.h"
#include "../operands/metric.h"
#include "gemm.h"
#include "recycled_buffers.h"
#include "row_combination.h"
#include "row_math.h"

namespace fastmeta::cpu {

constexpr int64_t kQueryBlock = 256;  // the most queries in a block (sizes per-block arrays)
constexpr int64_t kKeyBlock = 512;

// Keeps a parameter out of template argument deduction (so it accepts nullptr).
template <typename T>
using NoDeduce = typename std::common_type<T>::type;

// Per-row statistic (row_stat) and its gradient coefficient of rows whose
// sums of squares are given; `coeff` may be null.
template <Metric M, typename T>
void row_stats_from_sum_squares(const T* sum_squares, int64_t rows, T* stat, NoDeduce<T>* coeff) {
  for (int64_t r = 0; r < rows; ++r) {
    stat[r] = row_stat<M>(sum_squares[r]);
    if (coeff) coeff[r] = row_stat_coeff<M>(sum_squares[r], stat[r]);
  }
}

// The same for `rows` rows of length D (the dot metric has none: zeros,
// without a pass over the rows).
template <Metric M, typename T>
void row_stats(const T* v, int64_t rows, int64_t D, T* stat, NoDeduce<T>* coeff) {
  if constexpr (M == Metric::Dot) {
    std::fill(stat, stat + rows, T(0));
    if (coeff) std::fill(coeff, coeff + rows, T(0));
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T sum_squares = row_dot(v + r * D, v + r * D, D);
    row_stats_from_sum_squares<M>(&sum_squares, 1, stat + r, coeff ? coeff + r : nullptr);
  }
}

// Up to this many keys, a tile's dot products and the matrix products of its
// vector-Jacobian product are explicit-vector loops that hold each key's row
// (and its gradient's) in registers: a BLAS call on so few keys costs more
// than its arithmetic.
constexpr int64_t kFewKeys = 8;

// Runs Loop::template rows<K>(args...) with the compile-time K = nb, 1 <= nb <= kFewKeys.
template <typename Loop, typename... Args>
FASTMETA_INLINE void with_few_keys(int64_t nb, Args... args) {
  switch (nb) {
    case 1:
      return Loop::template rows<1>(args...);
    case 2:
      return Loop::template rows<2>(args...);
    case 3:
      return Loop::template rows<3>(args...);
    case 4:
      return Loop::template rows<4>(args...);
    case 5:
      return Loop::template rows<5>(args...);
    case 6:
      return Loop::template rows<6>(args...);
    case 7:
      return Loop::template rows<7>(args...);
    default:
      return Loop::template rows<8>(args...);
  }
}

// S[i * s_row + j * s_key] = x_i . y_j for rows x [qb, D] and K keys y [K, D],
// and sum_squares[i] = x_i . x_i where sum_squares is given: a row at a
// time, each x vector loaded once for all the sums.
template <int kBytes>
struct FewKeyDots {
  template <int K, typename T>
  FASTMETA_INLINE static void rows(const T* x, int64_t qb, const T* y, int64_t D, T* S, int64_t s_row,
                                   int64_t s_key, T* sum_squares) {
    using V = typename Vector<T, kBytes>::type;
    constexpr int64_t kLine = kBytes / sizeof(T);
    for (int64_t i = 0; i < qb; ++i) {
      const T* xi = x + i * D;
      V acc[K + 1] = {};
      int64_t k = 0;
      for (; k + kLine <= D; k += kLine) {
        V xv, yv;
        load_vector(xv, xi + k);
        for (int j = 0; j < K; ++j) {
          load_vector(yv, y + j * D + k);
          acc[j] += xv * yv;
        }
        if (sum_squares) acc[K] += xv * xv;
      }
      for (int j = 0; j <= K; ++j) {
        const T* other = j < K ? y + j * D : xi;
        T dot = 0;
        for (int64_t l = 0; l < kLine; ++l) dot += acc[j][l];
        for (int64_t t = k; t < D; ++t) dot += xi[t] * other[t];
        if (j < K)
          S[i * s_row + j * s_key] = dot;
        else if (sum_squares)
          sum_squares[i] = dot;
      }
    }
  }

  template <typename T>
  FASTMETA_INLINE static void run(const T* x, int64_t qb, const T* y, int64_t nb, int64_t D, T* S,
                                  int64_t s_row, int64_t s_key, T* sum_squares) {
    with_few_keys<FewKeyDots>(nb, x, qb, y, D, S, s_row, s_key, sum_squares);
  }
};

// S[qb, nb] = x y^T (leading dimension ld), or its transpose S[nb, qb]; and
// sum_squares[i] = x_i . x_i where sum_squares is given (in the same pass
// over x for few keys).
template <typename T>
void key_dots(const T* x, int64_t qb, const T* y, int64_t nb, int64_t D, T* S, int64_t ld,
              bool transposed = false, NoDeduce<T>* sum_squares = nullptr) {
  if (nb >= 1 && nb <= kFewKeys) {
    run_vector_loop<FewKeyDots>(x, qb, y, nb, D, S, transposed ? int64_t(1) : ld,
                                transposed ? ld : int64_t(1), sum_squares);
    return;
  }
  if (transposed)
    gemm_abt(nb, qb, D, y, D, x, D, S, ld);
  else
    gemm_abt(qb, nb, D, x, D, y, D, S, ld);
  for (int64_t i = 0; sum_squares && i < qb; ++i) sum_squares[i] = row_dot(x + i * D, x + i * D, D);
}

template <Metric M>
struct SimilarityRow {
  template <typename T>
  FASTMETA_INLINE static void run(T* row, int64_t n, T ax, const T* ay) {
    for (int64_t j = 0; j < n; ++j) row[j] = similarity<M>(row[j], ax, ay[j]);
  }
};

// x.y of a block of queries x [qb, D] and a tile of keys y [nb, D] into S
// (key_dots); where ax is given (for a block's first tile), also the queries'
// row statistics ax and their coefficients cx (where given), in the same
// pass over x where the keys are few. Every forward, and every backward that
// recomputes the similarities, takes the queries' statistics from here, so
// that a backward reproduces its forward's similarities bit for bit.
template <Metric M, typename T>
void query_dots(const T* x, int64_t qb, const T* y, int64_t nb, int64_t D, T* S, int64_t ld, bool transposed,
                T* ax, NoDeduce<T>* cx = nullptr) {
  if (!ax || M == Metric::Dot) {
    key_dots(x, qb, y, nb, D, S, ld, transposed);
    if (ax) row_stats<M>(x, qb, D, ax, cx);  // the dot metric's: zeros, without a pass
    return;
  }
  T sum_squares[kQueryBlock];
  key_dots(x, qb, y, nb, D, S, ld, transposed, sum_squares);
  row_stats_from_sum_squares<M>(sum_squares, qb, ax, cx);
}

// S[qb, nb] = s(x_i, y_j) for a block of queries and a tile of keys; the
// block's first tile also computes the queries' row statistics ax (and cx)
// (query_dots).
template <Metric M, typename T>
void similarity_tile(const T* x, int64_t qb, const T* y, int64_t nb, int64_t D, T* ax, const T* ay, T* S,
                     int64_t ld, bool first_tile = true, NoDeduce<T>* cx = nullptr) {
  query_dots<M>(x, qb, y, nb, D, S, ld, false, first_tile ? ax : nullptr, cx);
  for (int64_t i = 0; i < qb; ++i) run_loop<SimilarityRow<M>>(S + i * ld, nb, ax[i], ay);
}

// row[j] = scale * s(x, y_j) from row[j] = x.y_j; returns max_j row[j] (NaN
// entries are skipped here; they reach the log-sum-exp through the sum).
template <Metric M>
struct LogitsRowMax {
  template <typename T>
  FASTMETA_INLINE static T run(T* row, int64_t n, T ax, const T* ay, T scale) {
    T acc[kLanes<T>];
    for (int l = 0; l < kLanes<T>; ++l) acc[l] = -std::numeric_limits<T>::infinity();
    int64_t j = 0;
    for (; j + kLanes<T> <= n; j += kLanes<T>)
      for (int l = 0; l < kLanes<T>; ++l) {
        row[j + l] = scale * similarity<M>(row[j + l], ax, ay[j + l]);
        acc[l] = row[j + l] > acc[l] ? row[j + l] : acc[l];
      }
    for (; j < n; ++j) {
      row[j] = scale * similarity<M>(row[j], ax, ay[j]);
      acc[0] = row[j] > acc[0] ? row[j] : acc[0];
    }
    T m = acc[0];
    for (int l = 1; l < kLanes<T>; ++l) m = acc[l] > m ? acc[l] : m;
    return m;
  }
};

// L[qb, nb] = scale_i * s(x_i, y_j), and row_max[i] = max_j L[i, j]; the
// block's first tile also computes ax (query_dots).
template <Metric M, typename T>
void logits_tile(const T* x, int64_t qb, const T* y, int64_t nb, int64_t D, T* ax, const T* ay,
                 const T* scale, T* L, int64_t ld, T* row_max, bool first_tile = true) {
  query_dots<M>(x, qb, y, nb, D, L, ld, false, first_tile ? ax : nullptr);
  for (int64_t i = 0; i < qb; ++i)
    row_max[i] = run_loop<LogitsRowMax<M>>(L + i * ld, nb, ax[i], ay, scale[i]);
}

// The online softmax of a block of queries over tiles of keys: per row, the
// running maximum of the logits and the running sum of exp(logit - maximum),
// so that no [Q, N] buffer is needed.
template <typename T>
struct OnlineSoftmax {
  T max[kQueryBlock], sum[kQueryBlock];

  explicit OnlineSoftmax(int64_t rows) {
    std::fill(max, max + rows, -std::numeric_limits<T>::infinity());
    std::fill(sum, sum + rows, T(0));
  }

  // Adds row i of a tile: its logits (whose maximum is tile_max, NaN skipped)
  // become the weights exp(logit - running maximum); returns the factor by
  // which what earlier tiles added must be rescaled.
  T add(int64_t i, T* logits, int64_t n, T tile_max) {
    const T new_max = std::max(max[i], tile_max);
    if (new_max == -std::numeric_limits<T>::infinity()) {  // no finite logit yet
      std::fill(logits, logits + n, T(0));
      return T(1);
    }
    const T rescale = std::exp(max[i] - new_max);
    sum[i] = sum[i] * rescale + exp_affine_sum(logits, n, T(1), new_max);
    max[i] = new_max;
    return rescale;
  }

  T logsumexp(int64_t i) const { return max[i] + std::log(sum[i]); }
};

// The online softmax of a block of queries xb [qb, D] (row statistics ax,
// computed here) over the keys y [N, D] of their task (row statistics ay), a
// tile of kKeyBlock keys at a time: on_logits(n0, nb, L) sees each tile's
// logits L [qb, nb], then on_weights(n0, nb, W, rescale) its weights
// exp(logit - running maximum) and the factors rescale [qb] by which what
// earlier tiles added must be multiplied.
template <Metric M, typename T, typename OnLogits, typename OnWeights>
OnlineSoftmax<T> online_softmax_over_keys(const T* xb, int64_t qb, T* ax, const T* y, const T* ay, int64_t N,
                                          int64_t D, const T* scale, OnLogits on_logits,
                                          OnWeights on_weights) {
  OnlineSoftmax<T> softmax(qb);
  std::vector<T> tile(qb * std::min(N, kKeyBlock));
  T tile_max[kQueryBlock], rescale[kQueryBlock];
  for (int64_t n0 = 0; n0 < N; n0 += kKeyBlock) {
    const int64_t nb = std::min(kKeyBlock, N - n0);
    logits_tile<M>(xb, qb, y + n0 * D, nb, D, ax, ay + n0, scale, tile.data(), nb, tile_max, n0 == 0);
    on_logits(n0, nb, static_cast<const T*>(tile.data()));
    for (int64_t i = 0; i < qb; ++i) rescale[i] = softmax.add(i, tile.data() + i * nb, nb, tile_max[i]);
    on_weights(n0, nb, static_cast<const T*>(tile.data()), static_cast<const T*>(rescale));
  }
  return softmax;
}

// Past kFewKeys and up to this many keys, a block's query gradient W y
// [qb, D] from its one tile of keys is written by combine_rows, in one pass,
// instead of zeroed and accumulated by a BLAS product (faster up to about 32
// keys; docs/benchmarks.md).
constexpr int64_t kCombinedKeys = 32;

// out [rows, D] = W [rows, nb] y [nb, D].
template <int kBytes>
struct CombineKeys {
  template <typename T>
  FASTMETA_INLINE static void run(T* out, int64_t rows, int64_t D, const T* W, int64_t nb, const T* y) {
    combine_rows<kBytes>(out, D, rows, D, static_cast<const T*>(nullptr),
                         RowCombination<T>{W, nb, 1, y, D, nb});
  }
};

// One row of similarity_tile_vjp: w[j] *= d s / d(x.y), gy_stat[j] += w[j] *
// d s / d ay; returns sum_j w[j] * d s / d ax.
template <Metric M>
struct SimilarityVjpRow {
  template <typename T>
  FASTMETA_INLINE static T run(T* w, const T* s, int64_t n, T ax, const T* ay, T* gy_stat) {
    T acc[kLanes<T>] = {};
    int64_t j = 0;
    for (; j + kLanes<T> <= n; j += kLanes<T>)
      for (int l = 0; l < kLanes<T>; ++l) {
        const SimilarityPartials<T> p = similarity_partials<M>(s[j + l], ax, ay[j + l]);
        acc[l] += w[j + l] * p.d_ax;
        gy_stat[j + l] += w[j + l] * p.d_ay;
        w[j + l] *= p.d_dot;
      }
    for (; j < n; ++j) {
      const SimilarityPartials<T> p = similarity_partials<M>(s[j], ax, ay[j]);
      acc[0] += w[j] * p.d_ax;
      gy_stat[j] += w[j] * p.d_ay;
      w[j] *= p.d_dot;
    }
    T sum = 0;
    for (int l = 0; l < kLanes<T>; ++l) sum += acc[l];
    return sum;
  }
};

// The x.y part of a vector-Jacobian product from a block's only tile, of K
// keys, in one pass: gx_i = sum_j W_ij y_j + c_i x_i (written) and gy_j +=
// sum_i W_ij x_i, for rows x [qb, D] and W_ij = W[i * w_row + j * w_key] (W
// [qb, K] or its transpose). At each vector position the K key vectors and
// their gradient sums stay in registers while up to kRowChunk rows go by:
// few rows, so that few rows of x and gx stream from memory at once (4 was
// the fastest of 4, 8 and 16 for D = 64 to 1600, by up to 2x).
template <int kBytes>
struct FewKeyVjp {
  static constexpr int64_t kRowChunk = 4;

  template <int K, typename T>
  FASTMETA_INLINE static void rows(T* __restrict__ gx, T* __restrict__ gy, const T* W, int64_t w_row,
                                   int64_t w_key, const T* c, const T* x, const T* y, int64_t qb, int64_t D) {
    using V = typename Vector<T, kBytes>::type;
    constexpr int64_t kLine = kBytes / sizeof(T);
    const int64_t full = D - D % kLine;
    for (int64_t i0 = 0; i0 < qb; i0 += kRowChunk) {
      const int64_t i1 = std::min(qb, i0 + kRowChunk);
      for (int64_t k = 0; k < full; k += kLine) {
        V key[K], key_grad[K];
        for (int j = 0; j < K; ++j) {
          load_vector(key[j], y + j * D + k);
          load_vector(key_grad[j], gy + j * D + k);
        }
        for (int64_t i = i0; i < i1; ++i) {
          V xv;
          load_vector(xv, x + i * D + k);
          V g = c[i] * xv;
          for (int j = 0; j < K; ++j) {
            g += W[i * w_row + j * w_key] * key[j];
            key_grad[j] += W[i * w_row + j * w_key] * xv;
          }
          store_vector(gx + i * D + k, g);
        }
        for (int j = 0; j < K; ++j) store_vector(gy + j * D + k, key_grad[j]);
      }
      for (int64_t t = full; t < D; ++t)
        for (int64_t i = i0; i < i1; ++i) {
          T g = c[i] * x[i * D + t];
          for (int j = 0; j < K; ++j) {
            g += W[i * w_row + j * w_key] * y[j * D + t];
            gy[j * D + t] += W[i * w_row + j * w_key] * x[i * D + t];
          }
          gx[i * D + t] = g;
        }
    }
  }

  template <typename T>
  FASTMETA_INLINE static void run(T* gx, T* gy, const T* W, int64_t w_row, int64_t w_key, const T* c,
                                  const T* x, const T* y, int64_t qb, int64_t nb, int64_t D) {
    with_few_keys<FewKeyVjp>(nb, gx, gy, W, w_row, w_key, c, x, y, qb, D);
  }
};

// FewKeyVjp for a block's only tile of nb <= kFewKeys keys, W_ij = W[i *
// w_row + j * w_key], with the queries' row-statistic part (cx, the queries'
// coefficients, times gx_stat) added to gx; returns false, doing nothing,
// where it does not apply (no cx, or more keys).
template <typename T>
bool few_key_vjp(const T* W, int64_t w_row, int64_t w_key, int64_t qb, int64_t nb, const T* x, const T* y,
                 int64_t D, T* gx, T* gy, const T* gx_stat, const T* cx) {
  if (!cx || nb < 1 || nb > kFewKeys) return false;
  T c[kQueryBlock];
  for (int64_t i = 0; i < qb; ++i) c[i] = cx[i] * gx_stat[i];
  run_vector_loop<FewKeyVjp>(gx, gy, W, w_row, w_key, static_cast<const T*>(c), x, y, qb, nb, D);
  return true;
}

// Vector-Jacobian product of a similarity tile S [qb, nb] (leading dimension
// lds). On entry W [qb, nb] holds dL/dS for the tile; it is overwritten. Adds
// the x.y part of the gradient to gx [qb, D] (writes it with `overwrite`, for
// the first tile) and to gy [nb, D], and the row-statistic parts to gx_stat
// [qb] and gy_stat [nb]; `finish_row_stat_grad` applies those last. With cx
// (the queries' row-statistic coefficients, given for a block's only tile)
// and few keys, the queries' row-statistic part goes into gx here as well,
// and the call returns true: the block's finish must then skip gx.
template <Metric M, typename T>
bool similarity_tile_vjp(T* W, const T* S, int64_t lds, int64_t qb, int64_t nb, const T* x, const T* y,
                         int64_t D, const T* ax, const T* ay, T* gx, T* gy, T* gx_stat, T* gy_stat,
                         bool overwrite, const T* cx) {
  if constexpr (M != Metric::Dot) {
    for (int64_t i = 0; i < qb; ++i)
      gx_stat[i] += run_loop<SimilarityVjpRow<M>>(W + i * nb, S + i * lds, nb, ax[i], ay, gy_stat);
  }
  if (few_key_vjp(static_cast<const T*>(W), nb, int64_t(1), qb, nb, x, y, D, gx, gy, gx_stat, cx))
    return true;
  if (overwrite && nb <= kCombinedKeys)
    run_vector_loop<CombineKeys>(gx, qb, D, static_cast<const T*>(W), nb, y);
  else
    gemm(false, false, qb, D, nb, static_cast<const T*>(W), nb, y, D, overwrite ? T(0) : T(1), gx, D);
  gemm_atb_acc(nb, D, qb, W, nb, x, D, gy, D);
  return false;
}

// Transposed tiles, [keys, queries], for ops whose rows of keys are short: a
// vector then spans queries, and a row of few keys costs no per-row
// reduction, remainder or call.

// ST[j, i] = s(x_i, y_j) from x_i . y_j, for a transposed tile ST [nb, qb].
template <Metric M>
struct SimilarityColumns {
  template <typename T>
  FASTMETA_INLINE static void run(T* ST, int64_t nb, int64_t qb, const T* ax, const T* ay) {
    for (int64_t j = 0; j < nb; ++j)
      for (int64_t i = 0; i < qb; ++i) ST[j * qb + i] = similarity<M>(ST[j * qb + i], ax[i], ay[j]);
  }
};

// SimilarityVjpRow for a transposed tile: WT [nb, qb] (d loss / d s,
// overwritten with d loss / d(x.y)) and ST [nb, qb].
template <Metric M>
struct SimilarityVjpColumns {
  template <typename T>
  FASTMETA_INLINE static void run(T* WT, const T* ST, int64_t nb, int64_t qb, const T* ax, const T* ay,
                                  T* gx_stat, T* gy_stat) {
    for (int64_t j = 0; j < nb; ++j) {
      T* w = WT + j * qb;
      const T* s = ST + j * qb;
      T acc[kLanes<T>] = {};
      int64_t i = 0;
      for (; i + kLanes<T> <= qb; i += kLanes<T>)
        for (int l = 0; l < kLanes<T>; ++l) {
          const SimilarityPartials<T> p = similarity_partials<M>(s[i + l], ax[i + l], ay[j]);
          gx_stat[i + l] += w[i + l] * p.d_ax;
          acc[l] += w[i + l] * p.d_ay;
          w[i + l] *= p.d_dot;
        }
      for (; i < qb; ++i) {
        const SimilarityPartials<T> p = similarity_partials<M>(s[i], ax[i], ay[j]);
        gx_stat[i] += w[i] * p.d_ax;
        acc[0] += w[i] * p.d_ay;
        w[i] *= p.d_dot;
      }
      T sum = 0;
      for (int l = 0; l < kLanes<T>; ++l) sum += acc[l];
      gy_stat[j] += sum;
    }
  }
};

// similarity_tile_vjp for a transposed tile ST [nb, qb], WT [nb, qb] holding
// (d loss / d s)^T on entry (overwritten).
template <Metric M, typename T>
bool similarity_tile_vjp_transposed(T* WT, const T* ST, int64_t qb, int64_t nb, const T* x, const T* y,
                                    int64_t D, const T* ax, const T* ay, T* gx, T* gy, T* gx_stat, T* gy_stat,
                                    bool overwrite, const T* cx) {
  if constexpr (M != Metric::Dot) run_loop<SimilarityVjpColumns<M>>(WT, ST, nb, qb, ax, ay, gx_stat, gy_stat);
  if (few_key_vjp(static_cast<const T*>(WT), int64_t(1), qb, qb, nb, x, y, D, gx, gy, gx_stat, cx))
    return true;
  gemm(true, false, qb, D, nb, static_cast<const T*>(WT), qb, y, D, overwrite ? T(0) : T(1), gx, D);
  gemm(false, false, nb, D, qb, static_cast<const T*>(WT), qb, x, D, T(1), gy, D);
  return false;
}

// g_r += v_r * coeff_r * stat_grad_r: the gradient through the row statistics.
template <typename T>
void finish_row_stat_grad(T* g, const T* v, const T* coeff, const T* stat_grad, int64_t rows, int64_t D) {
  for (int64_t r = 0; r < rows; ++r) {
    T c = coeff[r] * stat_grad[r];
    if (c != T(0)) run_loop<Axpy>(g + r * D, v + r * D, D, c);
  }
}

// Row statistics of the keys y [B, N, D] of every task, in parallel.
template <Metric M, typename T>
void key_row_stats(const T* y, int64_t B, int64_t N, int64_t D, T* ay, NoDeduce<T>* cy) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      row_stats<M>(y + b * N * D, N, D, ay + b * N, cy ? cy + b * N : nullptr);
  });
}

// Queries per block: up to kQueryBlock, so that each tile of keys read (and
// in the backward each key gradient written) serves many queries, which
// matters where the keys do not fit in cache; halved down to 64 while there
// are fewer than four blocks per thread, for the balance of the threads.
inline int64_t query_block_size(int64_t B, int64_t Q, int64_t largest = kQueryBlock) {
  int64_t size = std::min(largest, kQueryBlock);
  while (size > 64 && B * ((Q + size - 1) / size) < 4 * at::get_num_threads())
    size = std::max<int64_t>(64, size / 2);
  return size;
}

// Runs fn(b, q0, q1) for every (task, query block) pair, in parallel.
template <typename F>
void for_each_query_block(int64_t B, int64_t Q, F fn) {
  const int64_t size = query_block_size(B, Q), blocks = (Q + size - 1) / size;
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks, q0 = (item % blocks) * size;
      fn(b, q0, std::min(Q, q0 + size));
    }
  });
}

// Accumulates gradients with respect to the keys (and values), which every
// query block of a task adds to, without atomics or locks. The (task, query
// block) pairs are split into a fixed number of contiguous chunks; each chunk
// runs on one thread and adds into its own buffers, zeroing a task's buffer
// when it first reaches that task; `reduce` sums, for each task, the chunks
// that reached it, in chunk order, so results do not depend on scheduling.
template <typename T>
class KeyGradAccumulator {
 public:
  KeyGradAccumulator(int64_t B, int64_t Q, int64_t N, std::vector<int64_t> widths, at::ScalarType dtype,
                     int64_t largest_block)
      : B_(B),
        N_(N),
        size_(query_block_size(B, Q, largest_block)),
        blocks_((Q + size_ - 1) / size_),
        widths_(std::move(widths)) {
    chunks_ = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B_ * blocks_));
    for (int64_t w : widths_) buffers_.push_back(empty_recycled({chunks_, B_, N_, w}, dtype));
  }

  // Runs fn(b, q0, q1, key_rows) for every (task, query block); key_rows[f]
  // is the chunk's [N, width f] buffer of field f for task b.
  template <typename F>
  void run(int64_t Q, F fn) {
    at::parallel_for(0, chunks_, 1, [&](int64_t begin, int64_t end) {
      std::vector<T*> rows(buffers_.size());
      for (int64_t c = begin; c < end; ++c) {
        int64_t current = -1;
        for (int64_t item = first_item(c); item < first_item(c + 1); ++item) {
          const int64_t b = item / blocks_, q0 = (item % blocks_) * size_;
          if (b != current) {
            for (size_t f = 0; f < buffers_.size(); ++f) {
              rows[f] = slice(f, c, b);
              std::fill(rows[f], rows[f] + N_ * widths_[f], T(0));
            }
            current = b;
          }
          fn(b, q0, std::min(Q, q0 + size_), rows.data());
        }
      }
    });
  }

  // Field f summed over chunks: [B, N, width f].
  at::Tensor reduce(size_t f) {
    if (chunks_ == 1 && blocks_ > 0) return buffers_[f][0];  // one chunk reached every task
    at::Tensor out = empty_recycled({B_, N_, widths_[f]}, buffers_[f].scalar_type());
    const int64_t size = N_ * widths_[f];
    at::parallel_for(0, B_, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        T* dst = out.template mutable_data_ptr<T>() + b * size;
        bool first = true;
        for (int64_t c = 0; c < chunks_; ++c) {
          if (first_item(c) == first_item(c + 1) || first_item(c) / blocks_ > b ||
              (first_item(c + 1) - 1) / blocks_ < b)
            continue;
          const T* src = slice(f, c, b);
          for (int64_t k = 0; k < size; ++k) dst[k] = first ? src[k] : dst[k] + src[k];
          first = false;
        }
        if (first) std::fill(dst, dst + size, T(0));
      }
    });
    return out;
  }

 private:
  int64_t first_item(int64_t c) const { return B_ * blocks_ * c / chunks_; }
  T* slice(size_t f, int64_t c, int64_t b) {
    return buffers_[f].template mutable_data_ptr<T>() + (c * B_ + b) * N_ * widths_[f];
  }

  int64_t B_, N_, size_, blocks_, chunks_;
  std::vector<int64_t> widths_;
  std::vector<at::Tensor> buffers_;
};

// Gradient for the keys: the accumulated x.y part (field 0, [B, N, D]) plus
// the row-statistic part (field 1, [B, N, 1]).
template <typename T>
at::Tensor key_grad(KeyGradAccumulator<T>& acc, const at::Tensor& y, const at::Tensor& cy) {
  at::Tensor gy = acc.reduce(0).contiguous();
  at::Tensor gy_stat = acc.reduce(1).contiguous();
  finish_row_stat_grad(gy.mutable_data_ptr<T>(), y.const_data_ptr<T>(), cy.const_data_ptr<T>(),
                       gy_stat.const_data_ptr<T>(), y.size(0) * y.size(1), y.size(2));
  return gy;
}

// One block of queries of a similarity backward: rows q0 .. q0 + qb of task b.
// For each tile of keys the op fills W [qb, nb] with d loss / d s (S, the
// similarities, from `similarities` or its own source) and calls `apply`,
// which adds the tile's part of the gradients for x and y.
template <Metric M, typename T>
struct SimilarityGradBlock {
  using Scalar = T;
  static constexpr Metric metric = M;
  int64_t b, q0, qb, row, N, D;
  const T *xb, *y, *ay;  // x rows of the block; y and its row statistics for task b
  T* gx;                 // gradient rows of the block
  T* const* key_rows;    // key gradients of task b: x.y part, row statistics, then the op's own
  std::vector<T> S, W;   // [qb, min(N, kKeyBlock)] tiles

  SimilarityGradBlock(int64_t b_, int64_t q0_, int64_t qb_, int64_t Q, int64_t N_, int64_t D_, const T* x,
                      const T* y_, const T* ay_, T* gx_, T* const* key_rows_)
      : b(b_),
        q0(q0_),
        qb(qb_),
        row(b_ * Q + q0_),
        N(N_),
        D(D_),
        xb(x + row * D_),
        y(y_),
        ay(ay_),
        gx(gx_ + row * D_),
        key_rows(key_rows_),
        S(qb_ * std::min(N_, kKeyBlock)),
        W(S.size()) {
    if (N == 0) std::fill(gx, gx + qb * D, T(0));  // otherwise the first tile writes it
  }

  // Similarities of the block's queries to keys n0 .. n0 + nb, into S_out (leading dimension ld).
  void similarities_into(int64_t n0, int64_t nb, T* S_out, int64_t ld) {
    similarity_tile<M>(xb, qb, y + n0 * D, nb, D, ax, ay + n0, S_out, ld, !row_stats_known, cx);
    row_stats_known = true;
  }
  const T* similarities(int64_t n0, int64_t nb) {
    similarities_into(n0, nb, S.data(), nb);
    return S.data();
  }

  // Adds the gradient of the tile of keys n0 .. n0 + nb, from W (leading
  // dimension nb, overwritten) and its similarities S_tile (leading dimension lds).
  void apply(int64_t n0, int64_t nb, const T* S_tile, int64_t lds) {
    compute_row_stats();
    const bool only_tile = n0 == 0 && nb == N;
    query_stats_applied = similarity_tile_vjp<M>(W.data(), S_tile, lds, qb, nb, xb, y + n0 * D, D, ax,
                                                 ay + n0, gx, key_rows[0] + n0 * D, gx_stat, key_rows[1] + n0,
                                                 n0 == 0, only_tile ? cx : nullptr);
  }

  // similarities and apply for transposed tiles, [nb, qb]: S holds the
  // similarities, W (d loss / d s)^T for apply_transposed.
  const T* similarities_transposed(int64_t n0, int64_t nb) {
    query_dots<M>(xb, qb, y + n0 * D, nb, D, S.data(), qb, true, row_stats_known ? nullptr : ax, cx);
    row_stats_known = true;
    run_loop<SimilarityColumns<M>>(S.data(), nb, qb, static_cast<const T*>(ax), ay + n0);
    return S.data();
  }
  void apply_transposed(int64_t n0, int64_t nb, const T* S_tile) {
    compute_row_stats();
    const bool only_tile = n0 == 0 && nb == N;
    query_stats_applied = similarity_tile_vjp_transposed<M>(
        W.data(), S_tile, qb, nb, xb, y + n0 * D, D, ax, ay + n0, gx, key_rows[0] + n0 * D, gx_stat,
        key_rows[1] + n0, n0 == 0, only_tile ? cx : nullptr);
  }

  // After the op's tiles: the queries' row-statistic part of gx, unless
  // apply's few-key pass already added it.
  void finish() {
    compute_row_stats();
    if (!query_stats_applied) finish_row_stat_grad(gx, xb, cx, gx_stat, qb, D);
  }

 private:
  // The queries' row statistics and coefficients (from the first tile's
  // similarities), and the gradient with respect to the statistics.
  T ax[kQueryBlock], cx[kQueryBlock], gx_stat[kQueryBlock] = {};
  bool row_stats_known = false, query_stats_applied = false;

  // The queries' row statistics, where no tile's similarities computed them
  // (no keys, or an op whose backward reads the forward's output instead).
  void compute_row_stats() {
    if (row_stats_known) return;
    row_stats<M>(xb, qb, D, ax, cx);
    row_stats_known = true;
  }
};

// The gradients of a similarity op with respect to x and y (and `extra` more
// per-key fields of the given widths, such as values): the set-up, the loop
// over blocks of queries and the accumulation over blocks, shared by the ops.
// per_block(SimilarityGradBlock&) does an op's own work for one block.
struct SimilarityGradients {
  at::Tensor gx, gy;
  std::vector<at::Tensor> extra;
};

// Blocks have at most largest_block queries.
template <typename PerBlock>
SimilarityGradients similarity_backward(const SimilarityOperands& o, const std::vector<int64_t>& extra_widths,
                                        PerBlock per_block, int64_t largest_block = kQueryBlock) {
  const at::Tensor &x = o.x, &y = o.y;
  const int64_t B = o.B, Q = o.Q, N = o.N, D = o.D;
  SimilarityGradients out{empty_like_recycled(x), at::Tensor(), {}};
  at::Tensor ay = at::empty({B, N}, x.options()), cy = at::empty({B, N}, x.options());
  std::vector<int64_t> widths = {D, 1};
  widths.insert(widths.end(), extra_widths.begin(), extra_widths.end());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmeta: similarity backward", [&] {
    KeyGradAccumulator<scalar_t> keys(B, Q, N, widths, x.scalar_type(), largest_block);
    FASTMETA_DISPATCH_METRIC(o.metric, [&] {
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      key_row_stats<M>(yp, B, N, D, ay.mutable_data_ptr<scalar_t>(), cy.mutable_data_ptr<scalar_t>());
      keys.run(Q, [&](int64_t b, int64_t q0, int64_t q1, scalar_t* const* key_rows) {
        SimilarityGradBlock<M, scalar_t> block(b, q0, q1 - q0, Q, N, D, x.const_data_ptr<scalar_t>(),
                                               yp + b * N * D, ay.const_data_ptr<scalar_t>() + b * N,
                                               out.gx.mutable_data_ptr<scalar_t>(), key_rows);
        per_block(block);
        block.finish();
      });
    });
    out.gy = key_grad(keys, y, cy);
    for (size_t f = 0; f < extra_widths.size(); ++f) out.extra.push_back(keys.reduce(2 + f));
  });
  return out;
}

}  // namespace fastmeta::cpu
