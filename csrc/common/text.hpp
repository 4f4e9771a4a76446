// Building messages without iostreams: concat(a, b, ...) appends strings, characters, booleans
// ("true"/"false"), integers (int8_t/uint8_t too, as numbers) and floating-point numbers (as
// printf's %g would) into one std::string.
//
// Why not std::ostringstream: it drags in the process-wide locale machinery, and a Python process
// may load another libstdc++'s view of it (torch, CUDA libraries). On a GCC 13 build the master
// crashed inside `ostream << unsigned long` the first time it logged a number; std::to_chars has no
// locale and no shared state.
#pragma once

#include <charconv>
#include <concepts>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>

namespace pccl::text {

inline void append(std::string& out, std::string_view s) { out.append(s); }
inline void append(std::string& out, const char* s) { out.append(s ? s : "(null)"); }
inline void append(std::string& out, char c) { out.push_back(c); }
inline void append(std::string& out, bool b) { out.append(b ? "true" : "false"); }
// Any other pointer would convert to bool and print "true": refuse it at compile time.
template <typename T>
    requires(!std::same_as<std::remove_cv_t<T>, char>)
void append(std::string& out, T* pointer) = delete;

template <std::integral T>
    requires(!std::same_as<T, bool> && !std::same_as<T, char>)
void append(std::string& out, T value) {
    char buf[48];  // 128-bit integers included
    const auto r = std::to_chars(buf, buf + sizeof(buf), value);
    if (r.ec == std::errc()) out.append(buf, r.ptr);
}

template <std::floating_point T>
void append(std::string& out, T value) {
    char buf[48];
    const auto r = std::to_chars(buf, buf + sizeof(buf), value, std::chars_format::general, 6);
    if (r.ec == std::errc()) out.append(buf, r.ptr);
}

template <typename... Args>
std::string concat(const Args&... args) {
    std::string out;
    (append(out, args), ...);
    return out;
}

}  // namespace pccl::text
