// A readiness-driven reactor: one thread sleeps in epoll_wait until a socket is ready, a task is
// posted from another thread (eventfd), or the periodic tick is due. Watches are named by ids, not
// pointers, so a handler removed while a batch of events is being dispatched is simply skipped.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "net/socket.hpp"

namespace pccl::net {

class EventLoop {
public:
    using IoCallback = std::function<void(uint32_t events)>;
    using Task = std::function<void()>;

    EventLoop();
    ~EventLoop();
    EventLoop(const EventLoop&) = delete;
    EventLoop& operator=(const EventLoop&) = delete;

    // Loop thread only.
    uint64_t watch(int fd, uint32_t events, IoCallback callback);
    void modify(uint64_t id, uint32_t events);
    void unwatch(uint64_t id);

    // Any thread. Tasks run on the loop thread in posting order.
    void post(Task task);
    void stop();
    bool stopped() const { return stop_.load(); }

    // Runs until stop(); calls on_tick about every `tick`.
    void run(const std::function<void()>& on_tick, std::chrono::milliseconds tick);

private:
    struct Watch {
        int fd;
        std::shared_ptr<IoCallback> callback;  // shared: dispatch keeps it alive if it unwatches itself
    };
    void drain_tasks();

    Fd epoll_;
    Fd wake_;
    std::unordered_map<uint64_t, Watch> watches_;
    uint64_t next_id_ = 1;
    std::mutex tasks_mutex_;
    std::vector<Task> tasks_;
    std::atomic<bool> tasks_pending_{false};  // tasks_ is not empty (set under tasks_mutex_)
    std::atomic<bool> stop_{false};
};

}  // namespace pccl::net
