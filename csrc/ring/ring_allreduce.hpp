// The pipelined ring all-reduce of one operation, free of sockets. Every piece travels the ring on
// its own: reduce-scatter hops reduce it into the destination and forward it; the chunk's owner
// finalises it (AVG divides once) and starts it on its all-gather lap, where each peer keeps it and
// forwards it verbatim. Each reduced value is computed exactly once, hence bit-identical results.
//
// Peer `rank` sends chunk `rank` first; the piece of chunk c is owned (fully reduced) at peer c-1.
// Buffers: `send` is never written; out of place, `recv` receives every piece where it belongs (no
// staging). In place
// (`send` null, `backup` given), the caller's input is saved piece by piece before its first
// overwrite, and restore_input() puts every overwritten piece back when the op fails. A
// reduce-scatter piece is received into `backup` at its offset and reduced with a swap (the sum
// goes to the caller's buffer, the input it replaces to `backup`), so saving costs no pass of its
// own; an all-gather piece that overwrites input is copied out first.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/types.hpp"
#include "kernels/quantize.hpp"
#include "ring/ring_plan.hpp"
#include "wire/data_frame.hpp"

namespace pccl::ring {

// Where pieces go: implemented by the transport.
class PieceSink {
public:
    virtual ~PieceSink() = default;
    // Queue the piece at element `offset` (`bytes` of `data` on the wire) for the next peer. `data`
    // stays valid and unmodified until the transport reports the send done with the same `token`
    // (0: the data lives in the caller's buffers; otherwise a buffer the ring owns).
    virtual void send_piece(wire::RingPhase phase, uint64_t offset, uint32_t bytes, const uint8_t* data,
                            uint64_t token) = 0;
};

class RingAllReduce {
public:
    struct Params {
        const uint8_t* send = nullptr;  // null: in place
        uint8_t* recv = nullptr;
        uint8_t* backup = nullptr;      // in place only: room for a copy of the input
        uint64_t count = 0;
        DataType dtype = DataType::FLOAT;
        ReduceOp op = ReduceOp::SUM;
        uint32_t world = 1;
        uint32_t rank = 0;
        uint64_t piece_elems = 1;
        // Quantized on the wire: every hop dequantizes, reduces in full precision and quantizes
        // again; the owner quantizes the final value once and adopts its dequantized form, so
        // every peer decodes the same bytes into the same bits.
        std::optional<kernels::quant::Format> quant;
    };

    explicit RingAllReduce(const Params& p);

    // Queue this peer's first pieces.
    void start(PieceSink& sink);

    // Validate an incoming piece header; the destination of its payload, or nullptr with `error`.
    // A piece accepted here must later be passed to on_piece_received.
    uint8_t* accept_piece(wire::RingPhase phase, uint64_t offset, uint32_t bytes, std::string& error);
    void on_piece_received(PieceSink& sink, wire::RingPhase phase, uint64_t offset, uint32_t bytes);

    // In place: copy back every piece that was overwritten. Call only once the op is over.
    void restore_input();

    void on_piece_queued() { ++sends_outstanding_; }
    void on_piece_sent(uint64_t token) {
        --sends_outstanding_;
        if (token != 0) buffers_.erase(token);
    }
    bool complete() const { return pieces_left_ == 0 && sends_outstanding_ == 0; }
    size_t element_bytes() const { return elem_; }

    static uint64_t choose_piece_elems(uint64_t count, uint32_t world, size_t elem);

private:
    uint32_t chunk_owned_by_next() const { return (p_.rank + 2) % p_.world; }
    uint32_t my_chunk() const { return p_.rank; }
    uint32_t owned_chunk() const { return (p_.rank + 1) % p_.world; }
    uint32_t wire_bytes(uint64_t elems) const;
    void save_before_overwrite(int64_t piece, uint64_t offset, uint64_t elems);
    uint64_t new_buffer(size_t bytes);
    void on_quantized_piece(PieceSink& sink, wire::RingPhase phase, uint64_t offset, uint64_t elems, int64_t piece);
    // The local contribution at `offset`: the send buffer, or in place the saved copy.
    const uint8_t* input_at(uint64_t offset) const { return (p_.send ? p_.send : p_.backup) + offset * elem_; }
    bool in_place() const { return p_.send == nullptr; }

    Params p_;
    size_t elem_;
    RingPlan plan_;
    std::vector<uint8_t> seen_[2];  // per phase, per piece: accepted already
    std::vector<uint8_t> reduced_;  // per piece: its reduce-scatter bytes were delivered here
    std::vector<uint8_t> saved_;    // in place, per piece: copied to backup before its first overwrite
    // Quantized pieces the ring owns (to send, or received and waiting to be decoded/forwarded).
    std::unordered_map<uint64_t, std::vector<uint8_t>> buffers_;
    std::unordered_map<uint64_t, uint64_t> staging_;  // (phase, piece) -> token of its received bytes
    uint64_t next_token_ = 1;
    uint64_t pieces_left_ = 0;
    uint64_t sends_outstanding_ = 0;
};

}  // namespace pccl::ring
