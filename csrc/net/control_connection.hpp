// A non-blocking control stream of framed messages: bounded read parsing, a bounded write queue.
// The owner drives it from its event loop: read_messages() on EPOLLIN, flush() on EPOLLOUT.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "net/socket.hpp"
#include "wire/messages.hpp"

namespace pccl::net {

class ControlConnection {
public:
    ControlConnection(Fd fd, uint32_t max_incoming_payload, size_t max_queued_bytes)
        : fd_(std::move(fd)), parser_(max_incoming_payload), max_queued_(max_queued_bytes) {}

    int fd() const { return fd_.get(); }
    void set_max_incoming(uint32_t bytes) { parser_.set_max_payload(bytes); }

    enum class ReadStatus { OPEN, CLOSED, PROTOCOL_ERROR };
    // Reads everything available and appends the decoded messages. CLOSED on EOF or a socket
    // error, PROTOCOL_ERROR on a malformed frame (error() says what); messages decoded before
    // the problem are still returned.
    ReadStatus read_messages(std::vector<wire::Message>& out);

    // Queues a frame and tries to write it at once. False when the peer stopped reading and the
    // queue exceeds its bound: the owner must drop the connection.
    bool send(const wire::Message& m);
    // Writes what the socket takes. False on a socket error.
    bool flush();
    bool wants_write() const { return sent_ < queue_.size(); }
    const std::string& error() const { return error_; }

private:
    Fd fd_;
    wire::FrameParser parser_;
    std::vector<uint8_t> queue_;
    size_t sent_ = 0;
    size_t max_queued_;
    std::string error_;
};

}  // namespace pccl::net
