#include "client/data_plane.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <iterator>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "common/limits.hpp"
#include "common/log.hpp"
#include "net/socket.hpp"

namespace pccl::client {

namespace {

// Stalled ops without first-hand evidence fail after timeout * (1 + 1/kCascadeGraceDivisor) (see check_deadlines).
constexpr int kCascadeGraceDivisor = 4;

constexpr uint32_t kInEvents = EPOLLIN | EPOLLRDHUP;
// One readiness event reads at most this much, so one busy connection cannot starve the others.
constexpr size_t kReadBudgetBytes = 8 * 1024 * 1024;

void encode_handshake(wire::DataFrameKind kind, PeerId from, PeerId to, uint32_t index, uint8_t* out) {
    wire::DataHeader h;
    h.kind = static_cast<uint8_t>(kind);
    h.a = from;
    h.b = to;
    h.aux = index;
    wire::encode_data_header(h, out);
}

// A frame for a send queue: `h` encoded, its payload at `data`, queued under `queue_key`.
SendItem make_frame(const wire::DataHeader& h, const uint8_t* data, uint64_t queue_key, uint64_t token = 0) {
    SendItem item;
    wire::encode_data_header(h, item.header);
    item.data = data;
    item.length = h.length;
    item.uid = queue_key;
    item.token = token;
    return item;
}

bool send_all_now(int fd, const uint8_t* data, size_t n) {
    // Only for 32-byte handshakes on fresh sockets, whose buffers are empty.
    while (n > 0) {
        const ssize_t w = ::send(fd, data, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return false;
        data += w;
        n -= static_cast<size_t>(w);
    }
    return true;
}

}  // namespace

class DataPlane::OpSink final : public ring::PieceSink {
public:
    OpSink(DataPlane& dp, uint64_t uid, PeerId next, ring::RingAllReduce* ring) : dp_(dp), uid_(uid), next_(next), ring_(ring) {}
    void send_piece(wire::RingPhase phase, uint64_t offset, uint32_t bytes, const uint8_t* data,
                    uint64_t token) override {
        ring_->on_piece_queued();
        dp_.enqueue(next_, uid_, phase, offset, bytes, data, token);
    }

private:
    DataPlane& dp_;
    uint64_t uid_;
    PeerId next_;
    ring::RingAllReduce* ring_;
};

DataPlane::DataPlane(net::EventLoop& loop, DataPlaneEvents& events, size_t pool_size, bool threaded_writer)
    : loop_(loop), events_(events), pool_size_(std::clamp<size_t>(pool_size, 1, limits::kMaxPoolSize)),
      probe_sink_(loop), discard_(limits::kDiscardBufferBytes),
      writer_(loop, threaded_writer,
              FrameWriter::Callbacks{
                  [this](const std::vector<FrameWriter::SentFrame>& sent) { on_frames_sent(sent); },
                  [this](PeerId peer, uint64_t generation, const std::string& why) { on_write_failed(peer, generation, why); }}) {}

DataPlane::~DataPlane() { close_all(); }

Status DataPlane::listen(int family, uint16_t& port_out) {
    net::Endpoint any;
    if (family == AF_INET6) {
        auto& sin6 = reinterpret_cast<sockaddr_in6&>(any.storage);
        sin6.sin6_family = AF_INET6;
        sin6.sin6_addr = in6addr_any;
        any.length = sizeof(sockaddr_in6);
    } else {
        auto& sin = reinterpret_cast<sockaddr_in&>(any.storage);
        sin.sin_family = AF_INET;
        sin.sin_addr.s_addr = htonl(INADDR_ANY);
        any.length = sizeof(sockaddr_in);
    }
    if (auto s = net::listen_on(any, 1024, listener_); !s.is_ok()) return s;
    net::tune_data_socket(listener_.get());  // accepted sockets inherit the buffer sizes
    port_out = net::local_endpoint(listener_.get())->port();
    listener_watch_ = loop_.watch(listener_.get(), EPOLLIN, [this](uint32_t) { on_accept(); });
    return Status::ok();
}

void DataPlane::set_identity(PeerId me) {
    me_ = me;
    for (uint64_t id : awaiting_identity_)
        if (auto it = in_.find(id); it != in_.end()) loop_.modify(it->second->watch, kInEvents);  // level-triggered: it fires
    awaiting_identity_.clear();
}

void DataPlane::set_directory(std::map<PeerId, net::Endpoint> directory) {
    std::vector<PeerId> gone;
    for (const auto& [peer, ep] : directory_)
        if (!directory.contains(peer)) gone.push_back(peer);
    directory_ = std::move(directory);
    for (PeerId peer : gone) {
        fail_pool(peer, Status::error(Result::RANK_CONNECTION_LOST, "peer " + std::to_string(peer) + " left the run"));
        std::vector<uint64_t> ins;
        for (const auto& [id, c] : in_)
            if (c->peer == peer) ins.push_back(id);
        for (uint64_t id : ins) close_in(id, "peer left the run");
    }
}

// ------------------------------------------------------------------ outgoing pools

void DataPlane::ensure_pool(PeerId peer, std::function<void(Status)> done) {
    if (auto it = pools_.find(peer); it != pools_.end()) {
        if (it->second.ready == it->second.conns.size()) {
            if (done) done(Status::ok());
        } else if (done) {
            it->second.waiters.push_back(std::move(done));
        }
        return;
    }
    auto dir = directory_.find(peer);
    if (dir == directory_.end()) {
        if (done) done(Status::error(Result::RANK_CONNECTION_FAILED, "peer " + std::to_string(peer) + " is not in the ring"));
        return;
    }
    Pool& pool = pools_[peer];
    pool.generation = next_pool_generation_++;
    if (done) pool.waiters.push_back(std::move(done));
    for (uint32_t i = 0; i < pool_size_; ++i) {
        auto c = std::make_unique<OutConn>();
        c->id = next_conn_id_++;
        c->peer = peer;
        c->index = i;
        c->started = Clock::now();
        bool in_progress = false;
        Status s = net::start_connect(dir->second, c->fd, in_progress, net::tune_data_socket);
        if (!s.is_ok()) {
            post_fail_pool(peer, Status::error(Result::RANK_CONNECTION_FAILED,
                                               "cannot connect to peer " + std::to_string(peer) + " at " +
                                                   dir->second.to_string() + ": " + s.message));
            return;
        }
        const uint64_t id = c->id;
        c->watch = loop_.watch(c->fd.get(), EPOLLOUT | kInEvents, [this, id](uint32_t ev) { on_out_io(id, ev); });
        pool.conns.push_back(id);
        OutConn& ref = *c;
        out_.emplace(id, std::move(c));
        if (!in_progress) out_connected(ref);
    }
}

void DataPlane::out_connected(OutConn& c) {
    uint8_t hello[wire::kDataHeaderBytes];
    encode_handshake(wire::DataFrameKind::P2P_HELLO, me_, c.peer, c.index, hello);
    if (!send_all_now(c.fd.get(), hello, sizeof(hello))) {
        post_fail_pool(c.peer, Status::error(Result::RANK_CONNECTION_FAILED, "handshake with peer " + std::to_string(c.peer) + " failed"));
        return;
    }
    c.state = OutState::AWAIT_ACK;
    loop_.modify(c.watch, kInEvents);
}

bool DataPlane::out_read_ack(OutConn& c) {
    while (c.ack_got < sizeof(c.ack)) {
        const ssize_t n = ::recv(c.fd.get(), c.ack + c.ack_got, sizeof(c.ack) - c.ack_got, 0);
        if (n > 0) { c.ack_got += static_cast<size_t>(n); continue; }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
        if (n < 0 && errno == EINTR) continue;
        return false;
    }
    const wire::DataHeader h = wire::decode_data_header(c.ack);
    return wire::header_is_sane(h) && h.kind == static_cast<uint8_t>(wire::DataFrameKind::P2P_HELLO_ACK) &&
           h.a == me_ && h.b == c.peer;
}

void DataPlane::on_out_io(uint64_t id, uint32_t events) {
    auto it = out_.find(id);
    if (it == out_.end()) return;
    OutConn& c = *it->second;
    const PeerId peer = c.peer;
    if (c.state == OutState::CONNECTING) {
        if (Status s = net::finish_connect(c.fd.get()); !s.is_ok()) {
            return fail_pool(peer, Status::error(Result::RANK_CONNECTION_FAILED,
                                                 "cannot connect to peer " + std::to_string(peer) + ": " + s.message));
        }
        out_connected(c);
        return;
    }
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
        if (c.state == OutState::AWAIT_ACK) {
            if (!out_read_ack(c))
                return fail_pool(peer, Status::error(Result::RANK_CONNECTION_FAILED,
                                                     "peer " + std::to_string(peer) + " refused the data connection"));
            if (c.ack_got == sizeof(c.ack)) {
                c.state = OutState::READY;
                Pool& pool = pools_[peer];
                ++pool.ready;
                writer_.add_connection(peer, pool.generation, c.id, c.fd.get());
                pool_ready_changed(peer);
                return;
            }
        } else {
            // Nothing is ever sent back on a data connection after the ack: this is EOF or an error.
            uint8_t probe;
            const ssize_t n = ::recv(c.fd.get(), &probe, 1, 0);
            if (!(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)))
                return fail_pool(peer, Status::error(Result::RANK_CONNECTION_LOST,
                                                     "connection to next peer " + std::to_string(peer) + " lost"));
        }
    }
}

void DataPlane::pool_ready_changed(PeerId peer) {
    auto it = pools_.find(peer);
    if (it == pools_.end() || it->second.ready != it->second.conns.size()) return;
    auto waiters = std::move(it->second.waiters);
    it->second.waiters.clear();
    for (auto& w : waiters) w(Status::ok());
}

void DataPlane::fail_pool(PeerId peer, const Status& why, bool silent) {
    auto it = pools_.find(peer);
    if (it == pools_.end()) return;
    Pool pool = std::move(it->second);
    pools_.erase(it);
    PCCL_LOG(INFO, "peer ", me_, ": closing data connections to peer ", peer, ": ", why.message);
    writer_.remove_pool(peer);  // before the sockets close: the writer may be in a sendmsg on one
    for (uint64_t id : pool.conns) {
        auto c = out_.find(id);
        if (c == out_.end()) continue;
        loop_.unwatch(c->second->watch);
        out_.erase(c);
    }
    for (auto& w : pool.waiters) w(why);
    std::vector<uint64_t> affected;
    for (const auto& [uid, op] : ops_)
        if (op.next == peer) affected.push_back(uid);
    for (uint64_t uid : affected) fail_op(uid, why, peer, silent);
}

void DataPlane::post_fail_pool(PeerId peer, const Status& why) {
    auto it = pools_.find(peer);
    if (it == pools_.end()) return;
    // The pool may fail another way first and a new one to the same peer be opened before this
    // runs: only the pool that broke may be failed.
    const uint64_t generation = it->second.generation;
    loop_.post([this, peer, why, generation] {
        auto pool = pools_.find(peer);
        if (pool != pools_.end() && pool->second.generation == generation) fail_pool(peer, why);
    });
}

void DataPlane::enqueue(PeerId next, uint64_t uid, wire::RingPhase phase, uint64_t offset, uint32_t bytes,
                        const uint8_t* data, uint64_t token) {
    auto pit = pools_.find(next);
    auto op = ops_.find(uid);
    if (op == ops_.end()) return;
    if (pit == pools_.end() || pit->second.conns.empty()) {
        // The pool died under this op; the failure is already on its way to the op.
        op->second.ring->on_piece_sent(token);
        return;
    }
    wire::DataHeader h;
    if (ActiveOp& o = op->second; !o.confirmed) {
        uint64_t& early_out = early_out_bytes_[next];
        if (!o.held.empty() || o.early_sent + bytes > o.early_budget || early_out + bytes > limits::kSpeculativeBytes) {
            o.held.push_back(HeldPiece{phase, offset, bytes, data, token});
            return;
        }
        o.early_sent += bytes;
        early_out += bytes;
        h.aux = wire::kDataFlagEarly;
    }
    h.kind = static_cast<uint8_t>(wire::DataFrameKind::DATA);
    h.phase = static_cast<uint8_t>(phase);
    h.length = bytes;
    h.a = uid;
    h.b = offset;
    write_frames(next, pit->second.generation, uid, {make_frame(h, data, uid, token)});
}

void DataPlane::write_frames(PeerId peer, uint64_t generation, uint64_t queue_key, std::vector<SendItem> frames) {
    if (frames.empty()) return;
    uint64_t& unreported = unreported_bytes_[queue_key];
    for (const auto& f : frames) unreported += f.total();
    writer_.push(peer, generation, std::move(frames));
}

uint64_t DataPlane::drop_unsent(uint64_t queue_key) {
    // A finished op's frames were all written: no round trip to a writer thread for it.
    auto u = unreported_bytes_.find(queue_key);
    if (u == unreported_bytes_.end()) return 0;
    const uint64_t unreported = u->second;
    unreported_bytes_.erase(u);
    // No answer (the writer thread died): count nothing rather than frames that may never have left.
    const uint64_t unwritten = writer_.drop(queue_key).value_or(unreported);
    return unreported > unwritten ? unreported - unwritten : 0;
}

void DataPlane::on_frames_sent(const std::vector<FrameWriter::SentFrame>& sent) {
    const auto now = Clock::now();
    for (const auto& f : sent) {
        // The rest of a dropped frame: its key left unreported_bytes_ at the drop, so it counts nothing.
        if (f.zeros) continue;
        if (auto u = unreported_bytes_.find(f.queue_key); u != unreported_bytes_.end() && (u->second -= f.bytes) == 0)
            unreported_bytes_.erase(u);
        if (f.queue_key >> 63) {  // shared-state data
            auto sync = syncs_.find(f.queue_key & ~(1ull << 63));
            if (sync == syncs_.end()) continue;
            sync->second.stats.tx_bytes += f.bytes;
            sync->second.last_progress = now;
            continue;
        }
        auto op = ops_.find(f.queue_key);
        if (op == ops_.end()) continue;
        op->second.ring->on_piece_sent(f.token);
        op->second.stats.tx_bytes += f.bytes;
        op->second.last_progress = now;
        maybe_complete(f.queue_key);
    }
}

void DataPlane::on_write_failed(PeerId peer, uint64_t generation, const std::string& why) {
    auto it = pools_.find(peer);
    if (it == pools_.end() || it->second.generation != generation) return;  // that pool is gone already
    fail_pool(peer, Status::error(Result::RANK_CONNECTION_LOST, why));
}

// ------------------------------------------------------------------ incoming connections

void DataPlane::on_accept() {
    for (;;) {
        const int fd = ::accept4(listener_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            return;
        }
        net::Fd owned(fd);
        if (in_.size() >= limits::kMaxIncomingP2PConnections) {
            PCCL_LOG(WARN, "peer ", me_, ": refusing a data connection: already ", in_.size(), " open");
            continue;
        }
        net::tune_control_socket(fd);
        auto c = std::make_unique<InConn>();
        c->id = next_conn_id_++;
        c->fd = std::move(owned);
        c->accepted = Clock::now();
        const uint64_t id = c->id;
        c->watch = loop_.watch(fd, kInEvents, [this, id](uint32_t ev) { on_in_io(id, ev); });
        in_.emplace(id, std::move(c));
    }
}

void DataPlane::close_in(uint64_t id, const std::string& why) {
    auto it = in_.find(id);
    if (it == in_.end()) return;
    const PeerId peer = it->second->peer;
    loop_.unwatch(it->second->watch);
    parked_.erase(id);
    if (it->second->state == InState::STASH) {
        if (auto f = early_frames_.find(it->second->stash); f != early_frames_.end()) {
            forget_early_frame(f);
            loop_.post([this] { unpark_all(); });  // a connection may be parked on that memory
        }
    }
    in_.erase(it);
    if (peer == 0) return;
    // One line per event: a pool of 16 going away is one event, not 16. The first close says why
    // (it often has the cause: a malformed piece, a reset); the rest of the pool's go to DEBUG.
    const auto still_open = std::count_if(in_.begin(), in_.end(), [peer](const auto& kv) { return kv.second->peer == peer; });
    if (closing_from_.contains(peer))
        PCCL_LOG(DEBUG, "peer ", me_, ": data connection from peer ", peer, " closed: ", why);
    else
        PCCL_LOG(INFO, "peer ", me_, ": data connection from peer ", peer, " closed: ", why,
                 still_open > 0 ? text::concat(" (", still_open, " more open)") : std::string());
    if (still_open > 0) closing_from_.insert(peer);
    else closing_from_.erase(peer);
    std::vector<uint64_t> affected;
    for (const auto& [uid, op] : ops_)
        if (op.prev == peer) affected.push_back(uid);
    for (uint64_t uid : affected)
        fail_op(uid, Status::error(Result::RANK_CONNECTION_LOST, "connection from previous peer " + std::to_string(peer) + " lost: " + why), peer);
}

void DataPlane::park(InConn& c) {
    c.state = InState::PARKED;
    parked_.insert(c.id);
    loop_.modify(c.watch, 0);  // TCP back-pressure holds the sender until unpark_all() resumes it
}

bool DataPlane::route_header(InConn& c) {
    const uint64_t uid = c.h.a;
    if (auto it = ops_.find(uid); it != ops_.end()) return route_to_op(c, it->second);
    // Only frames sent before their sender's OP_GO are kept in memory: this peer may not have called
    // that op yet, and other ops' frames may be queued behind them. A confirmed frame means this
    // peer claimed the ticket too, so its own OP_GO is on the way: it parks the connection.
    if (tickets_.contains(uid)) {
        uint64_t& kept = early_in_bytes_[c.peer];
        if ((c.h.aux & wire::kDataFlagEarly) && kept + c.h.length <= limits::kSpeculativeBytes) {
            kept += c.h.length;
            const uint64_t key = next_early_key_++;
            EarlyFrame& f = early_frames_[key];
            f.uid = uid;
            f.peer = c.peer;
            f.phase = static_cast<wire::RingPhase>(c.h.phase);
            f.offset = c.h.b;
            f.payload = early_buffers_.take(c.h.length);
            f.bytes = c.h.length;
            c.stash = key;
            c.dest = f.payload.data.get();
            c.remaining = c.h.length;
            c.state = InState::STASH;
            return true;
        }
        // A confirmed frame (this peer's OP_GO is on the way), or more than a sender may send early:
        // park the connection until the op starts here. Its uid may be below max_go_uid_ (reserved
        // before later ops began), so the rule below would discard it.
        park(c);
        return true;
    }
    if (uid > max_go_uid_) {
        park(c);
        return true;
    }
    c.state = InState::DISCARD;
    c.remaining = c.h.length;
    return true;
}

bool DataPlane::route_to_op(InConn& c, ActiveOp& op) {
    const uint64_t uid = c.h.a;
    if (op.prev != c.peer) {
        if (!op.confirmed) {
            // Sent early on a ring view the master will not confirm: it names a fresh uid instead.
            c.state = InState::DISCARD;
            c.remaining = c.h.length;
            return true;
        }
        fail_op(uid, Status::error(Result::RANK_CONNECTION_LOST, "data for this op came from a peer that is not its previous peer"), c.peer);
        close_in(c.id, "data from the wrong peer");
        return false;
    }
    std::string error;
    uint8_t* dest = op.ring->accept_piece(static_cast<wire::RingPhase>(c.h.phase), c.h.b, c.h.length, error);
    if (!dest) {
        if (!op.confirmed) {
            // Both sides started early with different arguments; the master refuses the op for
            // everyone, so only this op fails, and the connection (other ops' frames) stays.
            fail_op(uid, Status::error(Result::RANK_CONNECTION_LOST, "a piece from the previous peer does not fit this op: " + error), c.peer);
            c.state = InState::DISCARD;
            c.remaining = c.h.length;
            return true;
        }
        close_in(c.id, "malformed piece: " + error);  // fails the op too: it came from prev
        return false;
    }
    c.dest = dest;
    c.remaining = c.h.length;
    c.state = InState::PAYLOAD;
    return true;
}

void DataPlane::deliver_piece(uint64_t uid, ActiveOp& op, const wire::DataHeader& h) {
    op.stats.rx_bytes += wire::kDataHeaderBytes + h.length;
    op.last_progress = Clock::now();
    op.received_any = true;
    OpSink sink(*this, uid, op.next, op.ring);
    op.ring->on_piece_received(sink, static_cast<wire::RingPhase>(h.phase), h.b, h.length);
    maybe_complete(uid);
}

void DataPlane::finish_piece(InConn& c) {
    const uint64_t uid = c.h.a;
    c.state = InState::HEADER;
    c.header_got = 0;
    auto it = ops_.find(uid);
    if (it == ops_.end()) return;
    deliver_piece(uid, it->second, c.h);
}

void DataPlane::finish_stash(InConn& c) {
    c.state = InState::HEADER;
    c.header_got = 0;
    auto it = early_frames_.find(c.stash);
    if (it == early_frames_.end()) return;
    it->second.complete = true;
    const uint64_t uid = it->second.uid;
    if (ops_.contains(uid)) {
        replay_early_frames(uid);  // the op started while this frame was being read
    } else if (!tickets_.contains(uid)) {
        forget_early_frame(it);
        unpark_all();  // a connection may be parked on that memory
    }
}

std::map<uint64_t, DataPlane::EarlyFrame>::iterator DataPlane::forget_early_frame(std::map<uint64_t, EarlyFrame>::iterator it) {
    early_in_bytes_[it->second.peer] -= it->second.bytes;
    early_buffers_.give_back(std::move(it->second.payload));
    return early_frames_.erase(it);
}

void DataPlane::replay_early_frames(uint64_t uid) {
    std::vector<uint64_t> keys;
    for (const auto& [key, f] : early_frames_)
        if (f.uid == uid && f.complete) keys.push_back(key);
    for (uint64_t key : keys) {
        auto fit = early_frames_.find(key);
        if (fit == early_frames_.end()) continue;
        const EarlyFrame& f = fit->second;
        auto op = ops_.find(uid);
        // Gone: the op failed meanwhile. Another previous peer: sent on a ring view the master did not confirm.
        if (op == ops_.end() || op->second.prev != f.peer) {
            forget_early_frame(fit);
            continue;
        }
        wire::DataHeader h;
        h.phase = static_cast<uint8_t>(f.phase);
        h.b = f.offset;
        h.length = f.bytes;
        const PeerId from = f.peer;
        std::string error;
        uint8_t* dest = op->second.ring->accept_piece(f.phase, f.offset, f.bytes, error);
        if (dest) std::memcpy(dest, f.payload.data.get(), f.bytes);
        // Forgotten before the op reacts: failing or delivering may drop this uid's frames.
        forget_early_frame(fit);
        if (!dest) fail_op(uid, Status::error(Result::RANK_CONNECTION_LOST, "a piece from the previous peer does not fit this op: " + error), from);
        else deliver_piece(uid, op->second, h);
    }
}

void DataPlane::drop_early_frames(uint64_t uid) {
    for (auto& [id, c] : in_) {
        if (c->state != InState::STASH) continue;
        auto f = early_frames_.find(c->stash);
        if (f != early_frames_.end() && f->second.uid == uid) c->state = InState::DISCARD;  // the rest of it
    }
    for (auto it = early_frames_.begin(); it != early_frames_.end();)
        it = it->second.uid == uid ? forget_early_frame(it) : std::next(it);
}

void DataPlane::add_ticket(uint64_t uid) {
    tickets_.insert(uid);
    unpark_all();  // a connection parked on this uid may now keep its frames in memory
}

void DataPlane::void_ticket(uint64_t uid) {
    tickets_.erase(uid);
    drop_early_frames(uid);
    // Every uid below a ticket's was handed out before it, so raising the mark loses nothing.
    max_go_uid_ = std::max(max_go_uid_, uid);
    unpark_all();
}

void DataPlane::on_in_io(uint64_t id, uint32_t events) {
    auto it = in_.find(id);
    if (it == in_.end()) return;
    InConn& c = *it->second;
    if (c.state == InState::PARKED) {
        if (events & (EPOLLHUP | EPOLLERR)) close_in(id, "connection reset while parked");
        return;
    }
    if (c.state == InState::HELLO && me_ == 0) {
        // A ring member learnt of this peer before this peer's own WELCOME arrived (its master is
        // nearer to them): the handshake names an id this peer does not know yet, so it waits.
        // (epoll reports a reset even with no events asked for.)
        if (events & (EPOLLHUP | EPOLLERR)) return close_in(id, "connection reset before the handshake");
        if (!c.awaiting_identity) {
            c.awaiting_identity = true;
            loop_.modify(c.watch, 0);
            awaiting_identity_.push_back(id);
        }
        return;
    }
    size_t budget = kReadBudgetBytes;
    while (budget > 0) {
        ssize_t n = 0;
        switch (c.state) {
            case InState::HELLO:
            case InState::HEADER:
                n = ::recv(c.fd.get(), c.header + c.header_got, sizeof(c.header) - c.header_got, 0);
                break;
            case InState::PAYLOAD:
            case InState::STASH:
                n = ::recv(c.fd.get(), c.dest, std::min<uint64_t>(c.remaining, budget), 0);
                break;
            case InState::DISCARD:
                n = ::recv(c.fd.get(), discard_.data(), std::min<uint64_t>(c.remaining, discard_.size()), 0);
                break;
            case InState::PARKED:
                return;
        }
        if (n == 0) return close_in(id, "closed by the other side");
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            if (errno == EINTR) continue;
            return close_in(id, net::errno_text(errno));
        }
        budget -= std::min<size_t>(budget, static_cast<size_t>(n));
        switch (c.state) {
            case InState::HELLO:
            case InState::HEADER: {
                c.header_got += static_cast<size_t>(n);
                if (c.header_got < sizeof(c.header)) break;
                c.h = wire::decode_data_header(c.header);
                if (!wire::header_is_sane(c.h)) return close_in(id, "malformed data frame header");
                if (c.state == InState::HELLO && c.h.kind == static_cast<uint8_t>(wire::DataFrameKind::PROBE_HELLO)) {
                    if (c.h.b != me_ || c.h.a == 0) return close_in(id, "bad probe handshake");
                    net::Fd fd = std::move(c.fd);
                    close_in(id, "handed to the bandwidth probe receiver");
                    probe_sink_.adopt(std::move(fd));
                    return;
                }
                if (c.state == InState::HELLO) {
                    if (c.h.kind != static_cast<uint8_t>(wire::DataFrameKind::P2P_HELLO) || c.h.b != me_ || c.h.a == 0)
                        return close_in(id, "bad handshake");
                    c.peer = c.h.a;
                    closing_from_.erase(c.peer);  // a new pool from it: its closes are news again
                    uint8_t ack[wire::kDataHeaderBytes];
                    encode_handshake(wire::DataFrameKind::P2P_HELLO_ACK, c.h.a, me_, c.h.aux, ack);
                    if (!send_all_now(c.fd.get(), ack, sizeof(ack))) return close_in(id, "cannot acknowledge handshake");
                    c.state = InState::HEADER;
                    c.header_got = 0;
                    break;
                }
                if (c.h.kind == static_cast<uint8_t>(wire::DataFrameKind::DATA)) {
                    if (!route_header(c)) return;  // connection closed
                } else if (c.h.kind == static_cast<uint8_t>(wire::DataFrameKind::SYNC_DATA)) {
                    if (!route_sync_header(c)) return;
                } else {
                    return close_in(id, "unexpected frame kind");
                }
                if (c.state == InState::PARKED) return;
                break;
            }
            case InState::PAYLOAD:
            case InState::STASH:
                c.dest += n;
                c.remaining -= static_cast<uint64_t>(n);
                if (c.remaining == 0) {
                    if (c.state == InState::STASH) finish_stash(c);
                    else if (c.h.kind == static_cast<uint8_t>(wire::DataFrameKind::SYNC_DATA)) finish_sync_frame(c);
                    else finish_piece(c);
                    if (!in_.contains(id)) return;
                }
                break;
            case InState::DISCARD:
                c.remaining -= static_cast<uint64_t>(n);
                if (c.remaining == 0) {
                    c.state = InState::HEADER;
                    c.header_got = 0;
                }
                break;
            case InState::PARKED:
                return;
        }
    }
}

void DataPlane::unpark_all() {
    std::vector<uint64_t> ready;
    for (uint64_t id : parked_) {
        auto it = in_.find(id);
        if (it == in_.end()) continue;
        const auto& h = it->second->h;
        const bool sync = h.kind == static_cast<uint8_t>(wire::DataFrameKind::SYNC_DATA);
        const bool early = (h.aux & wire::kDataFlagEarly) != 0;
        if (sync ? h.a <= max_sync_uid_
                 : ops_.contains(h.a) || (tickets_.contains(h.a) ? early : h.a <= max_go_uid_))
            ready.push_back(id);
    }
    for (uint64_t id : ready) {
        parked_.erase(id);
        auto it = in_.find(id);
        if (it == in_.end()) continue;
        InConn& c = *it->second;
        loop_.modify(c.watch, kInEvents);
        if (c.h.kind == static_cast<uint8_t>(wire::DataFrameKind::SYNC_DATA)) route_sync_header(c);
        else route_header(c);
    }
}

void DataPlane::note_go(uint64_t uid) {
    if (uid <= max_go_uid_) return;
    max_go_uid_ = uid;
    unpark_all();
}

// ------------------------------------------------------------------ operations

void DataPlane::start_op(uint64_t uid, ring::RingAllReduce* ring, PeerId prev, PeerId next, bool confirmed,
                         uint64_t op_bytes) {
    ActiveOp op;
    op.ring = ring;
    op.prev = prev;
    op.next = next;
    op.last_progress = Clock::now();
    op.confirmed = confirmed;
    if (!confirmed)
        op.early_budget = std::min<uint64_t>(limits::kSpeculativeBytes,
                                             std::max<uint64_t>(limits::kSpeculativeMinBytes, op_bytes / limits::kSpeculativeOpDivisor));
    tickets_.erase(uid);
    ops_[uid] = op;
    ensure_pool(next, nullptr);
    OpSink sink(*this, uid, next, ring);
    ring->start(sink);
    replay_early_frames(uid);
    if (confirmed) note_go(uid);
    unpark_all();  // connections parked on this uid (or on memory for early frames)
    maybe_complete(uid);
}

void DataPlane::confirm_op(uint64_t uid) {
    auto it = ops_.find(uid);
    if (it == ops_.end() || it->second.confirmed) return;
    ActiveOp& op = it->second;
    op.confirmed = true;
    early_out_bytes_[op.next] -= op.early_sent;
    op.early_sent = 0;
    op.last_progress = Clock::now();
    const PeerId next = op.next;
    std::vector<HeldPiece> held = std::move(op.held);
    op.held.clear();
    for (const auto& p : held) enqueue(next, uid, p.phase, p.offset, p.bytes, p.data, p.token);
    note_go(uid);  // late frames of it are discarded once it is over, like any confirmed op's
}

void DataPlane::release_early_share(uint64_t uid) {
    auto it = early_retained_.find(uid);
    if (it == early_retained_.end()) return;
    early_out_bytes_[it->second.first] -= it->second.second;
    early_retained_.erase(it);
}

void DataPlane::maybe_complete(uint64_t uid) {
    auto it = ops_.find(uid);
    if (it == ops_.end() || !it->second.ring->complete()) return;
    events_.on_op_complete(uid);
}

DataPlane::OpStats DataPlane::op_stats(uint64_t uid) const {
    auto it = ops_.find(uid);
    return it == ops_.end() ? OpStats{} : it->second.stats;
}

DataPlane::OpStats DataPlane::remove_op(uint64_t uid) {
    OpStats stats;
    auto it = ops_.find(uid);
    if (it == ops_.end()) return stats;
    stats = it->second.stats;
    if (!it->second.confirmed) {
        // The next peer may still keep this op's early frames (it frees them once it calls the tag),
        // so they stay charged to the allowance until the tag's OP_GO or OP_RESULT here.
        if (it->second.early_sent > 0) early_retained_[uid] = {it->second.next, it->second.early_sent};
        // No OP_GO is behind its uid yet: its late frames must be discarded, not parked.
        max_go_uid_ = std::max(max_go_uid_, uid);
    }
    ops_.erase(it);
    // Written, but the writer thread's report is still on its way here (it will find no op).
    stats.tx_bytes += drop_unsent(uid);
    for (auto& [id, c] : in_)
        if (c->state == InState::PAYLOAD && c->h.a == uid && c->h.kind == static_cast<uint8_t>(wire::DataFrameKind::DATA))
            c->state = InState::DISCARD;
    return stats;
}

// ------------------------------------------------------------------ shared-state sync

void DataPlane::begin_sync(uint64_t uid, std::vector<SyncBuffer> entries) {
    SyncState& s = syncs_[uid];
    s.entries = std::move(entries);
    s.last_progress = Clock::now();
    // Frames of this sync stop parking; the caller registers the ranges it expects right away,
    // in the same reactor task, so none can slip through as "stale".
    max_sync_uid_ = std::max(max_sync_uid_, uid);
}

void DataPlane::expect_sync_ranges(uint64_t uid, const std::vector<wire::SyncRange>& ranges) {
    auto it = syncs_.find(uid);
    if (it == syncs_.end()) return;
    SyncState& s = it->second;
    s.receiving = true;
    for (const auto& r : ranges) {
        if (r.entry >= s.entries.size() || r.length == 0 || r.offset + r.length > s.entries[r.entry].bytes ||
            r.offset + r.length < r.offset)
            continue;  // the master never plans this; bounds are checked regardless
        SyncRangeState rs;
        rs.range = r;
        rs.missing = (r.length + limits::kSyncFrameBytes - 1) / limits::kSyncFrameBytes;
        rs.got.assign(rs.missing, 0);
        s.missing_frames += rs.missing;
        s.ranges_of_entry[r.entry].push_back(s.ranges.size());
        s.ranges.push_back(std::move(rs));
    }
    s.last_progress = Clock::now();
    unpark_all();
    if (s.missing_frames == 0 && !s.announced) {
        s.announced = true;
        events_.on_sync_received(uid);
    }
}

void DataPlane::send_sync_ranges(uint64_t uid, const std::vector<wire::SyncRange>& ranges) {
    auto it = syncs_.find(uid);
    if (it == syncs_.end()) return;
    SyncState& s = it->second;
    for (const auto& r : ranges) {
        if (r.entry >= s.entries.size() || r.offset + r.length > s.entries[r.entry].bytes) continue;
        ensure_pool(r.peer, nullptr);
        auto pit = pools_.find(r.peer);
        if (pit == pools_.end() || pit->second.conns.empty()) continue;  // unknown peer: the master will notice
        std::vector<SendItem> frames;
        for (uint64_t rel = 0; rel < r.length; rel += limits::kSyncFrameBytes) {
            wire::DataHeader h;
            h.kind = static_cast<uint8_t>(wire::DataFrameKind::SYNC_DATA);
            h.length = static_cast<uint32_t>(std::min<uint64_t>(limits::kSyncFrameBytes, r.length - rel));
            h.a = uid;
            h.b = r.offset + rel;
            h.aux = r.entry;
            frames.push_back(make_frame(h, s.entries[r.entry].data + r.offset + rel, sync_queue_key(uid)));
        }
        write_frames(r.peer, pit->second.generation, sync_queue_key(uid), std::move(frames));
    }
}

DataPlane::OpStats DataPlane::end_sync(uint64_t uid) {
    OpStats stats;
    max_sync_uid_ = std::max(max_sync_uid_, uid);
    auto it = syncs_.find(uid);
    if (it != syncs_.end()) {
        stats = it->second.stats;
        syncs_.erase(it);
    }
    stats.tx_bytes += drop_unsent(sync_queue_key(uid));
    for (auto& [id, c] : in_)
        if (c->state == InState::PAYLOAD && c->h.a == uid && c->h.kind == static_cast<uint8_t>(wire::DataFrameKind::SYNC_DATA))
            c->state = InState::DISCARD;
    unpark_all();  // frames of this sync that parked are now stale: drain them
    return stats;
}

bool DataPlane::route_sync_header(InConn& c) {
    const uint64_t uid = c.h.a;
    auto it = syncs_.find(uid);
    if (it != syncs_.end() && it->second.receiving) {
        SyncState& s = it->second;
        const uint32_t entry = c.h.aux;
        const uint64_t offset = c.h.b;
        auto idx = s.ranges_of_entry.find(entry);
        if (idx != s.ranges_of_entry.end()) {
            for (size_t r : idx->second) {
                const auto& range = s.ranges[r].range;
                if (offset < range.offset || offset >= range.offset + range.length) continue;
                const uint64_t rel = offset - range.offset;
                if (rel % limits::kSyncFrameBytes != 0 ||
                    c.h.length != std::min<uint64_t>(limits::kSyncFrameBytes, range.length - rel))
                    break;
                c.dest = s.entries[entry].data + offset;
                c.remaining = c.h.length;
                c.sync_range = r;
                c.sync_frame = rel / limits::kSyncFrameBytes;
                c.state = InState::PAYLOAD;
                return true;
            }
        }
        close_in(c.id, "shared-state data outside the planned ranges");
        return false;
    }
    if (uid > max_sync_uid_) {
        park(c);
        return true;
    }
    c.state = InState::DISCARD;  // a sync that is over (or that this peer receives nothing in)
    c.remaining = c.h.length;
    return true;
}

void DataPlane::finish_sync_frame(InConn& c) {
    const uint64_t uid = c.h.a;
    c.state = InState::HEADER;
    c.header_got = 0;
    auto it = syncs_.find(uid);
    if (it == syncs_.end()) return;
    SyncState& s = it->second;
    s.stats.rx_bytes += wire::kDataHeaderBytes + c.h.length;
    s.last_progress = Clock::now();
    auto& rs = s.ranges[c.sync_range];
    if (rs.got[c.sync_frame]) return;  // a replacement distributor sent it again: same bytes
    rs.got[c.sync_frame] = 1;
    --rs.missing;
    if (--s.missing_frames == 0 && !s.announced) {
        s.announced = true;
        events_.on_sync_received(uid);
    }
}

void DataPlane::fail_op(uint64_t uid, const Status& why, PeerId suspect, bool silent, bool even_if_complete) {
    auto it = ops_.find(uid);
    if (it == ops_.end()) return;
    // An op whose ring part is complete has all its bytes; whether it succeeded is the master's call
    // (OP_RESULT), and its statistics must survive until then. A neighbour closing its connections
    // right after its own last op is normal, not a failure of this one. The exception: its last
    // bytes never reached the next peer (see check_deadlines).
    if (it->second.ring->complete() && !even_if_complete) return;
    events_.on_op_failed(uid, why, suspect, silent);
    remove_op(uid);  // in case the owner did not
}

bool DataPlane::forward_path_silent(PeerId next, std::chrono::milliseconds quiet) const {
    auto pool = pools_.find(next);
    if (pool == pools_.end()) return false;
    for (uint64_t id : pool->second.conns) {
        auto c = out_.find(id);
        if (c != out_.end() && c->second->state == OutState::READY && net::send_unacknowledged_for(c->second->fd.get(), quiet))
            return true;
    }
    return false;
}

void DataPlane::check_deadlines(Clock::time_point now, std::chrono::milliseconds timeout) {
    probe_sink_.check_deadlines(now);
    // In a stalled ring every peer waits on its previous peer; only the two ends of the dead link
    // or the peers around a dead peer hold first-hand evidence, and they report at the deadline:
    // a peer that got nothing at all from its previous peer in this op, and a peer whose data to
    // its next peer sits unacknowledged for the deadline (the link forward is dead, even if the
    // cut came mid-op).
    // The master drops the suspect of the first report. Peers with neither may only be stalled
    // behind the break (a cascade): they wait a quarter longer, so their report, naming an
    // innocent neighbour, comes after the op was already failed by a first-hand one.
    struct Stall { uint64_t uid; PeerId suspect; std::string why; };
    std::vector<Stall> first_hand, cascade;
    const std::string for_timeout = " for " + std::to_string(timeout.count()) + " ms";
    for (const auto& [uid, op] : ops_) {
        if (!op.confirmed) continue;  // the others may not have called yet: no deadline before OP_GO
        const auto quiet = now - op.last_progress;
        // Only a quiet op pays for the TCP_INFO look. Its ACK silence, not its quiet time, times
        // the report: writes into a large socket buffer go on for a while after a cut.
        if (quiet <= timeout / 2) continue;
        // A complete op still waits for the master's verdict; its last pieces were written to the
        // kernel, not necessarily delivered, so its sender may be the only end of the break that
        // still has an op to report on.
        const bool complete = op.ring->complete();
        if (!complete && !op.received_any && quiet > timeout)
            first_hand.push_back({uid, op.prev, "nothing from previous peer " + std::to_string(op.prev) + for_timeout});
        else if (forward_path_silent(op.next, timeout))
            first_hand.push_back({uid, op.next, "data to next peer " + std::to_string(op.next) + " unacknowledged" + for_timeout});
        else if (!complete && quiet > timeout + timeout / kCascadeGraceDivisor)
            cascade.push_back({uid, op.prev, "no progress" + for_timeout + " (previous peer " + std::to_string(op.prev) + ")"});
    }
    for (const auto* list : {&first_hand, &cascade})
        for (const auto& stall : *list)
            fail_op(stall.uid, Status::error(Result::RANK_CONNECTION_LOST, stall.why), stall.suspect, /*silent=*/true,
                    /*even_if_complete=*/true);

    std::vector<uint64_t> stalled_syncs;
    for (auto& [uid, sync] : syncs_)
        if (sync.receiving && sync.missing_frames > 0 && now - sync.last_progress > timeout) {
            stalled_syncs.push_back(uid);
            sync.last_progress = now;  // report once per deadline
        }
    for (uint64_t uid : stalled_syncs) {
        std::vector<wire::SyncRange> missing;
        for (const auto& r : syncs_.at(uid).ranges)
            if (r.missing > 0) missing.push_back(r.range);
        events_.on_sync_stalled(uid,
                                Status::error(Result::RANK_CONNECTION_LOST,
                                              "no shared-state data for " + std::to_string(timeout.count()) + " ms"),
                                std::move(missing));
    }

    std::vector<PeerId> slow_pools;
    for (const auto& [id, c] : out_)
        if (c->state != OutState::READY && now - c->started > limits::kP2PHandshakeDeadline) slow_pools.push_back(c->peer);
    for (PeerId peer : slow_pools)
        fail_pool(peer, Status::error(Result::RANK_CONNECTION_FAILED, "handshake with peer " + std::to_string(peer) + " timed out"),
                  /*silent=*/true);

    std::vector<uint64_t> slow_in;
    for (const auto& [id, c] : in_)
        if (c->state == InState::HELLO && now - c->accepted > limits::kP2PHandshakeDeadline) slow_in.push_back(id);
    for (uint64_t id : slow_in) close_in(id, "no handshake in time");
}

void DataPlane::close_all() {
    writer_.stop();  // before the sockets close
    probe_sink_.close_all();
    for (auto& [id, c] : out_) loop_.unwatch(c->watch);
    for (auto& [id, c] : in_) loop_.unwatch(c->watch);
    out_.clear();
    in_.clear();
    pools_.clear();
    parked_.clear();
    awaiting_identity_.clear();
    ops_.clear();
    tickets_.clear();
    early_frames_.clear();
    early_in_bytes_.clear();
    early_out_bytes_.clear();
    early_retained_.clear();
    syncs_.clear();
    unreported_bytes_.clear();
    closing_from_.clear();
    if (listener_.valid()) {
        loop_.unwatch(listener_watch_);
        listener_.reset();
    }
}

}  // namespace pccl::client
