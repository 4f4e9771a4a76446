// The peer-to-peer transport of one communicator, run on its reactor thread: the listening socket,
// K outgoing connections per ring neighbour (a pool), incoming connections, and the routing of data
// frames to running operations by op uid. Writing is the FrameWriter's (inline or on a thread of its
// own): pieces are striped over the pool by late binding (they wait in the pool's backlog until a
// connection has room, so the fastest connections carry the most), concurrent ops share the backlog
// and each connection round-robin, and pieces are written straight from the caller's memory with
// sendmsg. They are read straight into the destination.
//
// A frame for an op this peer has not been told about yet (uid above the last OP_GO) parks its
// connection: TCP back-pressure holds the sender until the OP_GO arrives. A frame for an op that is
// over (or cancelled) is read into a discard buffer.
//
// Early start: an op may run before its OP_GO (unconfirmed), under the uid of an OP_TICKET. Until
// confirmed it sends its next peer only a bounded share (limits::kSpeculative*), holding the rest,
// and it is exempt from deadlines (the others may not have called yet). Frames that arrive for a
// ticket's uid before this peer runs that op are read into memory (at most kSpeculativeBytes per
// previous peer) and handed to the op when it starts; they never park a connection, which could
// hold up another op's frames queued behind them.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/status.hpp"
#include "net/address.hpp"
#include "net/event_loop.hpp"
#include "client/bandwidth_probe.hpp"
#include "client/frame_writer.hpp"
#include "client/scratch_pool.hpp"
#include "client/send_queue.hpp"
#include "ring/ring_allreduce.hpp"
#include "wire/data_frame.hpp"

namespace pccl::client {

using PeerId = uint64_t;
using Clock = std::chrono::steady_clock;

class DataPlaneEvents {
public:
    virtual ~DataPlaneEvents() = default;
    // Every planned range of a shared-state sync arrived (hashes not checked yet).
    virtual void on_sync_received(uint64_t sync_uid) = 0;
    // A receiving sync made no progress for the deadline; `missing`: its planned ranges (peer = the
    // distributor first named) that have not fully arrived.
    virtual void on_sync_stalled(uint64_t sync_uid, const Status& why, std::vector<wire::SyncRange> missing) = 0;
    // The op can no longer finish on this ring; the data plane has already stopped touching its buffers.
    // `silent`: the suspect sent nothing for the deadline, or could not be reached at all (no error
    // came back): its path to this peer is dead while it may still talk to the master.
    virtual void on_op_failed(uint64_t uid, const Status& why, PeerId suspect, bool silent) = 0;
    // All pieces received and all sends written: the op is locally complete.
    virtual void on_op_complete(uint64_t uid) = 0;
};

class DataPlane {
public:
    // `threaded_writer`: frames are written on a thread of their own (FrameWriter).
    DataPlane(net::EventLoop& loop, DataPlaneEvents& events, size_t pool_size,
              bool threaded_writer = FrameWriter::threaded_by_default());
    ~DataPlane();

    Status listen(int family, uint16_t& port_out);
    // This peer's id from WELCOME; handshakes that arrived before it resume.
    void set_identity(PeerId me);
    // Peers absent from the directory lose their connections; their ops fail.
    void set_directory(std::map<PeerId, net::Endpoint> directory);

    // Opens (or reuses) the pool to `peer`; `done` runs once all K connections are handshaken, or
    // with an error once any fails.
    void ensure_pool(PeerId peer, std::function<void(Status)> done);

    struct OpStats {
        uint64_t tx_bytes = 0;
        uint64_t rx_bytes = 0;
    };
    // Starts an op whose OP_GO just arrived, or (confirmed = false) one started early under a
    // ticket's uid (`op_bytes`, the tensor's size, sets its early share). The ring object must outlive
    // remove_op().
    void start_op(uint64_t uid, ring::RingAllReduce* ring, PeerId prev, PeerId next, bool confirmed = true,
                  uint64_t op_bytes = 0);
    // OP_GO confirmed an early start: its held frames go out and deadlines apply from now.
    void confirm_op(uint64_t uid);
    // An early start removed before OP_GO keeps its early bytes charged to the next peer's
    // allowance (that peer may still hold them) until the tag's OP_GO or OP_RESULT calls this.
    void release_early_share(uint64_t uid);
    // A ticket's uid: its frames are kept in memory until the op starts here (or the ticket is voided).
    void add_ticket(uint64_t uid);
    // The ticket will never be used here: frames kept for it are dropped, later ones discarded.
    void void_ticket(uint64_t uid);
    // Stops touching the op's buffers at once (queued sends dropped, a half-sent piece completed
    // with zeros, a half-read payload drained). Returns the op's byte counts.
    OpStats remove_op(uint64_t uid);
    // The op's byte counts so far (zeros for an unknown op), without touching it.
    OpStats op_stats(uint64_t uid) const;
    // Every OP_GO's uid, also for ops cancelled before it came: frames up to it stop parking.
    void note_go(uint64_t uid);

    // Shared-state sync. The entries' memory must stay valid until end_sync(). A receiver accepts
    // exactly the planned ranges (a range may arrive twice, from a replacement distributor); a
    // distributor sends what it is told, to peers it connects to on demand.
    struct SyncBuffer {
        uint8_t* data = nullptr;
        uint64_t bytes = 0;
    };
    void begin_sync(uint64_t uid, std::vector<SyncBuffer> entries);
    size_t pool_size() const { return pool_size_; }
    void expect_sync_ranges(uint64_t uid, const std::vector<wire::SyncRange>& ranges);
    void send_sync_ranges(uint64_t uid, const std::vector<wire::SyncRange>& ranges);
    OpStats end_sync(uint64_t uid);

    // Fails ops without progress for `timeout`, closes handshakes that take too long.
    void check_deadlines(Clock::time_point now, std::chrono::milliseconds timeout);
    void close_all();

private:
    enum class OutState { CONNECTING, AWAIT_ACK, READY };
    struct OutConn {
        uint64_t id = 0;
        net::Fd fd;
        uint64_t watch = 0;
        PeerId peer = 0;
        uint32_t index = 0;
        OutState state = OutState::CONNECTING;
        uint8_t ack[wire::kDataHeaderBytes];
        size_t ack_got = 0;
        Clock::time_point started;
    };
    struct Pool {
        std::vector<uint64_t> conns;
        uint64_t generation = 0;  // tells a pool from a later one to the same peer
        size_t ready = 0;
        std::vector<std::function<void(Status)>> waiters;
    };
    enum class InState { HELLO, HEADER, PAYLOAD, DISCARD, PARKED, STASH };
    struct InConn {
        uint64_t id = 0;
        net::Fd fd;
        uint64_t watch = 0;
        PeerId peer = 0;
        InState state = InState::HELLO;
        uint8_t header[wire::kDataHeaderBytes];
        size_t header_got = 0;
        wire::DataHeader h;
        uint8_t* dest = nullptr;
        uint64_t remaining = 0;
        size_t sync_range = 0;   // SYNC_DATA payload: which range and frame of it
        size_t sync_frame = 0;
        uint64_t stash = 0;      // STASH payload: the key of the early frame being read
        bool awaiting_identity = false;  // a handshake that came before this peer's WELCOME
        Clock::time_point accepted;
    };
    // A frame that arrived under a ticket's uid before this peer started that op.
    struct EarlyFrame {
        uint64_t uid = 0;
        PeerId peer = 0;
        wire::RingPhase phase{};
        uint64_t offset = 0;
        ScratchPool::Buffer payload;  // from early_buffers_
        uint32_t bytes = 0;
        bool complete = false;  // fully read
    };
    // A piece an unconfirmed op may not send yet.
    struct HeldPiece {
        wire::RingPhase phase{};
        uint64_t offset = 0;
        uint32_t bytes = 0;
        const uint8_t* data = nullptr;
        uint64_t token = 0;
    };
    struct ActiveOp {
        ring::RingAllReduce* ring = nullptr;
        PeerId prev = 0;
        PeerId next = 0;
        OpStats stats;
        Clock::time_point last_progress;
        bool received_any = false;  // from prev, in this op
        bool confirmed = true;      // false: started early, no OP_GO yet
        uint64_t early_budget = 0;  // unconfirmed: bytes it may still send
        uint64_t early_sent = 0;    // unconfirmed: bytes it queued, counted in early_out_
        std::vector<HeldPiece> held;
    };
    class OpSink;
    struct SyncRangeState {
        wire::SyncRange range;
        std::vector<uint8_t> got;  // per frame of the range
        uint64_t missing = 0;
    };
    struct SyncState {
        std::vector<SyncBuffer> entries;
        std::vector<SyncRangeState> ranges;  // receiving side
        std::unordered_map<uint32_t, std::vector<size_t>> ranges_of_entry;
        uint64_t missing_frames = 0;
        bool receiving = false;
        bool announced = false;
        OpStats stats;
        Clock::time_point last_progress;
    };
    static uint64_t sync_queue_key(uint64_t uid) { return uid | (1ull << 63); }
    bool route_sync_header(InConn& c);
    void finish_sync_frame(InConn& c);

    void on_accept();
    void on_out_io(uint64_t id, uint32_t events);
    void on_in_io(uint64_t id, uint32_t events);
    void out_connected(OutConn& c);
    bool out_read_ack(OutConn& c);
    // Hands frames of one op or sync (`queue_key`) to the writer, counted until they are written.
    void write_frames(PeerId peer, uint64_t generation, uint64_t queue_key, std::vector<SendItem> frames);
    // The writer's reports (reactor thread).
    void on_frames_sent(const std::vector<FrameWriter::SentFrame>& sent);
    void on_write_failed(PeerId peer, uint64_t generation, const std::string& why);
    // No write reads the frames of `queue_key` after this returns. Returns the bytes of them that
    // were written but not yet reported (a writer thread's reports may still be on their way).
    uint64_t drop_unsent(uint64_t queue_key);
    void enqueue(PeerId next, uint64_t uid, wire::RingPhase phase, uint64_t offset, uint32_t bytes, const uint8_t* data,
                 uint64_t token);
    void pool_ready_changed(PeerId peer);
    void fail_pool(PeerId peer, const Status& why, bool silent = false);
    // fail_pool from a clean stack (never inside the ring's callbacks), for this pool only.
    void post_fail_pool(PeerId peer, const Status& why);
    void close_in(uint64_t id, const std::string& why);
    bool route_header(InConn& c);
    void finish_piece(InConn& c);
    void fail_op(uint64_t uid, const Status& why, PeerId suspect, bool silent = false, bool even_if_complete = false);
    // Whether a connection to `next` holds data that no acknowledgement has covered for `quiet`.
    bool forward_path_silent(PeerId next, std::chrono::milliseconds quiet) const;
    void maybe_complete(uint64_t uid);
    // Stops reading `c`, whose header names an op or sync this peer cannot take yet.
    void park(InConn& c);
    void unpark_all();
    // Routes a piece header of a running op; false when the connection was closed.
    bool route_to_op(InConn& c, ActiveOp& op);
    // Delivers a received piece to its op (the payload is already at the op's destination).
    void deliver_piece(uint64_t uid, ActiveOp& op, const wire::DataHeader& h);
    // Hands the early frames of `uid` (complete ones) to the op that just started.
    void replay_early_frames(uint64_t uid);
    void finish_stash(InConn& c);
    void drop_early_frames(uint64_t uid);
    // Erases an early frame: its bytes leave its peer's allowance, its buffer goes back for reuse.
    std::map<uint64_t, EarlyFrame>::iterator forget_early_frame(std::map<uint64_t, EarlyFrame>::iterator it);

    net::EventLoop& loop_;
    DataPlaneEvents& events_;
    size_t pool_size_;
    ProbeSink probe_sink_;  // incoming optimize_topology() probes
    PeerId me_ = 0;
    net::Fd listener_;
    uint64_t listener_watch_ = 0;
    std::map<PeerId, net::Endpoint> directory_;
    std::unordered_map<uint64_t, std::unique_ptr<OutConn>> out_;
    std::unordered_map<uint64_t, std::unique_ptr<InConn>> in_;
    std::unordered_map<PeerId, Pool> pools_;
    std::unordered_map<uint64_t, ActiveOp> ops_;
    std::set<uint64_t> parked_;
    std::vector<uint64_t> awaiting_identity_;  // incoming handshakes that came before WELCOME
    // Peers whose incoming connections started closing (logged once) while others stayed open:
    // the rest of that pool's closes go to DEBUG. Left by the last close or a new handshake.
    std::set<PeerId> closing_from_;
    uint64_t max_go_uid_ = 0;
    std::set<uint64_t> tickets_;
    std::map<uint64_t, EarlyFrame> early_frames_;            // by arrival
    // Early frames come every op when one peer calls a little after its neighbour: recycling their
    // buffers spares a page fault and a zeroing per page (measured: 6 ms of 64 on loopback, world 3).
    ScratchPool early_buffers_{limits::kSpeculativeBytes};
    uint64_t next_early_key_ = 1;
    std::unordered_map<PeerId, uint64_t> early_in_bytes_;    // kept for each previous peer
    std::unordered_map<PeerId, uint64_t> early_out_bytes_;   // sent unconfirmed to each next peer
    std::unordered_map<uint64_t, std::pair<PeerId, uint64_t>> early_retained_;  // removed early starts' share
    std::unordered_map<uint64_t, SyncState> syncs_;
    uint64_t max_sync_uid_ = 0;
    uint64_t next_conn_id_ = 1;
    uint64_t next_pool_generation_ = 1;
    std::vector<uint8_t> discard_;
    // By queue key: header and payload bytes of the frames handed to the writer and not yet reported
    // written (every frame has a header, so 0 means none left: the key is erased).
    std::unordered_map<uint64_t, uint64_t> unreported_bytes_;
    FrameWriter writer_;  // last: stopped first, while the sockets it writes are still open
};

}  // namespace pccl::client
