#include "master/master_node.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <cstdlib>
#include <tuple>
#include <unordered_map>
#include <vector>

#include <sys/epoll.h>
#include <sys/socket.h>

#include "client/completion.hpp"
#include "common/limits.hpp"
#include "common/log.hpp"
#include "master/master_state.hpp"
#include "master/status.hpp"
#include "net/control_connection.hpp"
#include "net/event_loop.hpp"

namespace pccl::master {

std::chrono::milliseconds resolve_peer_timeout(std::chrono::milliseconds requested) {
    if (requested.count() <= 0) {
        requested = limits::kDefaultPeerTimeout;
        if (const char* env = std::getenv("PCCL_PEER_TIMEOUT_MS")) {
            const long v = std::strtol(env, nullptr, 10);
            if (v > 0) requested = std::chrono::milliseconds(v);
        }
    }
    return std::max(requested, limits::kMinPeerTimeout);
}

// PCCL_BANDWIDTH_PROBE_MS: how long each pair streams during optimize_topology() (tests on
// short emulated links use less; a path with a long round trip may want more).
std::chrono::milliseconds resolve_probe_duration() {
    auto duration = limits::kBandwidthProbeDuration;
    if (const char* env = std::getenv("PCCL_BANDWIDTH_PROBE_MS")) {
        const long v = std::strtol(env, nullptr, 10);
        if (v > 0) duration = std::chrono::milliseconds(v);
    }
    return std::clamp(duration, limits::kMinBandwidthProbeDuration, limits::kMaxBandwidthProbeDuration);
}

struct MasterNode::Impl final : Outbox {
    struct Connection {
        net::ControlConnection stream;
        uint64_t watch = 0;
        bool writable_armed = false;
        bool registered = false;  // said HELLO: may send frames up to kMaxPeerToMasterFrameBytes
    };

    net::EventLoop loop;
    net::Fd listener;
    MasterState state;
    std::unordered_map<ConnId, std::unique_ptr<Connection>> conns;
    // Deferred: never close inside a state callback.
    std::vector<std::tuple<ConnId, std::string, DropCause>> to_close;
    ConnId next_conn = 1;

    explicit Impl(std::chrono::milliseconds timeout) : state(*this, timeout, resolve_probe_duration()) {}

    // ---- Outbox
    void send(ConnId id, const wire::Message& m) override {
        auto it = conns.find(id);
        if (it == conns.end()) return;
        Connection& c = *it->second;
        if (!c.stream.send(m)) {
            to_close.emplace_back(id, c.stream.error(), DropCause::SEND_FAILED);
            return;
        }
        arm_write(id, c);
    }
    void disconnect(ConnId id, const std::string& reason) override {
        auto it = conns.find(id);
        if (it == conns.end()) return;
        // Best effort to deliver what is queued (e.g. KICKED) before closing.
        it->second->stream.flush();
        PCCL_LOG(DEBUG, "master: closing connection ", id, ": ", reason);
        loop.unwatch(it->second->watch);
        conns.erase(it);
    }

    void arm_write(ConnId id, Connection& c) {
        const bool want = c.stream.wants_write();
        if (want == c.writable_armed) return;
        c.writable_armed = want;
        loop.modify(c.watch, EPOLLIN | EPOLLRDHUP | (want ? EPOLLOUT : 0u));
        (void)id;
    }

    void close_deferred() {
        while (!to_close.empty()) {
            auto batch = std::move(to_close);
            to_close.clear();
            for (auto& [id, reason, cause] : batch) {
                // A write fails when the peer has closed; what it sent before closing (a GOODBYE,
                // typically) may still be unread, and decides why it is gone.
                if (cause == DropCause::SEND_FAILED) deliver_unread(id);
                if (!conns.contains(id)) continue;
                disconnect(id, reason);
                state.on_disconnect(id, reason, cause);
            }
        }
    }

    // Hands the state whatever complete messages the connection has received (end-of-stream and
    // errors are left to the caller, which is closing it anyway).
    void deliver_unread(ConnId id) {
        auto it = conns.find(id);
        if (it == conns.end()) return;
        std::vector<wire::Message> msgs;
        (void)it->second->stream.read_messages(msgs);
        const auto now = Clock::now();
        for (auto& m : msgs) {
            if (!conns.contains(id)) break;
            state.on_message(id, std::move(m), now);
        }
    }

    void on_accept() {
        for (;;) {
            sockaddr_storage addr{};
            socklen_t len = sizeof(addr);
            const int fd = ::accept4(listener.get(), reinterpret_cast<sockaddr*>(&addr), &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (fd < 0) {
                if (errno == EINTR || errno == ECONNABORTED) continue;
                if (errno != EAGAIN && errno != EWOULDBLOCK)
                    PCCL_LOG(WARN, "master: accept failed: ", net::errno_text(errno));
                return;
            }
            net::Fd owned(fd);
            if (conns.size() >= limits::kMaxMasterConnections) {
                PCCL_LOG(WARN, "master: refusing a connection: already ", conns.size(), " open");
                continue;
            }
            net::tune_control_socket(fd);
            net::Endpoint remote;
            std::memcpy(&remote.storage, &addr, len);
            remote.length = len;
            const ConnId id = next_conn++;
            auto c = std::make_unique<Connection>(Connection{
                net::ControlConnection(std::move(owned), limits::kMaxUnregisteredFrameBytes, limits::kMaxMasterSendQueueBytes)});
            c->watch = loop.watch(fd, EPOLLIN | EPOLLRDHUP, [this, id](uint32_t ev) { on_io(id, ev); });
            conns.emplace(id, std::move(c));
            PCCL_LOG(DEBUG, "master: connection ", id, " from ", remote.to_string());
            state.on_connect(id, remote.ip(), Clock::now());
        }
    }

    void on_io(ConnId id, uint32_t events) {
        auto it = conns.find(id);
        if (it == conns.end()) return;
        Connection& c = *it->second;
        if (events & EPOLLOUT) {
            if (!c.stream.flush()) to_close.emplace_back(id, c.stream.error(), DropCause::SEND_FAILED);
            else arm_write(id, c);
        }
        if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
            std::vector<wire::Message> msgs;
            const auto status = c.stream.read_messages(msgs);
            const std::string error = c.stream.error();
            const auto now = Clock::now();
            for (auto& m : msgs) {
                if (!conns.contains(id)) break;  // dropped by an earlier message
                state.on_message(id, std::move(m), now);
            }
            if (auto live = conns.find(id); live != conns.end() && !live->second->registered && state.is_registered(id)) {
                live->second->registered = true;
                live->second->stream.set_max_incoming(limits::kMaxPeerToMasterFrameBytes);
            }
            if (status != net::ControlConnection::ReadStatus::OPEN && conns.contains(id)) {
                const bool malformed = status == net::ControlConnection::ReadStatus::PROTOCOL_ERROR;
                if (malformed) PCCL_LOG(WARN, "master: dropping connection ", id, ": ", error);
                to_close.emplace_back(id, error, malformed ? DropCause::MALFORMED_FRAME : DropCause::CLOSED);
            }
        }
        close_deferred();
    }
};

// ---- status snapshots
//
// The HTTP side asks on its own thread; MasterState belongs to the loop thread. A request is posted
// to the loop (EventLoop::post: a mutex-guarded task list and an eventfd wake-up) and the asking
// thread waits, bounded by limits::kStatusSnapshotTimeout, for the loop to copy a StatusSnapshot
// out of the state; the JSON is then rendered on the asking thread, so the loop only copies.
// Why on request rather than a snapshot the loop publishes periodically and on change: the page is
// looked at rarely, while the state changes with every vote and op (thousands a second), so
// publishing would spend the loop's time on copies nobody reads, and a periodic copy would be stale
// by up to its period; on request costs nothing while nobody looks and is always current.
// Each request is one O(peers + ops) copy, bounded by the limits::kMaxStatus* cuts, and the HTTP
// side serves at most limits::kMaxStatusHttpConnections requests at once.
using SnapshotSlot = client::Completion<std::shared_ptr<const StatusSnapshot>>;

namespace {
// Held by the posted task. If the task is destroyed without having run (the loop stopped first),
// the waiter is told at once instead of waiting out its timeout.
struct SnapshotRequest {
    explicit SnapshotRequest(std::shared_ptr<SnapshotSlot> s) : slot(std::move(s)) {}
    SnapshotRequest(const SnapshotRequest&) = delete;
    SnapshotRequest& operator=(const SnapshotRequest&) = delete;
    std::shared_ptr<SnapshotSlot> slot;
    ~SnapshotRequest() { slot->complete(nullptr); }  // no-op when already answered
};
}  // namespace

std::optional<std::string> MasterNode::status_json() {
    auto slot = std::make_shared<SnapshotSlot>();
    {
        std::lock_guard lock(impl_mutex_);  // impl_ lives until interrupt() resets it under this lock
        if (!impl_ || !running_.load()) return std::nullopt;
        auto request = std::make_shared<SnapshotRequest>(slot);
        Impl* impl = impl_.get();  // the task runs on the loop thread, which interrupt() joins before the reset
        const uint16_t port = port_.load();
        impl->loop.post([impl, request, port] {
            auto snap = std::make_shared<StatusSnapshot>(impl->state.snapshot(Clock::now()));
            snap->port = port;
            request->slot->complete(std::move(snap));
        });
    }
    if (!slot->wait_for(limits::kStatusSnapshotTimeout)) return std::nullopt;
    const auto snap = slot->get();
    if (!snap) return std::nullopt;
    return render_status_json(*snap);
}

MasterNode::MasterNode(std::string listen_address, std::chrono::milliseconds peer_timeout)
    : listen_address_(std::move(listen_address)), peer_timeout_(resolve_peer_timeout(peer_timeout)) {}

MasterNode::~MasterNode() { interrupt(); }

Status MasterNode::run() {
    std::lock_guard lifecycle(lifecycle_mutex_);
    if (running_.load()) return Status::error(Result::INVALID_USAGE, "the master is already running");
    if (thread_.joinable()) thread_.join();
    net::Endpoint at;
    if (auto s = net::parse_endpoint(listen_address_, at); !s.is_ok()) return s;
    {
        std::lock_guard lock(impl_mutex_);
        impl_ = std::make_unique<Impl>(peer_timeout_);
    }
    if (auto s = net::listen_on(at, 1024, impl_->listener); !s.is_ok()) return s;
    port_.store(net::local_endpoint(impl_->listener.get())->port());
    impl_->loop.watch(impl_->listener.get(), EPOLLIN, [impl = impl_.get()](uint32_t) {
        impl->on_accept();
        impl->close_deferred();
    });
    running_.store(true);
    PCCL_LOG(INFO, "master: listening on ", net::local_endpoint(impl_->listener.get())->to_string());
    thread_ = std::thread([this] {
        Impl* impl = impl_.get();
        try {
            impl->loop.run(
                [impl] {
                    impl->state.on_tick(Clock::now());
                    impl->close_deferred();
                },
                limits::kDeadlineCheckInterval);
        } catch (const std::exception& e) {
            PCCL_LOG(FATAL, "master: event loop failed: ", e.what());
        }
        running_.store(false);
    });
    return Status::ok();
}

void MasterNode::interrupt() {
    std::lock_guard lifecycle(lifecycle_mutex_);  // two interrupts must not both join the thread
    if (impl_) impl_->loop.stop();
    if (thread_.joinable()) thread_.join();
    running_.store(false);
    std::lock_guard lock(impl_mutex_);  // a status_json() posting right now finishes first
    impl_.reset();
}

}  // namespace pccl::master
