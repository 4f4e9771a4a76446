#include "wan/config.hpp"

#include <arpa/inet.h>

#include <algorithm>
#include <charconv>
#include <fstream>
#include <iterator>
#include <utility>

namespace pccl::wan {

namespace {

constexpr double kNanosPerSecond = 1e9;
constexpr int kBitsPerByte = 8;
constexpr size_t kMaxConfigFileTokens = 1 << 20;

template <typename T>
bool parse_number(const std::string& text, T& out) {
    const char* end = text.data() + text.size();
    auto [ptr, ec] = std::from_chars(text.data(), end, out);
    return ec == std::errc() && ptr == end;
}

std::vector<std::string> split(const std::string& text, char sep) {
    std::vector<std::string> parts;
    size_t start = 0;
    while (true) {
        size_t at = text.find(sep, start);
        parts.push_back(text.substr(start, at - start));
        if (at == std::string::npos) return parts;
        start = at + 1;
    }
}

bool parse_host(const std::string& text, HostSpec& host, std::string& error) {
    auto parts = split(text, ',');
    in_addr addr{};
    if (parts.size() != 3 || parts[0].empty() || parts[1].empty() ||
        inet_pton(AF_INET, parts[2].c_str(), &addr) != 1) {
        error = "--host wants NETNS,TUN,IPV4, got '" + text + "'";
        return false;
    }
    host = {parts[0], parts[1], ntohl(addr.s_addr)};
    return true;
}

// Applies "key=value,key=value" on top of `spec`; an empty text changes nothing.
bool parse_link_spec(const std::string& text, LinkSpec& spec, std::string& error) {
    if (text.empty()) return true;
    for (const auto& item : split(text, ',')) {
        auto eq = item.find('=');
        std::string key = item.substr(0, eq);
        std::string value = eq == std::string::npos ? "" : item.substr(eq + 1);
        bool ok = false;
        if (key == "delay_ns") ok = parse_number(value, spec.delay_ns) && spec.delay_ns >= 0;
        else if (key == "rate_bps") ok = parse_number(value, spec.rate_bps);
        else if (key == "loss") ok = parse_number(value, spec.loss) && spec.loss >= 0 && spec.loss <= 1;
        else if (key == "queue_bytes") ok = parse_number(value, spec.queue_bytes);
        else if (key == "flow_rate_bps") ok = parse_number(value, spec.flow_rate_bps);
        else if (key == "flow_queue_bytes") ok = parse_number(value, spec.flow_queue_bytes);
        if (!ok) {
            error = "bad link setting '" + item + "'";
            return false;
        }
    }
    return true;
}

bool read_config_file(const std::string& path, std::vector<std::string>& tokens, std::string& error) {
    std::ifstream in(path);
    if (!in) {
        error = "cannot read config file " + path;
        return false;
    }
    std::vector<std::string> file_tokens{std::istream_iterator<std::string>(in), {}};
    if (file_tokens.size() > kMaxConfigFileTokens) {
        error = "config file " + path + " is too long";
        return false;
    }
    tokens.insert(tokens.end(), file_tokens.begin(), file_tokens.end());
    return true;
}

}  // namespace

uint64_t bdp_bytes(uint64_t rate_bps, int64_t one_way_delay_ns) {
    double rtt_s = 2.0 * static_cast<double>(one_way_delay_ns) / kNanosPerSecond;
    return static_cast<uint64_t>(static_cast<double>(rate_bps) * rtt_s / kBitsPerByte);
}

uint64_t default_queue_bytes(const LinkSpec& spec) {
    return std::max(kMinQueueBytes, bdp_bytes(spec.rate_bps, spec.delay_ns));
}

uint64_t default_flow_queue_bytes(const LinkSpec& spec) {
    return std::max(kMinFlowQueueBytes, bdp_bytes(spec.flow_rate_bps, spec.delay_ns));
}

const char* usage() {
    return "usage: pccl-wan-delay-line --host NETNS,TUN,IPV4 [--host ...]\n"
           "         [--default-link SPEC] [--link SRC:DST:SPEC ...] [--mtu N] [--seed N]\n"
           "         [--config FILE]   (FILE holds more of the same tokens) [--cuts-file FILE]\n"
           "  SPEC: comma-separated delay_ns=, rate_bps=, loss= (fraction), queue_bytes=,\n"
           "        flow_rate_bps=, flow_queue_bytes=; absent or 0 means none (queues: 0 = one BDP)\n"
           "  Prints 'READY' once every TUN is attached; SIGUSR1 prints a STATS line; SIGTERM or\n"
           "  SIGINT prints a final STATS line and exits. SIGUSR2 re-reads the cuts file (one SRC:DST a\n"
           "  line: links that drop every packet from then on) and prints 'CUTS n'.\n";
}

std::optional<std::vector<std::pair<size_t, size_t>>> parse_cuts(const std::string& text, size_t hosts,
                                                                  std::string& error) {
    std::vector<std::pair<size_t, size_t>> cuts;
    for (const auto& line : split(text, '\n')) {
        if (line.empty()) continue;
        auto parts = split(line, ':');
        size_t src = 0, dst = 0;
        if (parts.size() != 2 || !parse_number(parts[0], src) || !parse_number(parts[1], dst) || src >= hosts ||
            dst >= hosts || src == dst) {
            error = "a cut is SRC:DST between two of the hosts, got '" + line + "'";
            return std::nullopt;
        }
        cuts.push_back({src, dst});
    }
    return cuts;
}

std::optional<Config> parse_args(const std::vector<std::string>& argv, std::string& error) {
    Config config;
    LinkSpec default_link;
    std::vector<std::pair<std::pair<size_t, size_t>, std::string>> overrides;
    std::vector<std::string> args = argv;
    for (size_t i = 0; i < args.size(); ++i) {
        const std::string flag = args[i];  // a copy: --config grows `args`
        if (flag == "--help" || flag == "-h") {
            error.clear();
            return std::nullopt;
        }
        if (i + 1 >= args.size()) {
            error = "missing value after " + flag;
            return std::nullopt;
        }
        const std::string value = args[++i];
        if (flag == "--host") {
            HostSpec host;
            if (!parse_host(value, host, error)) return std::nullopt;
            config.hosts.push_back(host);
        } else if (flag == "--default-link") {
            if (!parse_link_spec(value, default_link, error)) return std::nullopt;
        } else if (flag == "--link") {
            auto parts = split(value, ':');
            size_t src = 0, dst = 0;
            if (parts.size() != 3 || !parse_number(parts[0], src) || !parse_number(parts[1], dst)) {
                error = "--link wants SRC:DST:SPEC, got '" + value + "'";
                return std::nullopt;
            }
            overrides.push_back({{src, dst}, parts[2]});
        } else if (flag == "--mtu") {
            if (!parse_number(value, config.mtu) || config.mtu < kMinMtu || config.mtu > kMaxMtu) {
                error = "--mtu must be within [576, 65535]";
                return std::nullopt;
            }
        } else if (flag == "--seed") {
            if (!parse_number(value, config.seed)) {
                error = "--seed wants an unsigned integer";
                return std::nullopt;
            }
        } else if (flag == "--cuts-file") {
            config.cuts_file = value;
        } else if (flag == "--config") {
            if (!read_config_file(value, args, error)) return std::nullopt;
        } else {
            error = "unknown option " + flag;
            return std::nullopt;
        }
    }
    const size_t n = config.hosts.size();
    if (n < 1 || n > kMaxHosts) {
        error = "need between 1 and 254 --host options";
        return std::nullopt;
    }
    config.links.assign(n * n, default_link);
    for (auto& [pair, text] : overrides) {
        auto [src, dst] = pair;
        if (src >= n || dst >= n || src == dst) {
            error = "--link " + std::to_string(src) + ":" + std::to_string(dst) + " names no pair of hosts";
            return std::nullopt;
        }
        LinkSpec spec;  // an override replaces the default, it does not amend it
        if (!parse_link_spec(text, spec, error)) return std::nullopt;
        config.links[src * n + dst] = spec;
    }
    for (size_t a = 0; a < n; ++a)
        for (size_t b = a + 1; b < n; ++b)
            if (config.hosts[a].ip == config.hosts[b].ip) {
                error = "hosts " + std::to_string(a) + " and " + std::to_string(b) + " share an address";
                return std::nullopt;
            }
    return config;
}

}  // namespace pccl::wan
