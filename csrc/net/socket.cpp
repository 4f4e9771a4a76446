#include "net/socket.hpp"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/limits.hpp"
#include "common/log.hpp"

namespace pccl::net {

void Fd::reset() {
    if (fd_ >= 0) {
        ::close(fd_);
        fd_ = -1;
    }
}

std::string errno_text(int err) { return std::strerror(err); }

void set_nonblocking(int fd) {
    const int flags = fcntl(fd, F_GETFL, 0);
    fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

void tune_control_socket(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
}

int data_socket_buffer_bytes() {
    static const int bytes = [] {
        if (const char* env = std::getenv("PCCL_SOCKET_BUFFER_BYTES")) return static_cast<int>(std::strtol(env, nullptr, 10));
        return limits::kSocketBufferBytes;
    }();
    return bytes;
}

int data_notsent_lowat_bytes() {
    static const int bytes = [] {
        if (const char* env = std::getenv("PCCL_NOTSENT_LOWAT_BYTES")) return static_cast<int>(std::strtol(env, nullptr, 10));
        return limits::kNotSentLowWatermarkBytes;
    }();
    return bytes;
}

const std::string& data_congestion_control() {
    static const std::string name = [] {
        const char* env = std::getenv("PCCL_TCP_CONGESTION");
        const std::string chosen = env ? env : limits::kDataCongestionControl;
        return chosen == "system" ? std::string() : chosen;
    }();
    return name;
}

void tune_data_socket(int fd) {
    tune_control_socket(fd);
    if (const std::string& cc = data_congestion_control(); !cc.empty()) {
        if (setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, cc.data(), static_cast<socklen_t>(cc.size())) != 0) {
            // Not built into this kernel, or not in net.ipv4.tcp_allowed_congestion_control for a
            // process without CAP_NET_ADMIN: the socket keeps the system's default. Said once: a WAN
            // pool then runs slower than it could.
            static std::once_flag said;
            const int err = errno;
            std::call_once(said, [&] {
                PCCL_LOG(WARN, "data connections keep the system's TCP congestion control: cannot use '", cc, "' (",
                         errno_text(err), "); allow it in net.ipv4.tcp_allowed_congestion_control, or set ",
                         "PCCL_TCP_CONGESTION=system to keep the default without this warning");
            });
        }
    }
    if (int lowat = data_notsent_lowat_bytes(); lowat > 0)
        setsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &lowat, sizeof(lowat));
    int bytes = data_socket_buffer_bytes();
    if (bytes <= 0) return;  // 0: leave the kernel's autotuning on
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof(bytes));
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof(bytes));
}

bool send_unacknowledged_for(int fd, std::chrono::milliseconds quiet) {
    tcp_info info{};
    socklen_t len = sizeof(info);
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) != 0) return false;
    // tcpi_last_ack_recv alone would misfire on a burst after an idle spell (no ACK can have come
    // yet); a retransmission timeout that fired without an ACK since is what a dead path shows.
    return info.tcpi_unacked > 0 && info.tcpi_last_ack_recv >= quiet.count() &&
           (info.tcpi_retransmits > 0 || info.tcpi_backoff > 0);
}

Status listen_on(const Endpoint& at, int backlog, Fd& out) {
    Fd fd(::socket(at.family(), SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!fd.valid()) return Status::error(Result::INTERNAL_ERROR, "socket(): " + errno_text(errno));
    int one = 1;
    setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (at.family() == AF_INET6) {
        int zero = 0;
        setsockopt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
    }
    if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&at.storage), at.length) != 0)
        return Status::error(Result::INVALID_ARGUMENT, "cannot bind " + at.to_string() + ": " + errno_text(errno));
    if (::listen(fd.get(), backlog) != 0)
        return Status::error(Result::INTERNAL_ERROR, "listen(): " + errno_text(errno));
    out = std::move(fd);
    return Status::ok();
}

Status start_connect(const Endpoint& to, Fd& out, bool& in_progress, void (*tune)(int fd)) {
    Fd fd(::socket(to.family(), SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!fd.valid()) return Status::error(Result::INTERNAL_ERROR, "socket(): " + errno_text(errno));
    if (tune) tune(fd.get());
    in_progress = false;
    if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&to.storage), to.length) != 0) {
        if (errno != EINPROGRESS)
            return Status::error(Result::RANK_CONNECTION_FAILED, "connect to " + to.to_string() + ": " + errno_text(errno));
        in_progress = true;
    }
    out = std::move(fd);
    return Status::ok();
}

Status finish_connect(int fd) {
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
    if (err != 0) return Status::error(Result::RANK_CONNECTION_FAILED, errno_text(err));
    return Status::ok();
}

Status connect_with_timeout(const Endpoint& to, int timeout_ms, Fd& out) {
    bool in_progress = false;
    Fd fd;
    if (auto s = start_connect(to, fd, in_progress); !s.is_ok()) return s;
    if (in_progress) {
        pollfd p{fd.get(), POLLOUT, 0};
        int rc;
        do { rc = ::poll(&p, 1, timeout_ms); } while (rc < 0 && errno == EINTR);
        if (rc == 0) return Status::error(Result::MASTER_CONNECTION_FAILED, "connect to " + to.to_string() + " timed out");
        if (auto s = finish_connect(fd.get()); !s.is_ok())
            return Status::error(Result::MASTER_CONNECTION_FAILED, "connect to " + to.to_string() + ": " + s.message);
    }
    out = std::move(fd);
    return Status::ok();
}

}  // namespace pccl::net
