// A one-shot result handed from the reactor thread to a waiting caller thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>

namespace pccl::client {

template <typename T>
class Completion {
public:
    // First call wins; later calls are ignored (a result is final).
    bool complete(T value) {
        {
            std::lock_guard lock(mutex_);
            if (value_) return false;
            value_ = std::move(value);
        }
        cv_.notify_all();
        return true;
    }
    bool wait_for(std::chrono::milliseconds d) {
        std::unique_lock lock(mutex_);
        return cv_.wait_for(lock, d, [this] { return value_.has_value(); });
    }
    bool done() const {
        std::lock_guard lock(mutex_);
        return value_.has_value();
    }
    T get() const {  // call after done()
        std::lock_guard lock(mutex_);
        return *value_;
    }

private:
    mutable std::mutex mutex_;
    std::condition_variable cv_;
    std::optional<T> value_;
};

}  // namespace pccl::client
