#include "wan/link_model.hpp"

#include <algorithm>
#include <cstring>

namespace pccl::wan {

namespace {

constexpr double kNanosPerSecond = 1e9;
constexpr double kBitsPerByte = 8.0;
constexpr size_t kIpv4MinHeader = 20;
constexpr uint8_t kIpv4Version = 4;
constexpr uint8_t kProtoTcp = 6;
constexpr uint8_t kProtoUdp = 17;
constexpr uint8_t kFragmentOffsetHighMask = 0x1f;
constexpr uint8_t kMoreFragmentsBit = 0x20;
constexpr uint64_t kGoldenGamma = 0x9e3779b97f4a7c15ull;
constexpr int kDoubleMantissaBits = 53;

uint64_t splitmix64(uint64_t& state) {
    uint64_t z = (state += kGoldenGamma);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

uint32_t read_be32(const uint8_t* p) { return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3]; }
uint16_t read_be16(const uint8_t* p) { return uint16_t(p[0] << 8 | p[1]); }

Nanos serialisation_ns(uint32_t bytes, uint64_t rate_bps) {
    if (rate_bps == 0) return 0;
    return static_cast<Nanos>(bytes * kBitsPerByte * kNanosPerSecond / static_cast<double>(rate_bps));
}

// Flows are told apart by the 5-tuple; fragments past the first carry no ports, so every fragment
// of a protocol shares one flow (pccl never fragments: TCP segments fit the MTU).
FlowKey flow_key(const Packet& p) {
    FlowKey key;
    key.src = read_be32(p.data + 12);
    key.dst = read_be32(p.data + 16);
    key.protocol = p.data[9];
    size_t header = size_t(p.data[0] & 0x0f) * 4;
    bool fragment = (p.data[6] & (kFragmentOffsetHighMask | kMoreFragmentsBit)) != 0 || p.data[7] != 0;
    if ((key.protocol == kProtoTcp || key.protocol == kProtoUdp) && !fragment && p.len >= header + 4) {
        key.src_port = read_be16(p.data + header);
        key.dst_port = read_be16(p.data + header + 2);
    }
    return key;
}

}  // namespace

uint8_t* PacketPool::allocate(bool small) {
    auto& free = small ? free_small_ : free_large_;
    if (!free.empty()) {
        uint8_t* buffer = free.back();
        free.pop_back();
        return buffer;
    }
    owned_.push_back(std::make_unique<uint8_t[]>(small ? kSmallBytes : large_bytes_));
    return owned_.back().get();
}

std::optional<Packet> PacketPool::take() {
    if (outstanding_ >= kMaxPackets) return std::nullopt;
    ++outstanding_;
    Packet packet;
    packet.data = allocate(false);
    return packet;
}

void PacketPool::shrink(Packet& packet) {
    if (packet.small || packet.len > kSmallBytes) return;
    uint8_t* small = allocate(true);
    std::memcpy(small, packet.data, packet.len);
    free_large_.push_back(packet.data);
    packet.data = small;
    packet.small = true;
}

void PacketPool::give_back(Packet& packet) {
    (packet.small ? free_small_ : free_large_).push_back(packet.data);
    packet.data = nullptr;
    --outstanding_;
}

size_t FlowKeyHash::operator()(const FlowKey& k) const {
    uint64_t state = (uint64_t(k.src) << 32 | k.dst) ^ (uint64_t(k.src_port) << 24 | uint64_t(k.dst_port) << 8 | k.protocol);
    return splitmix64(state);
}

Network::Network(const Config& config, PacketPool& pool, Deliver deliver)
    : hosts_(config.hosts.size()), links_(hosts_ * hosts_), pool_(pool), deliver_(std::move(deliver)) {
    for (size_t i = 0; i < hosts_; ++i) host_by_ip_[config.hosts[i].ip] = i;
    for (size_t src = 0; src < hosts_; ++src)
        for (size_t dst = 0; dst < hosts_; ++dst) {
            Link& link = links_[src * hosts_ + dst];
            link.dst = dst;
            link.spec = config.link(src, dst);
            link.queue_bytes = link.spec.queue_bytes ? link.spec.queue_bytes : default_queue_bytes(link.spec);
            link.flow_queue_bytes =
                link.spec.flow_queue_bytes ? link.spec.flow_queue_bytes : default_flow_queue_bytes(link.spec);
            // One stream per link, so a link's losses do not depend on other links' traffic.
            link.rng_state = config.seed ^ (uint64_t(src) << 32 | dst) * kGoldenGamma;
        }
}

bool Network::lose(Link& link) {
    if (link.spec.loss <= 0) return false;
    double uniform = double(splitmix64(link.rng_state) >> (64 - kDoubleMantissaBits)) / double(1ull << kDoubleMantissaBits);
    return uniform < link.spec.loss;
}

void Network::set_cuts(const std::vector<std::pair<size_t, size_t>>& cuts) {
    for (auto& link : links_) link.cut = false;
    for (auto [src, dst] : cuts) links_[src * hosts_ + dst].cut = true;
}

void Network::arrive(size_t src, Packet packet, Nanos now) {
    bool ipv4 = packet.len >= kIpv4MinHeader && (packet.data[0] >> 4) == kIpv4Version;
    auto dst = ipv4 ? host_by_ip_.find(read_be32(packet.data + 16)) : host_by_ip_.end();
    if (dst == host_by_ip_.end() || dst->second == src) {
        ++unroutable_;
        return drop(packet);
    }
    Link& link = links_[src * hosts_ + dst->second];
    if (link.cut || lose(link)) {
        ++link.stats.lost;
        return drop(packet);
    }
    pool_.shrink(packet);
    if (link.spec.flow_rate_bps == 0) return enter_link(link, packet, now);

    FlowKey key = flow_key(packet);
    auto it = link.flows.try_emplace(key).first;
    Flow& flow = it->second;
    flow.key = key;
    if (flow.queued_bytes + packet.len > link.flow_queue_bytes) {
        ++link.stats.flow_drops;
        if (flow.queue.empty()) link.flows.erase(it);
        return drop(packet);
    }
    flow.busy_until = std::max(flow.busy_until, now) + serialisation_ns(packet.len, link.spec.flow_rate_bps);
    packet.due = flow.busy_until;
    flow.queued_bytes += packet.len;
    flow.queue.push_back(packet);
    if (flow.queue.size() == 1) timers_.push({packet.due, &link, &flow});
}

void Network::enter_link(Link& link, Packet packet, Nanos at) {
    if (link.spec.rate_bps != 0 && link.busy_until > at) {
        double backlog = double(link.busy_until - at) * double(link.spec.rate_bps) / kBitsPerByte / kNanosPerSecond;
        if (backlog + packet.len > double(link.queue_bytes)) {
            ++link.stats.queue_drops;
            return drop(packet);
        }
    }
    // Clamped by busy_until even without a rate, so deliveries stay in order when a shaper hands
    // over a packet whose release time is earlier than a direct arrival already queued.
    link.busy_until = std::max(link.busy_until, at) + serialisation_ns(packet.len, link.spec.rate_bps);
    packet.due = link.busy_until + link.spec.delay_ns;
    link.in_flight.push_back(packet);
    if (link.in_flight.size() == 1) timers_.push({packet.due, &link, nullptr});
}

void Network::release_flow(Link& link, Flow& flow, Nanos now) {
    while (!flow.queue.empty() && flow.queue.front().due <= now) {
        Packet packet = flow.queue.front();
        flow.queue.pop_front();
        flow.queued_bytes -= packet.len;
        // Enters the link when it left the shaper, not when the timer got round to it.
        enter_link(link, packet, packet.due);
    }
    // An empty shaper's clock is already in the past, so forgetting the flow loses nothing.
    if (flow.queue.empty()) link.flows.erase(flow.key);
    else timers_.push({flow.queue.front().due, &link, &flow});
}

void Network::deliver_link(Link& link, Nanos now) {
    while (!link.in_flight.empty() && link.in_flight.front().due <= now) {
        Packet packet = link.in_flight.front();
        link.in_flight.pop_front();
        ++link.stats.forwarded;
        link.stats.forwarded_bytes += packet.len;
        deliver_(link.dst, packet);
        pool_.give_back(packet);
    }
    if (!link.in_flight.empty()) timers_.push({link.in_flight.front().due, &link, nullptr});
}

void Network::run_due(Nanos now) {
    while (!timers_.empty() && timers_.top().due <= now) {
        Timer timer = timers_.top();
        timers_.pop();
        if (timer.flow) release_flow(*timer.link, *timer.flow, now);
        else deliver_link(*timer.link, now);
    }
}

std::optional<Nanos> Network::next_due() const {
    if (timers_.empty()) return std::nullopt;
    return timers_.top().due;
}

}  // namespace pccl::wan
