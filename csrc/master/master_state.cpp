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
