// Host buffers backed by transparent huge pages, for large offloaded K/V caches.
//
// Decode-time sparse attention reads a few thousand rows of 256-512 bytes at random positions of a
// multi-GB K/V cache. With 4 KiB pages nearly every row costs a TLB miss (a page walk), which
// halves the achievable gather bandwidth; with 2 MiB pages the whole cache fits in the TLB's reach.
// When the kernel runs THP in `madvise` mode (the common default), a region only gets huge pages
// if it is madvise(MADV_HUGEPAGE)'d before its first touch, which torch.empty does not do.
//
// Torch-free: allocate_huge_pages() returns 2 MiB aligned memory (posix_memalign) with the advice
// applied, or reports why not; release with free_huge_pages() (std::free). Pages are not touched
// here: the first writer faults them in, as huge pages where the kernel can.
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace lckv {

constexpr size_t kHugePageBytes = size_t(2) << 20;  // x86-64 / aarch64 (4 KiB base) PMD size

// Outcome of one allocation: the memory (nullptr if none) and, when the advice failed, why.
struct HugePageAllocation {
  void* data = nullptr;  // 2 MiB aligned, `bytes` usable bytes; free with free_huge_pages
  bool advised = false;  // madvise(MADV_HUGEPAGE) succeeded on the whole range
  std::string error;     // empty on success; otherwise what failed (allocation or advice)
};

// Allocates `bytes` (at least 1) aligned to 2 MiB and advises huge pages for it. On a failed
// allocation data is nullptr; on a failed advice (no THP support, not Linux) data is still valid,
// advised is false and error says why, so the caller can keep it or fall back.
inline HugePageAllocation allocate_huge_pages(size_t bytes) {
  HugePageAllocation result;
  if (bytes == 0) bytes = 1;
  if (bytes > ~size_t(0) - kHugePageBytes) {
    result.error = "size " + std::to_string(bytes) + " bytes overflows when rounded to 2 MiB pages";
    return result;
  }
  const size_t rounded = (bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
  const int status = posix_memalign(&result.data, kHugePageBytes, rounded);
  if (status != 0) {
    result.data = nullptr;
    result.error = "posix_memalign of " + std::to_string(rounded) + " bytes failed: " + std::strerror(status);
    return result;
  }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (madvise(result.data, rounded, MADV_HUGEPAGE) == 0) {
    result.advised = true;
  } else {
    result.error = std::string("madvise(MADV_HUGEPAGE) failed: ") + std::strerror(errno);
  }
#else
  result.error = "madvise(MADV_HUGEPAGE) is not available on this platform";
#endif
  return result;
}

inline void free_huge_pages(void* data) { std::free(data); }

}  // namespace lckv
