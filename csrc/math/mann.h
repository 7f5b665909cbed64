// Per-episode math of MANN's LRUA memory (Santoro et al. 2016), written once
// for the CPU kernel (one episode per loop iteration) and the CUDA kernel
// (one episode per thread).
//
// One episode: memory M [S, W] (S slots of width W), usage u [S], the H read
// heads' weights r [H, S]; at each of T steps the heads' keys k [H, W], write
// gates g [H] in (0, 1) and key strengths beta [H]:
//   lu      the n = min(H, S) least-used slots of u (NaN counts as most
//           used; ties go to the lower slot), lu[0] the least used;
//   w[h]    = g[h] r[h] + (1 - g[h]) 1_lu          write weights
//   M       = M with slot lu[0] zeroed + sum_h w[h] k[h]^T
//   r[h]    = softmax_i(beta[h] cos(k[h], M[i]))  read weights
//   read[h] = r[h] M
//   u       = decay u + sum_h (r[h] + w[h])
// The least-used selection, and so the usage, carry no gradient (as in the
// paper); everything else is differentiable.
#pragma once

#include "common.h"
#include "metric.h"

namespace fastmeta {

struct MannSizes {
  int64_t T, S, W, H;
  FASTMETA_HOST_DEVICE int64_t least_used() const { return H < S ? H : S; }
  // Scratch elements of one episode's forward and backward.
  FASTMETA_HOST_DEVICE int64_t forward_scratch() const { return H * S + S; }
  FASTMETA_HOST_DEVICE int64_t backward_scratch() const { return S * W + 2 * H * S + 2 * S; }
};

// Whether slot i comes before slot j in least-used order.
template <typename T>
FASTMETA_HOST_DEVICE bool less_used(const T* usage, int64_t i, int64_t j) {
  const T ui = usage[i], uj = usage[j];
  const bool nan_i = ui != ui, nan_j = uj != uj;
  if (nan_i != nan_j) return nan_j;
  if (!nan_i && ui != uj) return ui < uj;
  return i < j;
}

// The n least-used slots, in order (n passes over the slots; n is the number
// of heads, a handful).
template <typename T>
FASTMETA_HOST_DEVICE void least_used_slots(const T* usage, int64_t S, int64_t n, int64_t* slots) {
  for (int64_t k = 0; k < n; ++k) {
    int64_t best = -1;
    for (int64_t i = 0; i < S; ++i) {
      if (k > 0 && !less_used(usage, slots[k - 1], i)) continue;
      if (best < 0 || less_used(usage, i, best)) best = i;
    }
    slots[k] = best;
  }
}

// Write weights of one head: g r + (1 - g) 1_lu.
template <typename T>
FASTMETA_HOST_DEVICE void mann_write_weights(const T* read_weights, T gate, const int64_t* slots, int64_t n,
                                             int64_t S, T* out) {
  for (int64_t i = 0; i < S; ++i) out[i] = gate * read_weights[i];
  for (int64_t k = 0; k < n; ++k) out[slots[k]] += T(1) - gate;
}

// a . b with eight independent accumulators, so that the CPU compiler
// vectorises it (W, the memory width, is a few dozen).
template <typename T>
FASTMETA_HOST_DEVICE T mann_dot(const T* a, const T* b, int64_t W) {
  constexpr int kLanes = 8;
  T acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= W; c += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[c + l] * b[c + l];
  for (; c < W; ++c) acc[0] += a[c] * b[c];
  T sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  return sum;
}

// 1 / max(|M[i]|, eps) of every slot.
template <typename T>
FASTMETA_HOST_DEVICE void mann_slot_stats(const T* memory, int64_t S, int64_t W, T* inv_norm) {
  for (int64_t i = 0; i < S; ++i) {
    inv_norm[i] = row_stat<Metric::Cosine>(mann_dot(memory + i * W, memory + i * W, W));
  }
}

// The T steps of one episode. Inputs: memory0 [S, W], usage0 [S], weights0
// [H, S], keys [T, H, W], gates and strengths [T, H]. Outputs: reads
// [T, H, W]; the memory [S, W], read weights [H, S] and usage [S] after the
// last step; for the backward the memories [T, S, W] and read weights
// [T, H, S] after each step and the least-used slots [T, n] of each step.
template <typename T>
FASTMETA_HOST_DEVICE void mann_forward_episode(const MannSizes& z, const T* memory0, const T* usage0,
                                               const T* weights0, const T* keys, const T* gates,
                                               const T* strengths, T decay, T* reads, T* memory_out,
                                               T* weights_out, T* usage, T* memories, T* read_weights,
                                               int64_t* slots, T* scratch) {
  const int64_t S = z.S, W = z.W, H = z.H, n = z.least_used();
  T* write = scratch;           // [H, S]
  T* inv_norm = write + H * S;  // [S]
  for (int64_t i = 0; i < S; ++i) usage[i] = usage0[i];
  for (int64_t t = 0; t < z.T; ++t) {
    const T* prev_memory = t == 0 ? memory0 : memories + (t - 1) * S * W;
    const T* prev_weights = t == 0 ? weights0 : read_weights + (t - 1) * H * S;
    T* memory = memories + t * S * W;
    T* weights = read_weights + t * H * S;
    const T* k = keys + t * H * W;
    int64_t* lu = slots + t * n;
    least_used_slots(usage, S, n, lu);
    for (int64_t h = 0; h < H; ++h)
      mann_write_weights(prev_weights + h * S, gates[t * H + h], lu, n, S, write + h * S);
    for (int64_t i = 0; i < S; ++i) {
      const T keep = i == lu[0] ? T(0) : T(1);
      T* m = memory + i * W;
      for (int64_t c = 0; c < W; ++c) m[c] = keep * prev_memory[i * W + c];
      for (int64_t h = 0; h < H; ++h) {
        const T w = write[h * S + i];
        for (int64_t c = 0; c < W; ++c) m[c] += w * k[h * W + c];
      }
    }
    mann_slot_stats(memory, S, W, inv_norm);
    for (int64_t h = 0; h < H; ++h) {
      const T* key = k + h * W;
      const T scale = strengths[t * H + h] * row_stat<Metric::Cosine>(mann_dot(key, key, W));
      T* p = weights + h * S;
      T top = -INFINITY;
      for (int64_t i = 0; i < S; ++i) {
        p[i] = scale * mann_dot(key, memory + i * W, W) * inv_norm[i];
        top = p[i] > top ? p[i] : top;
      }
      T sum = 0;
      for (int64_t i = 0; i < S; ++i) sum += (p[i] = exp_fast(p[i] - top));
      T* read = reads + (t * H + h) * W;
      for (int64_t c = 0; c < W; ++c) read[c] = T(0);
      for (int64_t i = 0; i < S; ++i) {
        p[i] /= sum;
        for (int64_t c = 0; c < W; ++c) read[c] += p[i] * memory[i * W + c];
      }
    }
    for (int64_t i = 0; i < S; ++i) {
      T v = decay * usage[i];
      for (int64_t h = 0; h < H; ++h) v += weights[h * S + i] + write[h * S + i];
      usage[i] = v;
    }
  }
  const T* last_memory = z.T == 0 ? memory0 : memories + (z.T - 1) * S * W;
  const T* last_weights = z.T == 0 ? weights0 : read_weights + (z.T - 1) * H * S;
  for (int64_t e = 0; e < S * W; ++e) memory_out[e] = last_memory[e];
  for (int64_t e = 0; e < H * S; ++e) weights_out[e] = last_weights[e];
}

// The backward of one episode, from the gradients of the reads [T, H, W]
// and of the final memory [S, W] and read weights [H, S]. Writes the
// gradients of memory0, weights0, keys, gates and strengths.
template <typename T>
FASTMETA_HOST_DEVICE void mann_backward_episode(const MannSizes& z, const T* grad_reads,
                                                const T* grad_memory_out, const T* grad_weights_out,
                                                const T* weights0, const T* keys, const T* gates,
                                                const T* strengths, const T* memories, const T* read_weights,
                                                const int64_t* slots, T* grad_memory0, T* grad_weights0,
                                                T* grad_keys, T* grad_gates, T* grad_strengths, T* scratch) {
  const int64_t S = z.S, W = z.W, H = z.H, n = z.least_used();
  T* gm = scratch;              // [S, W] d loss / d memory after the step
  T* gw = gm + S * W;           // [H, S] d loss / d read weights after the step
  T* write = gw + H * S;        // [H, S]
  T* inv_norm = write + H * S;  // [S]
  T* g_write = inv_norm + S;    // [S]
  for (int64_t e = 0; e < S * W; ++e) gm[e] = grad_memory_out[e];
  for (int64_t e = 0; e < H * S; ++e) gw[e] = grad_weights_out[e];
  for (int64_t t = z.T - 1; t >= 0; --t) {
    const T* prev_weights = t == 0 ? weights0 : read_weights + (t - 1) * H * S;
    const T* memory = memories + t * S * W;
    const T* weights = read_weights + t * H * S;
    const T* k = keys + t * H * W;
    T* gk = grad_keys + t * H * W;
    const int64_t* lu = slots + t * n;
    mann_slot_stats(memory, S, W, inv_norm);
    // The reads and the read weights' softmax over beta cos(k, M).
    for (int64_t h = 0; h < H; ++h) {
      const T* key = k + h * W;
      const T* p = weights + h * S;
      const T* g_read = grad_reads + (t * H + h) * W;
      T* g_p = gw + h * S;
      T* g_key = gk + h * W;
      const T key_squares = mann_dot(key, key, W);
      const T key_stat = row_stat<Metric::Cosine>(key_squares);
      const T key_coeff = row_stat_coeff<Metric::Cosine>(key_squares, key_stat);
      const T beta = strengths[t * H + h];
      T mean = 0;
      for (int64_t i = 0; i < S; ++i) {
        g_p[i] += mann_dot(g_read, memory + i * W, W);
        mean += p[i] * g_p[i];
      }
      T g_beta = 0;
      for (int64_t c = 0; c < W; ++c) g_key[c] = T(0);
      for (int64_t i = 0; i < S; ++i) {
        const T* m = memory + i * W;
        T* g_m = gm + i * W;
        const T dot = mann_dot(key, m, W);
        const T cos = dot * key_stat * inv_norm[i];
        const T g_logit = p[i] * (g_p[i] - mean);
        g_beta += g_logit * cos;
        const T g_cos = g_logit * beta;
        // d cos / d key = stat_m (stat_k m + dot coeff_k key), and alike for m.
        const T m_coeff = row_stat_coeff<Metric::Cosine>(T(1) / (inv_norm[i] * inv_norm[i]), inv_norm[i]);
        const T to_key = g_cos * inv_norm[i] * key_stat, key_self = g_cos * inv_norm[i] * dot * key_coeff;
        const T to_m = g_cos * key_stat * inv_norm[i], m_self = g_cos * key_stat * dot * m_coeff;
        for (int64_t c = 0; c < W; ++c) {
          g_key[c] += to_key * m[c] + key_self * key[c];
          g_m[c] += to_m * key[c] + m_self * m[c] + p[i] * g_read[c];
        }
      }
      grad_strengths[t * H + h] = g_beta;
    }
    // The write: M = keep M_prev + sum_h w[h] k[h]^T, w[h] = g r_prev[h] + (1 - g) 1_lu.
    for (int64_t h = 0; h < H; ++h) {
      const T gate = gates[t * H + h];
      T* w = write + h * S;
      mann_write_weights(prev_weights + h * S, gate, lu, n, S, w);
      const T* key = k + h * W;
      T* g_key = gk + h * W;
      T g_gate = 0;
      for (int64_t i = 0; i < S; ++i) {
        const T g_w = mann_dot(gm + i * W, key, W);
        for (int64_t c = 0; c < W; ++c) g_key[c] += w[i] * gm[i * W + c];
        g_gate += g_w * prev_weights[h * S + i];
        gw[h * S + i] = gate * g_w;  // now d loss / d the previous read weights
        g_write[i] = g_w;
      }
      for (int64_t j = 0; j < n; ++j) g_gate -= g_write[lu[j]];
      grad_gates[t * H + h] = g_gate;
    }
    for (int64_t c = 0; c < W; ++c) gm[lu[0] * W + c] = T(0);
  }
  for (int64_t e = 0; e < S * W; ++e) grad_memory0[e] = gm[e];
  for (int64_t e = 0; e < H * S; ++e) grad_weights0[e] = gw[e];
}

}  // namespace fastmeta
