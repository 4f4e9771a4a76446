#include "client/scratch_pool.hpp"

#include <algorithm>

#include "common/limits.hpp"

namespace pccl::client {

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
    b.data.reset(new uint8_t[bytes == 0 ? 1 : bytes]);
    b.capacity = bytes;
    return b;
}

void ScratchPool::give_back(Buffer&& b) {
    if (!b.data) return;
    std::lock_guard lock(mutex_);
    free_.push_back(std::move(b));
    cached_bytes_ += free_.back().capacity;
    // Evict the largest buffers first until the cache is within bounds.
    while (cached_bytes_ > limits::kMaxCachedScratchBytes && !free_.empty()) {
        auto largest = std::max_element(free_.begin(), free_.end(),
                                        [](const Buffer& a, const Buffer& c) { return a.capacity < c.capacity; });
        cached_bytes_ -= largest->capacity;
        free_.erase(largest);
    }
}

}  // namespace pccl::client
