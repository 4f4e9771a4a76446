#include "client/frame_writer.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <iterator>
#include <stdexcept>
#include <string_view>

#include <pthread.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/limits.hpp"
#include "common/log.hpp"

namespace pccl::client {

namespace {

constexpr uint64_t kWakeKey = 0;  // connection ids start at 1
constexpr int kMaxEventsPerWait = 64;

std::string lost(uint64_t peer, const std::string& detail = {}) {
    return "connection to next peer " + std::to_string(peer) + " lost" + (detail.empty() ? "" : ": " + detail);
}

unsigned usable_cores() {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) != 0) return std::thread::hardware_concurrency();
    return static_cast<unsigned>(CPU_COUNT(&set));
}

}  // namespace

bool FrameWriter::threaded_by_default() {
    static const bool threaded = [] {
        const char* env = std::getenv("PCCL_SEND_THREAD");
        const std::string_view v = env ? env : "auto";
        if (v == "on" || v == "1") return true;
        if (v == "off" || v == "0") return false;
        if (v != "auto")
            PCCL_LOG(WARN, "PCCL_SEND_THREAD=", v, " is not on, off or auto; using auto");
        return usable_cores() >= limits::kSendThreadMinCores;
    }();
    return threaded;
}

FrameWriter::FrameWriter(net::EventLoop& reactor, bool threaded, Callbacks callbacks)
    : reactor_(reactor), threaded_(threaded), callbacks_(std::move(callbacks)), epoll_(epoll_create1(EPOLL_CLOEXEC)) {
    if (!epoll_.valid()) throw std::runtime_error("cannot create epoll: " + net::errno_text(errno));
    order_.reserve(limits::kMaxSendBatchIov);
    if (!threaded_) {
        // The reactor sleeps on our epoll set through its own: readable means a socket has room.
        reactor_watch_ = reactor_.watch(epoll_.get(), EPOLLIN, [this](uint32_t) {
            epoll_event events[kMaxEventsPerWait];
            const int n = epoll_wait(epoll_.get(), events, kMaxEventsPerWait, 0);
            if (n > 0) serve_ready(events, static_cast<size_t>(n));
            report_sent();
        });
        return;
    }
    wake_ = net::Fd(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
    if (!wake_.valid()) throw std::runtime_error("cannot create eventfd: " + net::errno_text(errno));
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = kWakeKey;
    epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, wake_.get(), &ev);
    thread_ = std::thread([this] { thread_main(); });
}

FrameWriter::~FrameWriter() { stop(); }

void FrameWriter::stop() {
    if (stopped_) return;
    stopped_ = true;
    if (threaded_) {
        {
            std::lock_guard lock(mutex_);
            stopping_ = true;
        }
        wake();
        if (thread_.joinable()) thread_.join();
        done_.notify_all();
    } else {
        reactor_.unwatch(reactor_watch_);
    }
    conns_.clear();
    pools_.clear();
    sent_.clear();
    discarded_.clear();
}

// ------------------------------------------------------------------ reactor side

void FrameWriter::wake() {
    const uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake_.get(), &one, sizeof(one));
}

template <typename Fn>
void FrameWriter::execute(Fn&& cmd, bool wait) {
    if (!threaded_) {
        cmd();
        report_sent();
        return;
    }
    uint64_t ticket;
    {
        std::lock_guard lock(mutex_);
        if (stopping_ || dead_) return;
        queued_commands_.fetch_add(1, std::memory_order_relaxed);
        mailbox_.emplace_back(std::forward<Fn>(cmd));
        ticket = ++commands_posted_;
    }
    wake();
    if (!wait) return;
    std::unique_lock lock(mutex_);
    done_.wait(lock, [&] { return commands_run_ >= ticket || stopping_ || dead_; });
}

void FrameWriter::add_connection(PeerId peer, uint64_t generation, uint64_t conn, int fd) {
    if (stopped_) return;
    execute([this, peer, generation, conn, fd] {
        pool_for(peer, generation).conns.push_back(conn);
        Conn& c = conns_[conn];
        c.peer = peer;
        c.fd = fd;
        epoll_event ev{};
        ev.events = 0;  // EPOLLOUT only while frames wait (arm); errors are reported regardless
        ev.data.u64 = conn;
        epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev);
        feed_pool(peer);
    }, false);
}

void FrameWriter::push(PeerId peer, uint64_t generation, std::vector<SendItem> frames) {
    if (stopped_) return;
    execute([this, peer, generation, frames = std::move(frames)] {
        Pool& pool = pool_for(peer, generation);
        for (const auto& f : frames) pool.backlog.push(f);
        feed_pool(peer);
    }, false);
}

std::optional<uint64_t> FrameWriter::drop(uint64_t queue_key) {
    if (stopped_) return std::nullopt;
    // Set by the writer context; execute(wait) orders that before the read here. If the thread
    // stops or dies first, the command never runs (it is only destroyed) and nothing is known.
    std::optional<uint64_t> unwritten;
    execute([this, queue_key, &unwritten] {
        uint64_t bytes = 0;
        for (auto& [peer, pool] : pools_) bytes += pool.backlog.drop_op(queue_key);
        for (auto& [id, c] : conns_) bytes += c.queue.drop_op(queue_key);
        if (auto d = discarded_.find(queue_key); d != discarded_.end()) {
            bytes += d->second;
            discarded_.erase(d);
        }
        unwritten = bytes;
    }, true);
    return unwritten;
}

void FrameWriter::remove_pool(PeerId peer) {
    if (stopped_) return;
    execute([this, peer] { erase_pool(peer); }, true);
}

void FrameWriter::report_sent() {
    if (sent_.empty()) return;
    std::vector<SentFrame> batch;
    batch.swap(sent_);
    if (!threaded_) {
        callbacks_.sent(batch);  // may push or drop again: the batch is ours alone
        return;
    }
    reactor_.post([sent = callbacks_.sent, batch = std::move(batch)] { sent(batch); });
}

// ------------------------------------------------------------------ writer side

void FrameWriter::thread_main() {
    pthread_setname_np(pthread_self(), "pccl-writer");
    epoll_event events[kMaxEventsPerWait];
    std::vector<Command> commands;
    std::vector<PeerId> waiting;
    bool cut_short = false;  // the last round ended with frames left that no EPOLLOUT may bring back
    for (;;) {
        const int n = epoll_wait(epoll_.get(), events, kMaxEventsPerWait, cut_short ? 0 : -1);
        if (n < 0 && errno != EINTR) return die("epoll_wait failed: " + net::errno_text(errno));
        {
            uint64_t count;
            [[maybe_unused]] auto r = ::read(wake_.get(), &count, sizeof(count));
        }
        {
            std::lock_guard lock(mutex_);
            if (stopping_) return;
            commands.swap(mailbox_);
        }
        round_bytes_ = 0;
        // Commands first: a removed pool's socket may already be ready in this batch. (Their own
        // writes wait for the feeding below: round_over() holds while commands are queued.)
        for (auto& cmd : commands) {
            cmd();
            queued_commands_.fetch_sub(1, std::memory_order_relaxed);
        }
        if (!commands.empty()) {
            {
                std::lock_guard lock(mutex_);
                commands_run_ += commands.size();
            }
            done_.notify_all();
            commands.clear();
        }
        if (n > 0) serve_ready(events, static_cast<size_t>(n));
        // Backlogs whose connections hold nothing (so no EPOLLOUT will come) after a round cut short.
        waiting.clear();
        for (const auto& [peer, pool] : pools_)
            if (!pool.backlog.empty()) waiting.push_back(peer);
        for (PeerId peer : waiting) feed_pool(peer);
        // Cut by the byte budget with frames left: go on at once. (Cut by a command: the eventfd
        // wakes us. Left because every socket is full: EPOLLOUT will.)
        cut_short = round_bytes_ >= limits::kWriterRoundBytes &&
                    std::any_of(pools_.begin(), pools_.end(), [](const auto& p) { return !p.second.backlog.empty(); });
        report_sent();
    }
}

void FrameWriter::die(const std::string& why) {
    PCCL_LOG(ERR, "frame writer: ", why, "; failing every data connection");
    report_sent();
    for (const auto& [peer, pool] : pools_) post_failure(peer, pool.generation, why);
    // The state stays (stop() clears it after the join); nothing will write it any more.
    {
        std::lock_guard lock(mutex_);
        dead_ = true;
    }
    done_.notify_all();
}

void FrameWriter::serve_ready(const epoll_event* events, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        if (round_over()) return;  // level-triggered: the rest are reported again
        const uint64_t id = events[i].data.u64;
        if (id == kWakeKey) continue;
        auto it = conns_.find(id);
        if (it == conns_.end()) continue;  // removed earlier in this round
        const PeerId peer = it->second.peer;
        if (events[i].events & (EPOLLERR | EPOLLHUP)) fail(peer, lost(peer));
        else if (!feed(id, it->second)) fail(peer, lost(peer, net::errno_text(errno)));
    }
}

FrameWriter::Pool& FrameWriter::pool_for(PeerId peer, uint64_t generation) {
    auto it = pools_.find(peer);
    if (it != pools_.end() && it->second.generation != generation) {
        erase_pool(peer);  // an older pool the reactor has given up on
        it = pools_.end();
    }
    if (it == pools_.end()) {
        it = pools_.emplace(peer, Pool{}).first;
        it->second.generation = generation;
    }
    return it->second;
}

void FrameWriter::erase_pool(PeerId peer) {
    auto it = pools_.find(peer);
    if (it == pools_.end()) return;
    // Their frames never go out: drop() tells their owners, who count what did.
    const auto discard = [this](uint64_t key, size_t bytes) { discarded_[key] += bytes; };
    it->second.backlog.for_each_unwritten(discard);
    for (uint64_t id : it->second.conns) {
        auto c = conns_.find(id);
        if (c == conns_.end()) continue;
        c->second.queue.for_each_unwritten(discard);
        epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, c->second.fd, nullptr);
        conns_.erase(c);
    }
    pools_.erase(it);
}

void FrameWriter::fail(PeerId peer, const std::string& why) {
    auto it = pools_.find(peer);
    if (it == pools_.end()) return;
    const uint64_t generation = it->second.generation;
    erase_pool(peer);
    // Frames written before the failure are reported first, as inline: an op whose last frame went
    // out is complete, and a failure must not turn it into a failed one.
    if (threaded_) report_sent();
    post_failure(peer, generation, why);
}

void FrameWriter::post_failure(PeerId peer, uint64_t generation, const std::string& why) {
    // Posted in both modes: the reactor must not fail ops from inside the ring's callbacks.
    reactor_.post([failed = callbacks_.failed, peer, generation, why] { failed(peer, generation, why); });
}

void FrameWriter::feed_pool(PeerId peer) {
    auto pit = pools_.find(peer);
    if (pit == pools_.end()) return;
    // feed() leaves the pool as it is; only fail() erases it, and then we stop.
    for (uint64_t id : pit->second.conns) {
        if (pit->second.backlog.empty() || round_over()) return;
        Conn& c = conns_.at(id);
        if (c.queue.bytes() >= limits::kBoundAheadBytes) continue;
        if (!feed(id, c)) return fail(peer, lost(peer, net::errno_text(errno)));
    }
}

bool FrameWriter::feed(uint64_t conn_id, Conn& c) {
    FairSendQueue& backlog = pools_.at(c.peer).backlog;
    for (;;) {
        bind_frames(backlog, c.queue, limits::kBoundAheadBytes);
        if (!flush(c)) return false;
        // Stop once the socket is full (frames left) or nothing is left to bind.
        if (!c.queue.empty() || backlog.empty()) break;
    }
    arm(conn_id, c);
    return true;
}

bool FrameWriter::flush(Conn& c) {
    iovec iov[limits::kMaxSendBatchIov * 2];
    while (!c.queue.empty()) {
        if (round_over()) return true;  // frames left: EPOLLOUT stays armed
        const size_t n_iov = c.queue.gather(iov, std::size(iov), order_);
        msghdr msg{};
        msg.msg_iov = iov;
        msg.msg_iovlen = n_iov;
        const ssize_t w = ::sendmsg(c.fd, &msg, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return true;
            if (errno == EINTR) continue;
            return false;
        }
        round_bytes_ += static_cast<size_t>(w);
        c.queue.advance(static_cast<size_t>(w), order_, [&](const SendItem& item) {
            sent_.push_back(SentFrame{item.uid, item.token, item.total(), item.data == nullptr});
        });
    }
    return true;
}

void FrameWriter::arm(uint64_t conn_id, Conn& c) {
    const bool want = !c.queue.empty();
    if (want == c.want_write) return;
    c.want_write = want;
    epoll_event ev{};
    ev.events = want ? EPOLLOUT : 0u;
    ev.data.u64 = conn_id;
    epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, c.fd, &ev);
}

}  // namespace pccl::client
