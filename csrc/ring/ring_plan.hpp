// How a tensor is cut for the ring: `world` chunks of nearly equal element counts (the first
// count % world chunks get one more), each cut into pieces of at most `piece_elems` elements.
// Pieces are the unit that travels; both ends derive the same cut, so a piece on the wire is
// named by its element offset alone.
#pragma once

#include <cstdint>
#include <vector>

namespace pccl::ring {

class RingPlan {
public:
    RingPlan(uint64_t count, uint32_t world, uint64_t piece_elems);

    uint32_t world() const { return world_; }
    uint64_t count() const { return count_; }
    uint64_t piece_elems() const { return piece_elems_; }

    uint64_t chunk_begin(uint32_t c) const;
    uint64_t chunk_end(uint32_t c) const { return chunk_begin(c + 1); }
    uint32_t chunk_of(uint64_t offset) const;  // offset < count

    uint64_t pieces_in_chunk(uint32_t c) const { return piece_base_[c + 1] - piece_base_[c]; }
    uint64_t total_pieces() const { return piece_base_[world_]; }
    // Global index of the piece starting at `offset`, or -1 if no piece starts there with
    // exactly `elems` elements.
    int64_t piece_index(uint64_t offset, uint64_t elems) const;
    // Elements of the piece starting at `offset`, or 0 if no piece starts there.
    uint64_t piece_elems_at(uint64_t offset) const;

private:
    uint64_t count_;
    uint32_t world_;
    uint64_t piece_elems_;
    uint64_t base_;
    uint64_t rem_;
    std::vector<uint64_t> piece_base_;  // prefix sums of pieces per chunk, world + 1 entries
};

}  // namespace pccl::ring
