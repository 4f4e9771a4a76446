#include "client/send_queue.hpp"

#include <algorithm>

#include "common/limits.hpp"

namespace pccl::client {

namespace {
const uint8_t kZeros[limits::kDiscardBufferBytes] = {};
}

void FairSendQueue::push(const SendItem& item) {
    auto& q = fifo_[item.uid];
    if (q.empty()) rotation_.push_back(item.uid);
    q.push_back(item);
    bytes_ += item.total() - item.sent;
}

size_t FairSendQueue::gather(iovec* iov, size_t max_iov, std::vector<SendItem*>& order) {
    order.clear();
    size_t n = 0;
    // Returns false once no more entries may follow (no room, or a short zero source).
    auto add = [&](SendItem& item) {
        if (n + 2 > max_iov) return false;
        if (item.sent < wire::kDataHeaderBytes)
            iov[n++] = {item.header + item.sent, wire::kDataHeaderBytes - item.sent};
        const uint32_t payload_sent = item.sent > wire::kDataHeaderBytes ? item.sent - wire::kDataHeaderBytes : 0;
        const uint32_t left = item.length - payload_sent;
        order.push_back(&item);
        if (left == 0) return true;
        if (item.data == nullptr) {
            iov[n++] = {const_cast<uint8_t*>(kZeros), std::min<size_t>(left, sizeof(kZeros))};
            return false;
        }
        iov[n++] = {const_cast<uint8_t*>(item.data) + payload_sent, left};
        return true;
    };
    if (partial_uid_ != 0) {
        // The rest of the half-written frame goes first, and then every other op (including one
        // that arrived since) gets a frame before this op gets its next. Without this a big op
        // whose frames never fit one write would keep the lead forever and starve the rest.
        rotate_after(partial_uid_);
        if (!add(fifo_.at(partial_uid_).front())) return n;
    }
    // Round robin: the k-th frame of every op before anybody's (k+1)-th.
    for (size_t round = 0;; ++round) {
        bool any = false;
        for (uint64_t uid : rotation_) {
            auto& q = fifo_.at(uid);
            const size_t index = round + (uid == partial_uid_ ? 1 : 0);
            if (index >= q.size()) continue;
            any = true;
            if (!add(q[index])) return n;
        }
        if (!any) return n;
    }
}

void FairSendQueue::retire_front(uint64_t uid) {
    auto it = fifo_.find(uid);
    it->second.pop_front();
    if (it->second.empty()) {
        fifo_.erase(it);
        rotation_.erase(std::find(rotation_.begin(), rotation_.end(), uid));
    }
}

void FairSendQueue::rotate_after(uint64_t uid) {
    // The op served last goes to the back, so the next batch starts with the one after it.
    auto it = std::find(rotation_.begin(), rotation_.end(), uid);
    if (it == rotation_.end()) return;  // its queue ran empty
    std::rotate(rotation_.begin(), std::next(it), rotation_.end());
}

bool FairSendQueue::pop_next(SendItem& out) {
    if (rotation_.empty()) return false;
    const uint64_t uid = rotation_.front();
    out = fifo_.at(uid).front();
    bytes_ -= out.total() - out.sent;
    retire_front(uid);
    rotate_after(uid);  // a no-op once the op ran out of frames
    return true;
}

size_t FairSendQueue::drop_op(uint64_t uid) {
    auto it = fifo_.find(uid);
    if (it == fifo_.end()) return 0;
    auto& q = it->second;
    const bool keep_front = partial_uid_ == uid;
    const size_t keep = keep_front ? 1 : 0;
    const size_t dropped = unwritten(q, keep);
    bytes_ -= dropped;
    q.resize(keep);
    if (keep_front) {
        q.front().data = nullptr;  // the receiver expects the rest of this frame
        return dropped + q.front().total() - q.front().sent;
    }
    fifo_.erase(it);
    rotation_.erase(std::find(rotation_.begin(), rotation_.end(), uid));
    return dropped;
}

size_t bind_frames(FairSendQueue& backlog, FairSendQueue& conn, size_t ahead) {
    size_t moved = 0;
    SendItem item;
    while (conn.bytes() < ahead && backlog.pop_next(item)) {
        conn.push(item);
        ++moved;
    }
    return moved;
}

}  // namespace pccl::client
