// Choosing a ring order from measured point-to-point bandwidths. A ring all-reduce moves the same
// bytes over every edge at once, so its throughput is that of the slowest directed edge
// (i -> next(i)): the best ring maximises the minimum edge, a bottleneck travelling-salesman tour.
// Pure functions: no sockets, no clocks, so tests drive them directly.
#pragma once

#include <cstddef>
#include <utility>
#include <vector>

namespace pccl::master {

// bandwidth[i][j]: bits/s from member i to member j (i != j); a negative value means "not measured".
using BandwidthMatrix = std::vector<std::vector<double>>;

// The slowest edge of `order` read as a ring; unmeasured edges are ignored (infinity when all are).
double ring_bottleneck(const BandwidthMatrix& bandwidth, const std::vector<size_t>& order);

// A ring over all members maximising ring_bottleneck: exact up to limits::kMaxExactRingPeers
// members, a relocation heuristic beyond. `current` (a permutation of 0..n-1) is kept unless the
// best ring beats it by more than limits::kRingImprovementMargin, so noise does not reshuffle it.
std::vector<size_t> best_ring(const BandwidthMatrix& bandwidth, const std::vector<size_t>& current);

// Where a newcomer goes: the index in `order` before which inserting `newcomer` gives the widest
// ring, among the positions where both of its new links are measured (other edges: measured ones
// only); order.size() (the end) when there is no such position.
size_t best_insertion(const BandwidthMatrix& bandwidth, const std::vector<size_t>& order, size_t newcomer);

// Rounds of directed probes (sender, receiver) covering every pair `wanted`: in each round a
// member sends to at most one other and receives from at most one, so the links a round measures
// do not share a sender's uplink or a receiver's downlink and can run at once.
std::vector<std::vector<std::pair<size_t, size_t>>> probe_rounds(size_t n, const std::vector<std::vector<bool>>& wanted);

}  // namespace pccl::master
