// One-line-per-event logging, filtered by PCCL_LOG_LEVEL (TRACE, DEBUG, INFO, WARN, ERR, FATAL, NONE).
#pragma once

#include <string>

#include "common/text.hpp"

namespace pccl::log {

enum class Level : int { TRACE = 0, DEBUG = 1, INFO = 2, WARN = 3, ERR = 4, FATAL = 5, NONE = 6 };

Level threshold();
void write(Level level, const std::string& line);

template <typename... Args>
void emit(Level level, const Args&... args) {
    if (level < threshold()) return;
    write(level, text::concat(args...));
}

}  // namespace pccl::log

#define PCCL_LOG(LEVEL, ...)                                                        \
    do {                                                                            \
        if (::pccl::log::Level::LEVEL >= ::pccl::log::threshold())                  \
            ::pccl::log::emit(::pccl::log::Level::LEVEL, __VA_ARGS__);              \
    } while (0)
