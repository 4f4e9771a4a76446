// Reusable host buffers for the one copy an in-place all-reduce keeps of its input. Buffers are
// handed out by size and returned for reuse, so repeated ops neither allocate nor fault pages again;
// at most `max_cached_bytes` stay cached. Buffers come uninitialised (nothing is zeroed). Thread-safe.
// The data plane keeps a second, small one for frames that arrive before their op starts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "common/limits.hpp"

namespace pccl::client {

class ScratchPool {
public:
    struct Free {
        void operator()(uint8_t* p) const noexcept;
    };
    struct Buffer {
        std::unique_ptr<uint8_t, Free> data;
        size_t capacity = 0;
    };

    explicit ScratchPool(size_t max_cached_bytes = limits::kMaxCachedScratchBytes) : max_cached_bytes_(max_cached_bytes) {}

    Buffer take(size_t bytes);
    void give_back(Buffer&& b);

private:
    const size_t max_cached_bytes_;
    std::mutex mutex_;
    std::vector<Buffer> free_;
    size_t cached_bytes_ = 0;
};

}  // namespace pccl::client
