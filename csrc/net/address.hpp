// Endpoints: "ip:port", "[ipv6]:port" or "host:port", resolved with getaddrinfo.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include <sys/socket.h>

#include "common/status.hpp"
#include "wire/messages.hpp"

namespace pccl::net {

struct Endpoint {
    sockaddr_storage storage{};
    socklen_t length = 0;

    int family() const { return storage.ss_family; }
    uint16_t port() const;
    void set_port(uint16_t port);
    std::string to_string() const;
    std::string host_string() const;  // the address alone: "10.0.0.1", "::1"
    wire::IpAddress ip() const;
    static Endpoint from(const wire::IpAddress& ip, uint16_t port);
};

// Splits "host:port" / "[v6]:port" and resolves the host. Port 0 is allowed (bind to any free port).
Status parse_endpoint(const std::string& text, Endpoint& out);

// The endpoint a socket is bound to / connected to.
std::optional<Endpoint> local_endpoint(int fd);
std::optional<Endpoint> remote_endpoint(int fd);

}  // namespace pccl::net
