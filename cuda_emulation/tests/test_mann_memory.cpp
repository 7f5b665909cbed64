// csrc/cuda/mann_memory.cu under emulation: MANN's LRUA memory over T steps
// (one thread per episode), forward against a direct double-precision loop
// of the steps, backward against central differences of that loop. Outputs
// start as NaN, so an element the kernels do not write shows.
#include "harness.h"

using namespace harness;
namespace fc = fastmeta::cuda;

struct Inputs {
  std::vector<double> memory, usage, weights, keys, gates, strengths;
};
struct Outputs {
  std::vector<double> reads, memory, usage, weights;
  std::vector<int64_t> slots;
};

// One episode's steps, as fastmeta.reference.mann_memory writes them.
Outputs steps(const Inputs& in, int64_t b, int64_t T, int64_t S, int64_t W, int64_t H, double decay) {
  const int64_t n = std::min(H, S);
  std::vector<double> memory(in.memory.begin() + b * S * W, in.memory.begin() + (b + 1) * S * W);
  std::vector<double> usage(in.usage.begin() + b * S, in.usage.begin() + (b + 1) * S);
  std::vector<double> weights(in.weights.begin() + b * H * S, in.weights.begin() + (b + 1) * H * S);
  Outputs out;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int64_t> order(S);
    for (int64_t s = 0; s < S; ++s) order[s] = s;
    std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return usage[i] < usage[j]; });
    std::vector<double> least(S, 0), write(H * S);
    for (int64_t k = 0; k < n; ++k) least[order[k]] = 1, out.slots.push_back(order[k]);
    const double* key = &in.keys[((b * T + t) * H) * W];
    for (int64_t h = 0; h < H; ++h) {
      const double g = in.gates[(b * T + t) * H + h];
      for (int64_t s = 0; s < S; ++s) write[h * S + s] = g * weights[h * S + s] + (1 - g) * least[s];
    }
    for (int64_t s = 0; s < S; ++s)
      for (int64_t w = 0; w < W; ++w) {
        double v = s == order[0] ? 0 : memory[s * W + w];
        for (int64_t h = 0; h < H; ++h) v += write[h * S + s] * key[h * W + w];
        memory[s * W + w] = v;
      }
    for (int64_t h = 0; h < H; ++h) {
      double key_norm = 0, top = -INFINITY, sum = 0;
      for (int64_t w = 0; w < W; ++w) key_norm += key[h * W + w] * key[h * W + w];
      std::vector<double> logit(S);
      for (int64_t s = 0; s < S; ++s) {
        double dot = 0, norm = 0;
        for (int64_t w = 0; w < W; ++w)
          dot += key[h * W + w] * memory[s * W + w], norm += memory[s * W + w] * memory[s * W + w];
        logit[s] = in.strengths[(b * T + t) * H + h] * dot /
                   (std::max(std::sqrt(key_norm), 1e-8) * std::max(std::sqrt(norm), 1e-8));
        top = std::max(top, logit[s]);
      }
      for (int64_t s = 0; s < S; ++s) sum += std::exp(logit[s] - top);
      for (int64_t s = 0; s < S; ++s) weights[h * S + s] = std::exp(logit[s] - top) / sum;
      for (int64_t w = 0; w < W; ++w) {
        double r = 0;
        for (int64_t s = 0; s < S; ++s) r += weights[h * S + s] * memory[s * W + w];
        out.reads.push_back(r);
      }
    }
    for (int64_t s = 0; s < S; ++s) {
      double used = 0;
      for (int64_t h = 0; h < H; ++h) used += weights[h * S + s] + write[h * S + s];
      usage[s] = decay * usage[s] + used;
    }
  }
  out.memory = memory, out.usage = usage, out.weights = weights;
  return out;
}

template <typename T>
void run(int64_t B, int64_t T_, int64_t S, int64_t W, int64_t H) {
  const std::string where = std::string(name_of<T>()) + " B=" + std::to_string(B) +
                            " T=" + std::to_string(T_) + " S=" + std::to_string(S) +
                            " W=" + std::to_string(W) + " H=" + std::to_string(H);
  const double decay = 0.9;
  Inputs in{held<T>(normal(B * S * W, 0.5)),     held<T>(uniform(B * S, 0, 3)),
            held<T>(uniform(B * H * S, 0, 0.5)), held<T>(normal(B * T_ * H * W)),
            held<T>(uniform(B * T_ * H, 0, 1)),  held<T>(uniform(B * T_ * H, 0.5, 4))};
  Outputs want;
  for (int64_t b = 0; b < B; ++b) {
    Outputs o = steps(in, b, T_, S, W, H, decay);
    for (auto [to, from] : {std::pair{&want.reads, &o.reads},
                            {&want.memory, &o.memory},
                            {&want.usage, &o.usage},
                            {&want.weights, &o.weights}})
      to->insert(to->end(), from->begin(), from->end());
    want.slots.insert(want.slots.end(), o.slots.begin(), o.slots.end());
  }
  std::vector<T> memory = as<T>(in.memory), usage = as<T>(in.usage), weights = as<T>(in.weights),
                 keys = as<T>(in.keys), gates = as<T>(in.gates), strengths = as<T>(in.strengths);
  fc::MannArgs args{dtype_of<T>(),
                    fastmeta::MannSizes{T_, S, W, H},
                    B,
                    memory.data(),
                    usage.data(),
                    weights.data(),
                    keys.data(),
                    gates.data(),
                    strengths.data()};
  const int64_t n = std::min(H, S);
  std::vector<T> reads(B * T_ * H * W, T(NAN)), memory_out(B * S * W, T(NAN)), weights_out(B * H * S, T(NAN)),
      usage_out(B * S, T(NAN)), memories(B * T_ * S * W, T(NAN)), history(B * T_ * H * S, T(NAN)),
      scratch(B * (H * S + S), T(NAN));
  std::vector<int64_t> slots(B * T_ * n, -1);
  fc::mann_memory_forward(args, decay, reads.data(), memory_out.data(), weights_out.data(), usage_out.data(),
                          memories.data(), history.data(), slots.data(), scratch.data(), nullptr);
  const double tol = tolerance<T>() * 10;
  compare(reads, want.reads, tol, tol, where + " reads");
  if (T_ > 0) {
    compare(memory_out, want.memory, tol, tol, where + " memory");
    compare(weights_out, want.weights, tol, tol, where + " read weights");
  }
  compare(usage_out, want.usage, tol, tol, where + " usage");
  std::vector<double> want_slots(want.slots.begin(), want.slots.end());
  compare(slots, want_slots, 0, 0, where + " least-used slots");
  if (!std::is_same_v<T, double> || T_ == 0) return;

  // Backward against central differences of sum(gr * reads) + sum(gm * memory) + sum(gw * weights).
  auto gr = normal(reads.size()), gm = normal(memory_out.size()), gw = normal(weights_out.size());
  auto loss = [&](const Inputs& x) {
    double total = 0;
    for (int64_t b = 0; b < B; ++b) {
      Outputs o = steps(x, b, T_, S, W, H, decay);
      for (size_t i = 0; i < o.reads.size(); ++i) total += gr[b * o.reads.size() + i] * o.reads[i];
      for (size_t i = 0; i < o.memory.size(); ++i) total += gm[b * o.memory.size() + i] * o.memory[i];
      for (size_t i = 0; i < o.weights.size(); ++i) total += gw[b * o.weights.size() + i] * o.weights[i];
    }
    return total;
  };
  auto numeric = [&](std::vector<double> Inputs::* field) {
    std::vector<double> grad((in.*field).size());
    for (size_t i = 0; i < grad.size(); ++i) {
      Inputs plus = in, minus = in;
      (plus.*field)[i] += 1e-6, (minus.*field)[i] -= 1e-6;
      grad[i] = (loss(plus) - loss(minus)) / 2e-6;
    }
    return grad;
  };
  std::vector<T> grad_memory0(memory_out.size(), T(NAN)), grad_weights0(weights_out.size(), T(NAN)),
      grad_keys(keys.size(), T(NAN)), grad_gates(gates.size(), T(NAN)),
      grad_strengths(strengths.size(), T(NAN)), back_scratch(B * (S * W + 2 * H * S + 2 * S), T(NAN));
  fc::mann_memory_backward(args, as<T>(gr).data(), as<T>(gm).data(), as<T>(gw).data(), memories.data(),
                           history.data(), slots.data(), grad_memory0.data(), grad_weights0.data(),
                           grad_keys.data(), grad_gates.data(), grad_strengths.data(), back_scratch.data(),
                           nullptr);
  compare(grad_memory0, numeric(&Inputs::memory), 1e-6, 1e-6, where + " grad memory");
  compare(grad_weights0, numeric(&Inputs::weights), 1e-6, 1e-6, where + " grad read weights");
  compare(grad_keys, numeric(&Inputs::keys), 1e-6, 1e-6, where + " grad keys");
  compare(grad_gates, numeric(&Inputs::gates), 1e-6, 1e-6, where + " grad gates");
  compare(grad_strengths, numeric(&Inputs::strengths), 1e-6, 1e-6, where + " grad strengths");
}

// A least-used slot out of range must fail a device-side assertion in the
// backward (run in a process of its own: a failed assertion ends it).
int death(const std::string& name) {
  const int64_t B = 1, T = 1, S = 2, W = 1, H = 1;
  std::vector<double> v(16, 0.5), scratch(16);
  std::vector<int64_t> slots{S};  // out of range
  fc::MannArgs a{
      DType::Float64, fastmeta::MannSizes{T, S, W, H}, B, v.data(), v.data(), v.data(), v.data(), v.data(),
      v.data()};
  if (name == "slot")
    fc::mann_memory_backward(a, v.data(), v.data(), v.data(), v.data(), v.data(), slots.data(),
                             scratch.data(), scratch.data(), scratch.data(), scratch.data(), scratch.data(),
                             scratch.data(), nullptr);
  std::printf("no assertion failed\n");
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "--death") return death(argv[2]);
  // One slot; more heads than slots; odd sizes over several blocks of 32 episodes; no steps.
  const int64_t shapes[][5] = {
      {2, 3, 1, 2, 1}, {3, 4, 3, 2, 5}, {2, 5, 7, 5, 3}, {40, 2, 4, 3, 2}, {2, 0, 5, 3, 2}};
  for (const auto& s : shapes) {
    run<float>(s[0], s[1], s[2], s[3], s[4]);
    run<double>(s[0], s[1], s[2], s[3], s[4]);
  }
  return finish("mann_memory");
}
