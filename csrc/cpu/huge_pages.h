// Large outputs backed by transparent huge pages, on request
// (FASTMETA_HUGE_PAGES=1). A fresh tensor of hundreds of megabytes is paged
// in on first touch, 4 KiB at a time; asking the kernel for 2 MiB pages makes
// those faults 512 times fewer. Measured on a 2-core Xeon (lstm_step P = 1M
// forward): 150-164 ms with against 204-211 ms without, in a loop of that
// call alone; but 320-533 ms against 212 ms in `fastmeta bench`, after the
// eager baseline has allocated and freed gigabytes: where free memory is
// fragmented, each huge page waits for the kernel to compact memory (THP
// "defrag" set to madvise). Off by default, for that worst case. Only advice:
// where huge pages are off or unavailable nothing changes.
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
    return setting != nullptr && std::strcmp(setting, "1") == 0;
  }();
  if (wanted && out.nbytes() >= kLarge && last > first)
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice: errors ignored
#endif
  return out;
}

}  // namespace fastmeta::cpu
