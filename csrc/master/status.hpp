// The master's status page, read-only. MasterState::snapshot() copies what the page shows into a
// StatusSnapshot on the master's own thread: a plain value with no pointers into the state, so it
// may then be rendered (render_status_json) on whichever thread asked. How the asking thread meets
// the master's thread is MasterNode::status_json()'s business (master_node.cpp).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace pccl::master {

// Why a peer left the registry, as a machine-readable word next to the human-readable reason.
enum class DropCause : uint8_t {
    CLOSED,              // EOF or a socket error on its control connection (a crash, a SIGKILL)
    MALFORMED_FRAME,     // bytes that do not parse as a frame (bad magic or version, oversized, ...)
    SEND_FAILED,         // the master could not write to it (it stopped reading, or a socket error)
    TIMEOUT,             // nothing heard from it for the peer timeout (hung or cut off)
    PROTOCOL_VIOLATION,  // a well-formed message that is not allowed in its phase
    LEFT,                // said GOODBYE
    UNREACHABLE,         // another peer reported it cannot connect to it, or, a newcomer, it cannot connect to a member
    SILENT_TO_NEIGHBOUR, // its ring neighbour got no data from it for the deadline (a dead link)
};
const char* to_string(DropCause cause);

struct StatusPeer {
    uint64_t id = 0;
    uint32_t group = 0;
    std::string address;  // ip:p2p port, as published to the other peers
    bool accepted = false;
    int64_t ring_index = -1;  // position in the group's ring; -1 while pending
    bool voted_update = false;
    bool voted_pending = false;
    bool in_sync = false;
    uint64_t ops_in_flight = 0;
    uint64_t confirmed_epoch = 0;
    double seconds_since_heard = 0;  // any message counts (heartbeats, votes, ...), as for the timeout
};

struct StatusSync {  // a shared-state sync round in progress
    uint64_t uid = 0;  // 0 while votes are still coming in
    bool planned = false;
    uint64_t revision = 0;  // once planned
    std::vector<uint64_t> voted;              // before planning: who has voted
    std::vector<uint64_t> receivers_pending;  // after planning: who still has to report
    std::vector<uint64_t> distributors;
};

struct StatusGroup {
    uint32_t group = 0;
    std::vector<uint64_t> ring;     // accepted peers in ring order
    std::vector<uint64_t> pending;  // registered, waiting for admission
    std::optional<uint64_t> revision;  // last synced shared-state revision
    std::optional<StatusSync> sync;
};

struct StatusOp {
    uint32_t group = 0;
    uint64_t tag = 0;
    uint64_t uid = 0;  // 0 until started
    bool started = false;
    std::string descriptor;  // count, dtype, op, quantization of the first peer to begin it
    double age_s = 0;
    // Not started: who has begun it / who it waits for to begin. Started: the participants / who
    // has not reported OP_END(ok) yet. Each cut at limits::kMaxStatusIdsPerOp; the totals are exact.
    std::vector<uint64_t> have;
    std::vector<uint64_t> waiting_for;
    uint64_t have_total = 0;
    uint64_t waiting_for_total = 0;
};

struct StatusDropped {
    uint64_t id = 0;
    uint32_t group = 0;
    std::string address;
    bool was_accepted = false;
    DropCause cause = DropCause::CLOSED;
    std::string reason;
    double seconds_ago = 0;
    double unix_time = 0;
};

struct StatusCounters {
    uint64_t peers_registered = 0;
    uint64_t peers_dropped = 0;
    uint64_t ops_started = 0;
    uint64_t ops_started_early = 0;  // OP_GO confirmed the uid every peer had claimed from its ticket
    uint64_t ops_completed = 0;
    uint64_t ops_failed = 0;        // started, then failed (a peer failed or left)
    uint64_t ops_rejected = 0;      // never started: descriptors disagreed, or a group of one
    uint64_t collective_tx_bytes = 0;  // summed over the OP_END reports of started ops' participants
    uint64_t collective_rx_bytes = 0;
    uint64_t syncs_planned = 0;
    uint64_t syncs_completed = 0;
    uint64_t syncs_failed = 0;
    uint64_t sync_ranges_reassigned = 0;  // SYNC_STALLED reports answered with other distributors
    uint64_t sync_bytes_planned = 0;  // bytes the plans told stale peers to receive
    uint64_t topology_optimizations = 0;  // optimize_topology() rounds started
    uint64_t topology_reorders = 0;       // ... of which changed some group's ring
};

// A measured host-to-host rate from the optimize_topology() cache.
struct StatusLink {
    std::string from;  // host addresses (no ports: the cache is per pair of hosts)
    std::string to;
    double bits_per_second = 0;
    double age_s = 0;
};

struct StatusLastFailure {
    uint32_t group = 0;
    uint64_t tag = 0;
    uint64_t uid = 0;
    std::string message;
    double seconds_ago = 0;
};

struct StatusSnapshot {
    uint16_t protocol_version = 0;
    uint16_t port = 0;
    double uptime_s = 0;
    uint64_t peer_timeout_ms = 0;
    uint64_t epoch = 0;
    bool topology_round_active = false;
    bool topology_optimizing = false;  // bandwidth probes of optimize_topology() under way
    uint64_t world_size = 0;  // accepted peers of every group
    uint64_t peer_count = 0;  // registered peers, pending included
    uint64_t connection_count = 0;
    std::vector<StatusPeer> peers;  // cut at limits::kMaxStatusPeersListed
    std::vector<StatusGroup> groups;
    std::vector<StatusOp> ops;  // cut at limits::kMaxStatusOpsListed
    uint64_t ops_in_flight_total = 0;
    StatusCounters counters;
    std::optional<StatusLastFailure> last_op_failure;
    std::vector<StatusDropped> dropped;  // newest first, at most limits::kMaxDroppedPeersRemembered
    std::vector<StatusLink> links;       // cut at limits::kMaxStatusLinksListed
};

std::string render_status_json(const StatusSnapshot& s);

// Appends `s` as a JSON string literal: quotes, backslashes and control characters escaped, '<',
// '>', '&', U+2028 and U+2029 escaped too (safe inside HTML), invalid UTF-8 replaced by U+FFFD.
void append_json_string(std::string& out, std::string_view s);

}  // namespace pccl::master
