// The master's brain: registry of peers, ring order, epochs and the unanimous votes of every phase
// (admission, peers-pending query, collective operations). Pure logic, no sockets: it reacts to
// events and speaks through an Outbox, so the whole state machine runs on one thread and can be
// driven by tests. See ARCHITECTURE.md for the phases.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <array>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/limits.hpp"
#include "master/ring_solver.hpp"
#include "master/status.hpp"
#include "master/sync_election.hpp"
#include "wire/messages.hpp"

namespace pccl::master {

using ConnId = uint64_t;
using PeerId = uint64_t;
using Clock = std::chrono::steady_clock;

class Outbox {
public:
    virtual ~Outbox() = default;
    virtual void send(ConnId conn, const wire::Message& m) = 0;
    // Close the connection. The state has already forgotten it; no on_disconnect follows.
    virtual void disconnect(ConnId conn, const std::string& reason) = 0;
};

class MasterState {
public:
    // probe_duration: how long each directed pair streams during optimize_topology().
    MasterState(Outbox& outbox, std::chrono::milliseconds peer_timeout,
                std::chrono::milliseconds probe_duration = limits::kBandwidthProbeDuration);

    void on_connect(ConnId conn, const wire::IpAddress& remote_ip, Clock::time_point now);
    void on_message(ConnId conn, wire::Message&& m, Clock::time_point now);
    // The connection died (EOF, socket error, protocol error); `cause` is what the status page shows.
    void on_disconnect(ConnId conn, const std::string& reason, DropCause cause = DropCause::CLOSED);
    void on_tick(Clock::time_point now);

    size_t peer_count() const { return peers_.size(); }
    bool is_registered(ConnId conn) const {
        auto it = conns_.find(conn);
        return it != conns_.end() && it->second.peer != 0;
    }
    size_t connection_count() const { return conns_.size(); }

    // A copy of what the status page shows (bounded by limits::kMaxStatus*). Read-only, and like
    // every other member it must be called on the thread that owns the state.
    StatusSnapshot snapshot(Clock::time_point now) const;

private:
    enum class PeerState { PENDING, ACCEPTED };
    struct Peer {
        PeerId id = 0;
        ConnId conn = 0;
        uint32_t group = 0;
        wire::IpAddress ip;
        uint16_t p2p_port = 0;
        PeerState state = PeerState::PENDING;
        bool voted_update = false;
        bool wants_optimize = false;  // its update vote came from optimize_topology()
        bool voted_pending = false;
        uint64_t confirmed_epoch = 0;
        bool joining = false;  // admitted by the update (admission round, reorder) still running
        size_t ops_in_flight = 0;
        bool in_sync = false;  // voted in, or takes part in, a shared-state sync round
        Clock::time_point last_heard;
    };
    struct Conn {
        wire::IpAddress ip;
        Clock::time_point connected_at;
        PeerId peer = 0;  // 0 until HELLO
    };
    struct OpKey {
        uint32_t group;
        uint64_t tag;
        auto operator<=>(const OpKey&) const = default;
    };
    struct OpRecord {
        wire::OpBegin desc;
        PeerId first_peer = 0;
        std::set<PeerId> begun;
        bool started = false;
        uint64_t uid = 0;
        std::vector<PeerId> participants;  // ring order, once started
        std::set<PeerId> ended_ok;
        std::set<PeerId> answered;         // got their OP_RESULT already
        Clock::time_point created{};       // for the status page only
        // Ticket uids claimed in OP_BEGIN: the reservation is used only if every member claimed it.
        std::set<uint64_t> claims;
        // OP_ENDs of early starts that finished before OP_GO, applied if it confirms their uid.
        std::map<PeerId, wire::OpEnd> early_ends;
    };
    // The uid promised to the next op of a (group, tag) by OP_TICKET, valid for this ring only.
    struct Reservation {
        uint64_t uid = 0;
        std::vector<PeerId> participants;  // ring order when it was issued
    };

    struct SyncRound {
        std::map<PeerId, wire::SyncVote> votes;
        bool planned = false;
        uint64_t uid = 0;
        uint64_t revision = 0;
        std::set<PeerId> participants;
        std::set<PeerId> receivers_pending;
        std::vector<PeerId> distributors;
        std::map<PeerId, std::map<PeerId, std::vector<wire::SyncRange>>> assigned;  // distributor -> receiver
        std::map<uint32_t, uint64_t> pinned;
        std::map<PeerId, std::set<PeerId>> silent_towards;  // receiver -> distributors that sent it nothing
        std::map<PeerId, Clock::time_point> last_stall_report;  // receiver -> its last SYNC_STALLED
    };

    // Topology optimisation: rounds of bandwidth probes between peers of a group, then the widest
    // ring per group. Measured rates are cached per pair of hosts (addresses), so a peer that
    // rejoins from a known host is placed without measuring, and only unknown pairs are probed.
    using HostKey = std::array<uint8_t, 17>;
    struct Measured {
        double bits_per_second = 0;
        Clock::time_point at{};
    };
    using HostPair = std::pair<HostKey, HostKey>;
    struct Optimization {
        bool active = false;
        Clock::time_point started{};  // cached rates are judged fresh as of this moment
        std::vector<std::vector<std::pair<PeerId, PeerId>>> rounds;
        size_t round = 0;
        Clock::time_point round_deadline{};
        std::map<uint64_t, std::pair<PeerId, PeerId>> outstanding;  // probe id -> (sender, receiver)
        std::set<HostPair> failed;  // unreachable this time: avoided, not cached
    };
    static HostKey host_key(const wire::IpAddress& ip);
    void on_vote_optimize(Peer& p);
    bool may_vote_update(Peer& p, const char* call);
    void complete_update_votes();
    void start_optimization(Clock::time_point now);
    void run_probe_round(Clock::time_point now);
    void expire_probe_round(Clock::time_point now);
    void on_bandwidth_report(Peer& p, const wire::BandwidthReport& m, Clock::time_point now);
    void optimization_peer_gone(PeerId id, Clock::time_point now);
    void finish_optimization();
    BandwidthMatrix bandwidth_matrix(const std::vector<PeerId>& members, Clock::time_point as_of) const;
    HostPair host_pair(PeerId from, PeerId to) const;
    void insert_newcomer(PeerId id);

    void handle_hello(ConnId conn, Conn& c, const wire::Hello& m, Clock::time_point now);
    void handle_peer_message(Peer& p, wire::Message&& m, Clock::time_point now);
    void on_vote_update(Peer& p);
    void on_p2p_ready(Peer& p, const wire::P2PReady& m);
    void on_vote_pending(Peer& p);
    void on_op_begin(Peer& p, const wire::OpBegin& m, Clock::time_point now);
    void on_op_end(Peer& p, const wire::OpEnd& m);
    void on_sync_vote(Peer& p, wire::SyncVote&& m);
    void on_sync_result(Peer& p, const wire::SyncResult& m);
    void on_sync_stalled(Peer& p, const wire::SyncStalled& m);
    // The round's distributors that have not gone silent towards `receiver`.
    static std::vector<PeerId> usable_distributors(const SyncRound& round, PeerId receiver);
    void check_sync(uint32_t group);
    void finish_sync(uint32_t group, Result result, const std::string& message);
    void sync_peer_gone(uint32_t group, PeerId id);

    void drop_peer(PeerId id, DropCause cause, const std::string& reason, bool tell_peer);
    void violation(Peer& p, const std::string& what);
    void send_to(PeerId id, const wire::Message& m);

    std::vector<PeerId> accepted_ids() const;
    std::vector<PeerId> group_ring(uint32_t group) const;
    // The peer `id` connects to in its group's ring; 0 when it has none.
    PeerId next_in_group_ring(PeerId id) const;
    wire::Topology topology_message(bool needs_confirm) const;
    void broadcast_topology(bool needs_confirm);
    std::string describe(PeerId id) const;

    void maybe_admit();
    void start_admission_round();
    void check_update_votes();
    void check_round_complete();
    void check_pending_votes();
    void resolve_stalemate();
    void check_op_start(const OpKey& key);
    void check_all_ops(uint32_t group);
    void finish_op(const OpKey& key, uint8_t result, const std::string& message);
    void answer_op(OpRecord& rec, const OpKey& key, PeerId peer, uint8_t result, const std::string& message);
    void issue_tickets(const OpKey& key, const OpRecord& rec);

    Outbox& out_;
    std::chrono::milliseconds peer_timeout_;
    std::unordered_map<ConnId, Conn> conns_;
    std::unordered_map<PeerId, Peer> peers_;
    std::vector<PeerId> ring_;  // accepted peers in ring order (all groups interleaved)
    std::vector<PeerId> pending_order_;
    std::map<OpKey, OpRecord> ops_;
    std::map<OpKey, Reservation> reservations_;
    std::map<uint32_t, SyncRound> syncs_;            // by group
    std::map<uint32_t, uint64_t> group_revision_;    // last synced shared-state revision per group
    uint64_t next_sync_uid_ = 1;
    PeerId next_peer_id_ = 1;
    uint64_t next_op_uid_ = 1;
    uint64_t epoch_ = 0;
    bool round_active_ = false;
    std::chrono::milliseconds probe_duration_;
    Optimization optimize_;
    bool optimize_after_round_ = false;  // an optimize vote admitted newcomers first
    uint64_t next_probe_id_ = 1;
    std::map<HostPair, Measured> bandwidth_;
    Clock::time_point last_heartbeat_sent_{};

    // For the status page only: nothing below feeds back into a decision.
    struct DroppedRecord {
        PeerId id = 0;
        uint32_t group = 0;
        std::string address;
        bool was_accepted = false;
        DropCause cause = DropCause::CLOSED;
        std::string reason;
        Clock::time_point at{};
        double unix_time = 0;
    };
    struct OpFailure {
        uint32_t group = 0;
        uint64_t tag = 0;
        uint64_t uid = 0;
        std::string message;
        Clock::time_point at{};
    };
    Clock::time_point created_at_ = Clock::now();
    StatusCounters counters_;
    std::deque<DroppedRecord> dropped_;  // newest at the front, at most kMaxDroppedPeersRemembered
    std::optional<OpFailure> last_op_failure_;
    // When each peer last had a suspect dropped for going silent on it (see on_silent_suspect).
    std::map<PeerId, Clock::time_point> silence_reported_;
    void on_silent_suspect(PeerId reporter, PeerId suspect, const std::string& why);
};

}  // namespace pccl::master
