#include "client/scratch_pool.hpp"

#include <algorithm>
#include <cstdlib>
#include <new>

#include <sys/mman.h>

namespace pccl::client {

namespace {

// Big buffers ask for transparent huge pages, as numpy does for its arrays: a copy across 64 MiB
// of 4 KiB pages spends a good part of its time on TLB misses (THP "madvise" mode needs the hint).
constexpr size_t kHugePageBytes = 2 * 1024 * 1024;
constexpr size_t kHugePageMinBufferBytes = 4 * 1024 * 1024;

uint8_t* allocate(size_t bytes) {
    if (bytes < kHugePageMinBufferBytes) {
        auto* p = static_cast<uint8_t*>(std::malloc(bytes == 0 ? 1 : bytes));
        if (!p) throw std::bad_alloc();
        return p;
    }
    const size_t rounded = (bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
    auto* p = static_cast<uint8_t*>(std::aligned_alloc(kHugePageBytes, rounded));
    if (!p) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    madvise(p, rounded, MADV_HUGEPAGE);  // a hint: refused (no THP) is fine
#endif
    return p;
}

}  // namespace

void ScratchPool::Free::operator()(uint8_t* p) const noexcept { std::free(p); }

ScratchPool::Buffer ScratchPool::take(size_t bytes) {
    {
        std::lock_guard lock(mutex_);
        // Best fit: the smallest cached buffer that is big enough, unless it wastes more than 2x.
        auto best = free_.end();
        for (auto it = free_.begin(); it != free_.end(); ++it)
            if (it->capacity >= bytes && it->capacity <= 2 * bytes + 4096 &&
                (best == free_.end() || it->capacity < best->capacity))
                best = it;
        if (best != free_.end()) {
            Buffer b = std::move(*best);
            free_.erase(best);
            cached_bytes_ -= b.capacity;
            return b;
        }
    }
    Buffer b;
    b.data.reset(allocate(bytes));
    b.capacity = bytes;
    return b;
}

void ScratchPool::give_back(Buffer&& b) {
    if (!b.data) return;
    std::lock_guard lock(mutex_);
    free_.push_back(std::move(b));
    cached_bytes_ += free_.back().capacity;
    // Evict the largest buffers first until the cache is within bounds.
    while (cached_bytes_ > max_cached_bytes_ && !free_.empty()) {
        auto largest = std::max_element(free_.begin(), free_.end(),
                                        [](const Buffer& a, const Buffer& c) { return a.capacity < c.capacity; });
        cached_bytes_ -= largest->capacity;
        free_.erase(largest);
    }
}

}  // namespace pccl::client
