// Text of messages and log lines. Building them without iostreams: concat(a, b, ...) appends
// strings, characters, booleans ("true"/"false"), integers (int8_t/uint8_t too, as numbers) and
// floating-point numbers (as printf's %g would) into one std::string. And making text that came
// from a peer safe to print: utf8_sequence() and append_printable().
//
// Why not std::ostringstream: it drags in the process-wide locale machinery, and a Python process
// may load another libstdc++'s view of it (torch, CUDA libraries). On a GCC 13 build the master
// crashed inside `ostream << unsigned long` the first time it logged a number; std::to_chars has no
// locale and no shared state.
#pragma once

#include <charconv>
#include <cstddef>
#include <cstdint>
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

// Length of the valid UTF-8 sequence at s[i], or 0 if the bytes there are not one.
inline size_t utf8_sequence(std::string_view s, size_t i) {
    const auto at = [&](size_t k) { return static_cast<uint8_t>(s[k]); };
    const auto cont = [&](size_t k) { return k < s.size() && (at(k) & 0xC0) == 0x80; };
    const uint8_t c = at(i);
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) return cont(i + 1) ? 2 : 0;
    if (c >= 0xE0 && c <= 0xEF) {
        if (!cont(i + 1) || !cont(i + 2)) return 0;
        const uint8_t c1 = at(i + 1);
        if (c == 0xE0 && c1 < 0xA0) return 0;  // overlong
        if (c == 0xED && c1 > 0x9F) return 0;  // surrogates
        return 3;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        if (!cont(i + 1) || !cont(i + 2) || !cont(i + 3)) return 0;
        const uint8_t c1 = at(i + 1);
        if (c == 0xF0 && c1 < 0x90) return 0;  // overlong
        if (c == 0xF4 && c1 > 0x8F) return 0;  // beyond U+10FFFF
        return 4;
    }
    return 0;
}

// Whether the n-byte sequence at s[i] (n from utf8_sequence) is U+2028 or U+2029, which some
// readers take for a line break.
inline bool is_unicode_line_break(std::string_view s, size_t i, size_t n) {
    return n == 3 && static_cast<uint8_t>(s[i]) == 0xE2 && static_cast<uint8_t>(s[i + 1]) == 0x80 &&
           (static_cast<uint8_t>(s[i + 2]) == 0xA8 || static_cast<uint8_t>(s[i + 2]) == 0xA9);
}

// Appends `s` as one printable line: control bytes (newlines included), the backslash, C1
// controls, U+2028/U+2029 and bytes that are not valid UTF-8 become \xNN, so text a peer sent
// can neither forge nor split a log line, nor break a reader that expects UTF-8.
void append_printable(std::string& out, std::string_view s);

template <typename... Args>
std::string concat(const Args&... args) {
    std::string out;
    (append(out, args), ...);
    return out;
}

}  // namespace pccl::text
