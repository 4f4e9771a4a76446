// File-descriptor ownership and the socket set-up every pccl socket shares.
#pragma once

#include <chrono>
#include <string>
#include <utility>

#include "common/status.hpp"
#include "net/address.hpp"

namespace pccl::net {

class Fd {
public:
    Fd() = default;
    explicit Fd(int fd) : fd_(fd) {}
    Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
    Fd& operator=(Fd&& o) noexcept {
        if (this != &o) { reset(); fd_ = std::exchange(o.fd_, -1); }
        return *this;
    }
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
    ~Fd() { reset(); }

    int get() const { return fd_; }
    bool valid() const { return fd_ >= 0; }
    void reset();

private:
    int fd_ = -1;
};

std::string errno_text(int err);

// A non-blocking listening socket on `at` (port 0 picks a free one). IPv6 sockets also take IPv4.
Status listen_on(const Endpoint& at, int backlog, Fd& out);
// Starts a non-blocking connect; `in_progress` tells whether completion must be awaited (EPOLLOUT).
// `tune` (e.g. tune_data_socket) runs on the socket before connect(): buffer sizes set later do not
// enter the window scale the handshake agrees on.
Status start_connect(const Endpoint& to, Fd& out, bool& in_progress, void (*tune)(int fd) = nullptr);
// Blocking connect with a timeout, leaving the socket non-blocking afterwards.
Status connect_with_timeout(const Endpoint& to, int timeout_ms, Fd& out);
// The result of a non-blocking connect once the socket became writable.
Status finish_connect(int fd);

void set_nonblocking(int fd);
// TCP_NODELAY (no Nagle: our frames are small or already large) and keep-alive.
void tune_control_socket(int fd);
// As above plus large buffers for the data path.
void tune_data_socket(int fd);
// Whether bytes sent on this TCP socket wait for an acknowledgement, none has arrived for `quiet`,
// and a retransmission timeout fired meanwhile: the path to the other end is dead (a live
// receiver's kernel acknowledges even when its process is stopped or its buffer is full).
bool send_unacknowledged_for(int fd, std::chrono::milliseconds quiet);

}  // namespace pccl::net
