// The CUDA emulation layer's stand-in for cuda_runtime.h: the kernels of
// csrc/cuda run on the CPU, one OS thread per CUDA thread, so that
// AddressSanitizer and ThreadSanitizer watch them. Semantics only: no
// timing, no memory ordering weaker than the host's. See ../README.md.
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <bit>
#include <chrono>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned int x = 0, y = 0, z = 0;
};

using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};

namespace cuda_emulation {

[[noreturn]] inline void fail(const char* what, int line = 0) {
  std::fprintf(stderr, "cuda_emulation: %s (line %d)\n", what, line);
  std::fflush(stderr);
  std::abort();
}

// The opt-in limit of dynamic shared memory per block: the H100's, or
// CUDA_EMULATION_SHARED_OPTIN bytes (101376 for sm_86/sm_89, 166912 for the
// A100); and the default without opting in.
inline int max_shared_optin() {
  const char* bytes = std::getenv("CUDA_EMULATION_SHARED_OPTIN");
  return bytes ? std::atoi(bytes) : 232448;
}
constexpr int kDefaultShared = 48 * 1024;
constexpr int kWarp = 32;
// Blocks run in waves of at most this many threads in all.
constexpr unsigned kThreadsPerWave = 2048;
// A barrier or shuffle with no progress for this long is a deadlock.
constexpr auto kDeadlock = std::chrono::seconds(60);

// A warp's shuffles. They synchronise its lanes but, as on a GPU, order no
// memory: they are built from relaxed atomics and futex waits, which
// ThreadSanitizer does not count as synchronisation, so shared memory that
// only a shuffle separates (a missing barrier) shows as a race.
struct Warp {
  std::atomic<unsigned> arrived{0}, mask{0};
  std::atomic<uint32_t> generation{0};
  std::atomic<unsigned> lane_masks[kWarp] = {};
  std::atomic<uint64_t> slots[kWarp] = {};
};

struct Block {
  unsigned threads = 0, live = 0, arrived = 0;
  unsigned long generation = 0;
  int line = 0;
  std::mutex mutex;
  std::condition_variable changed;
  std::unique_ptr<std::atomic<bool>[]> exited;
  std::unique_ptr<Warp[]> warps;
  std::map<std::pair<const void*, int>, std::unique_ptr<unsigned char[]>> statics;
  std::unique_ptr<unsigned char[]> dynamic;
};

inline thread_local Block* current_block = nullptr;
inline thread_local unsigned current_thread = 0;  // linear thread index in the block
inline cudaError_t last_error = cudaSuccess;
inline std::mutex attribute_mutex;
inline std::map<const void*, int> shared_optin;  // kernel -> dynamic bytes allowed

// Waits on the block's condition until done() holds, aborting as a deadlock
// when nothing changes for kDeadlock.
template <typename Done>
void wait_for(std::unique_lock<std::mutex>& lock, Block& block, Done done, const char* what, int line) {
  while (!done())
    if (block.changed.wait_for(lock, kDeadlock) == std::cv_status::timeout && !done()) fail(what, line);
}

inline void syncthreads(int line) {
  Block& b = *current_block;
  std::unique_lock<std::mutex> lock(b.mutex);
  if (b.arrived == 0) {
    b.line = line;
  } else if (b.line != line) {
    std::fprintf(stderr, "cuda_emulation: divergent __syncthreads: lines %d and %d\n", b.line, line);
    fail("divergent __syncthreads", line);
  }
  const unsigned long generation = b.generation;
  if (++b.arrived == b.live) {
    b.arrived = 0;
    ++b.generation;
    b.changed.notify_all();
    return;
  }
  wait_for(lock, b, [&] { return b.generation != generation; }, "deadlock at __syncthreads", line);
}

// Called when a thread's kernel returns: it leaves the block's barriers.
inline void thread_exit() {
  Block& b = *current_block;
  const unsigned lane = current_thread % kWarp;
  Warp& w = b.warps[current_thread / kWarp];
  b.exited[current_thread].store(true, std::memory_order_relaxed);
  if (w.arrived.load(std::memory_order_relaxed) > 0 && (w.mask.load(std::memory_order_relaxed) >> lane & 1u))
    fail("a lane exited while its warp waits for it in a shuffle");
  std::lock_guard<std::mutex> lock(b.mutex);
  --b.live;
  if (b.arrived > 0 && b.arrived == b.live) {
    b.arrived = 0;
    ++b.generation;
  }
  b.changed.notify_all();
}

// Waits until `word` no longer holds `value` (a futex wait, unseen by
// ThreadSanitizer), aborting as a deadlock when that takes kDeadlock.
inline void wait_while(std::atomic<uint32_t>& word, uint32_t value, const char* what, int line) {
  const auto deadline = std::chrono::steady_clock::now() + kDeadlock;
  while (word.load(std::memory_order_relaxed) == value) {
    timespec timeout{1, 0};
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT_PRIVATE, value, &timeout, nullptr, 0);
    if (std::chrono::steady_clock::now() > deadline) fail(what, line);
  }
}
inline void wake_all(std::atomic<uint32_t>& word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
}

// A warp-synchronous exchange: every lane of `mask` gives `value`; each gets
// the value of the lane `source(lane)` names, or its own where that is -1.
template <typename T, typename Source>
T exchange(unsigned mask, T value, Source source, int width, int line) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles of at most 8 bytes");
  Block& b = *current_block;
  const unsigned lane = current_thread % kWarp, base = current_thread - lane;
  if (width <= 0 || width > kWarp || (width & (width - 1)))
    fail("shuffle width is not a power of 2 <= 32", line);
  if (!(mask >> lane & 1u)) fail("shuffle mask lacks the calling lane", line);
  for (unsigned l = 0; l < kWarp; ++l)
    if ((mask >> l & 1u) && (base + l >= b.threads || b.exited[base + l].load(std::memory_order_relaxed)))
      fail("shuffle mask names lanes that have exited or do not exist", line);
  Warp& w = b.warps[current_thread / kWarp];
  const unsigned expected = std::popcount(mask);
  auto barrier = [&](bool check_masks) {
    w.lane_masks[lane].store(mask, std::memory_order_relaxed);
    w.mask.store(mask, std::memory_order_relaxed);
    const uint32_t generation = w.generation.load(std::memory_order_relaxed);
    if (w.arrived.fetch_add(1, std::memory_order_relaxed) + 1 == expected) {
      w.arrived.store(0, std::memory_order_relaxed);
      w.generation.fetch_add(1, std::memory_order_relaxed);
      wake_all(w.generation);
    } else {
      wait_while(w.generation, generation, "deadlock at a warp shuffle", line);
    }
    // (Only after the first barrier: after the second, a lane may already be
    // in its next shuffle.)
    for (unsigned l = 0; check_masks && l < kWarp; ++l)
      if ((mask >> l & 1u) && w.lane_masks[l].load(std::memory_order_relaxed) != mask)
        fail("lanes of a warp shuffle with different masks", line);
  };
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  w.slots[lane].store(bits, std::memory_order_relaxed);
  barrier(true);
  const int from = source(static_cast<int>(lane));
  T result = value;
  if (from >= 0) {
    if (!(mask >> from & 1u)) fail("a shuffle reads a lane outside its mask", line);
    bits = w.slots[from].load(std::memory_order_relaxed);
    std::memcpy(&result, &bits, sizeof(T));
  }
  barrier(false);
  return result;
}

inline unsigned char* fresh_shared(size_t bytes) {
  auto* memory = new unsigned char[bytes > 0 ? bytes : 1];
  std::memset(memory, 0xFF, bytes > 0 ? bytes : 1);  // NaN in every float: uninitialised reads show
  return memory;
}

// The block's storage of one __shared__ declaration (keyed by its place).
template <typename T>
T& block_shared(const char* file, int line) {
  Block& b = *current_block;
  std::lock_guard<std::mutex> lock(b.mutex);
  auto& slot = b.statics[{static_cast<const void*>(file), line}];
  if (!slot) slot.reset(fresh_shared(sizeof(T)));
  return *reinterpret_cast<T*>(slot.get());
}

// The launch's dynamic shared memory: exactly its bytes, so ASan sees overruns.
template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(current_block->dynamic.get());
}

inline bool valid_configuration(dim3 grid, dim3 block, size_t shared, const void* kernel) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535)
    return false;
  int allowed = kDefaultShared;
  {
    std::lock_guard<std::mutex> lock(attribute_mutex);
    auto found = shared_optin.find(kernel);
    if (found != shared_optin.end()) allowed = found->second;
  }
  return shared <= static_cast<size_t>(allowed);
}

inline thread_local uint3 thread_index, block_index;
inline thread_local dim3 block_dim, grid_dim;

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared, cudaStream_t, Args&&... args) {
  if (!valid_configuration(grid, block, shared, reinterpret_cast<const void*>(kernel))) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  const std::tuple<std::decay_t<Params>...> params(static_cast<Params>(std::forward<Args>(args))...);
  const unsigned threads = block.x * block.y * block.z;
  const unsigned long long blocks = 1ull * grid.x * grid.y * grid.z;
  const unsigned long long per_wave = std::max(1u, kThreadsPerWave / threads);
  for (unsigned long long first = 0; first < blocks; first += per_wave) {
    const unsigned long long count = std::min(per_wave, blocks - first);
    std::vector<std::unique_ptr<Block>> wave;
    std::vector<std::thread> workers;
    for (unsigned long long k = 0; k < count; ++k) {
      auto b = std::make_unique<Block>();
      b->threads = b->live = threads;
      b->exited.reset(new std::atomic<bool>[threads]());
      b->warps.reset(new Warp[(threads + kWarp - 1) / kWarp]);
      b->dynamic.reset(shared > 0 ? fresh_shared(shared) : nullptr);
      const unsigned long long linear = first + k;
      const uint3 index{static_cast<unsigned>(linear % grid.x),
                        static_cast<unsigned>(linear / grid.x % grid.y),
                        static_cast<unsigned>(linear / (1ull * grid.x * grid.y))};
      for (unsigned t = 0; t < threads; ++t) {
        Block* block_ptr = b.get();
        workers.emplace_back([=, &params] {
          current_block = block_ptr;
          current_thread = t;
          thread_index = uint3{t % block.x, t / block.x % block.y, t / (block.x * block.y)};
          block_index = index;
          block_dim = block;
          grid_dim = grid;
          auto copy = params;  // each CUDA thread has its own arguments
          std::apply(kernel, copy);
          thread_exit();
        });
      }
      wave.push_back(std::move(b));
    }
    for (auto& worker : workers) worker.join();
  }
}

}  // namespace cuda_emulation

#define threadIdx (::cuda_emulation::thread_index)
#define blockIdx (::cuda_emulation::block_index)
#define blockDim (::cuda_emulation::block_dim)
#define gridDim (::cuda_emulation::grid_dim)
#define __syncthreads() ::cuda_emulation::syncthreads(__LINE__)

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return ::cuda_emulation::exchange(
      mask, value,
      [&](int lane) {
        const int source = lane ^ lane_mask;
        return source > (lane | (width - 1)) ? -1 : source;  // later segments give the lane's own value
      },
      width, 0);
}
template <typename T>
T __shfl_sync(unsigned mask, T value, int source_lane, int width = 32) {
  return ::cuda_emulation::exchange(
      mask, value, [&](int lane) { return (lane & ~(width - 1)) + (source_lane & (width - 1)); }, width, 0);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return ::cuda_emulation::exchange(
      mask, value,
      [&](int lane) {
        const int source = lane + static_cast<int>(delta);
        return source > (lane | (width - 1)) ? -1 : source;
      },
      width, 0);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return ::cuda_emulation::exchange(
      mask, value,
      [&](int lane) {
        const int source = lane - static_cast<int>(delta);
        return source < (lane & ~(width - 1)) ? -1 : source;
      },
      width, 0);
}

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value, std::memory_order_relaxed);
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t error = ::cuda_emulation::last_error;
  ::cuda_emulation::last_error = cudaSuccess;
  return error;
}
inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    default:
      return "invalid argument";
  }
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
  *value = attribute == cudaDevAttrMaxSharedMemoryPerBlockOptin ? ::cuda_emulation::max_shared_optin() : 0;
  return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value > ::cuda_emulation::max_shared_optin())
    return ::cuda_emulation::last_error = cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(::cuda_emulation::attribute_mutex);
  ::cuda_emulation::shared_optin[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* to, const void* from, size_t bytes, cudaMemcpyKind,
                                   cudaStream_t = nullptr) {
  std::memcpy(to, from, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* to, const void* from, size_t bytes, cudaMemcpyKind kind) {
  return cudaMemcpyAsync(to, from, bytes, kind);
}
inline cudaError_t cudaMemsetAsync(void* to, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(to, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMalloc(void** pointer, size_t bytes) {
  *pointer = std::malloc(bytes > 0 ? bytes : 1);
  std::memset(*pointer, 0xFF, bytes > 0 ? bytes : 1);
  return cudaSuccess;
}
inline cudaError_t cudaFree(void* pointer) {
  std::free(pointer);
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

// Last, after the standard headers: the math headers take their device branch.
#define __CUDACC__ 1
#define __CUDA_ARCH__ 900
