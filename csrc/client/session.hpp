// One registration of a communicator with the master: the reactor thread, the control link, the
// membership view, the data plane and the table of operations. A session ends when the peer closes,
// is kicked, or loses the master; connect() then starts a new one. Internal to client/.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "client/communicator.hpp"
#include "client/data_plane.hpp"
#include "net/control_connection.hpp"
#include "net/event_loop.hpp"
#include "ring/ring_allreduce.hpp"

namespace pccl::client {

// Shared between the caller (Python's handle) and the session's table of ops in flight; a task
// posted for it holds a weak_ptr, so it never acts on a handle freed and replaced at the same address.
class ReduceHandle : public std::enable_shared_from_this<ReduceHandle> {
public:
    Completion<ReduceOutcome> outcome;

private:
    friend class Session;
    friend class Communicator;
    enum class Phase { WAIT_GO, RUNNING, LOCAL_DONE, LOCAL_FAILED };

    ReduceRequest request;
    bool in_place = false;
    ScratchPool::Buffer backup;
    std::shared_ptr<ScratchPool> scratch;
    std::weak_ptr<Session> session;
    // Reactor-only from here.
    Phase phase = Phase::WAIT_GO;
    uint64_t uid = 0;
    // Started early under a ticket's uid (`uid`), OP_GO not here yet.
    bool confirmed = true;
    uint64_t claimed_uid = 0;  // the ticket named in OP_BEGIN (0: none)
    std::unique_ptr<ring::RingAllReduce> ring;
    bool cancelled = false;
    bool recv_written = false;  // recv may hold partial results
    uint32_t world = 0;
    DataPlane::OpStats stats;
};

struct Attributes {
    bool admitted = false;
    int64_t global_world = 0;
    int64_t local_world = 0;
    int64_t groups = 0;
    int64_t largest_group = 0;
};

struct SyncEntryDesc {
    std::string name;
    DataType dtype = DataType::FLOAT;
    uint64_t count = 0;
    // Host memory, valid for the whole call; null for an entry the caller hashed itself (`hash`) and
    // stages into host memory only if this sync moves its bytes (a CUDA tensor: see Stager).
    uint8_t* data = nullptr;
    std::optional<wire::Hash128> hash;
    bool allow_inequality = false;
};

struct SyncOutcome {
    Status status;
    uint64_t revision = 0;
    uint64_t tx_bytes = 0;
    uint64_t rx_bytes = 0;
};

class Session final : public DataPlaneEvents, public std::enable_shared_from_this<Session> {
public:
    Session(uint32_t peer_group, size_t pool_size, std::shared_ptr<ScratchPool> scratch);
    ~Session() override;

    // Caller thread: open the master connection and register; returns once admitted.
    Status connect(const std::string& master_address, int n_attempts, const InterruptCheck& interrupted);
    Status update_topology(const InterruptCheck& interrupted);
    Status optimize_topology(const InterruptCheck& interrupted);
    Status are_peers_pending(bool& pending, const InterruptCheck& interrupted);
    Attributes attributes() const;
    SyncOutcome sync_shared_state(const std::vector<SyncEntryDesc>& entries, uint64_t revision, uint8_t strategy,
                                  const Hasher& hasher, const Stager& stager, const InterruptCheck& interrupted);
    void submit(const std::shared_ptr<ReduceHandle>& handle);
    void cancel(ReduceHandle& handle);
    // Leaves the run and joins the reactor. Idempotent.
    void shutdown(bool say_goodbye);
    bool alive() const { return alive_.load(); }
    // Why the session ended (kicked, master lost, closed): what every call reports once it is over.
    Status over_status();
    uint64_t peer_id() const { return my_id_.load(); }

    // DataPlaneEvents (reactor thread)
    void on_op_failed(uint64_t uid, const Status& why, PeerId suspect, bool silent) override;
    void on_op_complete(uint64_t uid) override;
    void on_sync_received(uint64_t uid) override;
    void on_sync_stalled(uint64_t uid, const Status& why, std::vector<wire::SyncRange> missing) override;

private:
    enum class CallKind { CONNECT, UPDATE_TOPOLOGY, OPTIMIZE_TOPOLOGY, PEERS_PENDING };
    struct CallResult {
        Status status;
        bool flag = false;
    };
    struct MembershipCall {
        CallKind kind;
        // More than one when a caller abandoned the call (Ctrl-C) and a later one re-attached.
        std::vector<std::shared_ptr<Completion<CallResult>>> waiters;
    };

    // One shared-state sync, shared between the calling thread and the reactor.
    struct SyncCall {
        std::mutex mutex;
        std::condition_variable changed;
        bool received = false;  // every planned range arrived: the caller checks the hashes
        bool done = false;
        SyncOutcome outcome;
        uint64_t uid = 0;
        std::vector<wire::SyncExpect> expect;
        std::vector<DataPlane::SyncBuffer> buffers;
        wire::SyncVote vote;
        bool staging_wanted = false;  // guarded by mutex: the reactor waits for host memory
        // Reactor only.
        bool staged = true;           // every entry has host memory
        bool data_plane_begun = false;
        std::vector<std::function<void()>> after_staging;
    };
    void when_staged(std::function<void()> action);
    void on_staged(const std::shared_ptr<SyncCall>& call, std::vector<uint8_t*> host, Status status);
    void start_sync(const std::shared_ptr<SyncCall>& call);
    void on_sync_plan(wire::SyncPlan&& plan);
    void finish_sync(Status status, uint64_t revision);

    bool post(net::EventLoop::Task task);  // false once the session is over
    CallResult run_call(CallKind kind, const InterruptCheck& interrupted);
    void start_call(CallKind kind, std::shared_ptr<Completion<CallResult>> done);
    void finish_call(CallKind kind, CallResult result);

    void on_master_io(uint32_t events);
    void handle(wire::Message&& m);
    void on_topology(const wire::Topology& t);
    void on_go(const wire::OpGo& go);
    void on_ticket(const wire::OpTicket& t);
    void void_all_tickets();
    // Builds the op's ring for its place in `go` (an OP_GO, or a ticket's promised one while
    // h.confirmed is false) and hands it to the data plane.
    void start_ring(ReduceHandle& h, const wire::OpGo& go);
    // The OP_GO named another uid than the early start's: undo it (buffer restored, frames dropped).
    void undo_early_start(ReduceHandle& h);
    void on_bandwidth_probe(const wire::BandwidthProbe& probe);
    void stop_probe();
    void on_result(const wire::OpResult& r);
    void send_master(const wire::Message& m);
    void tick();
    void end_session(const Status& why);
    void finish_op(const std::shared_ptr<ReduceHandle>& h, Status status);
    void restore_input(ReduceHandle& h);
    void release_backup(ReduceHandle& h);

    const uint32_t peer_group_;
    const size_t pool_size_;
    std::shared_ptr<ScratchPool> scratch_;
    net::EventLoop loop_;
    DataPlane data_plane_;
    std::thread thread_;
    std::atomic<bool> alive_{false};
    std::atomic<uint64_t> my_id_{0};
    std::mutex post_mutex_;
    bool closing_ = false;
    Status end_status_;  // why the session is over (first reason wins); guarded by post_mutex_
    bool ended_ = false;

    mutable std::mutex attributes_mutex_;
    Attributes attributes_;

    // Reactor-only state.
    std::unique_ptr<net::ControlConnection> master_;
    uint64_t master_watch_ = 0;
    bool master_write_armed_ = false;
    Clock::time_point last_heard_;
    Clock::time_point last_sent_;
    std::chrono::milliseconds peer_timeout_{10000};
    uint64_t epoch_ = 0;
    std::vector<wire::PeerEntry> ring_;
    std::optional<MembershipCall> call_;
    std::shared_ptr<SyncCall> sync_;
    std::string end_reason_;
    std::unordered_map<uint64_t, std::shared_ptr<ReduceHandle>> ops_by_tag_;
    std::unordered_map<uint64_t, uint64_t> tag_by_uid_;
    std::map<uint64_t, wire::OpTicket> tickets_;  // by tag, for this epoch

    // A bandwidth probe streams on a thread of its own and reports back through post(). The master
    // runs a peer's probes one after another; a newer probe stops an older one that still runs (its
    // round is over) without the reactor waiting for it: the thread is joined at shutdown.
    std::thread probe_thread_;
    std::shared_ptr<std::atomic<bool>> probe_stop_;
    std::vector<std::thread> stopped_probe_threads_;
};

}  // namespace pccl::client
