// MasterState's part of optimize_topology(): probe rounds, the bandwidth cache, the ring choice and
// the placement of newcomers. The voting around it lives in master_state.cpp.
//
// Bandwidth belongs to the path between two hosts, so rates are measured and cached per ordered
// pair of host addresses: one probe per pair of hosts, whichever peers live there, and rounds in
// which a *host* sends to at most one host and receives from at most one (peers of several groups
// or processes on one host would otherwise share its uplink and each measure a fraction).
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

MasterState::HostPair MasterState::host_pair(PeerId from, PeerId to) const {
    return {host_key(peers_.at(from).ip), host_key(peers_.at(to).ip)};
}

// Rates between the members' hosts as of `as_of`; -1 where nothing fresh is known. A pair that
// failed during the current optimisation counts as 0: the ring must avoid it.
BandwidthMatrix MasterState::bandwidth_matrix(const std::vector<PeerId>& members, Clock::time_point as_of) const {
    BandwidthMatrix w(members.size(), std::vector<double>(members.size(), -1.0));
    for (size_t i = 0; i < members.size(); ++i)
        for (size_t j = 0; j < members.size(); ++j) {
            if (i == j) continue;
            const HostPair key = host_pair(members[i], members[j]);
            if (optimize_.failed.contains(key)) {
                w[i][j] = 0;
                continue;
            }
            auto it = bandwidth_.find(key);
            if (it != bandwidth_.end() && as_of - it->second.at < limits::kBandwidthCacheTtl) w[i][j] = it->second.bits_per_second;
        }
    return w;
}

void MasterState::insert_newcomer(PeerId id) {
    const Peer& p = peers_.at(id);
    std::vector<PeerId> members = group_ring(p.group);
    if (members.size() < 2) return ring_.push_back(id);
    members.push_back(id);
    const BandwidthMatrix w = bandwidth_matrix(members, Clock::now());
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
    optimize_.started = now;
    std::erase_if(bandwidth_, [&](const auto& kv) { return now - kv.second.at >= limits::kBandwidthCacheTtl; });

    // Which host pairs are unknown, each with one pair of peers to measure it. Groups of two have
    // one ring only, so they need nothing.
    std::map<HostPair, std::pair<PeerId, PeerId>> wanted;
    std::set<uint32_t> groups;
    for (PeerId id : ring_) groups.insert(peers_.at(id).group);
    for (uint32_t g : groups) {
        const std::vector<PeerId> members = group_ring(g);
        if (members.size() < 3) continue;
        for (PeerId a : members)
            for (PeerId b : members)
                if (a != b && !bandwidth_.contains(host_pair(a, b))) wanted.try_emplace(host_pair(a, b), a, b);
    }
    std::vector<HostKey> hosts;
    for (const auto& [pair, peers] : wanted) {
        hosts.push_back(pair.first);
        hosts.push_back(pair.second);
    }
    std::sort(hosts.begin(), hosts.end());
    hosts.erase(std::unique(hosts.begin(), hosts.end()), hosts.end());
    auto index_of = [&](const HostKey& h) { return static_cast<size_t>(std::lower_bound(hosts.begin(), hosts.end(), h) - hosts.begin()); };
    std::vector<std::vector<bool>> between(hosts.size(), std::vector<bool>(hosts.size(), false));
    std::vector<std::pair<PeerId, PeerId>> within;  // two peers on one host: the loopback path
    for (const auto& [pair, peers] : wanted) {
        if (pair.first == pair.second) within.push_back(peers);
        else between[index_of(pair.first)][index_of(pair.second)] = true;
    }
    for (const auto& round : probe_rounds(hosts.size(), between)) {
        std::vector<std::pair<PeerId, PeerId>> probes;
        for (auto [from, to] : round) probes.push_back(wanted.at({hosts[from], hosts[to]}));
        optimize_.rounds.push_back(std::move(probes));
    }
    if (!within.empty()) optimize_.rounds.push_back(std::move(within));  // each host once: independent

    PCCL_LOG(INFO, "master: optimising the topology: ", wanted.size(), " host pairs to measure in ",
             optimize_.rounds.size(), " rounds of ", probe_duration_.count(), " ms");
    ++counters_.topology_optimizations;
    run_probe_round(now);
}

void MasterState::run_probe_round(Clock::time_point now) {
    while (optimize_.round < optimize_.rounds.size()) {
        for (auto [from, to] : optimize_.rounds[optimize_.round]) {
            if (!peers_.contains(from) || !peers_.contains(to)) continue;  // left since the plan was made
            const Peer& target = peers_.at(to);
            const uint64_t probe = next_probe_id_++;
            optimize_.outstanding[probe] = {from, to};
            send_to(from, wire::BandwidthProbe{probe, wire::PeerEntry{target.id, target.group, target.ip, target.p2p_port},
                                               static_cast<uint32_t>(probe_duration_.count())});
        }
        if (!optimize_.outstanding.empty()) {
            optimize_.round_deadline = now + probe_duration_ + limits::kBandwidthProbeRoundSlack;
            return;
        }
        ++optimize_.round;
    }
    finish_optimization();
}

// A peer that stays connected but never reports (a bug, a wedged thread) must not hold every
// peer in optimize_topology() forever: its probes count as failed.
void MasterState::expire_probe_round(Clock::time_point now) {
    for (const auto& [probe, pair] : optimize_.outstanding) {
        PCCL_LOG(WARN, "master: no report for the bandwidth probe ", describe(pair.first), " -> ", describe(pair.second),
                 " in time; the ring will avoid that link");
        if (peers_.contains(pair.first) && peers_.contains(pair.second)) optimize_.failed.insert(host_pair(pair.first, pair.second));
    }
    optimize_.outstanding.clear();
    ++optimize_.round;
    run_probe_round(now);
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
        bandwidth_[host_pair(from, to)] = Measured{static_cast<double>(m.bits_per_second), now};
        PCCL_LOG(INFO, "master: ", describe(from), " -> ", describe(to), ": ", m.bits_per_second / 1e6, " Mbit/s");
    } else {
        optimize_.failed.insert(host_pair(from, to));
        PCCL_LOG(WARN, "master: bandwidth probe ", describe(from), " -> ", describe(to), " failed: ", m.reason,
                 "; the ring will avoid that link");
    }
    if (!optimize_.outstanding.empty()) return;
    ++optimize_.round;
    run_probe_round(now);
}

void MasterState::optimization_peer_gone(PeerId id, Clock::time_point now) {
    const size_t before = optimize_.outstanding.size();
    std::erase_if(optimize_.outstanding, [&](const auto& kv) { return kv.second.first == id || kv.second.second == id; });
    if (optimize_.outstanding.empty() && before != 0) {
        ++optimize_.round;
        run_probe_round(now);
    }
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
        const BandwidthMatrix w = bandwidth_matrix(members, optimize_.started);
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
