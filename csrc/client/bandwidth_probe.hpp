// Point-to-point bandwidth probes for optimize_topology(). The master asks a peer to stream to
// another for a fixed time over as many connections as its pool holds (so the figure is what the
// ring's data path would get); the receiver counts what arrives and, when the sender shuts its
// side, answers with a receipt: the bytes and nanoseconds of the *second half* of its arrival
// window. The first half is left out because TCP spends it in slow start on a long path.
//
// Sender: run_bandwidth_probe(), blocking, on a thread of its own (it would stall the reactor).
// Receiver: ProbeSink, on the reactor; the data plane hands it connections whose first frame is
// PROBE_HELLO.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "net/address.hpp"
#include "net/event_loop.hpp"
#include "net/socket.hpp"

namespace pccl::client {

inline constexpr size_t kProbeReceiptBytes = 16;  // u64 window bytes, u64 window nanoseconds

struct ProbeOutcome {
    bool ok = false;
    uint64_t bits_per_second = 0;
    std::string reason;
};

// Streams to `target` for `duration` over `connections` sockets, then sums the receipts' rates.
// `stop` aborts it early (the session is closing).
ProbeOutcome run_bandwidth_probe(const net::Endpoint& target, uint64_t me, uint64_t target_id, size_t connections,
                                 std::chrono::milliseconds duration, const std::atomic<bool>& stop);

class ProbeSink {
public:
    explicit ProbeSink(net::EventLoop& loop);
    ~ProbeSink();
    // Takes a connection whose PROBE_HELLO has been read; what follows is the probe's stream.
    void adopt(net::Fd fd);
    // Closes connections idle for longer than any probe can take (a sender that vanished).
    void check_deadlines(std::chrono::steady_clock::time_point now);
    void close_all();

private:
    using Clock = std::chrono::steady_clock;
    struct Conn {
        net::Fd fd;
        uint64_t watch = 0;
        uint64_t bytes = 0;
        Clock::time_point first{};
        Clock::time_point last{};
        std::vector<std::pair<Clock::time_point, uint64_t>> samples;  // (time, bytes before it)
    };
    void on_io(uint64_t id);
    void finish(uint64_t id);
    void close(uint64_t id);

    net::EventLoop& loop_;
    std::unordered_map<uint64_t, Conn> conns_;
    uint64_t next_id_ = 1;
    std::vector<uint8_t> buffer_;
};

}  // namespace pccl::client
