// CPU outputs and scratch in recycled buffers. A fresh buffer larger than
// glibc's heap keeps at hand comes from mmap (or from heap memory it handed
// back), and is paged in on first touch, 4 KiB at a time, which can take a
// large share of a step (lstm_step's P = 1M forward, the few-shot GNN's
// training step, proto_episode's query gradient). These ops make buffers of
// the same sizes at every step, after the step before freed its own. So
// their buffers of 64 KiB and more are not returned to the system when
// freed: up to FASTMETA_RECYCLED_MIB MiB of them (default 1024; 0 turns
// recycling off; the oldest go first) are kept for the next buffer of the
// same size, already paged in.
// release_recycled_buffers() frees them.
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <mutex>
#include <utility>
#include <vector>

namespace fastmeta::cpu {

class RecyclingAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kSmallest = size_t(64) << 10;

  // One per process, never destroyed: tensors may be freed after static
  // destructors ran.
  static RecyclingAllocator& instance() {
    static auto* allocator = new RecyclingAllocator();
    return *allocator;
  }

  at::DataPtr allocate(size_t bytes) override {
    if (bytes < kSmallest || limit_bytes_ == 0) return c10::GetCPUAllocator()->allocate(bytes);
    auto* buffer = new Buffer{take(bytes), bytes};
    if (!buffer->data) buffer->data = c10::GetCPUAllocator()->allocate(bytes);
    void* data = buffer->data.get();
    return {data, buffer, &recycle, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Frees every kept buffer; returns how many bytes that was.
  size_t release() {
    std::vector<Buffer> freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      freed.swap(kept_);
      kept_bytes_ = 0;
    }
    size_t bytes = 0;
    for (const Buffer& buffer : freed) bytes += buffer.bytes;
    return bytes;  // `freed` frees them here, outside the lock
  }

 private:
  struct Buffer {
    at::DataPtr data;
    size_t bytes;
  };

  RecyclingAllocator() {
    const char* setting = std::getenv("FASTMETA_RECYCLED_MIB");
    if (setting == nullptr || *setting == '\0') {
      limit_bytes_ = size_t(1024) << 20;
      return;
    }
    char* end = nullptr;
    errno = 0;
    const unsigned long long mib = std::strtoull(setting, &end, 10);
    TORCH_CHECK(*end == '\0' && std::isdigit(static_cast<unsigned char>(setting[0])) && errno == 0 &&
                    mib < (1ull << 40),
                "FASTMETA_RECYCLED_MIB must be a whole number of MiB (0 turns recycling off), got '", setting,
                "'");
    limit_bytes_ = size_t(mib) << 20;
  }

  at::DataPtr take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = kept_.rbegin(); it != kept_.rend(); ++it) {
      if (it->bytes != bytes) continue;
      at::DataPtr data = std::move(it->data);
      kept_.erase(std::next(it).base());
      kept_bytes_ -= bytes;
      return data;
    }
    return {};
  }

  static void recycle(void* context) {
    auto* buffer = static_cast<Buffer*>(context);
    RecyclingAllocator& self = instance();
    std::vector<Buffer> evicted;
    if (buffer->bytes <= self.limit_bytes_) {
      std::lock_guard<std::mutex> lock(self.mutex_);
      self.kept_.push_back(std::move(*buffer));
      self.kept_bytes_ += self.kept_.back().bytes;
      size_t oldest = 0;
      while (self.kept_bytes_ > self.limit_bytes_) self.kept_bytes_ -= self.kept_[oldest++].bytes;
      std::move(self.kept_.begin(), self.kept_.begin() + oldest, std::back_inserter(evicted));
      self.kept_.erase(self.kept_.begin(), self.kept_.begin() + oldest);
    }
    delete buffer;  // frees its memory unless it was kept; `evicted` after the lock
  }

  std::mutex mutex_;
  std::vector<Buffer> kept_;  // oldest first
  size_t kept_bytes_ = 0;
  size_t limit_bytes_ = 0;
};

// An uninitialised contiguous tensor of `sizes`, in a recycled buffer where
// it is 64 KiB or more.
inline at::Tensor empty_recycled(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_generic(sizes, &RecyclingAllocator::instance(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   c10::MemoryFormat::Contiguous);
}

// The same, shaped like `like`.
inline at::Tensor empty_like_recycled(const at::Tensor& like) {
  return empty_recycled(like.sizes(), like.scalar_type());
}

// The same, filled with zeros.
inline at::Tensor zeros_recycled(at::IntArrayRef sizes, at::ScalarType dtype) {
  return empty_recycled(sizes, dtype).zero_();
}

}  // namespace fastmeta::cpu
