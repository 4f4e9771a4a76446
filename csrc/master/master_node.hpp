// The master process: a listening socket and one event-loop thread that feeds MasterState.
// run() binds and returns at once; interrupt() stops and joins; the destructor never blocks long.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "common/status.hpp"

namespace pccl::master {

class MasterNode {
public:
    // peer_timeout 0 means PCCL_PEER_TIMEOUT_MS or the library default.
    MasterNode(std::string listen_address, std::chrono::milliseconds peer_timeout);
    ~MasterNode();
    MasterNode(const MasterNode&) = delete;
    MasterNode& operator=(const MasterNode&) = delete;

    Status run();
    void interrupt();
    uint16_t port() const { return port_.load(); }
    bool running() const { return running_.load(); }
    // Any thread: the status page's JSON (see master/status.hpp), taken on the loop thread and
    // rendered on the caller's. nullopt when not running, or when the loop did not answer within
    // limits::kStatusSnapshotTimeout. Blocks the caller for that long at most.
    std::optional<std::string> status_json();

private:
    struct Impl;
    std::string listen_address_;
    std::chrono::milliseconds peer_timeout_;
    std::unique_ptr<Impl> impl_;
    std::mutex impl_mutex_;  // guards replacing impl_ against status_json() on another thread
    std::mutex lifecycle_mutex_;  // run() and interrupt() one at a time, from any threads
    std::thread thread_;
    std::atomic<uint16_t> port_{0};
    std::atomic<bool> running_{false};
};

std::chrono::milliseconds resolve_peer_timeout(std::chrono::milliseconds requested);

}  // namespace pccl::master
