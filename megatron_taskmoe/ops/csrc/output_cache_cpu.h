// Output buffers of the CPU permutation kernels: 2 MiB-aligned anonymous mappings with transparent huge pages,
// and a bounded cache of freed ones that later calls reuse.
//
// Why: every call returns fresh [N, H] / [T, H] tensors of tens to hundreds of MB. glibc serves blocks above
// its mmap threshold (32 MiB at most) with a new mmap() each time, so every call pays a page fault per 4 KiB on
// first touch, the kernel zeroing each page, and an munmap() (TLB shootdown) on free. On a 2-core VM that is 3-6x
// the cost of the copy itself, for megatron-core's index_select as much as for our gathers. The kernels write
// every byte of their outputs, so a recycled block needs no zeroing, and a block that does have to be mapped is
// faulted in 2 MiB at a time where transparent huge pages are available (enabled = always or madvise).
//
// The cache keeps at most TASKMOE_OPS_CACHE_MB MiB (default 1024; 0 turns caching off, huge pages stay) of freed
// blocks per process, evicting the least recently freed; taskmoe::set_output_cache_limit changes the limit and
// taskmoe::empty_output_cache() unmaps them all. Blocks
// below kMinBlockBytes come from torch's CPU allocator (glibc's heap already recycles those). The tensors are
// ordinary resizable CPU tensors; only their storage's allocator is this one.
//
// Legend: none of the [*, H] names apply here; sizes are bytes.

#pragma once

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <sys/mman.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

namespace taskmoe {
namespace {

constexpr size_t kHugePageBytes = size_t(2) << 20;
constexpr size_t kMinBlockBytes = size_t(4) << 20;
constexpr size_t kDefaultCacheMiB = 1024;

class OutputAllocator final : public c10::Allocator {
 public:
  struct Stats {
    int64_t cached_bytes = 0;  // freed blocks held for reuse
    int64_t hits = 0;          // allocations served from the cache
    int64_t misses = 0;        // allocations that mapped a new block
  };

  static OutputAllocator& get() {
    static OutputAllocator* instance = new OutputAllocator();  // never destroyed: tensors may outlive statics
    return *instance;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBlockBytes) {
      return c10::GetCPUAllocator()->allocate(n);
    }
    const size_t bytes = (n + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
    Block* block = take_cached(bytes);
    if (block == nullptr) {
      block = new Block{map_block(bytes), bytes};
    }
    return {block->ptr, block, &OutputAllocator::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Unmaps every cached block; returns the bytes released.
  int64_t empty_cache() {
    std::vector<Block*> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(cached_);
      stats_.cached_bytes = 0;
    }
    int64_t released = 0;
    for (Block* block : blocks) {
      released += static_cast<int64_t>(block->bytes);
      unmap(block);
    }
    return released;
  }

  int64_t limit_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(limit_bytes_);
  }

  // Changes the limit (the environment variable gives the first value), evicting down to it.
  void set_limit(size_t bytes) {
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_bytes_ = bytes;
      evict_to_limit(evicted);
    }
    for (Block* b : evicted) {
      unmap(b);
    }
  }

  Stats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return stats_;
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };

  OutputAllocator() : limit_bytes_(cache_limit_from_env()) {}

  static size_t cache_limit_from_env() {
    const char* text = std::getenv("TASKMOE_OPS_CACHE_MB");
    if (text == nullptr || *text == '\0') {
      return kDefaultCacheMiB << 20;
    }
    char* end = nullptr;
    const long long mib = std::strtoll(text, &end, 10);
    TORCH_CHECK(end != text && *end == '\0' && mib >= 0,
                "taskmoe: TASKMOE_OPS_CACHE_MB must be a non-negative integer (MiB), got '", text, "'");
    return static_cast<size_t>(mib) << 20;
  }

  // The smallest cached block of at least `bytes` and at most 1.25x that (a big block is not spent on a small
  // request), preferring an exact fit; removed from the cache.
  Block* take_cached(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t best = cached_.size();
    for (size_t i = 0; i < cached_.size(); ++i) {
      const size_t have = cached_[i]->bytes;
      if (have >= bytes && have <= bytes + bytes / 4 &&
          (best == cached_.size() || have < cached_[best]->bytes)) {
        best = i;
        if (have == bytes) break;
      }
    }
    if (best == cached_.size()) {
      ++stats_.misses;
      return nullptr;
    }
    Block* block = cached_[best];
    cached_.erase(cached_.begin() + static_cast<std::ptrdiff_t>(best));
    stats_.cached_bytes -= static_cast<int64_t>(block->bytes);
    ++stats_.hits;
    return block;
  }

  static void* map_block(size_t bytes) {
    // Over-map by one huge page and trim, so the block starts on a 2 MiB boundary (huge-page eligible).
    const size_t span = bytes + kHugePageBytes;
    void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK_WITH(OutOfMemoryError, raw != MAP_FAILED, "taskmoe: cannot map ", bytes,
                     " bytes for a permutation output: ", std::strerror(errno));
    const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = (start + kHugePageBytes - 1) & ~(uintptr_t(kHugePageBytes) - 1);
    if (aligned > start) {
      munmap(raw, aligned - start);
    }
    const uintptr_t tail = aligned + bytes;
    if (start + span > tail) {
      munmap(reinterpret_cast<void*>(tail), start + span - tail);
    }
#ifdef MADV_HUGEPAGE
    madvise(reinterpret_cast<void*>(aligned), bytes, MADV_HUGEPAGE);  // advisory: ignored where THP is off
#endif
    return reinterpret_cast<void*>(aligned);
  }

  static void unmap(Block* block) {
    munmap(block->ptr, block->bytes);
    delete block;
  }

  static void release(void* ctx) {
    get().put(static_cast<Block*>(ctx));
  }

  void put(Block* block) {
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (block->bytes > limit_bytes_) {
        evicted.push_back(block);
      } else {
        cached_.push_back(block);
        stats_.cached_bytes += static_cast<int64_t>(block->bytes);
        evict_to_limit(evicted);
      }
    }
    for (Block* b : evicted) {
      unmap(b);  // outside the lock: munmap of a large block is slow
    }
  }

  // Moves the least recently freed blocks to `evicted` until the cache fits its limit; mutex_ held.
  void evict_to_limit(std::vector<Block*>& evicted) {
    size_t drop = 0;
    while (static_cast<size_t>(stats_.cached_bytes) > limit_bytes_) {
      stats_.cached_bytes -= static_cast<int64_t>(cached_[drop]->bytes);
      evicted.push_back(cached_[drop++]);
    }
    cached_.erase(cached_.begin(), cached_.begin() + static_cast<std::ptrdiff_t>(drop));
  }

  size_t limit_bytes_;
  std::mutex mutex_;
  std::vector<Block*> cached_;  // oldest first
  Stats stats_;
};

// An uninitialized contiguous CPU tensor whose storage comes from OutputAllocator.
inline at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_generic(sizes, &OutputAllocator::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, std::nullopt);
}

}  // namespace
}  // namespace taskmoe
