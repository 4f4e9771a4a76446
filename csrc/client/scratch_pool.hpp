// Reusable host buffers for the one copy an in-place all-reduce keeps of its input. Buffers are
// handed out by size and returned for reuse, so repeated ops neither allocate nor fault pages again;
// at most limits::kMaxCachedScratchBytes stay cached. Thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace pccl::client {

class ScratchPool {
public:
    struct Buffer {
        std::unique_ptr<uint8_t[]> data;
        size_t capacity = 0;
    };

    Buffer take(size_t bytes);
    void give_back(Buffer&& b);

private:
    std::mutex mutex_;
    std::vector<Buffer> free_;
    size_t cached_bytes_ = 0;
};

}  // namespace pccl::client
