#include "ring/ring_plan.hpp"

#include <algorithm>

namespace pccl::ring {

RingPlan::RingPlan(uint64_t count, uint32_t world, uint64_t piece_elems)
    : count_(count), world_(world), piece_elems_(std::max<uint64_t>(piece_elems, 1)),
      base_(count / world), rem_(count % world) {
    piece_base_.resize(world_ + 1);
    piece_base_[0] = 0;
    for (uint32_t c = 0; c < world_; ++c) {
        const uint64_t size = chunk_end(c) - chunk_begin(c);
        piece_base_[c + 1] = piece_base_[c] + (size + piece_elems_ - 1) / piece_elems_;
    }
}

uint64_t RingPlan::chunk_begin(uint32_t c) const {
    return static_cast<uint64_t>(c) * base_ + std::min<uint64_t>(c, rem_);
}

uint32_t RingPlan::chunk_of(uint64_t offset) const {
    const uint64_t big = rem_ * (base_ + 1);  // elements in the chunks that got one more
    if (offset < big) return static_cast<uint32_t>(offset / (base_ + 1));
    return static_cast<uint32_t>(rem_ + (offset - big) / base_);
}

int64_t RingPlan::piece_index(uint64_t offset, uint64_t elems) const {
    if (offset >= count_ || elems == 0) return -1;
    const uint32_t c = chunk_of(offset);
    const uint64_t begin = chunk_begin(c), end = chunk_end(c);
    if ((offset - begin) % piece_elems_ != 0) return -1;
    if (elems != std::min(piece_elems_, end - offset)) return -1;
    return static_cast<int64_t>(piece_base_[c] + (offset - begin) / piece_elems_);
}

uint64_t RingPlan::piece_elems_at(uint64_t offset) const {
    if (offset >= count_) return 0;
    const uint32_t c = chunk_of(offset);
    const uint64_t begin = chunk_begin(c), end = chunk_end(c);
    if ((offset - begin) % piece_elems_ != 0) return 0;
    return std::min(piece_elems_, end - offset);
}

}  // namespace pccl::ring
