#include "common/log.hpp"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include <unistd.h>

namespace pccl::log {
namespace {

Level parse_level(const char* text) {
    if (text == nullptr) return Level::WARN;
    struct Name { const char* name; Level level; };
    static constexpr Name kNames[] = {
        {"TRACE", Level::TRACE}, {"DEBUG", Level::DEBUG}, {"INFO", Level::INFO},
        {"WARN", Level::WARN},   {"WARNING", Level::WARN}, {"ERR", Level::ERR},
        {"ERROR", Level::ERR},   {"FATAL", Level::FATAL}, {"NONE", Level::NONE},
    };
    for (const auto& n : kNames)
        if (strcasecmp(text, n.name) == 0) return n.level;
    return Level::WARN;
}

const char* level_name(Level l) {
    switch (l) {
        case Level::TRACE: return "TRACE";
        case Level::DEBUG: return "DEBUG";
        case Level::INFO: return "INFO";
        case Level::WARN: return "WARN";
        case Level::ERR: return "ERR";
        case Level::FATAL: return "FATAL";
        case Level::NONE: return "NONE";
    }
    return "?";
}

}  // namespace

Level threshold() {
    static const Level level = parse_level(std::getenv("PCCL_LOG_LEVEL"));
    return level;
}

void write(Level level, const std::string& line) {
    using namespace std::chrono;
    const auto ms = duration_cast<milliseconds>(system_clock::now().time_since_epoch()).count();
    char prefix[96];
    const int n = std::snprintf(prefix, sizeof(prefix), "[pccl %lld.%03lld %s pid=%d] ", static_cast<long long>(ms / 1000),
                                static_cast<long long>(ms % 1000), level_name(level), static_cast<int>(getpid()));
    std::string out(prefix, n > 0 ? std::min<size_t>(static_cast<size_t>(n), sizeof(prefix) - 1) : 0);
    text::append_printable(out, line);  // a peer's text in the line cannot split or forge it
    out += '\n';
    // One write(2) per line, not stdio: lines of concurrent threads and processes sharing the
    // stream never interleave, and nothing depends on the C stdio state of the host process.
    static std::mutex mutex;
    std::lock_guard lock(mutex);
    const char* at = out.data();
    size_t left = out.size();
    while (left > 0) {
        const ssize_t w = ::write(STDERR_FILENO, at, left);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return;  // nowhere to log to: drop the line rather than fail the caller
        at += w;
        left -= static_cast<size_t>(w);
    }
}

}  // namespace pccl::log
