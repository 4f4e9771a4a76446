// MasterState's part of optimize_topology(): probe rounds, the bandwidth cache, the ring choice and
// the placement of newcomers. The voting around it lives in master_state.cpp.
#include <algorithm>

#include "common/limits.hpp"
#include "common/log.hpp"
#include "master/master_state.hpp"

namespace pccl::master {

MasterState::HostKey MasterState::host_key(const wire::IpAddress& ip) {
    HostKey k{};
    k[0] = ip.family;
    std::copy(ip.bytes.begin(), ip.bytes.end(), k.begin() + 1);
    return k;
}

// Cached rates between the members' hosts; -1 where nothing (fresh) is known. A pair that failed
// during the current optimisation counts as 0: the ring must avoid it.
BandwidthMatrix MasterState::bandwidth_matrix(const std::vector<PeerId>& members) const {
    const auto now = Clock::now();
    BandwidthMatrix w(members.size(), std::vector<double>(members.size(), -1.0));
    for (size_t i = 0; i < members.size(); ++i)
        for (size_t j = 0; j < members.size(); ++j) {
            if (i == j) continue;
            if (optimize_.failed.contains({members[i], members[j]})) {
                w[i][j] = 0;
                continue;
            }
            auto it = bandwidth_.find({host_key(peers_.at(members[i]).ip), host_key(peers_.at(members[j]).ip)});
            if (it != bandwidth_.end() && now - it->second.at < limits::kBandwidthCacheTtl) w[i][j] = it->second.bits_per_second;
        }
    return w;
}

void MasterState::insert_newcomer(PeerId id) {
    const Peer& p = peers_.at(id);
    std::vector<PeerId> members = group_ring(p.group);
    if (members.size() < 2) return ring_.push_back(id);
    members.push_back(id);
    const BandwidthMatrix w = bandwidth_matrix(members);
    std::vector<size_t> order(members.size() - 1);
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    const size_t pos = best_insertion(w, order, members.size() - 1);
    if (pos >= order.size()) return ring_.push_back(id);
    // Just before that member in the global ring: between its group predecessor and it.
    ring_.insert(std::find(ring_.begin(), ring_.end(), members[pos]), id);
    PCCL_LOG(INFO, "master: placing ", describe(id), " before ", describe(members[pos]), " by measured bandwidth");
}

void MasterState::start_optimization(Clock::time_point now) {
    optimize_ = Optimization{};
    optimize_.active = true;
    std::erase_if(bandwidth_, [&](const auto& kv) { return now - kv.second.at >= limits::kBandwidthCacheTtl; });
    std::set<uint32_t> groups;
    for (PeerId id : ring_) groups.insert(peers_.at(id).group);
    // Groups have disjoint members, so their k-th rounds run together.
    for (uint32_t g : groups) {
        const std::vector<PeerId> members = group_ring(g);
        const BandwidthMatrix w = bandwidth_matrix(members);
        std::vector<std::vector<bool>> wanted(members.size(), std::vector<bool>(members.size(), false));
        for (size_t i = 0; i < members.size(); ++i)
            for (size_t j = 0; j < members.size(); ++j) wanted[i][j] = i != j && w[i][j] < 0;
        const auto rounds = probe_rounds(members.size(), wanted);
        if (optimize_.rounds.size() < rounds.size()) optimize_.rounds.resize(rounds.size());
        for (size_t r = 0; r < rounds.size(); ++r)
            for (auto [from, to] : rounds[r]) optimize_.rounds[r].emplace_back(members[from], members[to]);
    }
    size_t probes = 0;
    for (const auto& r : optimize_.rounds) probes += r.size();
    PCCL_LOG(INFO, "master: optimising the topology: ", probes, " directed pairs to measure in ",
             optimize_.rounds.size(), " rounds of ", probe_duration_.count(), " ms");
    ++counters_.topology_optimizations;
    run_probe_round();
}

void MasterState::run_probe_round() {
    while (optimize_.round < optimize_.rounds.size()) {
        for (auto [from, to] : optimize_.rounds[optimize_.round]) {
            if (!peers_.contains(from) || !peers_.contains(to)) continue;  // left since the plan was made
            const Peer& target = peers_.at(to);
            const uint64_t probe = next_probe_id_++;
            optimize_.outstanding[probe] = {from, to};
            send_to(from, wire::BandwidthProbe{probe, wire::PeerEntry{target.id, target.group, target.ip, target.p2p_port},
                                               static_cast<uint32_t>(probe_duration_.count())});
        }
        if (!optimize_.outstanding.empty()) return;
        ++optimize_.round;
    }
    finish_optimization();
}

void MasterState::on_bandwidth_report(Peer& p, const wire::BandwidthReport& m, Clock::time_point now) {
    if (!optimize_.active) return;  // a report for an optimisation that a drop already finished
    auto it = optimize_.outstanding.find(m.probe_id);
    if (it == optimize_.outstanding.end()) return;
    if (it->second.first != p.id || it->second.second != m.target)
        return violation(p, "reported a bandwidth probe it was not asked to run");
    const auto [from, to] = it->second;
    optimize_.outstanding.erase(it);
    if (m.ok) {
        bandwidth_[{host_key(p.ip), host_key(peers_.at(to).ip)}] = Measured{static_cast<double>(m.bits_per_second), now};
        PCCL_LOG(INFO, "master: ", describe(from), " -> ", describe(to), ": ", m.bits_per_second / 1e6, " Mbit/s");
    } else {
        optimize_.failed.insert({from, to});
        PCCL_LOG(WARN, "master: bandwidth probe ", describe(from), " -> ", describe(to), " failed: ", m.reason,
                 "; the ring will avoid that link");
    }
    if (!optimize_.outstanding.empty()) return;
    ++optimize_.round;
    run_probe_round();
}

void MasterState::optimization_peer_gone(PeerId id) {
    std::erase_if(optimize_.outstanding, [&](const auto& kv) { return kv.second.first == id || kv.second.second == id; });
    if (!optimize_.outstanding.empty()) return;
    ++optimize_.round;
    run_probe_round();
}

void MasterState::finish_optimization() {
    std::set<uint32_t> groups;
    for (PeerId id : ring_) groups.insert(peers_.at(id).group);
    bool changed = false;
    for (uint32_t g : groups) {
        const std::vector<PeerId> members = group_ring(g);
        if (members.size() < 3) continue;
        std::vector<size_t> current(members.size());
        for (size_t i = 0; i < current.size(); ++i) current[i] = i;
        const BandwidthMatrix w = bandwidth_matrix(members);
        const std::vector<size_t> best = best_ring(w, current);
        if (best == current) {
            PCCL_LOG(INFO, "master: group ", g, " keeps its ring (slowest link ", ring_bottleneck(w, current) / 1e6, " Mbit/s)");
            continue;
        }
        PCCL_LOG(INFO, "master: group ", g, " reorders its ring: slowest link ", ring_bottleneck(w, current) / 1e6, " -> ",
                 ring_bottleneck(w, best) / 1e6, " Mbit/s");
        // The group's slots in the global ring keep their places; only who sits in them changes.
        size_t next = 0;
        for (PeerId& slot : ring_)
            if (peers_.at(slot).group == g) slot = members[best[next++]];
        changed = true;
    }
    optimize_ = Optimization{};
    if (!changed) return complete_update_votes();
    ++counters_.topology_reorders;
    ++epoch_;
    round_active_ = true;
    broadcast_topology(/*needs_confirm=*/true);
    check_round_complete();
}

}  // namespace pccl::master
