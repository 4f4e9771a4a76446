// What the delay line emulates: the hosts it attaches to and one spec per directed link. Parsed from
// the command line (or a file of the same tokens) that pccl/testing/wan.py writes; every quantity is
// already in base units (ns, bit/s, bytes, fraction), so this side does no unit parsing.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace pccl::wan {

// Bounds of the command line: a config beyond them is a mistake, not a bigger emulation.
inline constexpr size_t kMaxHosts = 254;  // one /24 of host addresses
inline constexpr uint32_t kMinMtu = 576;    // the IPv4 minimum every host must accept
inline constexpr uint32_t kMaxMtu = 65535;  // the IPv4 total-length field
inline constexpr uint32_t kDefaultMtu = 9000;

struct HostSpec {
    std::string netns;  // a name under /var/run/netns, or an absolute path to a netns file
    std::string tun;    // the persistent TUN device inside that namespace
    uint32_t ip = 0;    // IPv4, host byte order
};

struct LinkSpec {
    int64_t delay_ns = 0;           // one way
    uint64_t rate_bps = 0;          // 0: no serialisation, no link queue
    double loss = 0.0;              // probability a packet is dropped on arrival
    uint64_t queue_bytes = 0;       // 0: the default (see default_queue_bytes)
    uint64_t flow_rate_bps = 0;     // per 5-tuple cap; 0: none
    uint64_t flow_queue_bytes = 0;  // 0: the default
};

struct Config {
    std::vector<HostSpec> hosts;
    std::vector<LinkSpec> links;  // hosts.size()^2, row = source, column = destination
    uint32_t mtu = kDefaultMtu;
    uint64_t seed = 1;
    // Read again on SIGUSR2: one SRC:DST per line, the directed links that drop every packet from
    // then on (a cut cable), replacing the previous set. Empty: no cuts can be made.
    std::string cuts_file;

    const LinkSpec& link(size_t src, size_t dst) const { return links[src * hosts.size() + dst]; }
};

// A queue of one bandwidth-delay product (round trip = 2 x one-way delay) lets a single loss-based
// TCP flow keep the link busy; the floor keeps short or slow links from dropping every burst.
inline constexpr uint64_t kMinQueueBytes = 256 * 1024;
inline constexpr uint64_t kMinFlowQueueBytes = 128 * 1024;
uint64_t bdp_bytes(uint64_t rate_bps, int64_t one_way_delay_ns);
uint64_t default_queue_bytes(const LinkSpec& spec);
uint64_t default_flow_queue_bytes(const LinkSpec& spec);

inline constexpr size_t kMaxCutsFileBytes = 1 << 20;
// Parses a cuts file's text into directed pairs, each within [0, hosts); sets `error` otherwise.
std::optional<std::vector<std::pair<size_t, size_t>>> parse_cuts(const std::string& text, size_t hosts,
                                                                  std::string& error);

// Parses argv (without argv[0]); returns the config or sets `error`. `--help` text is usage().
std::optional<Config> parse_args(const std::vector<std::string>& args, std::string& error);
const char* usage();

}  // namespace pccl::wan
