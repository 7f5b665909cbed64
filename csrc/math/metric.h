// The metric family's per-element math (distances, similarities, the
// contrastive loss), written once for the CPU and CUDA kernels.
//
// Every metric is a function of three numbers: the dot product x.y and one
// statistic per row of x and of y (`row_stat`). Kernels get x.y from a tiled
// matrix product, so the per-element work below is all that differs by metric.
//
//   sqeuclidean  row_stat = |v|^2            s = -max(ax + ay - 2 x.y, 0)
//   euclidean    row_stat = |v|^2            s = -sqrt(max(ax + ay - 2 x.y, 0))
//   cosine       row_stat = 1/max(|v|, eps)  s = x.y * ax * ay
//   dot          row_stat unused             s = x.y
//
// Distances (pairwise_distance) are -s for the two Euclidean metrics and 1 - s
// for cosine. Gradients are 0 where a Euclidean distance is 0, as torch.cdist.
#pragma once

#include <cmath>

#include "common.h"

namespace fastmeta {

enum class Metric : int { SqEuclidean = 0, Euclidean = 1, Cosine = 2, Dot = 3 };

// Same epsilon as torch.nn.functional.cosine_similarity.
constexpr double kCosineEps = 1e-8;

template <Metric M, typename T>
FASTMETA_HOST_DEVICE T row_stat(T sum_squares) {
  if constexpr (M == Metric::Cosine) {
    T norm = sqrt(sum_squares);
    return T(1) / (norm > T(kCosineEps) ? norm : T(kCosineEps));
  } else {
    return sum_squares;
  }
}

// d row_stat / d v = row_stat_coeff * v.
template <Metric M, typename T>
FASTMETA_HOST_DEVICE T row_stat_coeff(T sum_squares, T stat) {
  if constexpr (M == Metric::Cosine) {
    return sqrt(sum_squares) > T(kCosineEps) ? -stat * stat * stat : T(0);
  } else if constexpr (M == Metric::Dot) {
    return T(0);
  } else {
    return T(2);
  }
}

template <Metric M, typename T>
FASTMETA_HOST_DEVICE T similarity(T dot, T ax, T ay) {
  if constexpr (M == Metric::SqEuclidean) {
    T d2 = ax + ay - T(2) * dot;
    return d2 <= T(0) ? T(0) : -d2;  // written so that NaN propagates
  } else if constexpr (M == Metric::Euclidean) {
    T d2 = ax + ay - T(2) * dot;
    return d2 <= T(0) ? T(0) : -sqrt(d2);
  } else if constexpr (M == Metric::Cosine) {
    return dot * ax * ay;
  } else {
    return dot;
  }
}

// Partial derivatives of s with respect to (x.y, ax, ay), from s itself.
template <typename T>
struct SimilarityPartials {
  T d_dot, d_ax, d_ay;
};

template <Metric M, typename T>
FASTMETA_HOST_DEVICE SimilarityPartials<T> similarity_partials(T s, T ax, T ay) {
  if constexpr (M == Metric::SqEuclidean) {
    // s == 0 only where the distance was clamped at 0: gradient 0 there.
    return s == T(0) ? SimilarityPartials<T>{T(0), T(0), T(0)} : SimilarityPartials<T>{T(2), T(-1), T(-1)};
  } else if constexpr (M == Metric::Euclidean) {
    if (s == T(0)) return SimilarityPartials<T>{T(0), T(0), T(0)};
    T inv = T(-1) / s;  // 1 / distance
    return SimilarityPartials<T>{inv, T(-0.5) * inv, T(-0.5) * inv};
  } else if constexpr (M == Metric::Cosine) {
    return SimilarityPartials<T>{ax * ay, s / ax, s / ay};
  } else {
    return SimilarityPartials<T>{T(1), T(0), T(0)};
  }
}

// Distance from similarity and back: pairwise_distance's output convention.
template <Metric M, typename T>
FASTMETA_HOST_DEVICE T distance_from_similarity(T s) {
  return M == Metric::Cosine ? T(1) - s : -s;
}

template <Metric M, typename T>
FASTMETA_HOST_DEVICE T similarity_from_distance(T d) {
  return M == Metric::Cosine ? T(1) - d : -d;
}

// Contrastive loss of one pair with Euclidean distance d (Hadsell et al. 2006):
// same * d^2 + (1 - same) * max(margin - d, 0)^2.
template <typename T>
FASTMETA_HOST_DEVICE T contrastive_pair_loss(T d, T same, T margin) {
  T hinge = margin - d > T(0) ? margin - d : T(0);
  return same * d * d + (T(1) - same) * hinge * hinge;
}

// d loss / d d, and d loss / d same, for one pair.
template <typename T>
FASTMETA_HOST_DEVICE T contrastive_pair_d_distance(T d, T same, T margin) {
  T hinge = margin - d > T(0) ? margin - d : T(0);
  return T(2) * same * d - T(2) * (T(1) - same) * hinge;
}

template <typename T>
FASTMETA_HOST_DEVICE T contrastive_pair_d_same(T d, T margin) {
  T hinge = margin - d > T(0) ? margin - d : T(0);
  return d * d - hinge * hinge;
}

}  // namespace fastmeta

// Calls `body` with `M` bound to the metric as a compile-time constant, so that
// kernels are instantiated once per metric and the inner loops stay branch-free.
#define FASTMETA_DISPATCH_METRIC(metric, ...)                             \
  [&] {                                                                   \
    switch (metric) {                                                     \
      case ::fastmeta::Metric::SqEuclidean: {                             \
        constexpr ::fastmeta::Metric M = ::fastmeta::Metric::SqEuclidean; \
        return __VA_ARGS__();                                             \
      }                                                                   \
      case ::fastmeta::Metric::Euclidean: {                               \
        constexpr ::fastmeta::Metric M = ::fastmeta::Metric::Euclidean;   \
        return __VA_ARGS__();                                             \
      }                                                                   \
      case ::fastmeta::Metric::Cosine: {                                  \
        constexpr ::fastmeta::Metric M = ::fastmeta::Metric::Cosine;      \
        return __VA_ARGS__();                                             \
      }                                                                   \
      default: {                                                          \
        constexpr ::fastmeta::Metric M = ::fastmeta::Metric::Dot;         \
        return __VA_ARGS__();                                             \
      }                                                                   \
    }                                                                     \
  }()
