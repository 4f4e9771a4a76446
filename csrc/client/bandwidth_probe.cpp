#include "client/bandwidth_probe.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <poll.h>
#include <sys/epoll.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include "common/limits.hpp"
#include "common/log.hpp"
#include "wire/data_frame.hpp"

namespace pccl::client {

namespace {

using Clock = std::chrono::steady_clock;

void put_u64(uint8_t* out, uint64_t v) {
    for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(v >> (8 * i));
}

uint64_t get_u64(const uint8_t* in) {
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(in[i]) << (8 * i);
    return v;
}

int ms_until(Clock::time_point deadline, std::chrono::milliseconds cap) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    return static_cast<int>(std::clamp(left, std::chrono::milliseconds(0), cap).count());
}

// Writes all of a small buffer to a non-blocking socket, waiting for room up to the deadline.
bool write_all(int fd, const uint8_t* data, size_t n, Clock::time_point deadline) {
    while (n > 0) {
        const ssize_t w = ::send(fd, data, n, MSG_NOSIGNAL);
        if (w > 0) {
            data += w;
            n -= static_cast<size_t>(w);
            continue;
        }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno != EAGAIN) return false;
        pollfd p{fd, POLLOUT, 0};
        if (Clock::now() >= deadline || ::poll(&p, 1, ms_until(deadline, limits::kCallerPollInterval)) < 0) return false;
    }
    return true;
}

// Unsent bytes a probe socket may hold: small, so that the stream ends soon after the sender
// stops even on a slow link with a large pool (the receipt waits for everything to arrive).
constexpr int kProbeNotSentLowWatermark = 16 * 1024;

void reset_on_close(int fd) {
    linger l{1, 0};  // a failed probe's leftovers must not trickle into the next measurement
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
}

}  // namespace

ProbeOutcome run_bandwidth_probe(const net::Endpoint& target, uint64_t me, uint64_t target_id, size_t connections,
                                 std::chrono::milliseconds duration, const std::atomic<bool>& stop) {
    std::vector<net::Fd> fds;
    auto fail = [&](const std::string& why) {
        for (auto& fd : fds) reset_on_close(fd.get());
        return ProbeOutcome{false, 0, why + " (" + target.to_string() + ")"};
    };
    // Connect all at once, without blocking past a stop request.
    std::vector<pollfd> polls(connections);
    for (size_t k = 0; k < connections; ++k) {
        net::Fd fd;
        bool in_progress = false;
        const Status s = net::start_connect(target, fd, in_progress, net::tune_data_socket);
        if (!s.is_ok()) return fail("cannot connect: " + s.message);
        fds.push_back(std::move(fd));
    }
    const auto handshake_deadline = Clock::now() + limits::kP2PHandshakeDeadline;
    std::vector<bool> connected(connections, false);
    for (size_t done = 0; done < connections;) {
        if (stop.load()) return fail("the session closed");
        if (Clock::now() >= handshake_deadline) return fail("connecting timed out");
        for (size_t k = 0; k < connections; ++k) polls[k] = pollfd{fds[k].get(), connected[k] ? short(0) : short(POLLOUT), 0};
        if (::poll(polls.data(), polls.size(), ms_until(handshake_deadline, limits::kCallerPollInterval)) < 0 && errno != EINTR)
            return fail(std::string("poll: ") + std::strerror(errno));
        for (size_t k = 0; k < connections; ++k) {
            if (connected[k] || !(polls[k].revents & (POLLOUT | POLLERR | POLLHUP))) continue;
            if (const Status s = net::finish_connect(fds[k].get()); !s.is_ok()) return fail("cannot connect: " + s.message);
            int lowat = kProbeNotSentLowWatermark;
            setsockopt(fds[k].get(), IPPROTO_TCP, TCP_NOTSENT_LOWAT, &lowat, sizeof(lowat));
            wire::DataHeader h;
            h.kind = static_cast<uint8_t>(wire::DataFrameKind::PROBE_HELLO);
            h.a = me;
            h.b = target_id;
            h.aux = static_cast<uint32_t>(k);
            uint8_t hello[wire::kDataHeaderBytes];
            wire::encode_data_header(h, hello);
            if (!write_all(fds[k].get(), hello, sizeof(hello), handshake_deadline)) return fail("cannot send the probe hello");
            connected[k] = true;
            ++done;
        }
    }

    // Stream: the content does not matter, only how fast it leaves.
    static const std::vector<uint8_t> chunk(limits::kBandwidthProbeChunkBytes, 0);
    const auto stream_end = Clock::now() + duration;
    while (Clock::now() < stream_end) {
        if (stop.load()) return fail("the session closed");
        for (size_t k = 0; k < fds.size(); ++k) polls[k] = pollfd{fds[k].get(), POLLOUT, 0};
        if (::poll(polls.data(), polls.size(), ms_until(stream_end, limits::kCallerPollInterval)) < 0 && errno != EINTR)
            return fail(std::string("poll: ") + std::strerror(errno));
        for (size_t k = 0; k < fds.size(); ++k) {
            if (polls[k].revents & (POLLERR | POLLHUP)) return fail("the receiver closed the stream");
            if (!(polls[k].revents & POLLOUT)) continue;
            const ssize_t w = ::send(fds[k].get(), chunk.data(), chunk.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
            if (w < 0 && errno != EAGAIN && errno != EINTR) return fail(std::string("send: ") + std::strerror(errno));
        }
    }
    for (auto& fd : fds) ::shutdown(fd.get(), SHUT_WR);

    // Receipts: each arrives once the receiver has read everything this side wrote.
    std::vector<std::vector<uint8_t>> receipts(fds.size());
    const auto receipt_deadline = Clock::now() + limits::kBandwidthProbeReceiptTimeout;
    size_t complete = 0;
    while (complete < fds.size()) {
        if (stop.load()) return fail("the session closed");
        if (Clock::now() >= receipt_deadline) return fail("no receipt from the receiver in time");
        for (size_t k = 0; k < fds.size(); ++k) polls[k] = pollfd{fds[k].get(), receipts[k].size() < kProbeReceiptBytes ? short(POLLIN) : short(0), 0};
        if (::poll(polls.data(), polls.size(), ms_until(receipt_deadline, limits::kCallerPollInterval)) < 0 && errno != EINTR)
            return fail(std::string("poll: ") + std::strerror(errno));
        for (size_t k = 0; k < fds.size(); ++k) {
            // A finished connection still reports POLLHUP once the receiver closes it.
            if (receipts[k].size() == kProbeReceiptBytes || !(polls[k].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            uint8_t buf[kProbeReceiptBytes];
            const ssize_t r = ::recv(fds[k].get(), buf, kProbeReceiptBytes - receipts[k].size(), MSG_DONTWAIT);
            if (r == 0) return fail("the receiver closed without a receipt");
            if (r < 0) {
                if (errno == EAGAIN || errno == EINTR) continue;
                return fail(std::string("recv: ") + std::strerror(errno));
            }
            receipts[k].insert(receipts[k].end(), buf, buf + r);
            if (receipts[k].size() == kProbeReceiptBytes) ++complete;
        }
    }
    // All connections' bytes over the longest of their windows: a connection whose window came out
    // short (a stall, then one burst) cannot inflate the sum, only make it conservative.
    uint64_t bytes = 0, nanos = 1;
    for (const auto& r : receipts) {
        bytes += get_u64(r.data());
        nanos = std::max(nanos, get_u64(r.data() + 8));
    }
    return ProbeOutcome{true, static_cast<uint64_t>(static_cast<double>(bytes) * 8e9 / static_cast<double>(nanos)), ""};
}

// ---------------------------------------------------------------------------------- receiver

ProbeSink::ProbeSink(net::EventLoop& loop) : loop_(loop) {}

ProbeSink::~ProbeSink() { close_all(); }

void ProbeSink::adopt(net::Fd fd) {
    if (conns_.size() >= limits::kMaxProbeConnections) return;  // fd closes: that sender's probe fails
    const uint64_t id = next_id_++;
    Conn& c = conns_[id];
    c.fd = std::move(fd);
    c.first = c.last = Clock::now();
    c.watch = loop_.watch(c.fd.get(), EPOLLIN | EPOLLRDHUP, [this, id](uint32_t) { on_io(id); });
}

void ProbeSink::on_io(uint64_t id) {
    auto it = conns_.find(id);
    if (it == conns_.end()) return;
    Conn& c = it->second;
    buffer_.resize(limits::kBandwidthProbeChunkBytes);
    // Bounded per wake-up, like the data plane's reads: a fast stream must not starve the reactor.
    for (size_t budget = limits::kMaxProbeReadPerWakeup; budget > 0;) {
        const ssize_t r = ::recv(c.fd.get(), buffer_.data(), buffer_.size(), MSG_DONTWAIT);
        if (r > 0) {
            const auto now = Clock::now();
            if (c.bytes == 0) c.first = now;
            c.bytes += static_cast<uint64_t>(r);
            c.last = now;
            // One sample per millisecond at most: enough resolution for the window, bounded memory.
            if (c.samples.size() < limits::kMaxBandwidthProbeSamples &&
                (c.samples.empty() || now - c.samples.back().first >= std::chrono::milliseconds(1)))
                c.samples.emplace_back(now, c.bytes);
            budget -= std::min(budget, static_cast<size_t>(r));
            continue;
        }
        if (r == 0) return finish(id);
        if (errno == EINTR) continue;
        if (errno == EAGAIN) return;
        return close(id);
    }
}

void ProbeSink::finish(uint64_t id) {
    Conn& c = conns_.at(id);
    // The second half of the arrival window: after slow start, before the stream ends. A sample is
    // (time, bytes received by then), so the window counts only bytes that arrived after its start.
    uint64_t window_bytes = c.bytes;
    auto window_start = c.first;
    const auto span = c.last - c.first;
    for (const auto& [t, by_then] : c.samples) {
        if (t < c.first + span / 2) continue;
        // A window squeezed into the stream's last moments (a stall, then a burst) says nothing:
        // keep the whole span then.
        if (c.last - t >= span / 4) {
            window_bytes = c.bytes - by_then;
            window_start = t;
        }
        break;
    }
    const auto nanos = std::chrono::duration_cast<std::chrono::nanoseconds>(c.last - window_start).count();
    uint8_t receipt[kProbeReceiptBytes];
    put_u64(receipt, window_bytes);
    put_u64(receipt + 8, static_cast<uint64_t>(std::max<int64_t>(nanos, 1)));
    // The socket's send side has carried nothing yet, so 16 bytes always fit.
    if (::send(c.fd.get(), receipt, sizeof(receipt), MSG_NOSIGNAL | MSG_DONTWAIT) != static_cast<ssize_t>(sizeof(receipt)))
        PCCL_LOG(DEBUG, "probe receiver: could not send a receipt: ", std::strerror(errno));
    close(id);
}

void ProbeSink::close(uint64_t id) {
    auto it = conns_.find(id);
    if (it == conns_.end()) return;
    loop_.unwatch(it->second.watch);
    conns_.erase(it);
}

void ProbeSink::check_deadlines(Clock::time_point now) {
    const auto longest = limits::kMaxBandwidthProbeDuration + limits::kBandwidthProbeReceiptTimeout;
    std::vector<uint64_t> stale;
    for (const auto& [id, c] : conns_)
        if (now - c.last > longest) stale.push_back(id);
    for (uint64_t id : stale) close(id);
}

void ProbeSink::close_all() {
    for (auto& [id, c] : conns_) loop_.unwatch(c.watch);
    conns_.clear();
}

}  // namespace pccl::client
