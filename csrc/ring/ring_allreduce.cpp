#include "ring/ring_allreduce.hpp"

#include <algorithm>
#include <cstring>

#include "common/limits.hpp"
#include "kernels/reduce.hpp"

namespace pccl::ring {

uint64_t RingAllReduce::choose_piece_elems(uint64_t count, uint32_t world, size_t elem, size_t pool_size) {
    // A piece per connection of the pool, within [kMinPieceBytes, kMaxPieceBytes]. The ring already
    // moves `world` chunks at once, so cutting small chunks finer only adds per-piece syscalls and
    // wake-ups (measured: one 350 KiB piece beats sixteen 22 KiB ones 1.5x at 1 MiB, world 3).
    const uint64_t chunk_bytes = (count / std::max<uint32_t>(world, 1) + 1) * elem;
    const uint64_t want = chunk_bytes / std::max<size_t>(pool_size, 1);
    const uint64_t bytes = std::clamp<uint64_t>(want, limits::kMinPieceBytes, limits::kMaxPieceBytes);
    return std::max<uint64_t>(bytes / elem, 1);
}

RingAllReduce::RingAllReduce(const Params& p)
    : p_(p), elem_(element_size(p.dtype)), plan_(p.count, p.world, p.piece_elems) {
    const uint64_t n = plan_.total_pieces();
    seen_[0].assign(n, 0);
    seen_[1].assign(n, 0);
    if (in_place()) saved_.assign(n, 0);
    // Reduce-scatter brings every chunk but our own; all-gather every chunk but the one we own.
    pieces_left_ = (n - plan_.pieces_in_chunk(my_chunk())) + (n - plan_.pieces_in_chunk(owned_chunk()));
}

void RingAllReduce::start(PieceSink& sink) {
    const uint32_t c = my_chunk();
    const uint64_t end = plan_.chunk_end(c);
    for (uint64_t off = plan_.chunk_begin(c); off < end; off += plan_.piece_elems()) {
        const uint64_t n = std::min(plan_.piece_elems(), end - off);
        // In place this reads the caller's buffer, which keeps these pieces until they come back
        // around in all-gather, after the next peer has received them.
        sink.send_piece(wire::RingPhase::REDUCE_SCATTER, off, n, in_place() ? p_.recv + off * elem_ : p_.send + off * elem_);
    }
}

uint8_t* RingAllReduce::accept_piece(wire::RingPhase phase, uint64_t offset, uint32_t bytes, std::string& error) {
    if (bytes % elem_ != 0) {
        error = "piece length is not a whole number of elements";
        return nullptr;
    }
    const int64_t index = plan_.piece_index(offset, bytes / elem_);
    if (index < 0) {
        error = "piece at element " + std::to_string(offset) + " does not match this operation's plan";
        return nullptr;
    }
    const uint32_t c = plan_.chunk_of(offset);
    const bool rs = phase == wire::RingPhase::REDUCE_SCATTER;
    if ((rs && c == my_chunk()) || (!rs && c == owned_chunk())) {
        error = "piece of a chunk this peer never receives in that phase";
        return nullptr;
    }
    auto& seen = seen_[rs ? 0 : 1][static_cast<size_t>(index)];
    if (seen) {
        error = "duplicate piece";
        return nullptr;
    }
    seen = 1;
    uint8_t* dest = p_.recv + offset * elem_;
    if (in_place() && !saved_[static_cast<size_t>(index)]) {
        std::memcpy(p_.backup + offset * elem_, dest, bytes);
        saved_[static_cast<size_t>(index)] = 1;
    }
    return dest;
}

void RingAllReduce::restore_input() {
    if (!in_place()) return;
    for (uint32_t c = 0; c < p_.world; ++c) {
        const uint64_t end = plan_.chunk_end(c);
        for (uint64_t off = plan_.chunk_begin(c); off < end; off += plan_.piece_elems()) {
            const uint64_t n = std::min(plan_.piece_elems(), end - off);
            auto& saved = saved_[static_cast<size_t>(plan_.piece_index(off, n))];
            if (!saved) continue;
            std::memcpy(p_.recv + off * elem_, p_.backup + off * elem_, n * elem_);
            saved = 0;
        }
    }
}

void RingAllReduce::on_piece_received(PieceSink& sink, wire::RingPhase phase, uint64_t offset, uint32_t bytes) {
    --pieces_left_;
    const uint64_t n = bytes / elem_;
    uint8_t* data = p_.recv + offset * elem_;
    const uint32_t c = plan_.chunk_of(offset);
    if (phase == wire::RingPhase::REDUCE_SCATTER) {
        if (c == owned_chunk()) {
            // Last hop: this value is final. It is computed here and nowhere else.
            kernels::reduce_finalize(p_.dtype, p_.op, data, input_at(offset), n, p_.world);
            sink.send_piece(wire::RingPhase::ALL_GATHER, offset, n, data);
        } else {
            kernels::reduce_into(p_.dtype, p_.op, data, input_at(offset), n);
            sink.send_piece(wire::RingPhase::REDUCE_SCATTER, offset, n, data);
        }
    } else if (c != chunk_owned_by_next()) {
        sink.send_piece(wire::RingPhase::ALL_GATHER, offset, n, data);
    }
}

}  // namespace pccl::ring
