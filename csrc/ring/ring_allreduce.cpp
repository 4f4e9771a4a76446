#include "ring/ring_allreduce.hpp"

#include <algorithm>
#include <cstring>

#include "common/limits.hpp"
#include "kernels/reduce.hpp"

namespace pccl::ring {

uint64_t RingAllReduce::choose_piece_elems(uint64_t count, uint32_t world, size_t elem) {
    // A function of the op alone (the receiver checks every piece against the same plan). Small
    // chunks stay whole: the ring already moves `world` chunks at once, and cutting them finer only
    // adds per-piece syscalls and wake-ups (measured: one 350 KiB piece beats sixteen 22 KiB ones
    // 1.5x at 1 MiB, world 3). Large ones give every connection of a pool pieces to carry; smaller
    // pieces than kMaxPieceBytes did not help on a 100 ms, 100 Mbit/s-per-flow emulated WAN either
    // (pool 16, 256 MiB: 3.35-3.42 s with 128 KiB pieces against 3.23 s).
    const uint64_t chunk_bytes = (count / std::max<uint32_t>(world, 1) + 1) * elem;
    const uint64_t bytes = chunk_bytes <= limits::kMaxPieceBytes
                               ? chunk_bytes
                               : std::clamp<uint64_t>(chunk_bytes / limits::kTargetPiecesPerChunk, limits::kMinPieceBytes,
                                                      limits::kMaxPieceBytes);
    return std::max<uint64_t>(bytes / elem, 1);
}

RingAllReduce::RingAllReduce(const Params& p)
    : p_(p), elem_(element_size(p.dtype)), plan_(p.count, p.world, p.piece_elems) {
    const uint64_t n = plan_.total_pieces();
    seen_[0].assign(n, 0);
    seen_[1].assign(n, 0);
    reduced_.assign(n, 0);
    if (in_place()) saved_.assign(n, 0);
    // Reduce-scatter brings every chunk but our own; all-gather every chunk but the one we own.
    pieces_left_ = (n - plan_.pieces_in_chunk(my_chunk())) + (n - plan_.pieces_in_chunk(owned_chunk()));
}

uint32_t RingAllReduce::wire_bytes(uint64_t elems) const {
    return static_cast<uint32_t>(p_.quant ? kernels::quant::wire_bytes(*p_.quant, elems) : elems * elem_);
}

uint64_t RingAllReduce::new_buffer(size_t bytes) {
    const uint64_t token = next_token_++;
    buffers_[token].resize(bytes);
    return token;
}

void RingAllReduce::save_before_overwrite(int64_t piece, uint64_t offset, uint64_t elems) {
    if (!in_place() || saved_[static_cast<size_t>(piece)]) return;
    std::memcpy(p_.backup + offset * elem_, p_.recv + offset * elem_, elems * elem_);
    saved_[static_cast<size_t>(piece)] = 1;
}

void RingAllReduce::start(PieceSink& sink) {
    const uint32_t c = my_chunk();
    const uint64_t end = plan_.chunk_end(c);
    for (uint64_t off = plan_.chunk_begin(c); off < end; off += plan_.piece_elems()) {
        const uint64_t n = std::min(plan_.piece_elems(), end - off);
        // In place this reads the caller's buffer, which keeps these pieces until they come back
        // around in all-gather, after the next peer has received them.
        const uint8_t* src = in_place() ? p_.recv + off * elem_ : p_.send + off * elem_;
        if (!p_.quant) {
            sink.send_piece(wire::RingPhase::REDUCE_SCATTER, off, wire_bytes(n), src, 0);
            continue;
        }
        const uint64_t token = new_buffer(wire_bytes(n));
        uint8_t* wire = buffers_[token].data();
        kernels::quant::quantize(*p_.quant, src, n, wire);
        sink.send_piece(wire::RingPhase::REDUCE_SCATTER, off, wire_bytes(n), wire, token);
    }
}

uint8_t* RingAllReduce::accept_piece(wire::RingPhase phase, uint64_t offset, uint32_t bytes, std::string& error) {
    const uint64_t n = plan_.piece_elems_at(offset);
    if (n == 0 || bytes != wire_bytes(n)) {
        error = "piece at element " + std::to_string(offset) + " of " + std::to_string(bytes) +
                " bytes does not match this operation's plan";
        return nullptr;
    }
    const int64_t index = plan_.piece_index(offset, n);
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
    // A piece's all-gather lap can only begin after this peer forwarded its reduce-scatter value, so
    // one that comes earlier breaks the protocol; in place it would also land on the backup copy
    // while the reduce-scatter bytes are still arriving there, and a restore would mix the two.
    if (!rs && c != my_chunk() && !reduced_[static_cast<size_t>(index)]) {
        error = "all-gather piece before its reduce-scatter piece";
        return nullptr;
    }
    seen = 1;
    if (p_.quant) {  // quantized bytes land in a buffer of their own, decoded on arrival
        const uint64_t token = new_buffer(bytes);
        staging_[(static_cast<uint64_t>(rs ? 0 : 1) << 63) | static_cast<uint64_t>(index)] = token;
        return buffers_[token].data();
    }
    if (rs && in_place() && !saved_[static_cast<size_t>(index)]) {
        // A reduce-scatter piece lands in the backup at its own offset; the reduction then swaps
        // the caller's input into its place (reduce_swap), so saving the input costs no extra pass.
        return p_.backup + offset * elem_;
    }
    save_before_overwrite(index, offset, n);
    return p_.recv + offset * elem_;
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
    const uint64_t n = plan_.piece_elems_at(offset);
    const int64_t piece = plan_.piece_index(offset, n);
    if (phase == wire::RingPhase::REDUCE_SCATTER) reduced_[static_cast<size_t>(piece)] = 1;
    if (p_.quant) return on_quantized_piece(sink, phase, offset, n, piece);
    uint8_t* data = p_.recv + offset * elem_;
    const uint32_t c = plan_.chunk_of(offset);
    if (phase == wire::RingPhase::REDUCE_SCATTER && in_place() && !saved_[static_cast<size_t>(piece)]) {
        const bool last_hop = c == owned_chunk();
        kernels::reduce_swap(p_.dtype, p_.op, data, p_.backup + offset * elem_, n, last_hop ? p_.world : 0);
        saved_[static_cast<size_t>(piece)] = 1;
        sink.send_piece(last_hop ? wire::RingPhase::ALL_GATHER : wire::RingPhase::REDUCE_SCATTER, offset, bytes, data, 0);
    } else if (phase == wire::RingPhase::REDUCE_SCATTER) {
        if (c == owned_chunk()) {
            // Last hop: this value is final. It is computed here and nowhere else.
            kernels::reduce_finalize(p_.dtype, p_.op, data, input_at(offset), n, p_.world);
            sink.send_piece(wire::RingPhase::ALL_GATHER, offset, bytes, data, 0);
        } else {
            kernels::reduce_into(p_.dtype, p_.op, data, input_at(offset), n);
            sink.send_piece(wire::RingPhase::REDUCE_SCATTER, offset, bytes, data, 0);
        }
    } else if (c != chunk_owned_by_next()) {
        sink.send_piece(wire::RingPhase::ALL_GATHER, offset, bytes, data, 0);
    }
}

void RingAllReduce::on_quantized_piece(PieceSink& sink, wire::RingPhase phase, uint64_t offset, uint64_t n,
                                       int64_t piece) {
    const bool rs = phase == wire::RingPhase::REDUCE_SCATTER;
    auto node = staging_.extract((static_cast<uint64_t>(rs ? 0 : 1) << 63) | static_cast<uint64_t>(piece));
    const uint64_t in_token = node.mapped();
    const uint8_t* in = buffers_[in_token].data();
    const auto& f = *p_.quant;
    const uint32_t bytes = wire_bytes(n);
    uint8_t* dest = p_.recv + offset * elem_;
    const uint32_t c = plan_.chunk_of(offset);
    save_before_overwrite(piece, offset, n);
    if (!rs) {
        kernels::quant::dequantize(f, in, n, dest);
        if (c != chunk_owned_by_next()) sink.send_piece(wire::RingPhase::ALL_GATHER, offset, bytes, in, in_token);
        else buffers_.erase(in_token);
        return;
    }
    const bool last_hop = c == owned_chunk();
    kernels::quant::dequantize_reduce(f, p_.op, in, input_at(offset), n, dest, last_hop ? p_.world : 0);
    buffers_.erase(in_token);
    const uint64_t out_token = new_buffer(bytes);
    uint8_t* out = buffers_[out_token].data();
    kernels::quant::quantize(f, dest, n, out);
    if (last_hop) {
        // The owner keeps what everybody else will decode, not its full-precision sum.
        kernels::quant::dequantize(f, out, n, dest);
        sink.send_piece(wire::RingPhase::ALL_GATHER, offset, bytes, out, out_token);
    } else {
        sink.send_piece(wire::RingPhase::REDUCE_SCATTER, offset, bytes, out, out_token);
    }
}

}  // namespace pccl::ring
