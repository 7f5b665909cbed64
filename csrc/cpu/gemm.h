// Row-major matrix products on raw pointers, through the BLAS inside PyTorch.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace fastmeta::cpu {

// Fortran BLAS, exported by the MKL or OpenBLAS that PyTorch's CPU library
// links. Declared weak: where a PyTorch build does not export them, they are
// null and the matrix products below fall back to at::mm, as they do for
// sizes the BLAS's 32-bit integers cannot hold.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

// C[m, n] = alpha * op(A) op(B) + beta * C, with row-major operands: op(A) is
// A[m, k] (or A[k, m] transposed when trans_a), op(B) is B[k, n] (or B[n, k]
// transposed when trans_b).
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  auto blas = [] {
    if constexpr (std::is_same_v<T, float>)
      return sgemm_;
    else
      return dgemm_;
  }();
  constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
  if (blas != nullptr && std::max({m, n, k, lda, ldb, ldc}) <= kMaxInt) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int mi = n, ni = m, ki = k, ldai = ldb, ldbi = lda, ldci = ldc;
    const T one = 1;
    blas(&ta, &tb, &mi, &ni, &ki, &one, b, &ldai, a, &ldbi, &beta, c, &ldci);
    return;
  }
  auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    at::Tensor t = at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, options);
    return trans ? t.t() : t;
  };
  at::Tensor A = view(a, trans_a ? k : m, trans_a ? m : k, lda, trans_a);
  at::Tensor B = view(b, trans_b ? n : k, trans_b ? k : n, ldb, trans_b);
  at::Tensor C = view(c, m, n, ldc, false);
  C.copy_(beta == T(0) ? at::mm(A, B) : at::addmm(C, A, B, beta));
}

// C[m, n] = A[m, k] B[n, k]^T (row-major, leading dimensions given).
template <typename T>
void gemm_abt(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
              int64_t ldc) {
  gemm(false, true, m, n, k, a, lda, b, ldb, T(0), c, ldc);
}

// C[m, n] += A[m, k] B[k, n].
template <typename T>
void gemm_ab_acc(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                 int64_t ldc) {
  gemm(false, false, m, n, k, a, lda, b, ldb, T(1), c, ldc);
}

// C[m, n] += A[k, m]^T B[k, n].
template <typename T>
void gemm_atb_acc(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                  int64_t ldc) {
  gemm(true, false, m, n, k, a, lda, b, ldb, T(1), c, ldc);
}

}  // namespace fastmeta::cpu
