#include "net/control_connection.hpp"

#include <cerrno>

#include <sys/socket.h>

namespace pccl::net {

namespace {
constexpr size_t kReadChunkBytes = 64 * 1024;
}

ControlConnection::ReadStatus ControlConnection::read_messages(std::vector<wire::Message>& out) {
    for (;;) {
        auto space = parser_.write_space(kReadChunkBytes);
        const ssize_t n = ::recv(fd_.get(), space.data(), space.size(), 0);
        if (n > 0) {
            parser_.commit(static_cast<size_t>(n));
            while (auto m = parser_.next()) out.push_back(std::move(*m));
            if (parser_.has_error()) {
                error_ = parser_.error();
                return ReadStatus::PROTOCOL_ERROR;
            }
            continue;
        }
        if (n == 0) {
            error_ = "connection closed by the other side";
            return ReadStatus::CLOSED;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) return ReadStatus::OPEN;
        if (errno == EINTR) continue;
        error_ = errno_text(errno);
        return ReadStatus::CLOSED;
    }
}

bool ControlConnection::send(const wire::Message& m) {
    if (sent_ == queue_.size()) {
        queue_.clear();
        sent_ = 0;
    }
    wire::encode_frame(m, queue_);
    if (queue_.size() - sent_ > max_queued_) {
        error_ = "the other side stopped reading (send queue over its bound)";
        return false;
    }
    return flush();
}

bool ControlConnection::flush() {
    while (sent_ < queue_.size()) {
        const ssize_t n = ::send(fd_.get(), queue_.data() + sent_, queue_.size() - sent_, MSG_NOSIGNAL);
        if (n > 0) {
            sent_ += static_cast<size_t>(n);
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        if (n < 0 && errno == EINTR) continue;
        error_ = errno_text(errno);
        return false;
    }
    if (sent_ == queue_.size()) {
        queue_.clear();
        sent_ = 0;
    } else if (sent_ > 1024 * 1024) {  // keep the queue from creeping upward forever
        queue_.erase(queue_.begin(), queue_.begin() + static_cast<ptrdiff_t>(sent_));
        sent_ = 0;
    }
    return true;
}

}  // namespace pccl::net
