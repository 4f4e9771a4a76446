#include "client/session.hpp"

#include <algorithm>
#include <cstring>
#include <set>

#include <sys/epoll.h>

#include "client/bandwidth_probe.hpp"
#include "common/limits.hpp"
#include "common/log.hpp"
#include "net/address.hpp"

namespace pccl::client {

namespace {

template <class... Ts>
struct Overloaded : Ts... { using Ts::operator()...; };

constexpr std::chrono::milliseconds kMasterConnectTimeout{2000};
constexpr std::chrono::milliseconds kCancelAckTimeout{5000};

Status interrupted_status() { return Status::error(Result::INVALID_USAGE, "interrupted"); }

// PCCL_SPECULATIVE_START=off: hold every op until its OP_GO (tickets are still claimed, so peers
// with it on start early all the same). On by default: it saves one master round trip per op.
bool early_start_enabled() {
    static const bool enabled = [] {
        const char* env = std::getenv("PCCL_SPECULATIVE_START");
        if (!env) return true;
        const std::string v = env;
        return !(v == "0" || v == "off" || v == "false" || v == "no");
    }();
    return enabled;
}

}  // namespace

Session::Session(uint32_t peer_group, size_t pool_size, std::shared_ptr<ScratchPool> scratch)
    : peer_group_(peer_group), pool_size_(pool_size), scratch_(std::move(scratch)), data_plane_(loop_, *this, pool_size) {}

Session::~Session() { shutdown(/*say_goodbye=*/true); }

bool Session::post(net::EventLoop::Task task) {
    std::lock_guard lock(post_mutex_);
    if (closing_) return false;
    loop_.post(std::move(task));
    return true;
}

// ------------------------------------------------------------------ caller side

Status Session::connect(const std::string& master_address, int n_attempts, const InterruptCheck& interrupted) {
    net::Endpoint master;
    if (auto s = net::parse_endpoint(master_address, master); !s.is_ok()) return s;
    uint16_t p2p_port = 0;
    if (auto s = data_plane_.listen(master.family(), p2p_port); !s.is_ok()) return s;

    net::Fd fd;
    Status last = Status::error(Result::MASTER_CONNECTION_FAILED, "no attempt made (n_attempts < 1)");
    for (int attempt = 0; attempt < std::max(n_attempts, 1); ++attempt) {
        if (attempt > 0) {
            for (auto slept = std::chrono::milliseconds(0); slept < limits::kMasterConnectRetryDelay;
                 slept += limits::kCallerPollInterval) {
                if (interrupted && interrupted()) return interrupted_status();
                std::this_thread::sleep_for(limits::kCallerPollInterval);
            }
        }
        last = net::connect_with_timeout(master, static_cast<int>(kMasterConnectTimeout.count()), fd);
        if (last.is_ok()) break;
        PCCL_LOG(INFO, "connect to master ", master.to_string(), " (attempt ", attempt + 1, "/", n_attempts, "): ", last.message);
    }
    if (!last.is_ok())
        return Status::error(Result::MASTER_CONNECTION_FAILED, "cannot reach the master at " + master_address + " after " +
                                                                   std::to_string(std::max(n_attempts, 1)) +
                                                                   " attempts: " + last.message + "; is it running?");
    net::tune_control_socket(fd.get());
    const int raw_fd = fd.get();
    master_ = std::make_unique<net::ControlConnection>(std::move(fd), limits::kMaxMasterToPeerFrameBytes,
                                                       limits::kMaxMasterSendQueueBytes);
    master_watch_ = loop_.watch(raw_fd, EPOLLIN | EPOLLRDHUP, [this](uint32_t ev) { on_master_io(ev); });
    last_heard_ = last_sent_ = Clock::now();
    auto done = std::make_shared<Completion<CallResult>>();
    call_ = MembershipCall{CallKind::CONNECT, {done}};
    send_master(wire::Hello{peer_group_, p2p_port});
    alive_.store(true);
    thread_ = std::thread([this] {
        try {
            loop_.run([this] { tick(); }, limits::kDeadlineCheckInterval);
        } catch (const std::exception& e) {
            PCCL_LOG(FATAL, "peer ", my_id_.load(), ": reactor failed: ", e.what());
            end_session(Status::error(Result::INTERNAL_ERROR, std::string("reactor failed: ") + e.what()));
        }
    });
    while (!done->wait_for(limits::kCallerPollInterval)) {
        if (interrupted && interrupted()) return interrupted_status();
    }
    return done->get().status;
}

Session::CallResult Session::run_call(CallKind kind, const InterruptCheck& interrupted) {
    auto done = std::make_shared<Completion<CallResult>>();
    if (!post([this, kind, done] { start_call(kind, done); })) return {over_status(), false};
    while (!done->wait_for(limits::kCallerPollInterval)) {
        if (interrupted && interrupted()) return {interrupted_status(), false};
    }
    return done->get();
}

Status Session::update_topology(const InterruptCheck& interrupted) {
    return run_call(CallKind::UPDATE_TOPOLOGY, interrupted).status;
}

Status Session::optimize_topology(const InterruptCheck& interrupted) {
    return run_call(CallKind::OPTIMIZE_TOPOLOGY, interrupted).status;
}

Status Session::are_peers_pending(bool& pending, const InterruptCheck& interrupted) {
    auto r = run_call(CallKind::PEERS_PENDING, interrupted);
    pending = r.flag;
    return r.status;
}

Attributes Session::attributes() const {
    std::lock_guard lock(attributes_mutex_);
    return attributes_;
}

void Session::submit(const std::shared_ptr<ReduceHandle>& h) {
    h->session = weak_from_this();
    const bool posted = post([this, h] {
        auto reject = [&](Result code, std::string why) {
            release_backup(*h);
            h->outcome.complete({Status::error(code, std::move(why)), {}});
        };
        if (!master_) {
            const Status over = over_status();
            return reject(over.code, over.message);
        }
        if (!attributes().admitted) return reject(Result::NOT_INITIALIZED, "not connected: call connect() first");
        if (call_ && call_->kind != CallKind::PEERS_PENDING)
            return reject(Result::INVALID_USAGE, "update_topology is in progress on another thread; all-reduce after it returns");
        if (sync_) return reject(Result::INVALID_USAGE, "sync_shared_state is in progress on another thread; all-reduce after it returns");
        if (ops_by_tag_.contains(h->request.tag))
            return reject(Result::INVALID_ARGUMENT, "tag " + std::to_string(h->request.tag) +
                                                        " is already in flight; give each concurrent all-reduce its own tag");
        ops_by_tag_.emplace(h->request.tag, h);
        const auto& r = h->request;
        std::optional<wire::OpTicket> ticket;
        if (auto t = tickets_.find(r.tag); t != tickets_.end()) {
            ticket = t->second;  // spent on this call, whatever becomes of it
            tickets_.erase(t);
            h->claimed_uid = ticket->go.op_uid;
        }
        send_master(wire::OpBegin{r.tag, r.count, static_cast<uint8_t>(r.dtype), static_cast<uint8_t>(r.op),
                                  static_cast<uint8_t>(r.quant_algorithm), static_cast<uint8_t>(r.quant_dtype),
                                  h->claimed_uid});
        if (ticket && early_start_enabled()) {
            h->confirmed = false;
            PCCL_LOG(DEBUG, "peer ", my_id_.load(), ": all-reduce tag=", r.tag, " uid=", ticket->go.op_uid,
                     " started early from its ticket, rank ", ticket->go.rank, "/", ticket->go.world);
            start_ring(*h, ticket->go);
        }
    });
    if (!posted) {
        release_backup(*h);
        h->outcome.complete({over_status(), {}});
    }
}

void Session::cancel(ReduceHandle& handle) {
    auto acked = std::make_shared<Completion<bool>>();
    const bool posted = post([this, target = handle.weak_from_this(), acked] {
        auto h = target.lock();
        auto it = h ? ops_by_tag_.find(h->request.tag) : ops_by_tag_.end();
        if (it != ops_by_tag_.end() && it->second == h && !h->cancelled) {
            h->cancelled = true;
            if (h->phase == ReduceHandle::Phase::RUNNING) {
                h->stats = data_plane_.remove_op(h->uid);
                h->phase = ReduceHandle::Phase::LOCAL_FAILED;
                send_master(wire::OpEnd{h->request.tag, h->uid, 0, 0, "interrupted by the caller", h->stats.tx_bytes,
                                        h->stats.rx_bytes});
            }
            // LOCAL_DONE already told the master "ok" (an early start too: the master applies it if
            // OP_GO confirms the uid, and may have already): the op may succeed everywhere, so keep
            // the result. An early start that is undone instead keeps it as well (see undo_early_start).
            if (h->phase == ReduceHandle::Phase::LOCAL_FAILED) restore_input(*h);
            release_backup(*h);
            h->outcome.complete({interrupted_status(), {}});
        }
        acked->complete(true);
    });
    if (posted) acked->wait_for(kCancelAckTimeout);
}

void Session::shutdown(bool say_goodbye) {
    {
        std::lock_guard lock(post_mutex_);
        if (!closing_) {
            closing_ = true;
            loop_.post([this, say_goodbye] {
                if (say_goodbye && master_) {
                    master_->send(wire::Goodbye{});
                    master_->flush();
                }
                end_session(Status::error(Result::NOT_INITIALIZED, "the communicator was closed"));
            });
        }
    }
    loop_.stop();
    if (thread_.get_id() == std::this_thread::get_id()) return;
    if (thread_.joinable()) thread_.join();
    stop_probe();
    // The reactor has exited (or never ran, when connect failed early): settle what it left behind.
    end_session(Status::error(Result::NOT_INITIALIZED, "the communicator was closed"));
}

Status Session::over_status() {
    std::lock_guard lock(post_mutex_);
    if (!end_status_.is_ok()) return end_status_;
    return Status::error(Result::NOT_INITIALIZED, "the communicator was closed");
}

// ------------------------------------------------------------------ reactor side

void Session::start_call(CallKind kind, std::shared_ptr<Completion<CallResult>> done) {
    if (!master_) return void(done->complete({over_status(), false}));
    if (call_) {
        if (call_->kind == kind) return call_->waiters.push_back(std::move(done));  // re-attach to an abandoned call
        return void(done->complete({Status::error(Result::INVALID_USAGE, "another membership call is in progress on another thread"), false}));
    }
    if (!attributes().admitted)
        return void(done->complete({Status::error(Result::NOT_INITIALIZED, "not connected: call connect() first"), false}));
    const bool changes_ring = kind == CallKind::UPDATE_TOPOLOGY || kind == CallKind::OPTIMIZE_TOPOLOGY;
    const char* name = kind == CallKind::OPTIMIZE_TOPOLOGY ? "optimize_topology" : "update_topology";
    if (changes_ring && sync_)
        return void(done->complete({Status::error(Result::INVALID_USAGE, "sync_shared_state is in progress on another thread"), false}));
    if (changes_ring && !ops_by_tag_.empty())
        return void(done->complete({Status::error(Result::PENDING_ASYNC_OPS,
                                                  std::to_string(ops_by_tag_.size()) +
                                                      " all-reduce(s) still in flight; wait for them before " + name),
                                    false}));
    call_ = MembershipCall{kind, {std::move(done)}};
    if (kind == CallKind::UPDATE_TOPOLOGY) send_master(wire::VoteUpdateTopology{});
    else if (kind == CallKind::OPTIMIZE_TOPOLOGY) send_master(wire::VoteOptimizeTopology{});
    else send_master(wire::VotePeersPending{});
}

void Session::finish_call(CallKind kind, CallResult result) {
    if (!call_ || call_->kind != kind) return;
    auto waiters = std::move(call_->waiters);
    call_.reset();
    for (auto& w : waiters) w->complete(result);
}

void Session::send_master(const wire::Message& m) {
    if (!master_) return;
    if (!master_->send(m)) {
        const std::string why = master_->error();
        loop_.post([this, why] { end_session(Status::error(Result::MASTER_CONNECTION_FAILED, "lost the master: " + why)); });
        return;
    }
    last_sent_ = Clock::now();
    const bool want = master_->wants_write();
    if (want != master_write_armed_) {
        master_write_armed_ = want;
        loop_.modify(master_watch_, EPOLLIN | EPOLLRDHUP | (want ? EPOLLOUT : 0u));
    }
}

void Session::on_master_io(uint32_t events) {
    if (!master_) return;
    if (events & EPOLLOUT) {
        if (!master_->flush())
            return end_session(Status::error(Result::MASTER_CONNECTION_FAILED, "lost the master: " + master_->error()));
        const bool want = master_->wants_write();
        if (want != master_write_armed_) {
            master_write_armed_ = want;
            loop_.modify(master_watch_, EPOLLIN | EPOLLRDHUP | (want ? EPOLLOUT : 0u));
        }
    }
    if (!(events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) return;
    std::vector<wire::Message> msgs;
    const auto status = master_->read_messages(msgs);
    const std::string error = master_->error();
    if (!msgs.empty()) last_heard_ = Clock::now();
    for (auto& m : msgs) {
        if (!master_) return;
        handle(std::move(m));
    }
    if (!master_) return;
    if (status == net::ControlConnection::ReadStatus::CLOSED)
        end_session(Status::error(Result::MASTER_CONNECTION_FAILED, "lost the connection to the master: " + error));
    else if (status == net::ControlConnection::ReadStatus::PROTOCOL_ERROR)
        end_session(Status::error(Result::MASTER_CONNECTION_FAILED, "the master sent a malformed frame: " + error));
}

void Session::handle(wire::Message&& m) {
    std::visit(Overloaded{
                   [&](wire::Welcome& x) {
                       my_id_.store(x.peer_id);
                       data_plane_.set_identity(x.peer_id);
                       if (x.peer_timeout_ms > 0) peer_timeout_ = std::chrono::milliseconds(x.peer_timeout_ms);
                       PCCL_LOG(INFO, "peer ", x.peer_id, ": registered with the master");
                   },
                   [&](wire::Topology& x) { on_topology(x); },
                   [&](wire::TopologyComplete&) {
                       finish_call(CallKind::CONNECT, {Status::ok(), false});
                       finish_call(CallKind::UPDATE_TOPOLOGY, {Status::ok(), false});
                       finish_call(CallKind::OPTIMIZE_TOPOLOGY, {Status::ok(), false});
                   },
                   [&](wire::BandwidthProbe& x) { on_bandwidth_probe(x); },
                   [&](wire::PeersPendingAnswer& x) { finish_call(CallKind::PEERS_PENDING, {Status::ok(), x.pending != 0}); },
                   [&](wire::OpGo& x) { on_go(x); },
                   [&](wire::OpResult& x) { on_result(x); },
                   [&](wire::OpTicket& x) { on_ticket(x); },
                   [&](wire::Kicked& x) {
                       end_session(Status::error(Result::MASTER_CONNECTION_FAILED,
                                                 "dropped by the master (" + x.reason + "); call connect() to rejoin"));
                   },
                   [&](wire::MasterHeartbeat&) {},
                   [&](wire::SyncPlan& x) { on_sync_plan(std::move(x)); },
                   [&](wire::SyncSendMore& x) {
                       if (sync_ && sync_->uid == x.sync_uid)
                           when_staged([this, uid = x.sync_uid, send = std::move(x.send)] {
                               data_plane_.send_sync_ranges(uid, send);
                           });
                   },
                   [&](wire::SyncDone& x) {
                       if (!sync_ || sync_->uid != x.sync_uid) return;
                       finish_sync(x.result == 0 ? Status::ok() : Status::error(static_cast<Result>(x.result), x.message),
                                   x.revision);
                   },
                   [&](auto& other) {
                       end_session(Status::error(Result::MASTER_CONNECTION_FAILED,
                                                 std::string("the master sent a peer-only message: ") +
                                                     wire::type_name(wire::type_of(wire::Message(other)))));
                   },
               },
               m);
}

void Session::on_topology(const wire::Topology& t) {
    if (t.epoch != epoch_) void_all_tickets();  // they promised the old ring
    epoch_ = t.epoch;
    ring_ = t.peers;
    const uint64_t me = my_id_.load();
    std::map<PeerId, net::Endpoint> directory;
    const wire::PeerEntry* mine = nullptr;
    for (const auto& p : t.peers) {
        if (p.peer_id == me) mine = &p;
        else directory.emplace(p.peer_id, net::Endpoint::from(p.ip, p.p2p_port));
    }
    data_plane_.set_directory(std::move(directory));
    if (!mine) return;  // not admitted yet

    std::map<uint32_t, int64_t> group_sizes;
    for (const auto& p : t.peers) ++group_sizes[p.group];
    {
        std::lock_guard lock(attributes_mutex_);
        attributes_.admitted = true;
        attributes_.global_world = static_cast<int64_t>(t.peers.size());
        attributes_.local_world = group_sizes[mine->group];
        attributes_.groups = static_cast<int64_t>(group_sizes.size());
        attributes_.largest_group = 0;
        for (const auto& [g, n] : group_sizes) attributes_.largest_group = std::max(attributes_.largest_group, n);
    }
    if (!t.needs_confirm) return;

    std::vector<PeerId> group_ring;
    for (const auto& p : t.peers)
        if (p.group == mine->group) group_ring.push_back(p.peer_id);
    const uint64_t epoch = t.epoch;
    if (group_ring.size() < 2) {
        send_master(wire::P2PReady{epoch, 0});
        return;
    }
    const auto pos = std::find(group_ring.begin(), group_ring.end(), me) - group_ring.begin();
    const PeerId next = group_ring[(static_cast<size_t>(pos) + 1) % group_ring.size()];
    data_plane_.ensure_pool(next, [this, epoch, next](Status s) {
        if (epoch != epoch_ || !master_) return;  // the ring changed meanwhile; a newer round asks again
        if (!s.is_ok()) PCCL_LOG(WARN, "peer ", my_id_.load(), ": cannot connect to next peer ", next, ": ", s.message);
        send_master(wire::P2PReady{epoch, s.is_ok() ? 0 : next});
    });
}

void Session::on_go(const wire::OpGo& go) {
    auto it = ops_by_tag_.find(go.tag);
    if (it != ops_by_tag_.end() && it->second->uid != 0 && !it->second->confirmed) {
        auto h = it->second;
        data_plane_.release_early_share(h->uid);  // every member called the tag: no stash waits for it
        if (go.op_uid == h->uid) {
            h->confirmed = true;
            PCCL_LOG(DEBUG, "peer ", my_id_.load(), ": all-reduce tag=", go.tag, " uid=", go.op_uid, " go confirms the early start");
            data_plane_.confirm_op(h->uid);
            return;
        }
        undo_early_start(*h);  // then start afresh below
    }
    if (it == ops_by_tag_.end() || it->second->uid != 0) {
        send_master(wire::OpEnd{go.tag, go.op_uid, 0, 0, "no such operation on this peer"});
        data_plane_.note_go(go.op_uid);
        return;
    }
    auto h = it->second;
    if (h->claimed_uid != 0 && h->claimed_uid != go.op_uid) data_plane_.void_ticket(h->claimed_uid);
    h->claimed_uid = 0;
    if (h->cancelled) {
        h->uid = go.op_uid;
        h->world = go.world;
        tag_by_uid_[go.op_uid] = go.tag;
        h->phase = ReduceHandle::Phase::LOCAL_FAILED;
        send_master(wire::OpEnd{go.tag, go.op_uid, 0, 0, "interrupted by the caller"});
        data_plane_.void_ticket(go.op_uid);  // also stops parking on it
        return;
    }
    PCCL_LOG(DEBUG, "peer ", my_id_.load(), ": all-reduce tag=", go.tag, " uid=", go.op_uid, " go, rank ", go.rank, "/", go.world);
    start_ring(*h, go);
}

void Session::start_ring(ReduceHandle& h, const wire::OpGo& go) {
    h.uid = go.op_uid;
    h.world = go.world;
    tag_by_uid_[go.op_uid] = go.tag;
    ring::RingAllReduce::Params p;
    p.send = h.in_place ? nullptr : static_cast<const uint8_t*>(h.request.send);
    p.recv = static_cast<uint8_t*>(h.request.recv);
    p.backup = h.in_place ? h.backup.data.get() : nullptr;
    p.count = h.request.count;
    p.dtype = h.request.dtype;
    p.op = h.request.op;
    p.world = go.world;
    p.rank = go.rank;
    p.piece_elems = ring::RingAllReduce::choose_piece_elems(p.count, p.world, element_size(p.dtype));
    if (h.request.quant_algorithm != QuantizationAlgorithm::NONE)
        p.quant = kernels::quant::Format{p.dtype, h.request.quant_dtype, h.request.quant_algorithm};
    h.ring = std::make_unique<ring::RingAllReduce>(p);
    h.phase = ReduceHandle::Phase::RUNNING;
    h.recv_written = true;
    data_plane_.start_op(h.uid, h.ring.get(), go.prev_peer, go.next_peer, h.confirmed, p.count * element_size(p.dtype));
}

void Session::undo_early_start(ReduceHandle& h) {
    PCCL_LOG(INFO, "peer ", my_id_.load(), ": all-reduce tag=", h.request.tag, ": the master did not confirm the early start (uid ",
             h.uid, "): the ring changed or a peer held no ticket; starting over");
    if (h.phase == ReduceHandle::Phase::RUNNING || h.phase == ReduceHandle::Phase::LOCAL_DONE) data_plane_.remove_op(h.uid);
    data_plane_.release_early_share(h.uid);  // every member called the tag: no stash waits for it
    data_plane_.void_ticket(h.uid);          // frames still coming for it are dropped
    // A cancelled handle gave its backup back: cancel() restored a running op, and one that had
    // finished here keeps its result, as a cancelled op that finished always does.
    if (!h.cancelled) restore_input(h);
    tag_by_uid_.erase(h.uid);
    h.ring.reset();
    h.uid = 0;
    h.claimed_uid = 0;
    h.confirmed = true;
    h.stats = {};
    h.phase = ReduceHandle::Phase::WAIT_GO;
}

void Session::on_ticket(const wire::OpTicket& t) {
    if (t.epoch != epoch_) return;  // for a ring this peer already knows to be gone
    if (auto old = tickets_.find(t.go.tag); old != tickets_.end()) data_plane_.void_ticket(old->second.go.op_uid);
    tickets_[t.go.tag] = t;
    data_plane_.add_ticket(t.go.op_uid);
    if (tickets_.size() > limits::kMaxReservedOps) {  // the master drops its oldest reservation too
        auto oldest = std::min_element(tickets_.begin(), tickets_.end(),
                                       [](const auto& a, const auto& b) { return a.second.go.op_uid < b.second.go.op_uid; });
        data_plane_.void_ticket(oldest->second.go.op_uid);
        tickets_.erase(oldest);
    }
}

void Session::void_all_tickets() {
    for (const auto& [tag, t] : tickets_) data_plane_.void_ticket(t.go.op_uid);
    tickets_.clear();
}

void Session::on_op_complete(uint64_t uid) {
    auto t = tag_by_uid_.find(uid);
    if (t == tag_by_uid_.end()) return;
    auto h = ops_by_tag_.at(t->second);
    if (h->phase != ReduceHandle::Phase::RUNNING) return;
    h->phase = ReduceHandle::Phase::LOCAL_DONE;
    PCCL_LOG(DEBUG, "peer ", my_id_.load(), ": all-reduce tag=", h->request.tag, " uid=", uid, " done locally");
    const auto stats = data_plane_.op_stats(uid);  // complete: every byte of this peer's part is counted
    send_master(wire::OpEnd{h->request.tag, uid, 1, 0, "", stats.tx_bytes, stats.rx_bytes});
}

void Session::on_op_failed(uint64_t uid, const Status& why, PeerId suspect, bool silent) {
    auto t = tag_by_uid_.find(uid);
    if (t == tag_by_uid_.end()) return;
    auto h = ops_by_tag_.at(t->second);
    // LOCAL_DONE: this peer's part is done, but its last bytes never reached the next peer; the
    // master counted this peer's bytes with its first OP_END and now fails the op for everyone.
    if (h->phase != ReduceHandle::Phase::RUNNING && h->phase != ReduceHandle::Phase::LOCAL_DONE) return;
    const bool part_unfinished = h->phase == ReduceHandle::Phase::RUNNING;
    h->stats = data_plane_.remove_op(uid);
    h->phase = ReduceHandle::Phase::LOCAL_FAILED;
    PCCL_LOG(INFO, "peer ", my_id_.load(), ": all-reduce tag=", h->request.tag, " failed locally: ", why.message);
    send_master(wire::OpEnd{h->request.tag, uid, 0, suspect, why.message, h->stats.tx_bytes, h->stats.rx_bytes,
                            static_cast<uint8_t>(silent && suspect != 0)});
    // This peer's part never finished, so the op cannot succeed here: whether the master fails it or
    // undoes an early start, the input must be as it was. Restoring it (up to a copy of the tensor)
    // while the master's verdict travels, rather than after it, takes that copy out of the time to
    // the caller's error. Posted, so that when a pool dies under several ops every OP_END goes out
    // before any copy. A peer whose part was done (LOCAL_DONE) keeps its result: the master may
    // have counted it a success everywhere already.
    if (part_unfinished && h->in_place && !h->cancelled) {
        loop_.post([this, h, uid] {
            // Not if the verdict came first (finish_op restored it) or an undone early start
            // started over under a new uid (restore_input would undo the new run's progress).
            if (h->uid == uid && h->phase == ReduceHandle::Phase::LOCAL_FAILED && !h->cancelled) restore_input(*h);
        });
    }
}

void Session::on_result(const wire::OpResult& r) {
    auto it = ops_by_tag_.find(r.tag);
    if (it == ops_by_tag_.end()) return;
    auto h = it->second;
    if (r.op_uid != 0 && r.op_uid != h->uid) return;  // about an earlier use of this tag
    finish_op(h, r.result == 0 ? Status::ok() : Status::error(static_cast<Result>(r.result), r.message));
}

void Session::finish_op(const std::shared_ptr<ReduceHandle>& h, Status status) {
    if (h->phase == ReduceHandle::Phase::RUNNING || h->phase == ReduceHandle::Phase::LOCAL_DONE) {
        const auto s = data_plane_.remove_op(h->uid);
        if (h->phase == ReduceHandle::Phase::RUNNING || s.tx_bytes || s.rx_bytes) h->stats = s;
    }
    if (!status.is_ok() && !h->cancelled) restore_input(*h);
    release_backup(*h);
    // An early start the master refused before any OP_GO (different arguments): drop its frames.
    if (!h->confirmed) {
        data_plane_.void_ticket(h->uid);
        data_plane_.release_early_share(h->uid);
    }
    if (h->claimed_uid != 0) data_plane_.void_ticket(h->claimed_uid);
    ops_by_tag_.erase(h->request.tag);
    tag_by_uid_.erase(h->uid);
    h->ring.reset();
    if (!h->cancelled) h->outcome.complete({std::move(status), ReduceInfo{h->world, h->stats.tx_bytes, h->stats.rx_bytes}});
}

void Session::restore_input(ReduceHandle& h) {
    if (!h.recv_written || !h.ring) return;
    h.ring->restore_input();
    h.recv_written = false;
}

void Session::release_backup(ReduceHandle& h) {
    if (h.backup.data && h.scratch) h.scratch->give_back(std::move(h.backup));
    h.backup = {};
}

// ------------------------------------------------------------------ shared-state sync

SyncOutcome Session::sync_shared_state(const std::vector<SyncEntryDesc>& entries, uint64_t revision, uint8_t strategy,
                                       const Hasher& hasher, const Stager& stager, const InterruptCheck& interrupted) {
    auto call = std::make_shared<SyncCall>();
    call->vote.revision = revision;
    call->vote.strategy = strategy;
    for (const auto& e : entries) {
        const uint64_t bytes = e.count * element_size(e.dtype);
        wire::SyncEntry w;
        w.name = e.name;
        w.dtype = static_cast<uint8_t>(e.dtype);
        w.count = e.count;
        // On the caller's thread: the reactor keeps serving.
        w.hash = e.hash ? *e.hash : hasher(e.data, bytes);
        w.allow_inequality = e.allow_inequality ? 1 : 0;
        call->vote.entries.push_back(std::move(w));
        call->buffers.push_back({e.data, bytes});
        if (bytes > 0 && e.data == nullptr) call->staged = false;
    }
    if (!post([this, call] { start_sync(call); })) return {over_status(), 0, 0, 0};

    std::unique_lock lock(call->mutex);
    bool verified = false;
    bool staging_started = false;
    while (!call->done) {
        if (call->staging_wanted && !staging_started) {
            // This peer sends or receives: its device-resident entries need host memory now.
            staging_started = true;
            lock.unlock();
            std::vector<uint8_t*> host(call->buffers.size(), nullptr);
            Status staged = stager ? stager(host) : Status::error(Result::INTERNAL_ERROR, "no stager for host-less entries");
            post([this, call, host = std::move(host), staged = std::move(staged)]() mutable {
                on_staged(call, std::move(host), std::move(staged));
            });
            lock.lock();
            continue;
        }
        if (call->received && !verified) {
            // Check what arrived before anyone is told it is synced.
            verified = true;
            auto expect = call->expect;
            const uint64_t uid = call->uid;
            lock.unlock();
            std::string bad;
            for (const auto& e : expect) {
                const auto& buf = call->buffers[e.entry];
                if (hasher(buf.data, buf.bytes) != e.hash) {
                    bad = "entry '" + call->vote.entries[e.entry].name + "' arrived with the wrong hash";
                    break;
                }
            }
            post([this, uid, bad] { send_master(wire::SyncResult{uid, static_cast<uint8_t>(bad.empty()), bad}); });
            lock.lock();
            continue;
        }
        call->changed.wait_for(lock, limits::kCallerPollInterval);
        if (!call->done && interrupted && interrupted()) {
            lock.unlock();
            // Stop serving and receiving at once; the master hears we gave up and fails the round.
            auto stopped = std::make_shared<Completion<bool>>();
            post([this, call, stopped] {
                if (sync_ == call) {
                    if (call->uid != 0) send_master(wire::SyncResult{call->uid, 0, "interrupted by the caller"});
                    finish_sync(interrupted_status(), 0);
                }
                stopped->complete(true);
            });
            stopped->wait_for(limits::kP2PHandshakeDeadline);
            return {interrupted_status(), 0, 0, 0};
        }
    }
    return call->outcome;
}

void Session::start_sync(const std::shared_ptr<SyncCall>& call) {
    auto refuse = [&](Status why) {
        std::lock_guard lock(call->mutex);
        call->outcome.status = std::move(why);
        call->done = true;
        call->changed.notify_all();
    };
    if (!master_) return refuse(over_status());
    if (!attributes().admitted) return refuse(Status::error(Result::NOT_INITIALIZED, "not connected: call connect() first"));
    if (!ops_by_tag_.empty())
        return refuse(Status::error(Result::PENDING_ASYNC_OPS, std::to_string(ops_by_tag_.size()) +
                                                                   " all-reduce(s) still in flight; wait for them before sync_shared_state"));
    if (sync_) return refuse(Status::error(Result::INVALID_USAGE, "another sync_shared_state is in progress"));
    if (call_ && call_->kind != CallKind::PEERS_PENDING)
        return refuse(Status::error(Result::INVALID_USAGE, "update_topology is in progress on another thread"));
    sync_ = call;
    send_master(call->vote);
}

void Session::on_sync_plan(wire::SyncPlan&& plan) {
    if (!sync_ || sync_->uid != 0) {
        // Nobody waits for this round any more (the caller was interrupted): say so, or the others
        // would wait for this peer's data.
        send_master(wire::SyncResult{plan.sync_uid, 0, "the caller abandoned sync_shared_state"});
        return;
    }
    if (plan.result != 0) return finish_sync(Status::error(static_cast<Result>(plan.result), plan.message), plan.revision);
    sync_->uid = plan.sync_uid;
    sync_->outcome.revision = plan.revision;
    for (const auto& e : plan.expect)
        if (e.entry >= sync_->buffers.size())
            return finish_sync(Status::error(Result::INTERNAL_ERROR, "the master planned an entry this peer does not have"), 0);
    sync_->expect = std::move(plan.expect);
    if (plan.receive.empty() && plan.send.empty()) {
        // Nothing moves (the common case once a run is in sync): device-resident entries stay
        // unstaged. Registered anyway, so the master may still hand this peer ranges to send.
        data_plane_.begin_sync(plan.sync_uid, sync_->buffers);
        sync_->data_plane_begun = true;
        return;
    }
    when_staged([this, uid = plan.sync_uid, receive = std::move(plan.receive), send = std::move(plan.send)] {
        data_plane_.begin_sync(uid, sync_->buffers);
        sync_->data_plane_begun = true;
        if (!receive.empty()) data_plane_.expect_sync_ranges(uid, receive);
        if (!send.empty()) data_plane_.send_sync_ranges(uid, send);
    });
}

void Session::when_staged(std::function<void()> action) {
    if (sync_->staged) return action();
    // Until then a receiver's incoming frames of this sync park (their uid is not begun yet).
    sync_->after_staging.push_back(std::move(action));
    std::lock_guard lock(sync_->mutex);
    sync_->staging_wanted = true;
    sync_->changed.notify_all();
}

void Session::on_staged(const std::shared_ptr<SyncCall>& call, std::vector<uint8_t*> host, Status status) {
    if (sync_ != call) return;  // the round ended meanwhile
    if (!status.is_ok()) {
        call->after_staging.clear();
        send_master(wire::SyncResult{call->uid, 0, "staging the shared state into host memory failed: " + status.message});
        return;
    }
    for (size_t i = 0; i < host.size() && i < call->buffers.size(); ++i)
        if (call->buffers[i].data == nullptr) call->buffers[i].data = host[i];
    for (const auto& b : call->buffers)
        if (b.bytes > 0 && b.data == nullptr) {
            call->after_staging.clear();
            send_master(wire::SyncResult{call->uid, 0, "staging the shared state left an entry without host memory"});
            return;
        }
    call->staged = true;
    // Ranges handed over earlier were registered with the unstaged (null) pointers: refresh them.
    if (call->data_plane_begun) data_plane_.begin_sync(call->uid, call->buffers);
    auto actions = std::move(call->after_staging);
    call->after_staging.clear();
    for (auto& action : actions) action();
}

void Session::on_sync_received(uint64_t uid) {
    if (!sync_ || sync_->uid != uid) return;
    std::lock_guard lock(sync_->mutex);
    sync_->received = true;
    sync_->changed.notify_all();
}

void Session::on_sync_stalled(uint64_t uid, const Status& why, std::vector<wire::SyncRange> missing) {
    if (!sync_ || sync_->uid != uid) return;
    // The master hands what is missing to other distributors (or fails the sync if none may send it).
    PCCL_LOG(INFO, "peer ", my_id_.load(), ": shared-state sync ", uid, ": ", why.message, "; ", missing.size(),
             " range(s) missing");
    if (missing.empty()) send_master(wire::SyncResult{uid, 0, why.message});
    else send_master(wire::SyncStalled{uid, std::move(missing)});
}

void Session::finish_sync(Status status, uint64_t revision) {
    auto call = std::move(sync_);
    sync_.reset();
    const auto stats = call->uid != 0 ? data_plane_.end_sync(call->uid) : DataPlane::OpStats{};
    std::lock_guard lock(call->mutex);
    if (call->done) return;
    call->outcome.status = std::move(status);
    if (call->outcome.status.is_ok()) call->outcome.revision = revision;
    call->outcome.tx_bytes = stats.tx_bytes;
    call->outcome.rx_bytes = stats.rx_bytes;
    call->done = true;
    call->changed.notify_all();
}

// Runs while the reactor goes on (heartbeats, the master's messages); the caller of
// optimize_topology() is blocked meanwhile, so no collective competes with the stream.
void Session::on_bandwidth_probe(const wire::BandwidthProbe& probe) {
    if (probe_stop_) probe_stop_->store(true);
    if (probe_thread_.joinable()) stopped_probe_threads_.push_back(std::move(probe_thread_));
    auto stop = std::make_shared<std::atomic<bool>>(false);
    probe_stop_ = stop;
    const net::Endpoint target = net::Endpoint::from(probe.target.ip, probe.target.p2p_port);
    const uint64_t me = my_id_.load();
    const size_t connections = data_plane_.pool_size();
    const auto duration = std::chrono::milliseconds(
        std::clamp<uint32_t>(probe.duration_ms, limits::kMinBandwidthProbeDuration.count(), limits::kMaxBandwidthProbeDuration.count()));
    probe_thread_ = std::thread([this, probe, target, me, connections, duration, stop] {
        const ProbeOutcome r = run_bandwidth_probe(target, me, probe.target.peer_id, connections, duration, *stop);
        PCCL_LOG(INFO, "peer ", me, ": bandwidth to peer ", probe.target.peer_id, ": ",
                 r.ok ? std::to_string(r.bits_per_second / 1000000) + " Mbit/s" : "failed: " + r.reason);
        if (stop->load()) return;  // superseded or the session is over: nobody waits for this report
        post([this, probe, r] {
            send_master(wire::BandwidthReport{probe.probe_id, probe.target.peer_id, r.bits_per_second, uint8_t(r.ok ? 1 : 0), r.reason});
        });
    });
}

void Session::stop_probe() {
    if (probe_stop_) probe_stop_->store(true);
    if (probe_thread_.joinable()) stopped_probe_threads_.push_back(std::move(probe_thread_));
    for (auto& t : stopped_probe_threads_)
        if (t.get_id() != std::this_thread::get_id()) t.join();
    stopped_probe_threads_.clear();
}

void Session::tick() {
    const auto now = Clock::now();
    if (master_) {
        if (now - last_heard_ > peer_timeout_) on_master_io(EPOLLIN);  // a KICKED may be waiting after a long stop
        if (master_ && now - last_heard_ > peer_timeout_)
            return end_session(Status::error(Result::MASTER_CONNECTION_FAILED,
                                             "the master has been silent for more than " +
                                                 std::to_string(peer_timeout_.count()) + " ms"));
        if (master_ && now - last_sent_ >= limits::kHeartbeatInterval) send_master(wire::Heartbeat{});
    }
    data_plane_.check_deadlines(now, peer_timeout_);
}

void Session::end_session(const Status& why) {
    {
        std::lock_guard lock(post_mutex_);
        if (ended_) return;
        ended_ = true;
        if (end_status_.is_ok()) end_status_ = why;
        closing_ = true;
    }
    if (alive_.exchange(false)) PCCL_LOG(INFO, "peer ", my_id_.load(), ": session over: ", why.message);
    {
        std::lock_guard lock(attributes_mutex_);
        attributes_.admitted = false;
    }
    auto ops = ops_by_tag_;
    for (auto& [tag, h] : ops) finish_op(h, why);
    tickets_.clear();
    if (sync_) finish_sync(why, 0);
    if (call_) {
        auto waiters = std::move(call_->waiters);
        call_.reset();
        for (auto& w : waiters) w->complete({why, false});
    }
    data_plane_.close_all();
    if (probe_stop_) probe_stop_->store(true);  // a probe must not stream on for a session that is over
    if (master_) {
        loop_.unwatch(master_watch_);
        master_.reset();
    }
    loop_.stop();
}

}  // namespace pccl::client
