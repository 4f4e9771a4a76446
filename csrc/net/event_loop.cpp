#include "net/event_loop.hpp"

#include <cerrno>
#include <stdexcept>

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

namespace pccl::net {

namespace {
constexpr uint64_t kWakeId = 0;
constexpr int kMaxEventsPerWait = 256;
}  // namespace

EventLoop::EventLoop()
    : epoll_(epoll_create1(EPOLL_CLOEXEC)), wake_(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {
    if (!epoll_.valid() || !wake_.valid()) throw std::runtime_error("cannot create epoll/eventfd: " + errno_text(errno));
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = kWakeId;
    epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, wake_.get(), &ev);
}

EventLoop::~EventLoop() = default;

uint64_t EventLoop::watch(int fd, uint32_t events, IoCallback callback) {
    const uint64_t id = next_id_++;
    epoll_event ev{};
    ev.events = events;
    ev.data.u64 = id;
    if (epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0)
        throw std::runtime_error("epoll_ctl(ADD): " + errno_text(errno));
    watches_.emplace(id, Watch{fd, std::make_shared<IoCallback>(std::move(callback))});
    return id;
}

void EventLoop::modify(uint64_t id, uint32_t events) {
    auto it = watches_.find(id);
    if (it == watches_.end()) return;
    epoll_event ev{};
    ev.events = events;
    ev.data.u64 = id;
    epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, it->second.fd, &ev);
}

void EventLoop::unwatch(uint64_t id) {
    auto it = watches_.find(id);
    if (it == watches_.end()) return;
    epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, it->second.fd, nullptr);
    watches_.erase(it);
}

void EventLoop::post(Task task) {
    {
        std::lock_guard lock(tasks_mutex_);
        tasks_.push_back(std::move(task));
        tasks_pending_.store(true, std::memory_order_release);
    }
    const uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake_.get(), &one, sizeof(one));
}

void EventLoop::stop() {
    stop_.store(true);
    const uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake_.get(), &one, sizeof(one));
}

void EventLoop::drain_tasks() {
    std::vector<Task> batch;
    {
        std::lock_guard lock(tasks_mutex_);
        batch.swap(tasks_);
        tasks_pending_.store(false, std::memory_order_relaxed);
    }
    for (auto& t : batch) t();
}

void EventLoop::run(const std::function<void()>& on_tick, std::chrono::milliseconds tick) {
    using clock = std::chrono::steady_clock;
    auto next_tick = clock::now() + tick;
    epoll_event events[kMaxEventsPerWait];
    while (!stop_.load()) {
        const auto now = clock::now();
        if (now >= next_tick) {
            on_tick();
            next_tick = now + tick;
        }
        const int timeout_ms = static_cast<int>(
            std::chrono::duration_cast<std::chrono::milliseconds>(next_tick - clock::now()).count()) + 1;
        const int n = epoll_wait(epoll_.get(), events, kMaxEventsPerWait, timeout_ms < 0 ? 0 : timeout_ms);
        if (n < 0) {
            if (errno == EINTR) continue;
            throw std::runtime_error("epoll_wait: " + errno_text(errno));
        }
        for (int i = 0; i < n; ++i) {
            const uint64_t id = events[i].data.u64;
            if (id == kWakeId) {
                uint64_t drained;
                [[maybe_unused]] auto r = ::read(wake_.get(), &drained, sizeof(drained));
                continue;
            }
            auto it = watches_.find(id);
            if (it == watches_.end()) continue;  // removed earlier in this batch
            const auto callback = it->second.callback;
            (*callback)(events[i].events);
            // Posted tasks (a writer thread's completions, say) run between callbacks, not after
            // the whole batch: one data connection's callback may read megabytes.
            if (tasks_pending_.load(std::memory_order_acquire)) drain_tasks();
        }
        drain_tasks();
    }
    drain_tasks();
}

}  // namespace pccl::net
