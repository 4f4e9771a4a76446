// Little-endian encoding of fixed-width integers, bounded byte strings and counted lists.
// Reader never reads past its span: every get_* checks the remaining length and latches a failure,
// so a decoder can read a whole message and check ok() once at the end.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

namespace pccl::wire {

class Writer {
public:
    explicit Writer(std::vector<uint8_t>& out) : out_(out) {}

    void u8(uint8_t v) { out_.push_back(v); }
    void u16(uint16_t v) { put_le(v); }
    void u32(uint32_t v) { put_le(v); }
    void u64(uint64_t v) { put_le(v); }
    void bytes(const void* data, size_t n) {
        const auto* p = static_cast<const uint8_t*>(data);
        out_.insert(out_.end(), p, p + n);
    }
    void string(const std::string& s) {  // u32 length + bytes; callers bound the length
        u32(static_cast<uint32_t>(s.size()));
        bytes(s.data(), s.size());
    }

private:
    template <typename T>
    void put_le(T v) {
        for (size_t i = 0; i < sizeof(T); ++i) out_.push_back(static_cast<uint8_t>(v >> (8 * i)));
    }
    std::vector<uint8_t>& out_;
};

class Reader {
public:
    explicit Reader(std::span<const uint8_t> in) : in_(in) {}

    uint8_t u8() { return get_le<uint8_t>(); }
    uint16_t u16() { return get_le<uint16_t>(); }
    uint32_t u32() { return get_le<uint32_t>(); }
    uint64_t u64() { return get_le<uint64_t>(); }
    void bytes(void* dst, size_t n) {
        if (!take(n)) { std::memset(dst, 0, n); return; }
        std::memcpy(dst, in_.data() + pos_ - n, n);
    }
    std::string string(size_t max_len) {
        const uint32_t n = u32();
        if (n > max_len) { failed_ = true; return {}; }
        if (!take(n)) return {};
        return std::string(reinterpret_cast<const char*>(in_.data() + pos_ - n), n);
    }
    // A count prefix for a list whose elements take at least `min_element_bytes` each: rejects
    // counts that could not possibly fit in what is left, before anything is allocated.
    uint32_t count(size_t max_count, size_t min_element_bytes) {
        const uint32_t n = u32();
        if (n > max_count || (min_element_bytes != 0 && n > remaining() / min_element_bytes)) {
            failed_ = true;
            return 0;
        }
        return n;
    }

    size_t remaining() const { return failed_ ? 0 : in_.size() - pos_; }
    bool ok() const { return !failed_; }
    // A complete decode consumed everything: trailing bytes mean a confused sender.
    bool finished_cleanly() const { return !failed_ && pos_ == in_.size(); }
    void fail() { failed_ = true; }

private:
    bool take(size_t n) {
        if (failed_ || in_.size() - pos_ < n) { failed_ = true; return false; }
        pos_ += n;
        return true;
    }
    template <typename T>
    T get_le() {
        if (!take(sizeof(T))) return 0;
        T v = 0;
        for (size_t i = 0; i < sizeof(T); ++i) v |= static_cast<T>(static_cast<T>(in_[pos_ - sizeof(T) + i]) << (8 * i));
        return v;
    }
    std::span<const uint8_t> in_;
    size_t pos_ = 0;
    bool failed_ = false;
};

}  // namespace pccl::wire
