#include "wire/messages.hpp"

#include <algorithm>
#include <cstring>

#include "common/limits.hpp"
#include "wire/codec.hpp"

namespace pccl::wire {
namespace {

constexpr size_t kPeerEntryBytes = 8 + 4 + 1 + 16 + 2;
constexpr size_t kSyncEntryMinBytes = 4 + 1 + 8 + 16 + 1;
constexpr size_t kSyncRangeBytes = 4 + 8 + 8 + 8;
constexpr size_t kSyncExpectBytes = 4 + 16;

void put_ranges(Writer& w, const std::vector<SyncRange>& ranges) {
    w.u32(static_cast<uint32_t>(ranges.size()));
    for (const auto& r : ranges) { w.u32(r.entry); w.u64(r.offset); w.u64(r.length); w.u64(r.peer); }
}

std::vector<SyncRange> get_ranges(Reader& r) {
    std::vector<SyncRange> out(r.count(limits::kMaxSyncRanges, kSyncRangeBytes));
    for (auto& x : out) { x.entry = r.u32(); x.offset = r.u64(); x.length = r.u64(); x.peer = r.u64(); }
    return out;
}

template <class... Ts>
struct Overloaded : Ts... { using Ts::operator()...; };

void put_peer(Writer& w, const PeerEntry& p) {
    w.u64(p.peer_id);
    w.u32(p.group);
    w.u8(p.ip.family);
    w.bytes(p.ip.bytes.data(), p.ip.bytes.size());
    w.u16(p.p2p_port);
}

void put_go(Writer& w, const OpGo& x) {
    w.u64(x.tag); w.u64(x.op_uid); w.u32(x.rank); w.u32(x.world);
    w.u64(x.prev_peer); w.u64(x.next_peer);
}

OpGo get_go(Reader& r) {
    OpGo x;
    x.tag = r.u64(); x.op_uid = r.u64(); x.rank = r.u32(); x.world = r.u32();
    x.prev_peer = r.u64(); x.next_peer = r.u64();
    return x;
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
                       w.u8(x.quant_algorithm); w.u8(x.quant_dtype); w.u64(x.claimed_uid);
                   },
                   [&](const OpEnd& x) {
                       w.u64(x.tag); w.u64(x.op_uid); w.u8(x.ok); w.u64(x.blamed_peer); w.string(bounded(x.reason));
                       w.u64(x.tx_bytes); w.u64(x.rx_bytes); w.u8(x.suspect_silent);
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
                   [&](const OpGo& x) { put_go(w, x); },
                   [&](const OpTicket& x) { put_go(w, x.go); w.u64(x.epoch); },
                   [&](const OpResult& x) { w.u64(x.tag); w.u64(x.op_uid); w.u8(x.result); w.string(bounded(x.message)); },
                   [&](const Kicked& x) { w.string(bounded(x.reason)); },
                   [&](const MasterHeartbeat&) {},
                   [&](const SyncVote& x) {
                       w.u64(x.revision); w.u8(x.strategy);
                       w.u32(static_cast<uint32_t>(x.entries.size()));
                       for (const auto& e : x.entries) {
                           w.string(bounded(e.name)); w.u8(e.dtype); w.u64(e.count);
                           w.bytes(e.hash.data(), e.hash.size()); w.u8(e.allow_inequality);
                       }
                   },
                   [&](const SyncResult& x) { w.u64(x.sync_uid); w.u8(x.ok); w.string(bounded(x.reason)); },
                   [&](const SyncPlan& x) {
                       w.u64(x.sync_uid); w.u8(x.result); w.string(bounded(x.message)); w.u64(x.revision);
                       w.u32(static_cast<uint32_t>(x.expect.size()));
                       for (const auto& e : x.expect) { w.u32(e.entry); w.bytes(e.hash.data(), e.hash.size()); }
                       put_ranges(w, x.receive);
                       put_ranges(w, x.send);
                   },
                   [&](const SyncSendMore& x) { w.u64(x.sync_uid); put_ranges(w, x.send); },
                   [&](const SyncStalled& x) { w.u64(x.sync_uid); put_ranges(w, x.missing); },
                   [&](const SyncDone& x) {
                       w.u64(x.sync_uid); w.u8(x.result); w.string(bounded(x.message)); w.u64(x.revision);
                   },
                   [&](const VoteOptimizeTopology&) {},
                   [&](const BandwidthProbe& x) { w.u64(x.probe_id); put_peer(w, x.target); w.u32(x.duration_ms); },
                   [&](const BandwidthReport& x) {
                       w.u64(x.probe_id); w.u64(x.target); w.u64(x.bits_per_second); w.u8(x.ok); w.string(bounded(x.reason));
                   },
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
        MsgType::SYNC_VOTE, MsgType::SYNC_RESULT, MsgType::SYNC_PLAN, MsgType::SYNC_SEND_MORE, MsgType::SYNC_DONE,
        MsgType::SYNC_STALLED,
        MsgType::VOTE_OPTIMIZE_TOPOLOGY, MsgType::BANDWIDTH_PROBE, MsgType::BANDWIDTH_REPORT, MsgType::OP_TICKET,
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
        case MsgType::OP_TICKET: return "OP_TICKET";
        case MsgType::SYNC_VOTE: return "SYNC_VOTE";
        case MsgType::SYNC_RESULT: return "SYNC_RESULT";
        case MsgType::SYNC_PLAN: return "SYNC_PLAN";
        case MsgType::SYNC_SEND_MORE: return "SYNC_SEND_MORE";
        case MsgType::SYNC_STALLED: return "SYNC_STALLED";
        case MsgType::SYNC_DONE: return "SYNC_DONE";
        case MsgType::VOTE_OPTIMIZE_TOPOLOGY: return "VOTE_OPTIMIZE_TOPOLOGY";
        case MsgType::BANDWIDTH_PROBE: return "BANDWIDTH_PROBE";
        case MsgType::BANDWIDTH_REPORT: return "BANDWIDTH_REPORT";
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
            x.quant_algorithm = r.u8(); x.quant_dtype = r.u8(); x.claimed_uid = r.u64();
            m = x;
            break;
        }
        case MsgType::OP_END: {
            OpEnd x;
            x.tag = r.u64(); x.op_uid = r.u64(); x.ok = r.u8(); x.blamed_peer = r.u64();
            x.reason = r.string(limits::kMaxWireStringBytes);
            x.tx_bytes = r.u64(); x.rx_bytes = r.u64(); x.suspect_silent = r.u8();
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
        case MsgType::OP_GO: m = get_go(r); break;
        case MsgType::OP_TICKET: {
            OpTicket x;
            x.go = get_go(r);
            x.epoch = r.u64();
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
        case MsgType::SYNC_VOTE: {
            SyncVote x;
            x.revision = r.u64();
            x.strategy = r.u8();
            x.entries.resize(r.count(limits::kMaxSyncEntries, kSyncEntryMinBytes));
            for (auto& e : x.entries) {
                e.name = r.string(limits::kMaxWireStringBytes);
                e.dtype = r.u8();
                e.count = r.u64();
                r.bytes(e.hash.data(), e.hash.size());
                e.allow_inequality = r.u8();
            }
            m = std::move(x);
            break;
        }
        case MsgType::SYNC_RESULT: {
            SyncResult x;
            x.sync_uid = r.u64(); x.ok = r.u8(); x.reason = r.string(limits::kMaxWireStringBytes);
            m = std::move(x);
            break;
        }
        case MsgType::SYNC_PLAN: {
            SyncPlan x;
            x.sync_uid = r.u64(); x.result = r.u8(); x.message = r.string(limits::kMaxWireStringBytes);
            x.revision = r.u64();
            x.expect.resize(r.count(limits::kMaxSyncEntries, kSyncExpectBytes));
            for (auto& e : x.expect) { e.entry = r.u32(); r.bytes(e.hash.data(), e.hash.size()); }
            x.receive = get_ranges(r);
            x.send = get_ranges(r);
            m = std::move(x);
            break;
        }
        case MsgType::SYNC_SEND_MORE: { SyncSendMore x; x.sync_uid = r.u64(); x.send = get_ranges(r); m = std::move(x); break; }
        case MsgType::SYNC_STALLED: { SyncStalled x; x.sync_uid = r.u64(); x.missing = get_ranges(r); m = std::move(x); break; }
        case MsgType::SYNC_DONE: {
            SyncDone x;
            x.sync_uid = r.u64(); x.result = r.u8(); x.message = r.string(limits::kMaxWireStringBytes); x.revision = r.u64();
            m = std::move(x);
            break;
        }
        case MsgType::VOTE_OPTIMIZE_TOPOLOGY: m = VoteOptimizeTopology{}; break;
        case MsgType::BANDWIDTH_PROBE: {
            BandwidthProbe x;
            x.probe_id = r.u64(); x.target = get_peer(r); x.duration_ms = r.u32();
            m = x;
            break;
        }
        case MsgType::BANDWIDTH_REPORT: {
            BandwidthReport x;
            x.probe_id = r.u64(); x.target = r.u64(); x.bits_per_second = r.u64(); x.ok = r.u8();
            x.reason = r.string(limits::kMaxWireStringBytes);
            m = std::move(x);
            break;
        }
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
