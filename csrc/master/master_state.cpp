#include "master/master_state.hpp"

#include <algorithm>
#include <sstream>

#include "common/limits.hpp"
#include "common/log.hpp"
#include "common/types.hpp"
#include "net/address.hpp"

namespace pccl::master {

namespace {

template <class... Ts>
struct Overloaded : Ts... { using Ts::operator()...; };

std::string describe_op(const wire::OpBegin& d) {
    std::ostringstream s;
    s << "count=" << d.count << " dtype=" << to_string(static_cast<DataType>(d.dtype))
      << " op=" << to_string(static_cast<ReduceOp>(d.op)) << " quantization=" << int(d.quant_algorithm) << "/"
      << int(d.quant_dtype);
    return s.str();
}

}  // namespace

MasterState::MasterState(Outbox& outbox, std::chrono::milliseconds peer_timeout)
    : out_(outbox), peer_timeout_(peer_timeout) {}

// ---------------------------------------------------------------- connections

void MasterState::on_connect(ConnId conn, const wire::IpAddress& remote_ip, Clock::time_point now) {
    conns_[conn] = Conn{remote_ip, now, 0};
}

void MasterState::on_disconnect(ConnId conn, const std::string& reason) {
    auto it = conns_.find(conn);
    if (it == conns_.end()) return;
    const PeerId peer = it->second.peer;
    conns_.erase(it);
    if (peer != 0) drop_peer(peer, reason, /*tell_peer=*/false);
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
    handle_peer_message(pit->second, std::move(m));
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
    PCCL_LOG(INFO, "master: ", describe(p.id), " registered in group ", m.peer_group, ", pending admission");
    out_.send(conn, wire::Welcome{p.id, static_cast<uint32_t>(peer_timeout_.count())});
    maybe_admit();
}

void MasterState::handle_peer_message(Peer& p, wire::Message&& m) {
    std::visit(Overloaded{
                   [&](wire::Heartbeat&) {},
                   [&](wire::Goodbye&) { drop_peer(p.id, "left gracefully", /*tell_peer=*/false); },
                   [&](wire::VoteUpdateTopology&) { on_vote_update(p); },
                   [&](wire::P2PReady& x) { on_p2p_ready(p, x); },
                   [&](wire::VotePeersPending&) { on_vote_pending(p); },
                   [&](wire::OpBegin& x) { on_op_begin(p, x); },
                   [&](wire::OpEnd& x) { on_op_end(p, x); },
                   [&](wire::SyncVote& x) { on_sync_vote(p, std::move(x)); },
                   [&](wire::SyncResult& x) { on_sync_result(p, x); },
                   [&](auto& other) {
                       violation(p, std::string("sent a message only the master may send (") +
                                        wire::type_name(wire::type_of(wire::Message(other))) + ")");
                   },
               },
               m);
}

void MasterState::violation(Peer& p, const std::string& what) {
    PCCL_LOG(WARN, "master: protocol violation by ", describe(p.id), ": ", what, "; dropping it");
    drop_peer(p.id, "protocol violation: " + what, /*tell_peer=*/true);
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
        ring_.push_back(id);
        PCCL_LOG(INFO, "master: admitting ", describe(id));
    }
    pending_order_.clear();
    ++epoch_;
    round_active_ = true;
    broadcast_topology(/*needs_confirm=*/true);
    check_round_complete();
}

void MasterState::on_vote_update(Peer& p) {
    if (p.state != PeerState::ACCEPTED) return violation(p, "voted update_topology before being accepted");
    if (p.voted_update || round_active_) return violation(p, "voted update_topology twice");
    if (p.voted_pending) return violation(p, "voted update_topology while its are_peers_pending vote is open");
    if (p.ops_in_flight != 0) return violation(p, "voted update_topology with collective operations in flight");
    if (p.in_sync) return violation(p, "voted update_topology during a shared-state sync");
    p.voted_update = true;
    check_update_votes();
}

void MasterState::check_update_votes() {
    if (ring_.empty() || round_active_) return;
    for (PeerId id : ring_)
        if (!peers_.at(id).voted_update) return resolve_stalemate();
    if (pending_order_.empty()) {
        // Nobody to admit: the vote completes at once and the ring stays as it is.
        for (PeerId id : ring_) {
            peers_.at(id).voted_update = false;
            send_to(id, wire::TopologyComplete{epoch_});
        }
        return;
    }
    start_admission_round();
}

void MasterState::on_p2p_ready(Peer& p, const wire::P2PReady& m) {
    if (p.state != PeerState::ACCEPTED || !round_active_) return violation(p, "sent P2P_READY outside a topology round");
    if (m.epoch != epoch_) return;  // confirms a ring that has since changed; a newer TOPOLOGY is on its way
    if (m.unreachable_peer != 0) {
        if (peers_.contains(m.unreachable_peer) && m.unreachable_peer != p.id) {
            PCCL_LOG(WARN, "master: ", describe(p.id), " cannot reach ", describe(m.unreachable_peer), "; dropping the latter");
            drop_peer(m.unreachable_peer, "unreachable from " + describe(p.id), /*tell_peer=*/true);
        }
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
    for (PeerId id : ring_) {
        peers_.at(id).voted_update = false;
        send_to(id, wire::TopologyComplete{epoch_});
    }
    // Peers that registered during the round wait for the next update_topology, unless nobody is left.
    maybe_admit();
}

void MasterState::on_vote_pending(Peer& p) {
    if (p.state != PeerState::ACCEPTED) return violation(p, "asked are_peers_pending before being accepted");
    if (p.voted_pending) return violation(p, "voted are_peers_pending twice");
    if (p.voted_update || round_active_) return violation(p, "voted are_peers_pending during update_topology");
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
    if (ring_.empty() || round_active_) return;
    std::set<PeerId> waiting_in_op;
    for (const auto& [key, rec] : ops_)
        if (!rec.started && rec.poison.empty()) waiting_in_op.insert(rec.begun.begin(), rec.begun.end());
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

void MasterState::on_op_begin(Peer& p, const wire::OpBegin& m) {
    if (p.state != PeerState::ACCEPTED) return violation(p, "began an operation before being accepted");
    if (p.voted_update || round_active_) return violation(p, "began an operation during update_topology");
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
    } else if (rec.started || rec.begun.contains(p.id)) {
        return violation(p, "began tag " + std::to_string(m.tag) + " while it is still in flight");
    }
    rec.begun.insert(p.id);
    ++p.ops_in_flight;
    if (rec.poison.empty() && !(rec.desc == m)) {
        rec.poison = "all_reduce(tag=" + std::to_string(m.tag) + ") called with different arguments: " +
                     describe(rec.first_peer) + " has " + describe_op(rec.desc) + ", " + describe(p.id) + " has " +
                     describe_op(m) + "; every peer of the group must pass the same count, dtype, op and quantization";
        PCCL_LOG(WARN, "master: ", rec.poison);
    }
    if (!rec.poison.empty()) {
        for (PeerId id : rec.begun) answer_op(rec, key, id, static_cast<uint8_t>(Result::INVALID_ARGUMENT), rec.poison);
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

void MasterState::check_op_start(const OpKey& key) {
    auto it = ops_.find(key);
    if (it == ops_.end() || it->second.started) return;
    OpRecord& rec = it->second;
    const std::vector<PeerId> members = group_ring(key.group);
    for (PeerId id : members)
        if (!rec.begun.contains(id)) return;  // still waiting for someone
    if (!rec.poison.empty()) {  // everyone has been told; forget it
        ops_.erase(it);
        return;
    }
    if (members.size() < 2) {
        for (PeerId id : rec.begun)
            answer_op(rec, key, id, static_cast<uint8_t>(Result::TOO_FEW_PEERS),
                      "the peer group has only one peer; wait for others to join (update_topology) and retry");
        ops_.erase(it);
        return;
    }
    rec.started = true;
    rec.uid = next_op_uid_++;
    rec.participants = members;
    const uint32_t world = static_cast<uint32_t>(members.size());
    for (uint32_t r = 0; r < world; ++r) {
        wire::OpGo go;
        go.tag = key.tag;
        go.op_uid = rec.uid;
        go.rank = r;
        go.world = world;
        go.prev_peer = members[(r + world - 1) % world];
        go.next_peer = members[(r + 1) % world];
        send_to(members[r], go);
    }
    PCCL_LOG(DEBUG, "master: op tag=", key.tag, " uid=", rec.uid, " started in group ", key.group, " with ", world, " peers");
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
    // An END for an op that already failed (or for an old uid of a reused tag) is a normal race.
    if (it == ops_.end() || !it->second.started || it->second.uid != m.op_uid) return;
    OpRecord& rec = it->second;
    if (std::find(rec.participants.begin(), rec.participants.end(), p.id) == rec.participants.end()) return;
    if (!m.ok) {
        std::string why = describe(p.id) + " failed: " + m.reason;
        if (m.blamed_peer != 0) why += " (suspect " + describe(m.blamed_peer) + ")";
        PCCL_LOG(INFO, "master: op tag=", m.tag, " uid=", m.op_uid, " fails: ", why);
        finish_op(key, static_cast<uint8_t>(Result::RANK_CONNECTION_LOST), why);
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
    for (PeerId id : rec.participants) answer_op(rec, key, id, result, message);
    ops_.erase(it);
}

// ---------------------------------------------------------------- shared-state sync

void MasterState::on_sync_vote(Peer& p, wire::SyncVote&& m) {
    if (p.state != PeerState::ACCEPTED) return violation(p, "voted a sync before being accepted");
    if (p.voted_update || round_active_) return violation(p, "voted a sync during update_topology");
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
        for (const auto& v : voters) reject(v.peer, *d.group_failure);
        syncs_.erase(it);
        return;
    }
    for (const auto& [id, why] : d.rejected) {
        PCCL_LOG(WARN, "master: ", describe(id), ": ", why.message);
        reject(id, why);
    }
    round.distributors = d.distributors;
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

void MasterState::finish_sync(uint32_t group, Result result, const std::string& message) {
    auto it = syncs_.find(group);
    if (it == syncs_.end()) return;
    SyncRound round = std::move(it->second);
    syncs_.erase(it);
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
        std::vector<wire::SyncRange> unplaced;
        const auto moved = reassign_ranges(orphaned, round.distributors, round.pinned, unplaced);
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
        syncs_.erase(it);
        return;
    }
    if (round.receivers_pending.empty()) finish_sync(group, Result::SUCCESS, "");
}

// ---------------------------------------------------------------- dropping peers

void MasterState::drop_peer(PeerId id, const std::string& reason, bool tell_peer) {
    auto it = peers_.find(id);
    if (it == peers_.end()) return;
    const Peer dropped = it->second;
    const std::string who = describe(id);
    if (tell_peer) PCCL_LOG(WARN, "master: dropping ", who, ": ", reason);
    else PCCL_LOG(INFO, "master: ", who, " is gone: ", reason);
    if (tell_peer) {
        out_.send(dropped.conn, wire::Kicked{reason});
        out_.disconnect(dropped.conn, reason);
    }
    conns_.erase(dropped.conn);
    peers_.erase(it);
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
        drop_peer(id, "no message for more than " + std::to_string(peer_timeout_.count()) + " ms (hung or cut off)",
                  /*tell_peer=*/true);

    std::vector<ConnId> mute;
    for (const auto& [conn, c] : conns_)
        if (c.peer == 0 && now - c.connected_at > limits::kHelloDeadline) mute.push_back(conn);
    for (ConnId conn : mute) {
        conns_.erase(conn);
        out_.disconnect(conn, "no HELLO in time");
    }

    if (now - last_heartbeat_sent_ >= limits::kHeartbeatInterval) {
        last_heartbeat_sent_ = now;
        for (const auto& [id, p] : peers_) out_.send(p.conn, wire::MasterHeartbeat{});
    }
}

}  // namespace pccl::master
