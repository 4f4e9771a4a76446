// The writing half of the data plane: each outgoing pool's backlog of frames, each connection's
// queue, and the sendmsg calls that copy payloads into the kernel. Frames wait in their pool's
// backlog until a connection of the pool has room (late binding, bind_frames), and each connection
// serves concurrent operations round-robin (FairSendQueue).
//
// It runs in one of two modes, chosen once per communicator:
// - inline: on the reactor thread, woken through the reactor's epoll (its own epoll set is watched
//   there), completions reported on the calling stack. With fewer cores than busy threads (several
//   peers on a small machine) a second thread only adds wake-ups.
// - threaded: on a thread of its own with its own epoll. Copying into the socket is about a third
//   of a peer's CPU time in a ring all-reduce; with cores to spare the reactor then only receives
//   and reduces while this thread sends, as gloo's caller thread sends while its device thread
//   receives. Completions are posted to the reactor.
//
// Every method is called on the reactor thread. The writer never waits for the reactor; the
// reactor waits for the writer only in drop() and remove_pool(), because the memory or the socket
// behind them is about to go away.
//
// Threaded, the writer works in rounds: the mailbox's commands, then writes. A round ends after the
// sendmsg in progress once a command waits or limits::kWriterRoundBytes went out, and reports the
// frames it completed: a small op's frame must not wait in the mailbox, nor its completion in the
// writer, while a big op's backlog streams into a socket that a fast receiver keeps draining (that
// held a small op until the big one ended).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <sys/epoll.h>

#include "client/send_queue.hpp"
#include "common/limits.hpp"
#include "net/event_loop.hpp"
#include "net/socket.hpp"

namespace pccl::client {

class FrameWriter {
public:
    using PeerId = uint64_t;
    struct SentFrame {
        uint64_t queue_key = 0;  // SendItem::uid
        uint64_t token = 0;
        uint32_t bytes = 0;      // header + payload
        bool zeros = false;      // the rest of a dropped frame, sent as zeros
    };
    struct Callbacks {
        // Frames now fully written, in write order (reactor thread).
        std::function<void(const std::vector<SentFrame>&)> sent;
        // A write on a connection of the pool (peer, generation) failed: the writer dropped that
        // pool and its frames. Always posted, never called on the stack of a writer method.
        std::function<void(PeerId peer, uint64_t generation, const std::string& why)> failed;
    };

    // PCCL_SEND_THREAD=on|off|auto (default auto: a thread when this process may run on at least
    // limits::kSendThreadMinCores cores).
    static bool threaded_by_default();

    FrameWriter(net::EventLoop& reactor, bool threaded, Callbacks callbacks);
    ~FrameWriter();
    FrameWriter(const FrameWriter&) = delete;
    FrameWriter& operator=(const FrameWriter&) = delete;

    bool threaded() const { return threaded_; }
    // A handshaken connection of the pool to `peer`; `fd` stays open until remove_pool(peer).
    void add_connection(PeerId peer, uint64_t generation, uint64_t conn, int fd);
    // Appends frames to the pool's backlog; their memory must stay valid until they are reported
    // sent, dropped or the pool removed.
    void push(PeerId peer, uint64_t generation, std::vector<SendItem> frames);
    // Forgets every frame queued under `queue_key`. On return no write reads their memory again; a
    // half-written frame is finished with zeros (its receiver expects the rest). Returns the bytes
    // of the key's frames that never went out and never will (dropped now, or thrown away with a
    // pool that went down), so the caller can tell what did go out, reports still on their way
    // included; nothing once stopped or dead (the writer cannot say).
    std::optional<uint64_t> drop(uint64_t queue_key);
    // Forgets the pool to `peer`; on return no write touches its sockets, which may be closed.
    void remove_pool(PeerId peer);
    // Ends the thread (threaded) or the watch on the reactor (inline); frames are dropped.
    void stop();

private:
    struct Conn {
        PeerId peer = 0;
        int fd = -1;
        FairSendQueue queue;
        bool want_write = false;
    };
    struct Pool {
        uint64_t generation = 0;
        std::vector<uint64_t> conns;
        FairSendQueue backlog;
    };
    using Command = std::function<void()>;

    // Runs `cmd` in the writer's context: inline at once, threaded through the mailbox; `wait`
    // returns only after it ran.
    // (A template: inline, on the hot path, the command is called without a std::function.)
    template <typename Fn>
    void execute(Fn&& cmd, bool wait);
    void wake();
    void thread_main();
    void serve_ready(const epoll_event* events, size_t n);
    void report_sent();

    // Writer context only.
    Pool& pool_for(PeerId peer, uint64_t generation);
    void erase_pool(PeerId peer);
    void feed_pool(PeerId peer);
    // Threaded: the round is over (a command waits, or the round's byte budget is spent).
    bool round_over() const {
        return threaded_ && (round_bytes_ >= limits::kWriterRoundBytes || queued_commands_.load(std::memory_order_relaxed) > 0);
    }
    // The thread cannot go on (epoll failed): waiters are released, pools reported failed.
    void die(const std::string& why);
    bool feed(uint64_t conn_id, Conn& c);
    bool flush(Conn& c);
    void arm(uint64_t conn_id, Conn& c);
    void fail(PeerId peer, const std::string& why);
    void post_failure(PeerId peer, uint64_t generation, const std::string& why);

    net::EventLoop& reactor_;
    const bool threaded_;
    Callbacks callbacks_;
    net::Fd epoll_;
    uint64_t reactor_watch_ = 0;  // inline: epoll_ watched by the reactor

    // Writer context.
    std::unordered_map<PeerId, Pool> pools_;
    std::unordered_map<uint64_t, Conn> conns_;
    std::vector<SentFrame> sent_;
    std::vector<SendItem*> order_;
    // Bytes of each queue key thrown away unwritten with a pool that went down; drop() hands them
    // over (the key's owner always drops it once its op or sync ends, which bounds this map).
    std::unordered_map<uint64_t, uint64_t> discarded_;

    // Threaded mode: the mailbox.
    net::Fd wake_;
    std::mutex mutex_;
    std::condition_variable done_;
    std::vector<Command> mailbox_;
    std::atomic<int> queued_commands_{0};  // posted, not run yet
    size_t round_bytes_ = 0;                // written in this round (writer thread)
    uint64_t commands_posted_ = 0;  // under mutex_
    uint64_t commands_run_ = 0;     // under mutex_
    bool stopping_ = false;         // under mutex_
    bool dead_ = false;             // under mutex_: the thread ended on an error
    std::thread thread_;
    bool stopped_ = false;
};

}  // namespace pccl::client
