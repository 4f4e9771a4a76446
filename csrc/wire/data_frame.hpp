// The fixed 32-byte header of every frame on a peer-to-peer data connection:
//   magic u32 'PCCD' | version u16 | kind u8 | phase u8 | length u32 | aux u32 | a u64 | b u64
//   DATA:          a = op uid, b = element offset, length = payload bytes, phase = ring phase,
//                  aux = kDataFlagEarly when queued before the sender's OP_GO (an early start)
//   P2P_HELLO:     a = sender peer id, b = receiver peer id, aux = connection index (no payload)
//   P2P_HELLO_ACK: echoes the hello
//   SYNC_DATA:     a = sync uid, b = byte offset in the entry, aux = entry index, length = payload
//   PROBE_HELLO:   a = sender peer id, b = receiver peer id, aux = connection index (no payload); then
//                  raw bytes until the sender shuts its side, answered by the receiver with a
//                  ProbeReceipt (bytes and nanoseconds of the measured window) and closed
#pragma once

#include <cstdint>

#include "common/limits.hpp"

namespace pccl::wire {

inline constexpr size_t kDataHeaderBytes = 32;

enum class DataFrameKind : uint8_t { P2P_HELLO = 1, P2P_HELLO_ACK = 2, DATA = 3, SYNC_DATA = 4, PROBE_HELLO = 5 };
enum class RingPhase : uint8_t { REDUCE_SCATTER = 0, ALL_GATHER = 1 };
// A DATA frame of an op its sender started early: its receiver may not have called the op yet.
inline constexpr uint32_t kDataFlagEarly = 1;

struct DataHeader {
    uint32_t magic = limits::kDataMagic;
    uint16_t version = limits::kProtocolVersion;
    uint8_t kind = 0;
    uint8_t phase = 0;
    uint32_t length = 0;
    uint32_t aux = 0;
    uint64_t a = 0;
    uint64_t b = 0;
};

inline void encode_data_header(const DataHeader& h, uint8_t* out) {
    auto put = [&out](uint64_t v, int bytes) {
        for (int i = 0; i < bytes; ++i) *out++ = static_cast<uint8_t>(v >> (8 * i));
    };
    put(h.magic, 4); put(h.version, 2); put(h.kind, 1); put(h.phase, 1);
    put(h.length, 4); put(h.aux, 4); put(h.a, 8); put(h.b, 8);
}

inline DataHeader decode_data_header(const uint8_t* in) {
    auto get = [&in](int bytes) {
        uint64_t v = 0;
        for (int i = 0; i < bytes; ++i) v |= static_cast<uint64_t>(*in++) << (8 * i);
        return v;
    };
    DataHeader h;
    h.magic = static_cast<uint32_t>(get(4));
    h.version = static_cast<uint16_t>(get(2));
    h.kind = static_cast<uint8_t>(get(1));
    h.phase = static_cast<uint8_t>(get(1));
    h.length = static_cast<uint32_t>(get(4));
    h.aux = static_cast<uint32_t>(get(4));
    h.a = get(8);
    h.b = get(8);
    return h;
}

inline bool header_is_sane(const DataHeader& h) {
    return h.magic == limits::kDataMagic && h.version == limits::kProtocolVersion &&
           h.kind >= static_cast<uint8_t>(DataFrameKind::P2P_HELLO) && h.kind <= static_cast<uint8_t>(DataFrameKind::PROBE_HELLO) &&
           h.length <= limits::kMaxDataPieceBytes &&
           (h.kind == static_cast<uint8_t>(DataFrameKind::DATA)        ? h.phase <= 1 && h.aux <= kDataFlagEarly
            : h.kind == static_cast<uint8_t>(DataFrameKind::SYNC_DATA) ? h.length > 0
                                                                        : h.length == 0);
}

}  // namespace pccl::wire
