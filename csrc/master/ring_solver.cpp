#include "master/ring_solver.hpp"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>

#include "common/limits.hpp"

namespace pccl::master {

namespace {

constexpr double kInfinity = std::numeric_limits<double>::infinity();

// Unmeasured edges count as unusable when choosing a ring: a pair whose probe failed is one the
// ring must avoid, and the master measures every pair before it solves.
BandwidthMatrix known_or_zero(const BandwidthMatrix& bandwidth) {
    BandwidthMatrix w = bandwidth;
    for (auto& row : w)
        for (double& x : row) x = std::max(x, 0.0);
    return w;
}

// Lexicographic quality of a ring: its slowest edge first, then fewer edges that slow.
struct RingScore {
    double bottleneck = kInfinity;
    size_t at_bottleneck = 0;
    bool better_than(const RingScore& o) const {
        if (bottleneck != o.bottleneck) return bottleneck > o.bottleneck;
        return at_bottleneck < o.at_bottleneck;
    }
};

RingScore score(const BandwidthMatrix& w, const std::vector<size_t>& order) {
    RingScore s;
    for (size_t i = 0; i < order.size(); ++i) {
        const double e = w[order[i]][order[(i + 1) % order.size()]];
        if (e < s.bottleneck) s = {e, 1};
        else if (e == s.bottleneck) ++s.at_bottleneck;
    }
    return s;
}

// A Hamiltonian cycle using only edges of at least `threshold`, or empty. reach[mask] holds the
// members a path from member 0 through exactly `mask` can end at.
std::vector<size_t> cycle_at_least(const BandwidthMatrix& w, double threshold) {
    const size_t n = w.size();
    const uint32_t full = (1u << n) - 1;
    std::vector<uint32_t> reach(size_t(1) << n, 0);
    reach[1] = 1;
    for (uint32_t mask = 1; mask <= full; mask += 2) {  // paths start at member 0: odd masks only
        const uint32_t ends = reach[mask];
        if (ends == 0) continue;
        for (size_t v = 0; v < n; ++v) {
            if (!(ends >> v & 1)) continue;
            for (size_t u = 1; u < n; ++u)
                if (!(mask >> u & 1) && w[v][u] >= threshold) reach[mask | (1u << u)] |= 1u << u;
        }
    }
    size_t last = n;
    for (size_t v = 1; v < n && last == n; ++v)
        if ((reach[full] >> v & 1) && w[v][0] >= threshold) last = v;
    if (last == n) return {};
    std::vector<size_t> reversed{last};
    uint32_t mask = full;
    size_t v = last;
    while (v != 0) {
        const uint32_t before = mask & ~(1u << v);
        size_t prev = n;
        for (size_t u = 0; u < n && prev == n; ++u)
            if ((before >> u & 1) && (reach[before] >> u & 1) && w[u][v] >= threshold) prev = u;
        reversed.push_back(prev);
        mask = before;
        v = prev;
    }
    return {reversed.rbegin(), reversed.rend()};
}

std::vector<size_t> exact_ring(const BandwidthMatrix& w) {
    std::vector<double> values;
    for (size_t i = 0; i < w.size(); ++i)
        for (size_t j = 0; j < w.size(); ++j)
            if (i != j) values.push_back(w[i][j]);
    std::sort(values.begin(), values.end());
    values.erase(std::unique(values.begin(), values.end()), values.end());
    // The smallest value always admits a cycle (every edge qualifies); find the largest that does.
    size_t lo = 0, hi = values.size() - 1;
    std::vector<size_t> best = cycle_at_least(w, values[0]);
    while (lo < hi) {
        const size_t mid = (lo + hi + 1) / 2;
        auto cycle = cycle_at_least(w, values[mid]);
        if (cycle.empty()) {
            hi = mid - 1;
        } else {
            lo = mid;
            best = std::move(cycle);
        }
    }
    return best;
}

// Beyond exact sizes: start from the better of the current ring and a greedy widest-next-hop tour,
// then keep moving an end of the slowest edge to wherever the ring gets wider.
std::vector<size_t> heuristic_ring(const BandwidthMatrix& w, const std::vector<size_t>& current) {
    const size_t n = w.size();
    std::vector<size_t> greedy{current[0]};
    std::vector<bool> used(n, false);
    used[current[0]] = true;
    while (greedy.size() < n) {
        const size_t from = greedy.back();
        size_t pick = n;
        for (size_t u = 0; u < n; ++u)
            if (!used[u] && (pick == n || w[from][u] > w[from][pick])) pick = u;
        used[pick] = true;
        greedy.push_back(pick);
    }
    std::vector<size_t> order = score(w, greedy).better_than(score(w, current)) ? greedy : current;
    for (size_t pass = 0; pass < limits::kMaxRingHeuristicPasses; ++pass) {
        const RingScore now = score(w, order);
        size_t slow = 0;
        for (size_t i = 0; i < n; ++i)
            if (w[order[i]][order[(i + 1) % n]] == now.bottleneck) { slow = i; break; }
        std::vector<size_t> best_order;
        RingScore best = now;
        for (size_t end : {slow, (slow + 1) % n}) {
            std::vector<size_t> without = order;
            const size_t member = without[end];
            without.erase(without.begin() + static_cast<std::ptrdiff_t>(end));
            for (size_t pos = 0; pos <= without.size(); ++pos) {
                std::vector<size_t> candidate = without;
                candidate.insert(candidate.begin() + static_cast<std::ptrdiff_t>(pos), member);
                const RingScore s = score(w, candidate);
                if (s.better_than(best)) {
                    best = s;
                    best_order = std::move(candidate);
                }
            }
        }
        if (best_order.empty()) break;
        order = std::move(best_order);
    }
    return order;
}

}  // namespace

double ring_bottleneck(const BandwidthMatrix& bandwidth, const std::vector<size_t>& order) {
    double slowest = kInfinity;
    for (size_t i = 0; i < order.size() && order.size() > 1; ++i) {
        const double e = bandwidth[order[i]][order[(i + 1) % order.size()]];
        if (e >= 0) slowest = std::min(slowest, e);
    }
    return slowest;
}

std::vector<size_t> best_ring(const BandwidthMatrix& bandwidth, const std::vector<size_t>& current) {
    const size_t n = bandwidth.size();
    if (n <= 2) return current;  // one ring only (both directions of a pair are used either way)
    const BandwidthMatrix w = known_or_zero(bandwidth);
    std::vector<size_t> best = n <= limits::kMaxExactRingPeers ? exact_ring(w) : heuristic_ring(w, current);
    const double now = score(w, current).bottleneck;
    if (score(w, best).bottleneck <= now * (1.0 + limits::kRingImprovementMargin)) return current;
    // Start where the current ring starts, so the order reads as a change of the old one.
    std::rotate(best.begin(), std::find(best.begin(), best.end(), current[0]), best.end());
    return best;
}

size_t best_insertion(const BandwidthMatrix& bandwidth, const std::vector<size_t>& order, size_t newcomer) {
    const size_t m = order.size();
    if (m < 2) return m;
    size_t best_pos = m;
    double best = -1;
    for (size_t pos = 1; pos <= m; ++pos) {  // pos m: between the last and the first member
        // Only where both of the newcomer's new links are measured: an unmeasured link would look
        // free and win, and so would the removal of a measured slow one it replaces.
        const size_t prev = order[pos - 1], next = order[pos % m];
        if (bandwidth[prev][newcomer] < 0 || bandwidth[newcomer][next] < 0) continue;
        std::vector<size_t> candidate = order;
        candidate.insert(candidate.begin() + static_cast<std::ptrdiff_t>(pos), newcomer);
        const double b = ring_bottleneck(bandwidth, candidate);
        if (b >= best) {  // ties go to the later position: appending disturbs the least
            best = b;
            best_pos = pos;
        }
    }
    return best_pos;
}

std::vector<std::vector<std::pair<size_t, size_t>>> probe_rounds(size_t n, const std::vector<std::vector<bool>>& wanted) {
    std::vector<std::vector<std::pair<size_t, size_t>>> rounds;
    for (size_t shift = 1; shift < n; ++shift) {
        std::vector<std::pair<size_t, size_t>> round;
        for (size_t i = 0; i < n; ++i)
            if (wanted[i][(i + shift) % n]) round.emplace_back(i, (i + shift) % n);
        if (!round.empty()) rounds.push_back(std::move(round));
    }
    return rounds;
}

}  // namespace pccl::master
