// CPU kernels of fastmeta::relation_pair_pool, the first block of Relation
// networks' relation module after its separable first convolution: for every
// query map q_i and prototype map p_j of an episode (channels last),
//   out[i, j] = relu(max_pool2d(q_i + p_j, kernel 2, stride 2, ceil_mode)),
// without building the N x Q pair maps. The windows do not overlap, so each
// input position has one output cell; a clipped window at an odd edge repeats
// its valid positions. The backward recomputes each window's maximum (the
// maps are small and stay in cache) and sends the gradient to its first
// maximal position, as max_pool2d does, once per query (summing over the
// prototypes) and once per prototype, so that no two threads write alike.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../operands/relation.h"
#include "row_math.h"

namespace fastmeta::cpu {
namespace {

// The four input offsets (in elements of one [H, W, C] map) of each output
// cell, row-major; a position outside the map repeats the window's first.
std::vector<int64_t> window_offsets(int64_t H, int64_t W, int64_t C) {
  const int64_t OH = (H + 1) / 2, OW = (W + 1) / 2;
  std::vector<int64_t> offsets(OH * OW * 4);
  for (int64_t oy = 0; oy < OH; ++oy) {
    for (int64_t ox = 0; ox < OW; ++ox) {
      const int64_t y = 2 * oy, x = 2 * ox;
      const int64_t dx = x + 1 < W ? C : 0, dy = y + 1 < H ? W * C : 0;
      int64_t* o = &offsets[(oy * OW + ox) * 4];
      o[0] = (y * W + x) * C, o[1] = o[0] + dx, o[2] = o[0] + dy, o[3] = o[2] + dx;
    }
  }
  return offsets;
}

// The window's maximum of a + b at channel c and the index (0..3) of its
// first maximal position; NaN wins, as in max_pool2d.
template <typename T>
FASTMETA_INLINE T window_max(const T* a, const T* b, const int64_t* o, int64_t c, int& arg) {
  T best = a[o[0] + c] + b[o[0] + c];
  arg = 0;
#pragma GCC unroll 3
  for (int k = 1; k < 4; ++k) {
    const T v = a[o[k] + c] + b[o[k] + c];
    const bool take = best == best && !(v <= best);  // a NaN, once met, stays
    best = take ? v : best;
    arg = take ? k : arg;
  }
  return best;
}

// One pair's output [OH, OW, C] from its maps a and b.
struct PairPoolForward {
  template <typename T>
  FASTMETA_INLINE static void run(const T* a, const T* b, T* out, const int64_t* offsets, int64_t cells,
                                  int64_t C) {
    for (int64_t cell = 0; cell < cells; ++cell) {
      const int64_t* o = offsets + 4 * cell;
      T* y = out + cell * C;
#pragma GCC ivdep
      for (int64_t c = 0; c < C; ++c) {
        int arg;
        const T best = window_max(a, b, o, c, arg);
        y[c] = best < T(0) ? T(0) : best;  // NaN stays NaN, as relu
      }
    }
  }
};

// Adds one pair's gradient `grad [OH, OW, C]` to `target` (a's or b's
// gradient map) at each window's maximal position, where the output is
// positive (relu passes no gradient at 0).
struct PairPoolBackward {
  template <typename T>
  FASTMETA_INLINE static void run(const T* a, const T* b, const T* grad, T* target, const int64_t* offsets,
                                  int64_t cells, int64_t C) {
    for (int64_t cell = 0; cell < cells; ++cell) {
      const int64_t* o = offsets + 4 * cell;
      const T* g = grad + cell * C;
#pragma GCC ivdep
      for (int64_t c = 0; c < C; ++c) {
        int arg;
        const T best = window_max(a, b, o, c, arg);
        const T pass = best > T(0) ? g[c] : T(0);
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) target[o[k] + c] += arg == k ? pass : T(0);
      }
    }
  }
};

at::Tensor relation_pair_pool(const at::Tensor& queries_in, const at::Tensor& prototypes_in) {
  const PairPoolOperands o = pair_pool_operands(queries_in, prototypes_in);
  const int64_t B = o.B, Q = o.Q, N = o.N, C = o.C, map = o.H * o.W * C;
  const int64_t cells = o.OH * o.OW;
  at::Tensor out = at::empty({B, Q, N, o.OH, o.OW, C}, o.queries.options());
  if (out.numel() == 0) return out;
  const std::vector<int64_t> offsets = window_offsets(o.H, o.W, C);
  const int64_t grain = std::max<int64_t>(1, 16384 / (cells * C));
  AT_DISPATCH_FLOATING_TYPES(o.queries.scalar_type(), "fastmeta::relation_pair_pool", [&] {
    const scalar_t* q = o.queries.const_data_ptr<scalar_t>();
    const scalar_t* p = o.prototypes.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * Q * N, grain, [&](int64_t begin, int64_t end) {
      for (int64_t pair = begin; pair < end; ++pair) {
        const int64_t b = pair / (Q * N), i = pair / N, j = pair % N;
        run_loop<PairPoolForward>(q + i * map, p + (b * N + j) * map, y + pair * cells * C, offsets.data(),
                                  cells, C);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> relation_pair_pool_backward(const at::Tensor& grad_in,
                                                               const at::Tensor& queries_in,
                                                               const at::Tensor& prototypes_in) {
  const PairPoolOperands o = pair_pool_backward_operands(grad_in, queries_in, prototypes_in);
  const int64_t B = o.B, Q = o.Q, N = o.N, C = o.C, map = o.H * o.W * C;
  const int64_t cells = o.OH * o.OW, out_map = cells * C;
  at::Tensor grad_queries = at::zeros_like(o.queries);
  at::Tensor grad_prototypes = at::zeros_like(o.prototypes);
  if (o.grad.numel() == 0) return {grad_queries, grad_prototypes};
  const std::vector<int64_t> offsets = window_offsets(o.H, o.W, C);
  const int64_t grain = std::max<int64_t>(1, 16384 / (std::max(Q, N) * out_map));
  AT_DISPATCH_FLOATING_TYPES(o.queries.scalar_type(), "fastmeta::relation_pair_pool_backward", [&] {
    const scalar_t* q = o.queries.const_data_ptr<scalar_t>();
    const scalar_t* p = o.prototypes.const_data_ptr<scalar_t>();
    const scalar_t* g = o.grad.const_data_ptr<scalar_t>();
    scalar_t* gq = grad_queries.mutable_data_ptr<scalar_t>();
    scalar_t* gp = grad_prototypes.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * Q, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {  // i: the query, over all episodes
        const int64_t b = i / Q;
        for (int64_t j = 0; j < N; ++j) {
          run_loop<PairPoolBackward>(q + i * map, p + (b * N + j) * map, g + (i * N + j) * out_map,
                                     gq + i * map, offsets.data(), cells, C);
        }
      }
    });
    at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {  // j: the prototype, over all episodes
        const int64_t b = j / N;
        for (int64_t i = b * Q; i < (b + 1) * Q; ++i) {
          run_loop<PairPoolBackward>(q + i * map, p + j * map, g + (i * N + j % N) * out_map, gp + j * map,
                                     offsets.data(), cells, C);
        }
      }
    });
  });
  return {grad_queries, grad_prototypes};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("relation_pair_pool", &relation_pair_pool);
  m.impl("relation_pair_pool_backward", &relation_pair_pool_backward);
}

}  // namespace fastmeta::cpu
