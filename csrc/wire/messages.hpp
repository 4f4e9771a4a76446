// Control messages between peers and the master, and the frame that carries them:
//   magic u32 'PCCL' | version u16 | type u16 | payload length u32 | payload
// New messages take new type numbers; a receiver drops the connection on an unknown one.
// Type numbers 100-199 are reserved for shared-state sync, 200-255 for topology optimisation.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <variant>
#include <vector>

namespace pccl::wire {

inline constexpr size_t kFrameHeaderBytes = 12;

enum class MsgType : uint16_t {
    // peer -> master
    HELLO = 1,
    HEARTBEAT = 2,
    VOTE_UPDATE_TOPOLOGY = 3,
    P2P_READY = 4,
    VOTE_PEERS_PENDING = 5,
    OP_BEGIN = 6,
    OP_END = 7,
    GOODBYE = 8,
    // master -> peer
    WELCOME = 64,
    TOPOLOGY = 65,
    TOPOLOGY_COMPLETE = 66,
    PEERS_PENDING_ANSWER = 67,
    OP_GO = 68,
    OP_RESULT = 69,
    KICKED = 70,
    MASTER_HEARTBEAT = 71,
    OP_TICKET = 72,
    // shared-state sync, peer -> master
    SYNC_VOTE = 100,
    SYNC_RESULT = 101,
    SYNC_STALLED = 102,
    // shared-state sync, master -> peer
    SYNC_PLAN = 110,
    SYNC_SEND_MORE = 111,
    SYNC_DONE = 112,
    // topology optimisation, peer -> master
    VOTE_OPTIMIZE_TOPOLOGY = 200,
    BANDWIDTH_REPORT = 201,
    // topology optimisation, master -> peer
    BANDWIDTH_PROBE = 210,
};

using Hash128 = std::array<uint8_t, 16>;

// An IPv4 or IPv6 address as raw bytes (IPv4 in the first 4), family 4 or 6.
struct IpAddress {
    uint8_t family = 4;
    std::array<uint8_t, 16> bytes{};
    bool operator==(const IpAddress&) const = default;
};

struct PeerEntry {
    uint64_t peer_id = 0;
    uint32_t group = 0;
    IpAddress ip;
    uint16_t p2p_port = 0;
    bool operator==(const PeerEntry&) const = default;
};

struct Hello { uint32_t peer_group = 0; uint16_t p2p_port = 0; };
struct Heartbeat {};
struct VoteUpdateTopology {};
struct P2PReady { uint64_t epoch = 0; uint64_t unreachable_peer = 0; };
struct VotePeersPending {};
struct OpBegin {
    uint64_t tag = 0;
    uint64_t count = 0;
    uint8_t dtype = 0;
    uint8_t op = 0;
    uint8_t quant_algorithm = 0;
    uint8_t quant_dtype = 0;
    // The uid of this peer's OP_TICKET for the tag (0: none), under which it may already be sending.
    uint64_t claimed_uid = 0;
    // Same arguments (the claim is not an argument).
    bool same_call(const OpBegin& o) const {
        return tag == o.tag && count == o.count && dtype == o.dtype && op == o.op &&
               quant_algorithm == o.quant_algorithm && quant_dtype == o.quant_dtype;
    }
};
// tx/rx_bytes: what this peer's part of the op put on and took off the wire (data frames with
// their headers), reported so the master can count the bytes its collectives moved.
struct OpEnd {
    uint64_t tag = 0;
    uint64_t op_uid = 0;
    uint8_t ok = 0;
    uint64_t blamed_peer = 0;
    std::string reason;
    uint64_t tx_bytes = 0;
    uint64_t rx_bytes = 0;
    // The suspect's path to this peer went silent (no progress, or no handshake, and no error):
    // the master drops it, since its heartbeats alone would keep it in the ring forever.
    uint8_t suspect_silent = 0;
};
struct Goodbye {};

struct Welcome { uint64_t peer_id = 0; uint32_t peer_timeout_ms = 0; };
// The whole directory, in ring order; a group's ring is the entries of that group in list order.
struct Topology { uint64_t epoch = 0; uint8_t needs_confirm = 0; std::vector<PeerEntry> peers; };
struct TopologyComplete { uint64_t epoch = 0; };
struct PeersPendingAnswer { uint8_t pending = 0; };
struct OpGo {
    uint64_t tag = 0;
    uint64_t op_uid = 0;
    uint32_t rank = 0;
    uint32_t world = 0;
    uint64_t prev_peer = 0;
    uint64_t next_peer = 0;
};
// Sent with the OP_RESULT of a successful op, before it: the OP_GO the tag's next op in this group
// will get if nothing changes (a reserved uid, this peer's place in the ring), valid in `epoch`. A
// peer that calls the tag again claims it in OP_BEGIN and may start at once; OP_GO confirms the uid
// when every member claimed it and the ring is unchanged, otherwise it names a fresh uid and the
// early start is undone.
struct OpTicket {
    OpGo go;
    uint64_t epoch = 0;
};
struct OpResult { uint64_t tag = 0; uint64_t op_uid = 0; uint8_t result = 0; std::string message; };
struct Kicked { std::string reason; };
struct MasterHeartbeat {};

// One entry of a peer's shared state: its key (name, dtype, count) and the hash of its content.
struct SyncEntry {
    std::string name;
    uint8_t dtype = 0;
    uint64_t count = 0;
    Hash128 hash{};
    uint8_t allow_inequality = 0;
    bool same_key(const SyncEntry& o) const { return name == o.name && dtype == o.dtype && count == o.count; }
};
struct SyncVote { uint64_t revision = 0; uint8_t strategy = 0; std::vector<SyncEntry> entries; };
// Peer -> master: a receiver verified what it got (or not); anyone may report giving up.
struct SyncResult { uint64_t sync_uid = 0; uint8_t ok = 0; std::string reason; };
// Bytes [offset, offset + length) of entry `entry`; `peer` is the other side of the transfer.
struct SyncRange {
    uint32_t entry = 0;
    uint64_t offset = 0;
    uint64_t length = 0;
    uint64_t peer = 0;
    bool operator==(const SyncRange&) const = default;
};
struct SyncExpect { uint32_t entry = 0; Hash128 hash{}; };
struct SyncPlan {
    uint64_t sync_uid = 0;
    uint8_t result = 0;  // non-zero: this peer's vote was rejected; `message` says why
    std::string message;
    uint64_t revision = 0;
    std::vector<SyncExpect> expect;   // entries this peer receives, with the hash they must end with
    std::vector<SyncRange> receive;   // ranges coming to this peer (peer = distributor)
    std::vector<SyncRange> send;      // ranges this peer sends (peer = receiver)
};
struct SyncSendMore { uint64_t sync_uid = 0; std::vector<SyncRange> send; };
// Peer -> master: nothing arrived for the progress deadline while these planned ranges (peer = the
// distributor first named for them) are still missing; the master hands them to other distributors.
struct SyncStalled { uint64_t sync_uid = 0; std::vector<SyncRange> missing; };
struct SyncDone { uint64_t sync_uid = 0; uint8_t result = 0; std::string message; uint64_t revision = 0; };

// optimize_topology(): an update_topology vote that also asks for a bandwidth-aware ring.
struct VoteOptimizeTopology {};
// Master -> peer: stream to `target` for `duration_ms` over as many connections as this peer's
// pool holds, and report the rate that arrived.
struct BandwidthProbe { uint64_t probe_id = 0; PeerEntry target; uint32_t duration_ms = 0; };
struct BandwidthReport {
    uint64_t probe_id = 0;
    uint64_t target = 0;
    uint64_t bits_per_second = 0;  // 0 with ok = 0: the target could not be reached
    uint8_t ok = 0;
    std::string reason;
};

using Message = std::variant<Hello, Heartbeat, VoteUpdateTopology, P2PReady, VotePeersPending, OpBegin, OpEnd,
                             Goodbye, Welcome, Topology, TopologyComplete, PeersPendingAnswer, OpGo, OpResult,
                             Kicked, MasterHeartbeat, SyncVote, SyncResult, SyncPlan, SyncSendMore, SyncDone,
                             SyncStalled,
                             VoteOptimizeTopology, BandwidthProbe, BandwidthReport, OpTicket>;

MsgType type_of(const Message& m);
const char* type_name(MsgType t);

// Appends one complete frame (header + payload) to `out`.
void encode_frame(const Message& m, std::vector<uint8_t>& out);

// Decodes one payload of the given type; nullopt for an unknown type or malformed payload.
std::optional<Message> decode_payload(uint16_t type, std::span<const uint8_t> payload);

struct FrameHeader {
    uint32_t magic = 0;
    uint16_t version = 0;
    uint16_t type = 0;
    uint32_t length = 0;
};
FrameHeader decode_frame_header(const uint8_t* p);  // p has kFrameHeaderBytes

// Incremental frame splitter for a byte stream. Feed bytes with append(); next() yields decoded
// messages. Any violation (bad magic or version, oversized length, undecodable payload) latches an
// error; the owner then drops the connection. Memory stays bounded by max_frame_bytes.
class FrameParser {
public:
    explicit FrameParser(uint32_t max_payload_bytes) : max_payload_(max_payload_bytes) {}
    void set_max_payload(uint32_t bytes) { max_payload_ = bytes; }

    // Where to write incoming bytes; room for at least `min_room` bytes.
    std::span<uint8_t> write_space(size_t min_room);
    void commit(size_t n) { end_ += n; }

    // A decoded message, or nullopt if no complete frame is buffered (or error() is set).
    std::optional<Message> next();
    const std::string& error() const { return error_; }
    bool has_error() const { return !error_.empty(); }

private:
    uint32_t max_payload_;
    std::vector<uint8_t> buf_;
    size_t begin_ = 0;
    size_t end_ = 0;
    std::string error_;
};

}  // namespace pccl::wire
