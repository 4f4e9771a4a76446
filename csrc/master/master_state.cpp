#include "master/master_state.hpp"

#include <algorithm>
#include <map>
#include <set>
#include <tuple>

#include "common/limits.hpp"
#include "common/log.hpp"
#include "common/text.hpp"
#include "common/types.hpp"
#include "net/address.hpp"

namespace pccl::master {

namespace {

template <class... Ts>
struct Overloaded : Ts... { using Ts::operator()...; };

std::string describe_op(const wire::OpBegin& d) {
    return text::concat("count=", d.count, " dtype=", to_string(static_cast<DataType>(d.dtype)),
                        " op=", to_string(static_cast<ReduceOp>(d.op)), " quantization=", int(d.quant_algorithm), "/",
                        int(d.quant_dtype));
}

}  // namespace

MasterState::MasterState(Outbox& outbox, std::chrono::milliseconds peer_timeout, std::chrono::milliseconds probe_duration)
    : out_(outbox), peer_timeout_(peer_timeout), probe_duration_(probe_duration) {}

// ---------------------------------------------------------------- connections

void MasterState::on_connect(ConnId conn, const wire::IpAddress& remote_ip, Clock::time_point now) {
    conns_[conn] = Conn{remote_ip, now, 0};
}

void MasterState::on_disconnect(ConnId conn, const std::string& reason, DropCause cause) {
    auto it = conns_.find(conn);
    if (it == conns_.end()) return;
    const PeerId peer = it->second.peer;
    conns_.erase(it);
    if (peer != 0) drop_peer(peer, cause, reason, /*tell_peer=*/false);
}

void MasterState::on_message(ConnId conn, wire::Message&& m, Clock::time_point now) {
    auto cit = conns_.find(conn);
    if (cit == conns_.end()) return;
    Conn& c = cit->second;
    if (c.peer == 0) {
        if (auto* hello = std::get_if<wire::Hello>(&m)) {
            handle_hello(conn, c, *hello, now);
        } else {
            PCCL_LOG(WARN, "master: connection sent ", wire::type_name(wire::type_of(m)), " before HELLO; closing it");
            conns_.erase(cit);
            out_.disconnect(conn, "expected HELLO");
        }
        return;
    }
    auto pit = peers_.find(c.peer);
    if (pit == peers_.end()) return;
    pit->second.last_heard = now;
    handle_peer_message(pit->second, std::move(m), now);
}

void MasterState::handle_hello(ConnId conn, Conn& c, const wire::Hello& m, Clock::time_point now) {
    Peer p;
    p.id = next_peer_id_++;
    p.conn = conn;
    p.group = m.peer_group;
    p.ip = c.ip;
    p.p2p_port = m.p2p_port;
    p.last_heard = now;
    c.peer = p.id;
    peers_.emplace(p.id, p);
    pending_order_.push_back(p.id);
    ++counters_.peers_registered;
    PCCL_LOG(INFO, "master: ", describe(p.id), " registered in group ", m.peer_group, ", pending admission");
    out_.send(conn, wire::Welcome{p.id, static_cast<uint32_t>(peer_timeout_.count())});
    maybe_admit();
}

void MasterState::handle_peer_message(Peer& p, wire::Message&& m, Clock::time_point now) {
    std::visit(Overloaded{
                   [&](wire::Heartbeat&) {},
                   [&](wire::Goodbye&) { drop_peer(p.id, DropCause::LEFT, "left gracefully", /*tell_peer=*/false); },
                   [&](wire::VoteUpdateTopology&) { on_vote_update(p); },
                   [&](wire::VoteOptimizeTopology&) { on_vote_optimize(p); },
                   [&](wire::BandwidthReport& x) { on_bandwidth_report(p, x, now); },
                   [&](wire::P2PReady& x) { on_p2p_ready(p, x); },
                   [&](wire::VotePeersPending&) { on_vote_pending(p); },
                   [&](wire::OpBegin& x) { on_op_begin(p, x, now); },
                   [&](wire::OpEnd& x) { on_op_end(p, x); },
                   [&](wire::SyncVote& x) { on_sync_vote(p, std::move(x)); },
                   [&](wire::SyncResult& x) { on_sync_result(p, x); },
                   [&](wire::SyncStalled& x) { on_sync_stalled(p, x); },
                   [&](auto& other) {
                       violation(p, std::string("sent a message only the master may send (") +
                                        wire::type_name(wire::type_of(wire::Message(other))) + ")");
                   },
               },
               m);
}

void MasterState::violation(Peer& p, const std::string& what) {
    PCCL_LOG(WARN, "master: protocol violation by ", describe(p.id), ": ", what, "; dropping it");
    drop_peer(p.id, DropCause::PROTOCOL_VIOLATION, "protocol violation: " + what, /*tell_peer=*/true);
}

void MasterState::send_to(PeerId id, const wire::Message& m) {
    auto it = peers_.find(id);
    if (it != peers_.end()) out_.send(it->second.conn, m);
}

std::string MasterState::describe(PeerId id) const {
    auto it = peers_.find(id);
    if (it == peers_.end()) return "peer " + std::to_string(id);
    return "peer " + std::to_string(id) + " (" + net::Endpoint::from(it->second.ip, it->second.p2p_port).to_string() + ")";
}

// ---------------------------------------------------------------- membership

std::vector<PeerId> MasterState::accepted_ids() const { return ring_; }

PeerId MasterState::next_in_group_ring(PeerId id) const {
    auto p = peers_.find(id);
    if (p == peers_.end()) return 0;
    const std::vector<PeerId> members = group_ring(p->second.group);
    const auto at = std::find(members.begin(), members.end(), id);
    if (at == members.end() || members.size() < 2) return 0;
    return members[(static_cast<size_t>(at - members.begin()) + 1) % members.size()];
}

std::vector<PeerId> MasterState::group_ring(uint32_t group) const {
    std::vector<PeerId> out;
    for (PeerId id : ring_)
        if (peers_.at(id).group == group) out.push_back(id);
    return out;
}

wire::Topology MasterState::topology_message(bool needs_confirm) const {
    wire::Topology t;
    t.epoch = epoch_;
    t.needs_confirm = needs_confirm ? 1 : 0;
    t.peers.reserve(ring_.size());
    for (PeerId id : ring_) {
        const Peer& p = peers_.at(id);
        t.peers.push_back(wire::PeerEntry{p.id, p.group, p.ip, p.p2p_port});
    }
    return t;
}

void MasterState::broadcast_topology(bool needs_confirm) {
    const wire::Message m = topology_message(needs_confirm);
    for (PeerId id : ring_) send_to(id, m);
}

void MasterState::maybe_admit() {
    if (ring_.empty() && !pending_order_.empty() && !round_active_) start_admission_round();
}

void MasterState::start_admission_round() {
    for (PeerId id : pending_order_) {
        Peer& p = peers_.at(id);
        p.state = PeerState::ACCEPTED;
        p.joining = true;
        insert_newcomer(id);
        PCCL_LOG(INFO, "master: admitting ", describe(id));
    }
    pending_order_.clear();
    ++epoch_;
    round_active_ = true;
    broadcast_topology(/*needs_confirm=*/true);
    check_round_complete();
}

bool MasterState::may_vote_update(Peer& p, const char* call) {
    const std::string c = call;
    if (p.state != PeerState::ACCEPTED) return violation(p, "voted " + c + " before being accepted"), false;
    if (p.voted_update || round_active_ || optimize_.active) return violation(p, "voted " + c + " twice"), false;
    if (p.voted_pending) return violation(p, "voted " + c + " while its are_peers_pending vote is open"), false;
    if (p.ops_in_flight != 0) return violation(p, "voted " + c + " with collective operations in flight"), false;
    if (p.in_sync) return violation(p, "voted " + c + " during a shared-state sync"), false;
    return true;
}

void MasterState::on_vote_update(Peer& p) {
    if (!may_vote_update(p, "update_topology")) return;
    p.voted_update = true;
    p.wants_optimize = false;
    check_update_votes();
}

// optimize_topology() is update_topology() plus a bandwidth-aware reorder: it admits whoever is
// pending like an update vote does, and the ring is optimised only when every voter asked for it
// (a peer calling update_topology meanwhile gets its update, and the optimisers a plain one).
void MasterState::on_vote_optimize(Peer& p) {
    if (!may_vote_update(p, "optimize_topology")) return;
    p.voted_update = true;
    p.wants_optimize = true;
    check_update_votes();
}

void MasterState::complete_update_votes() {
    for (PeerId id : ring_) {
        Peer& p = peers_.at(id);
        p.joining = false;  // the update, an optimisation's reorder round included, is over
        p.voted_update = false;
        p.wants_optimize = false;
        send_to(id, wire::TopologyComplete{epoch_});
    }
}

void MasterState::check_update_votes() {
    if (ring_.empty() || round_active_ || optimize_.active) return;
    bool optimize = true;
    for (PeerId id : ring_) {
        const Peer& p = peers_.at(id);
        if (!p.voted_update) return resolve_stalemate();
        optimize &= p.wants_optimize;
    }
    if (pending_order_.empty()) {
        // Nobody to admit: a plain update completes at once and the ring stays as it is.
        if (optimize) return start_optimization(Clock::now());
        return complete_update_votes();
    }
    optimize_after_round_ = optimize;
    start_admission_round();
}

void MasterState::on_p2p_ready(Peer& p, const wire::P2PReady& m) {
    if (p.state != PeerState::ACCEPTED || !round_active_) return violation(p, "sent P2P_READY outside a topology round");
    if (m.epoch != epoch_) return;  // confirms a ring that has since changed; a newer TOPOLOGY is on its way
    if (m.unreachable_peer != 0) {
        auto target = peers_.find(m.unreachable_peer);
        if (target == peers_.end()) return;  // gone already
        // A peer connects only to its next in its group's ring; naming anyone else is a violation.
        if (next_in_group_ring(p.id) != m.unreachable_peer)
            return violation(p, "reported a peer unreachable that is not its next in the ring");
        // A newcomer that cannot reach a member of the running ring (its own firewall, a path it
        // lacks) goes, not the member: otherwise every join attempt of a badly connected peer
        // would evict a healthy one. Otherwise the unreachable peer goes (it may be dead).
        const bool reporter_is_new = p.joining;
        const bool target_is_new = target->second.joining;
        if (reporter_is_new && !target_is_new) {
            PCCL_LOG(WARN, "master: newcomer ", describe(p.id), " cannot reach ", describe(m.unreachable_peer),
                     "; dropping the newcomer");
            drop_peer(p.id, DropCause::UNREACHABLE,
                      "cannot reach ring member " + describe(m.unreachable_peer) + "; check that its p2p port is reachable from here",
                      /*tell_peer=*/true);
            return;
        }
        PCCL_LOG(WARN, "master: ", describe(p.id), " cannot reach ", describe(m.unreachable_peer), "; dropping the latter");
        drop_peer(m.unreachable_peer, DropCause::UNREACHABLE,
                  "unreachable from " + describe(p.id) + "; check that this peer's p2p port accepts connections from there",
                  /*tell_peer=*/true);
        return;
    }
    p.confirmed_epoch = m.epoch;
    check_round_complete();
}

void MasterState::check_round_complete() {
    if (!round_active_) return;
    for (PeerId id : ring_)
        if (peers_.at(id).confirmed_epoch != epoch_) return;
    round_active_ = false;
    PCCL_LOG(INFO, "master: topology epoch ", epoch_, " complete with ", ring_.size(), " peers");
    if (optimize_after_round_) {
        // The newcomers are connected; now measure what is unknown and choose the ring.
        optimize_after_round_ = false;
        return start_optimization(Clock::now());
    }
    complete_update_votes();
    // Peers that registered during the round wait for the next update_topology, unless nobody is left.
    maybe_admit();
}

void MasterState::on_vote_pending(Peer& p) {
    if (p.state != PeerState::ACCEPTED) return violation(p, "asked are_peers_pending before being accepted");
    if (p.voted_pending) return violation(p, "voted are_peers_pending twice");
    if (p.voted_update || round_active_ || optimize_.active) return violation(p, "voted are_peers_pending during update_topology");
    p.voted_pending = true;
    check_pending_votes();
}

void MasterState::check_pending_votes() {
    if (ring_.empty()) return;
    for (PeerId id : ring_)
        if (!peers_.at(id).voted_pending) return resolve_stalemate();
    const uint8_t pending = pending_order_.empty() ? 0 : 1;
    for (PeerId id : ring_) {
        peers_.at(id).voted_pending = false;
        send_to(id, wire::PeersPendingAnswer{pending});
    }
}

// Membership calls and collective ops of one step must line up across peers, but a peer that was
// just admitted (or a loop written another way) can arrive at a different call: it votes
// are_peers_pending while the others already wait in an all-reduce that needs it. When every
// accepted peer is blocked and the votes cannot complete, the peers blocked in operations have moved
// past the membership point of this step, so the voters are let through: are_peers_pending answers
// "no" and update_topology completes without change. Peers asked "pending?" while others voted for
// an update are answered "yes", which makes them vote for it too.
void MasterState::resolve_stalemate() {
    if (ring_.empty() || round_active_ || optimize_.active) return;
    std::set<PeerId> waiting_in_op;
    for (const auto& [key, rec] : ops_)
        if (!rec.started) waiting_in_op.insert(rec.begun.begin(), rec.begun.end());
    for (const auto& [group, round] : syncs_)
        if (!round.planned)
            for (const auto& [id, vote] : round.votes) waiting_in_op.insert(id);
    bool any_pending_vote = false, any_update_vote = false, any_only_in_op = false;
    for (PeerId id : ring_) {
        const Peer& p = peers_.at(id);
        const bool in_op = waiting_in_op.contains(id);
        if (!p.voted_pending && !p.voted_update && !in_op) return;  // someone is still working: wait
        any_pending_vote |= p.voted_pending;
        any_update_vote |= p.voted_update;
        any_only_in_op |= in_op && !p.voted_pending && !p.voted_update;
    }
    if (any_only_in_op) {
        PCCL_LOG(INFO, "master: membership votes meet peers waiting in an operation; letting the voters through");
        for (PeerId id : ring_) {
            Peer& p = peers_.at(id);
            if (p.voted_pending) {
                p.voted_pending = false;
                send_to(id, wire::PeersPendingAnswer{0});
            }
            if (p.voted_update) {
                p.voted_update = false;
                p.wants_optimize = false;
                send_to(id, wire::TopologyComplete{epoch_});
            }
        }
    } else if (any_pending_vote && any_update_vote) {
        for (PeerId id : ring_) {
            Peer& p = peers_.at(id);
            if (!p.voted_pending) continue;
            p.voted_pending = false;
            send_to(id, wire::PeersPendingAnswer{1});
        }
    }
}

// ---------------------------------------------------------------- collective operations

void MasterState::on_op_begin(Peer& p, const wire::OpBegin& m, Clock::time_point now) {
    if (p.state != PeerState::ACCEPTED) return violation(p, "began an operation before being accepted");
    if (p.voted_update || round_active_ || optimize_.active)
        return violation(p, "began an operation during update_topology");
    if (p.in_sync) return violation(p, "began an operation during a shared-state sync");
    if (!is_valid(static_cast<DataType>(m.dtype)) || !is_valid(static_cast<ReduceOp>(m.op)) ||
        !is_valid(static_cast<QuantizationAlgorithm>(m.quant_algorithm)) ||
        (m.quant_algorithm != 0 && !is_valid(static_cast<DataType>(m.quant_dtype))))
        return violation(p, "began an operation with an invalid descriptor");
    if (p.ops_in_flight >= limits::kMaxOpsInFlightPerPeer)
        return violation(p, "began more than " + std::to_string(limits::kMaxOpsInFlightPerPeer) + " operations at once");

    const OpKey key{p.group, m.tag};
    auto [it, inserted] = ops_.try_emplace(key);
    OpRecord& rec = it->second;
    if (inserted) {
        rec.desc = m;
        rec.first_peer = p.id;
        rec.created = now;
    } else if (rec.started || rec.begun.contains(p.id)) {
        return violation(p, "began tag " + std::to_string(m.tag) + " while it is still in flight");
    }
    rec.begun.insert(p.id);
    rec.claims.insert(m.claimed_uid);
    ++p.ops_in_flight;
    if (!rec.desc.same_call(m)) {
        // Everyone who began this instance is told, and the instance is forgotten at once: a peer
        // that has not begun the tag yet joins a fresh instance (most likely the others' retry)
        // instead of holding this one open, where a quick retry would look like a duplicate.
        const std::string why = "all_reduce(tag=" + std::to_string(m.tag) + ") called with different arguments: " +
                                describe(rec.first_peer) + " has " + describe_op(rec.desc) + ", " + describe(p.id) +
                                " has " + describe_op(m) +
                                "; every peer of the group must pass the same count, dtype, op and quantization";
        PCCL_LOG(WARN, "master: ", why);
        ++counters_.ops_rejected;
        for (PeerId id : rec.begun) answer_op(rec, key, id, static_cast<uint8_t>(Result::INVALID_ARGUMENT), why);
        ops_.erase(it);
        reservations_.erase(key);  // its tickets were spent on this instance
        resolve_stalemate();
        return;
    }
    check_op_start(key);
    resolve_stalemate();
}

void MasterState::answer_op(OpRecord& rec, const OpKey& key, PeerId peer, uint8_t result, const std::string& message) {
    if (!rec.answered.insert(peer).second) return;
    auto it = peers_.find(peer);
    if (it == peers_.end()) return;
    if (it->second.ops_in_flight > 0) --it->second.ops_in_flight;
    out_.send(it->second.conn, wire::OpResult{key.tag, rec.uid, result, message});
}

// The OP_GO of the member at `rank` of a ring (also what an OP_TICKET promises it).
static wire::OpGo go_for(uint64_t tag, uint64_t uid, const std::vector<PeerId>& ring, uint32_t rank) {
    const auto world = static_cast<uint32_t>(ring.size());
    return wire::OpGo{tag, uid, rank, world, ring[(rank + world - 1) % world], ring[(rank + 1) % world]};
}

void MasterState::check_op_start(const OpKey& key) {
    auto it = ops_.find(key);
    if (it == ops_.end() || it->second.started) return;
    OpRecord& rec = it->second;
    const std::vector<PeerId> members = group_ring(key.group);
    for (PeerId id : members)
        if (!rec.begun.contains(id)) return;  // still waiting for someone
    if (members.size() < 2) {
        ++counters_.ops_rejected;
        for (PeerId id : rec.begun)
            answer_op(rec, key, id, static_cast<uint8_t>(Result::TOO_FEW_PEERS),
                      "the peer group has only one peer; wait for others to join (update_topology) and retry");
        ops_.erase(it);
        reservations_.erase(key);
        return;
    }
    rec.started = true;
    // Peers that claimed the reservation may already be running the ring under its uid with the
    // ring they were told. Confirm it only if all of them did and that ring still stands; any other
    // case gets a fresh uid, and whoever started early undoes it (its frames are discarded).
    auto reserved = reservations_.find(key);
    const bool confirm_early_start = reserved != reservations_.end() && rec.claims.size() == 1 &&
                                     *rec.claims.begin() == reserved->second.uid &&
                                     reserved->second.participants == members;
    rec.uid = confirm_early_start ? reserved->second.uid : next_op_uid_++;
    reservations_.erase(key);
    ++counters_.ops_started;
    if (confirm_early_start) ++counters_.ops_started_early;
    rec.participants = members;
    for (uint32_t r = 0; r < members.size(); ++r) send_to(members[r], go_for(key.tag, rec.uid, members, r));
    PCCL_LOG(DEBUG, "master: op tag=", key.tag, " uid=", rec.uid, " started in group ", key.group, " with ", members.size(), " peers");
    std::map<PeerId, wire::OpEnd> early_ends = std::move(rec.early_ends);
    rec.early_ends.clear();
    if (!confirm_early_start) return;  // those peers undo and end again under the fresh uid
    for (auto& [id, end] : early_ends) {
        auto peer = peers_.find(id);
        if (peer == peers_.end() || !ops_.contains(key)) continue;  // on_op_end may finish the op
        on_op_end(peer->second, end);
    }
}

void MasterState::issue_tickets(const OpKey& key, const OpRecord& rec) {
    if (rec.participants != group_ring(key.group)) return;  // the ring is changing: no promise to make
    const uint64_t uid = next_op_uid_++;
    reservations_[key] = Reservation{uid, rec.participants};
    // Each peer holds its own group's tickets, so the bound is per group: past it, both sides drop
    // the group's oldest (a claim the master no longer knows would only cost its early start).
    auto group_begin = reservations_.lower_bound(OpKey{key.group, 0});
    size_t in_group = 0;
    auto oldest = reservations_.end();
    for (auto r = group_begin; r != reservations_.end() && r->first.group == key.group; ++r) {
        ++in_group;
        if (oldest == reservations_.end() || r->second.uid < oldest->second.uid) oldest = r;
    }
    if (in_group > limits::kMaxReservedOps) {
        reservations_.erase(oldest);
    }
    for (uint32_t r = 0; r < rec.participants.size(); ++r)
        send_to(rec.participants[r], wire::OpTicket{go_for(key.tag, uid, rec.participants, r), epoch_});
}

void MasterState::check_all_ops(uint32_t group) {
    std::vector<OpKey> keys;
    for (const auto& [key, rec] : ops_)
        if (key.group == group) keys.push_back(key);
    for (const auto& key : keys) check_op_start(key);
}

void MasterState::on_op_end(Peer& p, const wire::OpEnd& m) {
    const OpKey key{p.group, m.tag};
    auto it = ops_.find(key);
    if (it != ops_.end() && !it->second.started && it->second.begun.contains(p.id)) {
        // An early start under its ticket ended before OP_GO: it counts once OP_GO confirms that uid
        // (so a small op costs one round trip to the master, not two). A failure is never overwritten.
        auto reserved = reservations_.find(key);
        if (reserved == reservations_.end() || reserved->second.uid != m.op_uid) return;
        // Unconfirmed ops have no deadlines, so "went silent" cannot come from one: never act on it.
        wire::OpEnd kept = m;
        kept.suspect_silent = 0;
        auto [end, fresh] = it->second.early_ends.try_emplace(p.id, kept);
        if (!fresh && end->second.ok) end->second = kept;
        return;
    }
    // An END for an op that already failed (or for an old uid of a reused tag) is a normal race.
    if (it == ops_.end() || !it->second.started || it->second.uid != m.op_uid) return;
    OpRecord& rec = it->second;
    if (std::find(rec.participants.begin(), rec.participants.end(), p.id) == rec.participants.end()) return;
    if (!rec.ended_ok.contains(p.id)) {  // its first report for this op: a repeated one adds nothing
        counters_.collective_tx_bytes += m.tx_bytes;
        counters_.collective_rx_bytes += m.rx_bytes;
    }
    if (!m.ok) {
        std::string why = describe(p.id) + " failed: " + m.reason;
        if (m.blamed_peer != 0) why += " (suspect " + describe(m.blamed_peer) + ")";
        PCCL_LOG(INFO, "master: op tag=", m.tag, " uid=", m.op_uid, " fails: ", why);
        const bool suspect_in_op = std::find(rec.participants.begin(), rec.participants.end(), m.blamed_peer) !=
                                   rec.participants.end();
        finish_op(key, static_cast<uint8_t>(Result::RANK_CONNECTION_LOST), why);
        if (m.suspect_silent && suspect_in_op && m.blamed_peer != p.id) on_silent_suspect(p.id, m.blamed_peer, m.reason);
        return;
    }
    rec.ended_ok.insert(p.id);
    for (PeerId id : rec.participants)
        if (!rec.ended_ok.contains(id)) return;
    finish_op(key, static_cast<uint8_t>(Result::SUCCESS), "");
}

void MasterState::finish_op(const OpKey& key, uint8_t result, const std::string& message) {
    auto it = ops_.find(key);
    if (it == ops_.end()) return;
    OpRecord& rec = it->second;
    if (result == static_cast<uint8_t>(Result::SUCCESS)) {
        ++counters_.ops_completed;
        issue_tickets(key, rec);  // before the results, so a peer's next call already holds its ticket
    } else {
        ++counters_.ops_failed;
        last_op_failure_ = OpFailure{key.group, key.tag, rec.uid, message, Clock::now()};
    }
    for (PeerId id : rec.participants) answer_op(rec, key, id, result, message);
    ops_.erase(it);
}

// ---------------------------------------------------------------- shared-state sync

void MasterState::on_sync_vote(Peer& p, wire::SyncVote&& m) {
    if (p.state != PeerState::ACCEPTED) return violation(p, "voted a sync before being accepted");
    if (p.voted_update || round_active_ || optimize_.active)
        return violation(p, "voted a sync during update_topology");
    if (p.ops_in_flight != 0) return violation(p, "voted a sync with collective operations in flight");
    if (p.in_sync) return violation(p, "voted a sync twice");
    if (m.strategy >= kSyncStrategyCount) return violation(p, "voted a sync with an unknown strategy");
    for (const auto& e : m.entries)
        if (!is_valid(static_cast<DataType>(e.dtype))) return violation(p, "voted a sync with an unknown dtype");
    SyncRound& round = syncs_[p.group];
    if (round.planned) return violation(p, "voted a sync while the group's sync is being carried out");
    p.in_sync = true;
    round.votes[p.id] = std::move(m);
    check_sync(p.group);
    resolve_stalemate();
}

void MasterState::check_sync(uint32_t group) {
    auto it = syncs_.find(group);
    if (it == syncs_.end() || it->second.planned) return;
    SyncRound& round = it->second;
    const std::vector<PeerId> members = group_ring(group);
    if (members.empty()) {
        syncs_.erase(it);
        return;
    }
    for (PeerId id : members)
        if (!round.votes.contains(id)) return;

    std::vector<SyncVoter> voters;  // std::map iterates by peer id: the order the election needs
    for (auto& [id, vote] : round.votes) voters.push_back({id, vote});
    std::optional<uint64_t> last;
    if (auto g = group_revision_.find(group); g != group_revision_.end()) last = g->second;
    const SyncDecision d = elect_sync(voters, last);
    round.planned = true;
    round.uid = next_sync_uid_++;
    round.revision = d.revision;
    round.pinned = d.pinned;
    auto reject = [&](PeerId id, const SyncRejection& why) {
        peers_.at(id).in_sync = false;
        send_to(id, wire::SyncPlan{round.uid, static_cast<uint8_t>(why.code), why.message, d.revision, {}, {}, {}});
    };
    if (d.group_failure) {
        PCCL_LOG(WARN, "master: shared-state sync of group ", group, " fails: ", d.group_failure->message);
        ++counters_.syncs_failed;
        for (const auto& v : voters) reject(v.peer, *d.group_failure);
        syncs_.erase(it);
        return;
    }
    for (const auto& [id, why] : d.rejected) {
        PCCL_LOG(WARN, "master: ", describe(id), ": ", why.message);
        reject(id, why);
    }
    round.distributors = d.distributors;
    ++counters_.syncs_planned;
    for (const auto& [receiver, ranges] : d.receive)
        for (const auto& r : ranges) counters_.sync_bytes_planned += r.length;
    for (const auto& v : voters) {
        if (d.rejected.contains(v.peer)) continue;
        round.participants.insert(v.peer);
        wire::SyncPlan plan;
        plan.sync_uid = round.uid;
        plan.revision = d.revision;
        if (auto e = d.expect.find(v.peer); e != d.expect.end()) {
            plan.expect = e->second;
            plan.receive = d.receive.at(v.peer);
            round.receivers_pending.insert(v.peer);
        }
        if (auto s = d.send.find(v.peer); s != d.send.end()) {
            plan.send = s->second;
            for (const auto& r : s->second) round.assigned[v.peer][r.peer].push_back(r);
        }
        send_to(v.peer, plan);
    }
    PCCL_LOG(INFO, "master: shared-state sync ", round.uid, " of group ", group, " at revision ", d.revision, ": ",
             round.receivers_pending.size(), " peer(s) receive from ", round.distributors.size(), " distributor(s)");
    if (round.receivers_pending.empty()) finish_sync(group, Result::SUCCESS, "");
}

void MasterState::on_sync_result(Peer& p, const wire::SyncResult& m) {
    auto it = syncs_.find(p.group);
    if (it == syncs_.end() || !it->second.planned || it->second.uid != m.sync_uid) return;  // a late report
    SyncRound& round = it->second;
    if (!round.participants.contains(p.id)) return;
    if (!m.ok) return finish_sync(p.group, Result::RANK_CONNECTION_LOST, describe(p.id) + ": " + m.reason);
    round.receivers_pending.erase(p.id);
    if (round.receivers_pending.empty()) finish_sync(p.group, Result::SUCCESS, "");
}

// A receiver got nothing for the deadline. Its distributors may be alive yet unable to reach it (a
// dead link between two peers that both reach the master), so failing the sync would fail every
// retry the same way: the ranges it still misses go to distributors that have not gone silent
// towards it, in this same sync. Ranges that arrive twice are harmless (every distributor holds
// the same bytes). Only when no other distributor may send them does the sync fail.
void MasterState::on_sync_stalled(Peer& p, const wire::SyncStalled& m) {
    auto it = syncs_.find(p.group);
    if (it == syncs_.end() || !it->second.planned || it->second.uid != m.sync_uid) return;  // a late report
    SyncRound& round = it->second;
    if (!round.receivers_pending.contains(p.id)) return;
    if (m.missing.empty()) return violation(p, "reported a stalled shared-state sync without the ranges it misses");
    // An honest receiver reports once per deadline: more often is ignored, so reports cost the
    // master a bounded amount of work whatever a peer sends.
    const auto now = Clock::now();
    if (auto last = round.last_stall_report.find(p.id);
        last != round.last_stall_report.end() && now - last->second < peer_timeout_ / 2)
        return;
    round.last_stall_report[p.id] = now;
    // Who was asked for each range of this receiver (one pass; the report is checked against it,
    // so a report costs the master no more than the plan did).
    std::map<std::tuple<uint32_t, uint64_t, uint64_t>, std::vector<PeerId>> asked;
    for (const auto& [distributor, per_receiver] : round.assigned)
        if (auto owed = per_receiver.find(p.id); owed != per_receiver.end())
            for (const auto& a : owed->second) asked[{a.entry, a.offset, a.length}].push_back(distributor);
    if (m.missing.size() > asked.size()) return violation(p, "reported more stalled shared-state ranges than it was planned");
    // Whoever was asked for a missing range is silent towards this receiver: nothing came for the deadline.
    std::set<PeerId>& silent = round.silent_towards[p.id];
    const size_t silent_before = silent.size();
    std::set<std::tuple<uint32_t, uint64_t, uint64_t>> seen;
    std::vector<wire::SyncRange> missing;
    for (const auto& r : m.missing) {
        const auto key = std::make_tuple(r.entry, r.offset, r.length);
        auto who = asked.find(key);
        if (who == asked.end()) return violation(p, "reported a stalled shared-state range it was never sent");
        silent.insert(who->second.begin(), who->second.end());
        if (seen.insert(key).second) missing.push_back({r.entry, r.offset, r.length, p.id});
    }
    // Every range goes only to distributors not yet silent towards this receiver, so an honest
    // report always names a new one; one that does not would only make them resend.
    if (silent.size() == silent_before) return;
    std::vector<wire::SyncRange> unplaced;
    const auto moved = reassign_ranges({{p.id, missing}}, usable_distributors(round, p.id), round.pinned, unplaced);
    if (!unplaced.empty())
        return finish_sync(p.group, Result::RANK_CONNECTION_LOST,
                           describe(p.id) + " received nothing for the deadline and no other peer may send what it misses");
    for (const auto& [distributor, ranges] : moved) {
        for (const auto& r : ranges) round.assigned[distributor][r.peer].push_back(r);
        send_to(distributor, wire::SyncSendMore{round.uid, ranges});
    }
    ++counters_.sync_ranges_reassigned;
    PCCL_LOG(INFO, "master: sync ", round.uid, ": ", describe(p.id), " received nothing for the deadline; ", missing.size(),
             " range(s) go to ", moved.size(), " other distributor(s)");
}

std::vector<PeerId> MasterState::usable_distributors(const SyncRound& round, PeerId receiver) {
    auto silent = round.silent_towards.find(receiver);
    std::vector<PeerId> out;
    for (PeerId d : round.distributors)
        if (silent == round.silent_towards.end() || !silent->second.contains(d)) out.push_back(d);
    return out;
}

void MasterState::finish_sync(uint32_t group, Result result, const std::string& message) {
    auto it = syncs_.find(group);
    if (it == syncs_.end()) return;
    SyncRound round = std::move(it->second);
    syncs_.erase(it);
    if (result == Result::SUCCESS) ++counters_.syncs_completed;
    else ++counters_.syncs_failed;
    if (result == Result::SUCCESS) group_revision_[group] = round.revision;
    else PCCL_LOG(INFO, "master: shared-state sync ", round.uid, " of group ", group, " failed: ", message);
    for (PeerId id : round.participants) {
        auto p = peers_.find(id);
        if (p == peers_.end()) continue;
        p->second.in_sync = false;
        out_.send(p->second.conn, wire::SyncDone{round.uid, static_cast<uint8_t>(result), message, round.revision});
    }
}

void MasterState::sync_peer_gone(uint32_t group, PeerId id) {
    auto it = syncs_.find(group);
    if (it == syncs_.end()) return;
    SyncRound& round = it->second;
    if (!round.planned) {
        round.votes.erase(id);
        check_sync(group);
        return;
    }
    if (!round.participants.erase(id)) return;
    round.receivers_pending.erase(id);
    for (auto& [distributor, per_receiver] : round.assigned) per_receiver.erase(id);
    if (auto d = std::find(round.distributors.begin(), round.distributors.end(), id); d != round.distributors.end()) {
        // A distributor died mid-transfer: whatever it owed goes to the other distributors. Ranges
        // that arrive twice are harmless: every distributor holds the same bytes.
        round.distributors.erase(d);
        std::map<PeerId, std::vector<wire::SyncRange>> orphaned;
        if (auto a = round.assigned.find(id); a != round.assigned.end()) {
            for (auto& [receiver, ranges] : a->second)
                if (round.receivers_pending.contains(receiver)) orphaned[receiver] = ranges;
            round.assigned.erase(a);
        }
        // Per receiver: never to a distributor already known to be silent towards it.
        std::vector<wire::SyncRange> unplaced;
        std::map<PeerId, std::vector<wire::SyncRange>> moved;
        for (const auto& [receiver, ranges] : orphaned)
            for (auto& [distributor, more] :
                 reassign_ranges({{receiver, ranges}}, usable_distributors(round, receiver), round.pinned, unplaced))
                moved[distributor].insert(moved[distributor].end(), more.begin(), more.end());
        if (!unplaced.empty())
            return finish_sync(group, Result::RANK_CONNECTION_LOST,
                               describe(id) + " left mid-transfer and no other peer holds what it was sending");
        for (const auto& [distributor, ranges] : moved) {
            for (const auto& r : ranges) round.assigned[distributor][r.peer].push_back(r);
            send_to(distributor, wire::SyncSendMore{round.uid, ranges});
        }
        if (!moved.empty())
            PCCL_LOG(INFO, "master: sync ", round.uid, ": ", describe(id), " left mid-transfer; its ranges go to ",
                     moved.size(), " other distributor(s)");
    }
    if (round.participants.empty()) {
        ++counters_.syncs_failed;  // everyone who took part is gone
        syncs_.erase(it);
        return;
    }
    if (round.receivers_pending.empty()) finish_sync(group, Result::SUCCESS, "");
}

// ---------------------------------------------------------------- dropping peers

// A ring neighbour whose link with the reporter went silent while it still heartbeats (a dead link
// between two peers that both reach the master) would fail every op forever: drop it, and the
// survivors' ring closes without that link. Only the first report of an op counts (the root, not
// the cascade behind it).
// A reporter whose second such report comes within kRepeatedSilenceWindow is the likelier culprit
// (its own inbound path is dead): it is dropped instead, so one broken peer costs at most one
// innocent peer a rejoin.
void MasterState::on_silent_suspect(PeerId reporter, PeerId suspect, const std::string& why) {
    if (!peers_.contains(reporter) || !peers_.contains(suspect)) return;
    const auto now = Clock::now();
    auto last = silence_reported_.find(reporter);
    if (last != silence_reported_.end() && now - last->second < limits::kRepeatedSilenceWindow) {
        drop_peer(reporter, DropCause::SILENT_TO_NEIGHBOUR,
                  "two ring neighbours in a row went silent towards it (the last: " + why +
                      "); its own network is the likely cause",
                  /*tell_peer=*/true);
        return;
    }
    silence_reported_[reporter] = now;
    drop_peer(suspect, DropCause::SILENT_TO_NEIGHBOUR,
              "its ring link with " + describe(reporter) + " went silent (" + why + ") while it still talked to the master",
              /*tell_peer=*/true);
}

void MasterState::drop_peer(PeerId id, DropCause cause, const std::string& reason, bool tell_peer) {
    auto it = peers_.find(id);
    if (it == peers_.end()) return;
    const Peer dropped = it->second;
    const std::string who = describe(id);
    ++counters_.peers_dropped;
    dropped_.push_front(DroppedRecord{
        id, dropped.group, net::Endpoint::from(dropped.ip, dropped.p2p_port).to_string(),
        dropped.state == PeerState::ACCEPTED, cause, reason.substr(0, limits::kMaxWireStringBytes), Clock::now(),
        std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count()});
    if (dropped_.size() > limits::kMaxDroppedPeersRemembered) dropped_.pop_back();
    if (tell_peer) PCCL_LOG(WARN, "master: dropping ", who, ": ", reason);
    else PCCL_LOG(INFO, "master: ", who, " is gone: ", reason);
    if (tell_peer) {
        out_.send(dropped.conn, wire::Kicked{reason});
        out_.disconnect(dropped.conn, reason);
    }
    conns_.erase(dropped.conn);
    peers_.erase(it);
    silence_reported_.erase(id);
    std::erase(pending_order_, id);

    if (dropped.state == PeerState::ACCEPTED) {
        std::erase(ring_, id);
        ++epoch_;
        // Survivors learn the new ring before they learn which ops failed, so a failed call can
        // already read the shrunken world size.
        broadcast_topology(/*needs_confirm=*/round_active_);
        std::vector<OpKey> failed;
        for (auto& [key, rec] : ops_) {
            if (key.group != dropped.group) continue;
            if (rec.started) {
                if (std::find(rec.participants.begin(), rec.participants.end(), id) != rec.participants.end())
                    failed.push_back(key);
            } else {
                rec.begun.erase(id);
            }
        }
        for (const auto& key : failed) {
            auto& rec = ops_.at(key);
            std::erase(rec.participants, id);
            finish_op(key, static_cast<uint8_t>(Result::RANK_CONNECTION_LOST), who + " left the ring: " + reason);
        }
        sync_peer_gone(dropped.group, id);
        if (optimize_.active) optimization_peer_gone(id, Clock::now());
        if (group_ring(dropped.group).empty()) group_revision_.erase(dropped.group);  // the next peers start afresh
        // Remove empty not-yet-started records, then see whether the remaining votes now agree.
        std::erase_if(ops_, [&](const auto& kv) { return !kv.second.started && kv.second.begun.empty(); });
        check_all_ops(dropped.group);
        check_round_complete();
        check_update_votes();
        check_pending_votes();
    }
    maybe_admit();
}

// ---------------------------------------------------------------- time

void MasterState::on_tick(Clock::time_point now) {
    std::vector<PeerId> silent;
    for (const auto& [id, p] : peers_)
        if (now - p.last_heard > peer_timeout_) silent.push_back(id);
    for (PeerId id : silent)
        drop_peer(id, DropCause::TIMEOUT,
                  "no message for more than " + std::to_string(peer_timeout_.count()) + " ms (hung or cut off)",
                  /*tell_peer=*/true);

    std::vector<ConnId> mute;
    for (const auto& [conn, c] : conns_)
        if (c.peer == 0 && now - c.connected_at > limits::kHelloDeadline) mute.push_back(conn);
    for (ConnId conn : mute) {
        conns_.erase(conn);
        out_.disconnect(conn, "no HELLO in time");
    }

    if (optimize_.active && now > optimize_.round_deadline) expire_probe_round(now);

    if (now - last_heartbeat_sent_ >= limits::kHeartbeatInterval) {
        last_heartbeat_sent_ = now;
        for (const auto& [id, p] : peers_) out_.send(p.conn, wire::MasterHeartbeat{});
    }
}

// ---------------------------------------------------------------- status page

StatusSnapshot MasterState::snapshot(Clock::time_point now) const {
    const auto seconds_since = [now](Clock::time_point t) { return std::chrono::duration<double>(now - t).count(); };
    StatusSnapshot s;
    s.protocol_version = limits::kProtocolVersion;
    s.uptime_s = seconds_since(created_at_);
    s.peer_timeout_ms = static_cast<uint64_t>(peer_timeout_.count());
    s.epoch = epoch_;
    s.topology_round_active = round_active_;
    s.topology_optimizing = optimize_.active;
    for (const auto& [key, m] : bandwidth_) {
        if (s.links.size() >= limits::kMaxStatusLinksListed) break;
        if (now - m.at >= limits::kBandwidthCacheTtl) continue;  // expired: the next optimisation re-measures it
        auto host = [](const HostKey& k) {
            wire::IpAddress ip;
            ip.family = k[0];
            std::copy(k.begin() + 1, k.end(), ip.bytes.begin());
            return net::Endpoint::from(ip, 0).host_string();
        };
        s.links.push_back(StatusLink{host(key.first), host(key.second), m.bits_per_second, seconds_since(m.at)});
    }
    s.world_size = ring_.size();
    s.peer_count = peers_.size();
    s.connection_count = conns_.size();
    s.counters = counters_;

    // Groups: every group with a peer, a remembered revision or a sync round; rings in ring order.
    std::map<uint32_t, StatusGroup> groups;
    std::unordered_map<PeerId, int64_t> ring_index;
    for (PeerId id : ring_) {
        const uint32_t g = peers_.at(id).group;
        auto& group = groups[g];
        group.group = g;
        ring_index[id] = static_cast<int64_t>(group.ring.size());
        group.ring.push_back(id);
    }
    for (PeerId id : pending_order_) {
        const uint32_t g = peers_.at(id).group;
        groups[g].group = g;
        groups[g].pending.push_back(id);
    }
    for (const auto& [g, revision] : group_revision_) {
        groups[g].group = g;
        groups[g].revision = revision;
    }
    for (const auto& [g, round] : syncs_) {
        groups[g].group = g;
        StatusSync sync;
        sync.uid = round.uid;
        sync.planned = round.planned;
        sync.revision = round.revision;
        if (!round.planned)
            for (const auto& [id, vote] : round.votes) sync.voted.push_back(id);
        sync.receivers_pending.assign(round.receivers_pending.begin(), round.receivers_pending.end());
        sync.distributors = round.distributors;
        groups[g].sync = std::move(sync);
    }

    // Peers by id, cut at the bound.
    std::vector<PeerId> ids;
    ids.reserve(peers_.size());
    for (const auto& [id, p] : peers_) ids.push_back(id);
    std::sort(ids.begin(), ids.end());
    if (ids.size() > limits::kMaxStatusPeersListed) ids.resize(limits::kMaxStatusPeersListed);
    s.peers.reserve(ids.size());
    for (PeerId id : ids) {
        const Peer& p = peers_.at(id);
        StatusPeer e;
        e.id = id;
        e.group = p.group;
        e.address = net::Endpoint::from(p.ip, p.p2p_port).to_string();
        e.accepted = p.state == PeerState::ACCEPTED;
        if (auto r = ring_index.find(id); r != ring_index.end()) e.ring_index = r->second;
        e.voted_update = p.voted_update;
        e.voted_pending = p.voted_pending;
        e.in_sync = p.in_sync;
        e.ops_in_flight = p.ops_in_flight;
        e.confirmed_epoch = p.confirmed_epoch;
        e.seconds_since_heard = seconds_since(p.last_heard);
        s.peers.push_back(std::move(e));
    }

    // Operations in flight, in (group, tag) order, cut at the bound.
    s.ops_in_flight_total = ops_.size();
    const auto push_cut = [](std::vector<uint64_t>& v, uint64_t id) {
        if (v.size() < limits::kMaxStatusIdsPerOp) v.push_back(id);
    };
    for (const auto& [key, rec] : ops_) {
        if (s.ops.size() >= limits::kMaxStatusOpsListed) break;
        StatusOp o;
        o.group = key.group;
        o.tag = key.tag;
        o.uid = rec.uid;
        o.started = rec.started;
        o.descriptor = describe_op(rec.desc);
        o.age_s = seconds_since(rec.created);
        if (rec.started) {
            for (PeerId id : rec.participants) {
                push_cut(o.have, id);
                ++o.have_total;
                if (!rec.ended_ok.contains(id)) {
                    push_cut(o.waiting_for, id);
                    ++o.waiting_for_total;
                }
            }
        } else {
            for (PeerId id : rec.begun) {
                push_cut(o.have, id);
                ++o.have_total;
            }
            if (auto g = groups.find(key.group); g != groups.end())
                for (PeerId id : g->second.ring)
                    if (!rec.begun.contains(id)) {
                        push_cut(o.waiting_for, id);
                        ++o.waiting_for_total;
                    }
        }
        s.ops.push_back(std::move(o));
    }

    for (auto& [g, group] : groups) s.groups.push_back(std::move(group));

    if (last_op_failure_) {
        const auto& f = *last_op_failure_;
        s.last_op_failure = StatusLastFailure{f.group, f.tag, f.uid, f.message, seconds_since(f.at)};
    }
    s.dropped.reserve(dropped_.size());
    for (const auto& d : dropped_)
        s.dropped.push_back(StatusDropped{d.id, d.group, d.address, d.was_accepted, d.cause, d.reason,
                                          seconds_since(d.at), d.unix_time});
    return s;
}

}  // namespace pccl::master
