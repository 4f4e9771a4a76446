#include "common/log.hpp"

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
    static std::mutex mutex;
    using namespace std::chrono;
    const auto ms = duration_cast<milliseconds>(system_clock::now().time_since_epoch()).count();
    std::lock_guard lock(mutex);
    std::fprintf(stderr, "[pccl %lld.%03lld %s pid=%d] %s\n", static_cast<long long>(ms / 1000),
                 static_cast<long long>(ms % 1000), level_name(level), static_cast<int>(getpid()),
                 line.c_str());
}

}  // namespace pccl::log
