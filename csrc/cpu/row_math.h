// Loops over one row of a tile. Each is written once, as a struct with an
// always-inline `run`, and compiled for AVX-512, AVX2 and the baseline x86-64
// instruction set; run_loop picks the widest this CPU has. Written so that
// the compiler vectorises them: a polynomial exp for float32 (libm's expf does
// not vectorise) and reductions with a vector of independent accumulators
// (kLanes; a single accumulator does not vectorise without -ffast-math).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../math/metric.h"

#define FASTMETA_INLINE inline __attribute__((always_inline))

namespace fastmeta::cpu {

#if defined(__x86_64__)
enum class Isa { Baseline, Avx2, Avx512 };

// The widest instruction set this CPU runs; FASTMETA_CPU_ISA=avx2 or
// baseline caps it (the tests run every variant that way).
inline Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                       __builtin_cpu_supports("avx512dq")
                   ? Isa::Avx512
               : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? Isa::Avx2
                                                                                 : Isa::Baseline;
    const char* cap = std::getenv("FASTMETA_CPU_ISA");
    if (cap && std::strcmp(cap, "baseline") == 0) return Isa::Baseline;
    if (cap && std::strcmp(cap, "avx2") == 0 && best == Isa::Avx512) return Isa::Avx2;
    return best;
  }();
  return isa;
}

template <typename Loop, typename... Args>
__attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma"))) auto run_avx512(Args... args) {
  return Loop::run(args...);
}

template <typename Loop, typename... Args>
__attribute__((target("avx2,fma"))) auto run_avx2(Args... args) {
  return Loop::run(args...);
}
#endif

// Runs Loop::run(args...) compiled for the widest instruction set this CPU has.
template <typename Loop, typename... Args>
auto run_loop(Args... args) {
#if defined(__x86_64__)
  switch (cpu_isa()) {
    case Isa::Avx512:
      return run_avx512<Loop>(args...);
    case Isa::Avx2:
      return run_avx2<Loop>(args...);
    default:
      break;
  }
#endif
  return Loop::run(args...);
}

// Runs Loop<kBytes>::run(args...) compiled for the widest instruction set
// this CPU has, kBytes the width of its vector registers (64, 32 or 16), for
// loops written with explicit vectors of that width.
template <template <int> class Loop, typename... Args>
auto run_vector_loop(Args... args) {
#if defined(__x86_64__)
  switch (cpu_isa()) {
    case Isa::Avx512:
      return run_avx512<Loop<64>>(args...);
    case Isa::Avx2:
      return run_avx2<Loop<32>>(args...);
    default:
      break;
  }
#endif
  return Loop<16>::run(args...);
}

// y[j] += a * x[j].
struct Axpy {
  template <typename T>
  FASTMETA_INLINE static void run(T* __restrict__ y, const T* x, int64_t n, T a) {
    for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
  }
};

// v[j] *= a.
struct Scale {
  template <typename T>
  FASTMETA_INLINE static void run(T* v, int64_t n, T a) {
    for (int64_t j = 0; j < n; ++j) v[j] *= a;
  }
};

// The independent accumulators of a reduction loop: one 64-byte vector of T.
// Eight float32 lanes made GCC's AVX-512 code for such loops a tangle of
// permutations, slower than its AVX2 code.
template <typename T>
constexpr int kLanes = 64 / sizeof(T);

// v[j] = exp(a * v[j] - shift); returns sum_j v[j].
struct ExpAffineSum {
  template <typename T>
  FASTMETA_INLINE static T run(T* v, int64_t n, T a, T shift) {
    T acc[kLanes<T>] = {};
    int64_t j = 0;
    for (; j + kLanes<T> <= n; j += kLanes<T>)
      for (int l = 0; l < kLanes<T>; ++l) {
        v[j + l] = exp_fast(a * v[j + l] - shift);
        acc[l] += v[j + l];
      }
    for (; j < n; ++j) {
      v[j] = exp_fast(a * v[j] - shift);
      acc[0] += v[j];
    }
    T s = 0;
    for (int l = 0; l < kLanes<T>; ++l) s += acc[l];
    return s;
  }
};

// The cross-entropy gradient of one row without the target term: with
// p[j] = exp(a * s[j] - lse), writes w[j] = g * p[j]; returns
// sum_j p[j] * (s[j] - center) (see scale_gradient_center).
struct SoftmaxGradRow {
  template <typename T>
  FASTMETA_INLINE static T run(T* w, const T* s, int64_t n, T a, T lse, T g, T center) {
    T acc[kLanes<T>] = {};
    int64_t j = 0;
    for (; j + kLanes<T> <= n; j += kLanes<T>)
      for (int l = 0; l < kLanes<T>; ++l) {
        const T p = exp_fast(a * s[j + l] - lse);
        acc[l] += p * (s[j + l] - center);
        w[j + l] = g * p;
      }
    for (; j < n; ++j) {
      const T p = exp_fast(a * s[j] - lse);
      acc[0] += p * (s[j] - center);
      w[j] = g * p;
    }
    T sum = 0;
    for (int l = 0; l < kLanes<T>; ++l) sum += acc[l];
    return sum;
  }
};

// log sum_j exp(a * s[j]), without writing anything.
struct ScaledLogSumExp {
  template <typename T>
  FASTMETA_INLINE static T run(const T* s, int64_t n, T a) {
    T acc[kLanes<T>];
    for (int l = 0; l < kLanes<T>; ++l) acc[l] = -std::numeric_limits<T>::infinity();
    int64_t j = 0;
    for (; j + kLanes<T> <= n; j += kLanes<T>)
      for (int l = 0; l < kLanes<T>; ++l) acc[l] = a * s[j + l] > acc[l] ? a * s[j + l] : acc[l];
    for (; j < n; ++j) acc[0] = a * s[j] > acc[0] ? a * s[j] : acc[0];
    T m = acc[0];
    for (int l = 1; l < kLanes<T>; ++l) m = acc[l] > m ? acc[l] : m;
    if (m == -std::numeric_limits<T>::infinity()) return m;
    T sum[kLanes<T>] = {};
    for (j = 0; j + kLanes<T> <= n; j += kLanes<T>)
      for (int l = 0; l < kLanes<T>; ++l) sum[l] += exp_fast(a * s[j + l] - m);
    for (; j < n; ++j) sum[0] += exp_fast(a * s[j] - m);
    T total = 0;
    for (int l = 0; l < kLanes<T>; ++l) total += sum[l];
    return m + std::log(total);
  }
};

// sum_j a[j] * b[j].
struct Dot {
  template <typename T>
  FASTMETA_INLINE static T run(const T* a, const T* b, int64_t n) {
    T acc[kLanes<T>] = {};
    int64_t j = 0;
    for (; j + kLanes<T> <= n; j += kLanes<T>)
      for (int l = 0; l < kLanes<T>; ++l) acc[l] += a[j + l] * b[j + l];
    for (; j < n; ++j) acc[0] += a[j] * b[j];
    T s = 0;
    for (int l = 0; l < kLanes<T>; ++l) s += acc[l];
    return s;
  }
};

// sum_j a[j] * (b[j] - c).
struct ShiftedDot {
  template <typename T>
  FASTMETA_INLINE static T run(const T* a, const T* b, T c, int64_t n) {
    T acc[kLanes<T>] = {};
    int64_t j = 0;
    for (; j + kLanes<T> <= n; j += kLanes<T>)
      for (int l = 0; l < kLanes<T>; ++l) acc[l] += a[j + l] * (b[j + l] - c);
    for (; j < n; ++j) acc[0] += a[j] * (b[j] - c);
    T s = 0;
    for (int l = 0; l < kLanes<T>; ++l) s += acc[l];
    return s;
  }
};

struct Sum {
  template <typename T>
  FASTMETA_INLINE static T run(const T* a, int64_t n) {
    T acc[kLanes<T>] = {};
    int64_t j = 0;
    for (; j + kLanes<T> <= n; j += kLanes<T>)
      for (int l = 0; l < kLanes<T>; ++l) acc[l] += a[j + l];
    for (; j < n; ++j) acc[0] += a[j];
    T s = 0;
    for (int l = 0; l < kLanes<T>; ++l) s += acc[l];
    return s;
  }
};

// v[j] = exp(a * v[j] - shift); returns their sum.
template <typename T>
T exp_affine_sum(T* v, int64_t n, T a, T shift) {
  return run_loop<ExpAffineSum>(v, n, a, shift);
}

template <typename T>
T row_dot(const T* a, const T* b, int64_t n) {
  return run_loop<Dot>(a, b, n);
}

template <typename T>
T row_dot_shifted(const T* a, const T* b, T c, int64_t n) {
  return run_loop<ShiftedDot>(a, b, c, n);
}

template <typename T>
T row_sum(const T* a, int64_t n) {
  return run_loop<Sum>(a, n);
}

// The scale's gradient of a softmax row, sum_j w[j] * s[j], has weights
// w[j] = d loss / d logit[j] that sum to 0, so a constant may be subtracted
// from every s[j]. Subtracting the similarity of the likeliest key (of a
// row's first tile) keeps the rounding of the probabilities from being
// multiplied by |s| (large for the Euclidean metrics): the error then
// matches eager PyTorch's.
template <typename T>
T scale_gradient_center(const T* s, int64_t n, T scale) {
  T best = 0, center = 0;
  for (int64_t j = 0; j < n; ++j)
    if (j == 0 || scale * s[j] > best) {
      best = scale * s[j];
      center = s[j];
    }
  return std::isfinite(center) ? center : T(0);
}

}  // namespace fastmeta::cpu
