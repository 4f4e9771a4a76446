#include "net/address.hpp"

#include <cstring>

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>

namespace pccl::net {

uint16_t Endpoint::port() const {
    if (family() == AF_INET) return ntohs(reinterpret_cast<const sockaddr_in&>(storage).sin_port);
    if (family() == AF_INET6) return ntohs(reinterpret_cast<const sockaddr_in6&>(storage).sin6_port);
    return 0;
}

void Endpoint::set_port(uint16_t port) {
    if (family() == AF_INET) reinterpret_cast<sockaddr_in&>(storage).sin_port = htons(port);
    if (family() == AF_INET6) reinterpret_cast<sockaddr_in6&>(storage).sin6_port = htons(port);
}

std::string Endpoint::host_string() const {
    char host[INET6_ADDRSTRLEN] = "?";
    if (family() == AF_INET) inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in&>(storage).sin_addr, host, sizeof(host));
    else if (family() == AF_INET6) inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6&>(storage).sin6_addr, host, sizeof(host));
    return host;
}

std::string Endpoint::to_string() const {
    if (family() != AF_INET && family() != AF_INET6) return "?";
    // Appended piece by piece: GCC 12's -Wrestrict misfires on "[" + std::string + "]:" chains.
    std::string out;
    if (family() == AF_INET6) out += '[';
    out += host_string();
    out += family() == AF_INET6 ? "]:" : ":";
    out += std::to_string(port());
    return out;
}

wire::IpAddress Endpoint::ip() const {
    wire::IpAddress ip;
    if (family() == AF_INET) {
        ip.family = 4;
        std::memcpy(ip.bytes.data(), &reinterpret_cast<const sockaddr_in&>(storage).sin_addr, 4);
    } else {
        const auto& addr = reinterpret_cast<const sockaddr_in6&>(storage).sin6_addr;
        if (IN6_IS_ADDR_V4MAPPED(&addr)) {  // a dual-stack master saw an IPv4 peer: publish it as IPv4
            ip.family = 4;
            std::memcpy(ip.bytes.data(), reinterpret_cast<const uint8_t*>(&addr) + 12, 4);
        } else {
            ip.family = 6;
            std::memcpy(ip.bytes.data(), &addr, 16);
        }
    }
    return ip;
}

Endpoint Endpoint::from(const wire::IpAddress& ip, uint16_t port) {
    Endpoint e;
    if (ip.family == 4) {
        auto& sin = reinterpret_cast<sockaddr_in&>(e.storage);
        sin.sin_family = AF_INET;
        std::memcpy(&sin.sin_addr, ip.bytes.data(), 4);
        e.length = sizeof(sockaddr_in);
    } else {
        auto& sin6 = reinterpret_cast<sockaddr_in6&>(e.storage);
        sin6.sin6_family = AF_INET6;
        std::memcpy(&sin6.sin6_addr, ip.bytes.data(), 16);
        e.length = sizeof(sockaddr_in6);
    }
    e.set_port(port);
    return e;
}

Status parse_endpoint(const std::string& text, Endpoint& out) {
    std::string host, port;
    if (!text.empty() && text.front() == '[') {
        const auto close = text.find(']');
        if (close == std::string::npos || close + 1 >= text.size() || text[close + 1] != ':')
            return Status::error(Result::INVALID_ARGUMENT, "bad address '" + text + "': expected [ipv6]:port");
        host = text.substr(1, close - 1);
        port = text.substr(close + 2);
    } else {
        const auto colon = text.rfind(':');
        if (colon == std::string::npos || text.find(':') != colon)
            return Status::error(Result::INVALID_ARGUMENT,
                                 "bad address '" + text + "': expected host:port (write IPv6 as [addr]:port)");
        host = text.substr(0, colon);
        port = text.substr(colon + 1);
    }
    if (host.empty() || port.empty() || port.find_first_not_of("0123456789") != std::string::npos ||
        port.size() > 5 || std::stoul(port) > 65535)
        return Status::error(Result::INVALID_ARGUMENT, "bad address '" + text + "': expected host:port with port 0-65535");

    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    addrinfo* result = nullptr;
    const int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &result);
    if (rc != 0 || result == nullptr)
        return Status::error(Result::INVALID_ARGUMENT,
                             "cannot resolve '" + host + "': " + gai_strerror(rc));
    // Prefer IPv4 when a name resolves to both: loopback names and dual-stack masters reach it.
    const addrinfo* pick = result;
    for (const addrinfo* ai = result; ai; ai = ai->ai_next)
        if (ai->ai_family == AF_INET) { pick = ai; break; }
    std::memcpy(&out.storage, pick->ai_addr, pick->ai_addrlen);
    out.length = pick->ai_addrlen;
    freeaddrinfo(result);
    return Status::ok();
}

std::optional<Endpoint> local_endpoint(int fd) {
    Endpoint e;
    e.length = sizeof(e.storage);
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&e.storage), &e.length) != 0) return std::nullopt;
    return e;
}

std::optional<Endpoint> remote_endpoint(int fd) {
    Endpoint e;
    e.length = sizeof(e.storage);
    if (getpeername(fd, reinterpret_cast<sockaddr*>(&e.storage), &e.length) != 0) return std::nullopt;
    return e;
}

}  // namespace pccl::net
