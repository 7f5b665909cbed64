// Large outputs backed by transparent huge pages. A fresh tensor of hundreds of
// megabytes is paged in on first touch, 4 KiB at a time, and those page faults
// cost the LSTM kernels as much time as their arithmetic; asking the kernel
// for 2 MiB pages (what PyTorch does for every allocation under
// THP_MEM_ALLOC_ENABLE=1) makes them 512 times fewer. Only advice: where
// huge pages are off or unavailable nothing changes; FASTMETA_HUGE_PAGES=0
// turns it off.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace fastmeta::cpu {

// at::empty_like(like), with its pages advised huge where it is large.
inline at::Tensor empty_like_large(const at::Tensor& like) {
  at::Tensor out = at::empty_like(like, at::MemoryFormat::Contiguous);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kLarge = uintptr_t(8) << 20;
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t end = begin + out.nbytes();
  const uintptr_t first = (begin + page - 1) / page * page, last = end / page * page;
  static const bool wanted = [] {
    const char* setting = std::getenv("FASTMETA_HUGE_PAGES");
    return setting == nullptr || std::strcmp(setting, "0") != 0;
  }();
  if (wanted && out.nbytes() >= kLarge && last > first)
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice: errors ignored
#endif
  return out;
}

}  // namespace fastmeta::cpu
