// What one data connection still has to write: a FIFO of frames per operation, served round-robin
// one frame per operation at a time, so concurrent all-reduces share a connection fairly instead of
// the first one monopolising it. A frame already half written always goes on first (the receiver
// is in the middle of it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <unordered_map>
#include <vector>

#include <sys/uio.h>

#include "wire/data_frame.hpp"

namespace pccl::client {

struct SendItem {
    uint8_t header[wire::kDataHeaderBytes];
    const uint8_t* data = nullptr;  // nullptr: send zeros (the op was cancelled mid-frame)
    uint32_t length = 0;
    uint32_t sent = 0;              // of header + payload
    uint64_t uid = 0;
    uint64_t token = 0;             // the ring's buffer behind `data`, freed once sent (0: none)

    uint32_t total() const { return static_cast<uint32_t>(wire::kDataHeaderBytes) + length; }
};

class FairSendQueue {
public:
    void push(const SendItem& item);
    bool empty() const { return rotation_.empty(); }
    size_t bytes() const { return bytes_; }

    // Fills `iov` (room for `max_iov` entries) in service order and records the frames in `order`.
    size_t gather(iovec* iov, size_t max_iov, std::vector<SendItem*>& order);
    // Accounts for `written` bytes of the last gather; `on_sent(item)` runs for every frame that is
    // now complete, after it left the queue.
    template <typename OnSent>
    void advance(size_t written, const std::vector<SendItem*>& order, OnSent&& on_sent);
    // Forgets an op's frames; a half-written one stays and is finished with zeros. Returns the
    // bytes of the op's frames that will never be written (the zero tail among them).
    size_t drop_op(uint64_t uid);
    // Calls f(uid, bytes) with the bytes each op still has to write here (the queue is about to be
    // thrown away: its pool went down).
    template <typename F>
    void for_each_unwritten(F&& f) const {
        for (const auto& [uid, q] : fifo_)
            if (const size_t left = unwritten(q, 0); left > 0) f(uid, left);
    }
    // Takes the next whole frame in service order (round-robin over ops) out of the queue, for a
    // queue that is never written from (a pool's backlog). False when empty.
    bool pop_next(SendItem& out);

private:
    // Bytes of q[from...] not yet written.
    static size_t unwritten(const std::deque<SendItem>& q, size_t from) {
        size_t left = 0;
        for (size_t i = from; i < q.size(); ++i) left += q[i].total() - q[i].sent;
        return left;
    }
    void retire_front(uint64_t uid);
    void rotate_after(uint64_t uid);

    std::unordered_map<uint64_t, std::deque<SendItem>> fifo_;
    std::deque<uint64_t> rotation_;  // ops with frames waiting, in service order
    uint64_t partial_uid_ = 0;       // op whose front frame is half written, 0 if none
    size_t bytes_ = 0;
};

// Late binding of frames to the connections of a pool: a connection takes frames from the pool's
// shared backlog only while it holds fewer than `ahead` unwritten bytes, so a connection that the
// network slows (a loss halves its window) carries fewer pieces instead of holding back the op's
// end with a share fixed when the pieces were queued. Returns the number of frames moved.
size_t bind_frames(FairSendQueue& backlog, FairSendQueue& conn, size_t ahead);

template <typename OnSent>
void FairSendQueue::advance(size_t written, const std::vector<SendItem*>& order, OnSent&& on_sent) {
    uint64_t last_done = 0;
    for (SendItem* item : order) {
        if (written == 0) break;
        const size_t take = std::min<size_t>(written, item->total() - item->sent);
        item->sent += static_cast<uint32_t>(take);
        written -= take;
        bytes_ -= take;
        if (item->sent < item->total()) {
            partial_uid_ = item->uid;
            break;
        }
        const SendItem done = *item;  // the reference dies with pop_front
        partial_uid_ = 0;
        last_done = done.uid;
        retire_front(done.uid);
        on_sent(done);
    }
    if (last_done != 0 && partial_uid_ == 0) rotate_after(last_done);
}

}  // namespace pccl::client
