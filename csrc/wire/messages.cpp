#include "wire/messages.hpp"

#include <algorithm>
#include <cstring>

#include "common/limits.hpp"
#include "wire/codec.hpp"

namespace pccl::wire {
namespace {

constexpr size_t kPeerEntryBytes = 8 + 4 + 1 + 16 + 2;

template <class... Ts>
struct Overloaded : Ts... { using Ts::operator()...; };

void put_peer(Writer& w, const PeerEntry& p) {
    w.u64(p.peer_id);
    w.u32(p.group);
    w.u8(p.ip.family);
    w.bytes(p.ip.bytes.data(), p.ip.bytes.size());
    w.u16(p.p2p_port);
}

PeerEntry get_peer(Reader& r) {
    PeerEntry p;
    p.peer_id = r.u64();
    p.group = r.u32();
    p.ip.family = r.u8();
    r.bytes(p.ip.bytes.data(), p.ip.bytes.size());
    p.p2p_port = r.u16();
    if (p.ip.family != 4 && p.ip.family != 6) r.fail();
    return p;
}

std::string bounded(const std::string& s) {
    return s.size() <= limits::kMaxWireStringBytes ? s : s.substr(0, limits::kMaxWireStringBytes);
}

void encode_payload(const Message& m, Writer& w) {
    std::visit(Overloaded{
                   [&](const Hello& x) { w.u32(x.peer_group); w.u16(x.p2p_port); },
                   [&](const Heartbeat&) {},
                   [&](const VoteUpdateTopology&) {},
                   [&](const P2PReady& x) { w.u64(x.epoch); w.u64(x.unreachable_peer); },
                   [&](const VotePeersPending&) {},
                   [&](const OpBegin& x) {
                       w.u64(x.tag); w.u64(x.count); w.u8(x.dtype); w.u8(x.op);
                       w.u8(x.quant_algorithm); w.u8(x.quant_dtype);
                   },
                   [&](const OpEnd& x) {
                       w.u64(x.tag); w.u64(x.op_uid); w.u8(x.ok); w.u64(x.blamed_peer); w.string(bounded(x.reason));
                   },
                   [&](const Goodbye&) {},
                   [&](const Welcome& x) { w.u64(x.peer_id); w.u32(x.peer_timeout_ms); },
                   [&](const Topology& x) {
                       w.u64(x.epoch); w.u8(x.needs_confirm);
                       w.u32(static_cast<uint32_t>(x.peers.size()));
                       for (const auto& p : x.peers) put_peer(w, p);
                   },
                   [&](const TopologyComplete& x) { w.u64(x.epoch); },
                   [&](const PeersPendingAnswer& x) { w.u8(x.pending); },
                   [&](const OpGo& x) {
                       w.u64(x.tag); w.u64(x.op_uid); w.u32(x.rank); w.u32(x.world);
                       w.u64(x.prev_peer); w.u64(x.next_peer);
                   },
                   [&](const OpResult& x) { w.u64(x.tag); w.u64(x.op_uid); w.u8(x.result); w.string(bounded(x.message)); },
                   [&](const Kicked& x) { w.string(bounded(x.reason)); },
                   [&](const MasterHeartbeat&) {},
               },
               m);
}

}  // namespace

MsgType type_of(const Message& m) {
    static constexpr MsgType kTypes[] = {
        MsgType::HELLO,   MsgType::HEARTBEAT, MsgType::VOTE_UPDATE_TOPOLOGY, MsgType::P2P_READY,
        MsgType::VOTE_PEERS_PENDING, MsgType::OP_BEGIN, MsgType::OP_END, MsgType::GOODBYE,
        MsgType::WELCOME, MsgType::TOPOLOGY, MsgType::TOPOLOGY_COMPLETE, MsgType::PEERS_PENDING_ANSWER,
        MsgType::OP_GO,   MsgType::OP_RESULT, MsgType::KICKED, MsgType::MASTER_HEARTBEAT,
    };
    static_assert(std::size(kTypes) == std::variant_size_v<Message>);
    return kTypes[m.index()];
}

const char* type_name(MsgType t) {
    switch (t) {
        case MsgType::HELLO: return "HELLO";
        case MsgType::HEARTBEAT: return "HEARTBEAT";
        case MsgType::VOTE_UPDATE_TOPOLOGY: return "VOTE_UPDATE_TOPOLOGY";
        case MsgType::P2P_READY: return "P2P_READY";
        case MsgType::VOTE_PEERS_PENDING: return "VOTE_PEERS_PENDING";
        case MsgType::OP_BEGIN: return "OP_BEGIN";
        case MsgType::OP_END: return "OP_END";
        case MsgType::GOODBYE: return "GOODBYE";
        case MsgType::WELCOME: return "WELCOME";
        case MsgType::TOPOLOGY: return "TOPOLOGY";
        case MsgType::TOPOLOGY_COMPLETE: return "TOPOLOGY_COMPLETE";
        case MsgType::PEERS_PENDING_ANSWER: return "PEERS_PENDING_ANSWER";
        case MsgType::OP_GO: return "OP_GO";
        case MsgType::OP_RESULT: return "OP_RESULT";
        case MsgType::KICKED: return "KICKED";
        case MsgType::MASTER_HEARTBEAT: return "MASTER_HEARTBEAT";
    }
    return "UNKNOWN";
}

void encode_frame(const Message& m, std::vector<uint8_t>& out) {
    const size_t start = out.size();
    Writer w(out);
    w.u32(limits::kControlMagic);
    w.u16(limits::kProtocolVersion);
    w.u16(static_cast<uint16_t>(type_of(m)));
    w.u32(0);  // patched below
    encode_payload(m, w);
    const uint32_t len = static_cast<uint32_t>(out.size() - start - kFrameHeaderBytes);
    for (size_t i = 0; i < 4; ++i) out[start + 8 + i] = static_cast<uint8_t>(len >> (8 * i));
}

std::optional<Message> decode_payload(uint16_t type, std::span<const uint8_t> payload) {
    Reader r(payload);
    std::optional<Message> m;
    switch (static_cast<MsgType>(type)) {
        case MsgType::HELLO: { Hello x; x.peer_group = r.u32(); x.p2p_port = r.u16(); m = x; break; }
        case MsgType::HEARTBEAT: m = Heartbeat{}; break;
        case MsgType::VOTE_UPDATE_TOPOLOGY: m = VoteUpdateTopology{}; break;
        case MsgType::P2P_READY: { P2PReady x; x.epoch = r.u64(); x.unreachable_peer = r.u64(); m = x; break; }
        case MsgType::VOTE_PEERS_PENDING: m = VotePeersPending{}; break;
        case MsgType::OP_BEGIN: {
            OpBegin x;
            x.tag = r.u64(); x.count = r.u64(); x.dtype = r.u8(); x.op = r.u8();
            x.quant_algorithm = r.u8(); x.quant_dtype = r.u8();
            m = x;
            break;
        }
        case MsgType::OP_END: {
            OpEnd x;
            x.tag = r.u64(); x.op_uid = r.u64(); x.ok = r.u8(); x.blamed_peer = r.u64();
            x.reason = r.string(limits::kMaxWireStringBytes);
            m = std::move(x);
            break;
        }
        case MsgType::GOODBYE: m = Goodbye{}; break;
        case MsgType::WELCOME: { Welcome x; x.peer_id = r.u64(); x.peer_timeout_ms = r.u32(); m = x; break; }
        case MsgType::TOPOLOGY: {
            Topology x;
            x.epoch = r.u64();
            x.needs_confirm = r.u8();
            const uint32_t n = r.count(limits::kMaxPeersInTopology, kPeerEntryBytes);
            x.peers.reserve(n);
            for (uint32_t i = 0; i < n && r.ok(); ++i) x.peers.push_back(get_peer(r));
            m = std::move(x);
            break;
        }
        case MsgType::TOPOLOGY_COMPLETE: { TopologyComplete x; x.epoch = r.u64(); m = x; break; }
        case MsgType::PEERS_PENDING_ANSWER: { PeersPendingAnswer x; x.pending = r.u8(); m = x; break; }
        case MsgType::OP_GO: {
            OpGo x;
            x.tag = r.u64(); x.op_uid = r.u64(); x.rank = r.u32(); x.world = r.u32();
            x.prev_peer = r.u64(); x.next_peer = r.u64();
            m = x;
            break;
        }
        case MsgType::OP_RESULT: {
            OpResult x;
            x.tag = r.u64(); x.op_uid = r.u64(); x.result = r.u8(); x.message = r.string(limits::kMaxWireStringBytes);
            m = std::move(x);
            break;
        }
        case MsgType::KICKED: { Kicked x; x.reason = r.string(limits::kMaxWireStringBytes); m = std::move(x); break; }
        case MsgType::MASTER_HEARTBEAT: m = MasterHeartbeat{}; break;
        default: return std::nullopt;
    }
    if (!r.finished_cleanly()) return std::nullopt;
    return m;
}

FrameHeader decode_frame_header(const uint8_t* p) {
    Reader r(std::span<const uint8_t>(p, kFrameHeaderBytes));
    FrameHeader h;
    h.magic = r.u32();
    h.version = r.u16();
    h.type = r.u16();
    h.length = r.u32();
    return h;
}

std::span<uint8_t> FrameParser::write_space(size_t min_room) {
    if (begin_ == end_) begin_ = end_ = 0;
    if (buf_.size() - end_ < min_room) {
        // Compact first; grow only if the unread bytes plus the room do not fit.
        if (begin_ > 0) {
            std::memmove(buf_.data(), buf_.data() + begin_, end_ - begin_);
            end_ -= begin_;
            begin_ = 0;
        }
        if (buf_.size() - end_ < min_room) buf_.resize(end_ + min_room);
    }
    return {buf_.data() + end_, buf_.size() - end_};
}

std::optional<Message> FrameParser::next() {
    if (has_error()) return std::nullopt;
    const size_t avail = end_ - begin_;
    if (avail < kFrameHeaderBytes) return std::nullopt;
    const FrameHeader h = decode_frame_header(buf_.data() + begin_);
    if (h.magic != limits::kControlMagic) { error_ = "bad frame magic"; return std::nullopt; }
    if (h.version != limits::kProtocolVersion) {
        error_ = "protocol version " + std::to_string(h.version) + " (this build speaks " +
                 std::to_string(limits::kProtocolVersion) + ")";
        return std::nullopt;
    }
    if (h.length > max_payload_) {
        error_ = "frame of " + std::to_string(h.length) + " bytes exceeds the limit of " + std::to_string(max_payload_);
        return std::nullopt;
    }
    if (avail < kFrameHeaderBytes + h.length) return std::nullopt;
    auto payload = std::span<const uint8_t>(buf_.data() + begin_ + kFrameHeaderBytes, h.length);
    auto m = decode_payload(h.type, payload);
    if (!m) {
        error_ = std::string("malformed or unknown message type ") + std::to_string(h.type);
        return std::nullopt;
    }
    begin_ += kFrameHeaderBytes + h.length;
    // Release memory a huge (but legal) frame left behind.
    if (begin_ == end_ && buf_.size() > 64 * 1024) { buf_.clear(); buf_.shrink_to_fit(); begin_ = end_ = 0; }
    return m;
}

}  // namespace pccl::wire
