#include "common/text.hpp"

namespace pccl::text {

void append_printable(std::string& out, std::string_view s) {
    static constexpr char kHex[] = "0123456789abcdef";
    const auto escape = [&](uint8_t byte) {
        const char e[4] = {'\\', 'x', kHex[byte >> 4], kHex[byte & 0xF]};
        out.append(e, sizeof(e));
    };
    for (size_t i = 0; i < s.size();) {
        const size_t n = utf8_sequence(s, i);
        const auto b0 = static_cast<uint8_t>(s[i]);
        const auto b1 = n > 1 ? static_cast<uint8_t>(s[i + 1]) : 0;
        // The backslash too: a literal "\x0a" from a peer must not read like an escaped newline.
        const bool escaped = (n == 1 && (b0 < 0x20 || b0 == 0x7F || b0 == '\\')) ||
                             (n == 2 && b0 == 0xC2 && b1 < 0xA0) ||  // U+0080..U+009F
                             is_unicode_line_break(s, i, n);
        if (n == 0) {
            escape(b0);
            ++i;
        } else if (escaped) {
            for (size_t k = 0; k < n; ++k) escape(static_cast<uint8_t>(s[i + k]));
            i += n;
        } else {
            out.append(s.data() + i, n);
            i += n;
        }
    }
}

}  // namespace pccl::text
