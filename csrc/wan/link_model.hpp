// The emulated network, free of I/O so its timing is plain arithmetic on a clock it is handed.
// Each directed link: arrival -> random loss -> per-flow shaper (if capped) -> the link's FIFO at
// the link rate -> propagation delay -> delivery. Shapers and the link FIFO are virtual clocks
// ("busy until"), so a packet's departure time is known when it enters, and one timer heap entry
// per non-empty queue drives everything: no per-packet timers, no polling.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <queue>
#include <unordered_map>
#include <vector>

#include "wan/config.hpp"

namespace pccl::wan {

using Nanos = int64_t;  // CLOCK_MONOTONIC

struct Packet {
    uint8_t* data = nullptr;
    uint32_t len = 0;
    bool small = false;
    Nanos due = 0;  // when it leaves the queue it currently sits in
};

// Packets live in recycled buffers of two sizes: one MTU for reading, and a small one that pure
// ACKs are moved into, so a queue full of ACKs does not pin an MTU of memory per packet.
class PacketPool {
public:
    static constexpr uint32_t kSmallBytes = 256;
    // About 2 GiB of MTU-9000 buffers: far above any sane queue, a guard against runaway configs.
    static constexpr size_t kMaxPackets = 1 << 18;

    explicit PacketPool(uint32_t mtu) : large_bytes_(mtu) {}
    std::optional<Packet> take();  // an MTU buffer, or nothing when kMaxPackets are out
    void shrink(Packet& packet);    // moves a short packet into a small buffer
    void give_back(Packet& packet);
    uint32_t large_bytes() const { return large_bytes_; }

private:
    uint8_t* allocate(bool small);
    uint32_t large_bytes_;
    size_t outstanding_ = 0;
    std::vector<std::unique_ptr<uint8_t[]>> owned_;
    std::vector<uint8_t*> free_large_, free_small_;
};

struct LinkStats {
    uint64_t forwarded = 0, forwarded_bytes = 0, lost = 0, queue_drops = 0, flow_drops = 0;
};

struct FlowKey {
    uint32_t src = 0, dst = 0;
    uint16_t src_port = 0, dst_port = 0;
    uint8_t protocol = 0;
    bool operator==(const FlowKey&) const = default;
};

struct FlowKeyHash {
    size_t operator()(const FlowKey& k) const;
};

class Network {
public:
    // Writes a packet out to host `dst`; the network gives the buffer back to the pool afterwards.
    using Deliver = std::function<void(size_t dst, const Packet&)>;

    Network(const Config& config, PacketPool& pool, Deliver deliver);

    // A packet read from host `src`'s TUN at `now`; the network owns it from here on.
    void arrive(size_t src, Packet packet, Nanos now);
    // Moves every packet whose time has come, delivering those that reached their destination.
    void run_due(Nanos now);
    std::optional<Nanos> next_due() const;

    const LinkStats& link_stats(size_t src, size_t dst) const { return links_[src * hosts_ + dst].stats; }
    // A cut link drops every packet that arrives for it (counted as lost); packets already on
    // their way are still delivered.
    void set_cuts(const std::vector<std::pair<size_t, size_t>>& cuts);
    uint64_t unroutable() const { return unroutable_; }

private:
    struct Flow;
    struct Link {
        size_t dst = 0;
        LinkSpec spec;
        uint64_t queue_bytes = 0, flow_queue_bytes = 0;
        Nanos busy_until = 0;        // the link FIFO has sent everything queued by then
        std::deque<Packet> in_flight;  // serialising or propagating, due = delivery time
        std::unordered_map<FlowKey, Flow, FlowKeyHash> flows;  // only flows with queued packets
        uint64_t rng_state = 0;
        bool cut = false;
        LinkStats stats;
    };
    struct Flow {
        FlowKey key;
        Nanos busy_until = 0;
        uint64_t queued_bytes = 0;
        std::deque<Packet> queue;  // due = when its last bit has passed the flow's shaper
    };
    struct Timer {
        Nanos due;
        Link* link;
        Flow* flow;  // null: the link's delivery queue
        bool operator>(const Timer& other) const { return due > other.due; }
    };

    bool lose(Link& link);
    void enter_link(Link& link, Packet packet, Nanos at);
    void release_flow(Link& link, Flow& flow, Nanos now);
    void deliver_link(Link& link, Nanos now);
    void drop(Packet& packet) { pool_.give_back(packet); }

    size_t hosts_;
    std::vector<Link> links_;
    std::unordered_map<uint32_t, size_t> host_by_ip_;
    PacketPool& pool_;
    Deliver deliver_;
    std::priority_queue<Timer, std::vector<Timer>, std::greater<>> timers_;
    uint64_t unroutable_ = 0;
};

}  // namespace pccl::wan
