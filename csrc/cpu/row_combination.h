// Small matrix products written as rows of the output that combine rows of
// an operand, in explicit vectors of the instruction set's width (kBytes):
// for the MLP kernel's products and the similarity kernels' query gradients
// from few keys, where a BLAS call costs more than the arithmetic. Callers
// compile them per instruction set through run_vector_loop (row_math.h).
#pragma once

#include <cstdint>
#include <cstring>
#include <initializer_list>

#include "row_math.h"

namespace fastmeta::cpu {

// A matrix product as rows of the output that combine rows of an operand:
// output row m gets sum_r coef[m * coef_row + r * coef_stride] *
// rows[r * row_stride + k], r < count.
template <typename T>
struct RowCombination {
  const T* coef;
  int64_t coef_row, coef_stride;
  const T* rows;
  int64_t row_stride;
  int64_t count;

  FASTMETA_INLINE RowCombination from_row(int64_t m) const {
    return {count ? coef + m * coef_row : coef, coef_row, coef_stride, rows, row_stride, count};
  }
};

// A vector of kBytes of T (GCC's vector extension; an alias template would
// drop the attribute).
template <typename T, int kBytes>
struct Vector {
  typedef T type __attribute__((vector_size(kBytes)));
};

// A vector loaded from (stored to) any address of a T, as the compilers'
// unaligned-load intrinsics define it: a memcpy into an element of an array
// of vectors is copied in halves instead, and the full-width load that
// follows stalls on them. By reference: passing or returning a vector by
// value is ABI-dependent on the instruction set.
template <typename V, typename T>
FASTMETA_INLINE void load_vector(V& v, const T* p) {
  typedef T Unaligned __attribute__((vector_size(sizeof(V)), aligned(alignof(T)), may_alias));
  v = *reinterpret_cast<const Unaligned*>(p);
}
template <typename V, typename T>
FASTMETA_INLINE void store_vector(T* p, const V& v) {
  typedef T Unaligned __attribute__((vector_size(sizeof(V)), aligned(alignof(T)), may_alias));
  *reinterpret_cast<Unaligned*>(p) = v;
}

// Columns [k0, k0 + sizeof(V) / sizeof(T)) of kRows output rows (out_stride
// apart): init (or 0) + first + second, V a Vector or T itself (one column,
// for outputs narrower than a vector). The kRows sums stay in registers, each
// row of the operands is loaded once for the kRows outputs, and the kRows
// sums are independent chains of multiply-adds (one chain waits on each
// add's latency). Written with explicit vectors: left to itself, the
// compiler vectorised across the kRows outputs instead, with shuffles.
template <int64_t kRows, typename V, typename T>
FASTMETA_INLINE void combine_block(T* __restrict__ out, int64_t out_stride, int64_t k0, const T* init,
                                   const RowCombination<T>& first, const RowCombination<T>& second) {
  V start = {}, acc[kRows];
  if (init) std::memcpy(&start, init + k0, sizeof(V));
  for (int64_t m = 0; m < kRows; ++m) acc[m] = start;
  for (const RowCombination<T>& c : {first, second})
    for (int64_t r = 0; r < c.count; ++r) {
      V row;
      std::memcpy(&row, c.rows + r * c.row_stride + k0, sizeof(V));
      for (int64_t m = 0; m < kRows; ++m) acc[m] += c.coef[m * c.coef_row + r * c.coef_stride] * row;
    }
  for (int64_t m = 0; m < kRows; ++m) std::memcpy(out + m * out_stride + k0, &acc[m], sizeof(V));
}

// kRows output rows, all n columns, a vector at a time. A last partial
// vector is recomputed overlapping the one before (out aliases no operand).
template <int64_t kRows, int kBytes, typename T>
FASTMETA_INLINE void combine_row_block(T* out, int64_t out_stride, int64_t n, const T* init,
                                       const RowCombination<T>& first, const RowCombination<T>& second) {
  constexpr int64_t kLine = kBytes / sizeof(T);
  if (n < kLine) {
    for (int64_t k = 0; k < n; ++k) combine_block<kRows, T>(out, out_stride, k, init, first, second);
    return;
  }
  using V = typename Vector<T, kBytes>::type;
  for (int64_t k0 = 0; k0 + kLine <= n; k0 += kLine)
    combine_block<kRows, V>(out, out_stride, k0, init, first, second);
  if (n % kLine) combine_block<kRows, V>(out, out_stride, n - kLine, init, first, second);
}

// out[m * out_stride + k] = init[k] (or 0) + first + second for m0 <= m < M,
// k < n: kRows output rows at a time, then the rest kRows / 2 at a time.
template <int64_t kRows, int kBytes, typename T>
FASTMETA_INLINE void combine_rows_from(T* out, int64_t out_stride, int64_t m0, int64_t M, int64_t n,
                                       const T* init, const RowCombination<T>& first,
                                       const RowCombination<T>& second) {
  int64_t m = m0;
  for (; m + kRows <= M; m += kRows)
    combine_row_block<kRows, kBytes>(out + m * out_stride, out_stride, n, init, first.from_row(m),
                                     second.from_row(m));
  if constexpr (kRows > 1)
    combine_rows_from<kRows / 2, kBytes>(out, out_stride, m, M, n, init, first, second);
}

// All M output rows, eight at a time, then four, two and one; no `second`
// term by default.
template <int kBytes, typename T>
FASTMETA_INLINE void combine_rows(T* out, int64_t out_stride, int64_t M, int64_t n, const T* init,
                                  const RowCombination<T>& first, const RowCombination<T>& second = {}) {
  combine_rows_from<8, kBytes>(out, out_stride, 0, M, n, init, first, second);
}

}  // namespace fastmeta::cpu
