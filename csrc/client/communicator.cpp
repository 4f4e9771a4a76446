#include "client/communicator.hpp"

#include <cstring>
#include <set>

#include "client/session.hpp"
#include "common/limits.hpp"
#include "kernels/quantize.hpp"

namespace pccl::client {

Communicator::Communicator(std::string master_address, uint32_t peer_group, size_t pool_size)
    : master_address_(std::move(master_address)), peer_group_(peer_group),
      pool_size_(pool_size == 0 ? limits::kDefaultPoolSize : pool_size), scratch_(std::make_shared<ScratchPool>()) {}

Communicator::~Communicator() { close(); }

std::shared_ptr<Session> Communicator::current_session() const {
    std::lock_guard lock(mutex_);
    return session_;
}

Status Communicator::connect(int n_attempts, const InterruptCheck& interrupted) {
    if (pool_size_ > limits::kMaxPoolSize)
        return Status::error(Result::INVALID_ARGUMENT, "p2p_connection_pool_size may be at most " +
                                                           std::to_string(limits::kMaxPoolSize));
    std::shared_ptr<Session> session;
    {
        std::lock_guard lock(mutex_);
        if (session_ && session_->alive())
            return Status::error(Result::INVALID_USAGE, "already connected; close() first to connect again");
        if (session_) session_->shutdown(/*say_goodbye=*/false);
        session_ = std::make_shared<Session>(peer_group_, pool_size_, scratch_);
        session = session_;
    }
    Status s = session->connect(master_address_, n_attempts, interrupted);
    if (!s.is_ok()) session->shutdown(/*say_goodbye=*/true);
    return s;
}

Status Communicator::update_topology(const InterruptCheck& interrupted) {
    auto s = current_session();
    if (!s) return Status::error(Result::NOT_INITIALIZED, "not connected: call connect() first");
    return s->update_topology(interrupted);
}

Status Communicator::optimize_topology(const InterruptCheck& interrupted) {
    auto s = current_session();
    if (!s) return Status::error(Result::NOT_INITIALIZED, "not connected: call connect() first");
    return s->optimize_topology(interrupted);
}

Status Communicator::are_peers_pending(bool& pending, const InterruptCheck& interrupted) {
    auto s = current_session();
    if (!s) return Status::error(Result::NOT_INITIALIZED, "not connected: call connect() first");
    return s->are_peers_pending(pending, interrupted);
}

SyncOutcome Communicator::sync_shared_state(const std::vector<SyncEntryDesc>& entries, uint64_t revision,
                                            uint8_t strategy,
                                            const Hasher& hasher, const Stager& stager,
                                            const InterruptCheck& interrupted) {
    auto s = current_session();
    if (!s) return {Status::error(Result::NOT_INITIALIZED, "not connected: call connect() first"), 0, 0, 0};
    if (strategy > 2) return {Status::error(Result::INVALID_ARGUMENT, "unknown shared-state sync strategy"), 0, 0, 0};
    std::set<std::string> names;
    for (const auto& e : entries) {
        if (!is_valid(e.dtype)) return {Status::error(Result::INVALID_ARGUMENT, "entry '" + e.name + "' has an unknown dtype"), 0, 0, 0};
        if (e.count > 0 && e.data == nullptr && !e.hash)
            return {Status::error(Result::INVALID_ARGUMENT, "entry '" + e.name + "' has a null pointer"), 0, 0, 0};
        if (e.count > 0 && e.data == nullptr && !stager)
            return {Status::error(Result::INVALID_ARGUMENT, "entry '" + e.name + "' has no host memory and nothing stages it"), 0, 0, 0};
        if (e.name.size() > limits::kMaxWireStringBytes)
            return {Status::error(Result::INVALID_ARGUMENT, "entry name longer than " + std::to_string(limits::kMaxWireStringBytes) + " bytes"), 0, 0, 0};
        if (!names.insert(e.name).second)
            return {Status::error(Result::INVALID_ARGUMENT, "two shared-state entries are named '" + e.name + "'"), 0, 0, 0};
    }
    if (entries.size() > limits::kMaxSyncEntries)
        return {Status::error(Result::INVALID_ARGUMENT, "too many shared-state entries"), 0, 0, 0};
    return s->sync_shared_state(entries, revision, strategy, hasher, stager, interrupted);
}

Status Communicator::get_attribute(Attribute attribute, int64_t& value) const {
    auto s = current_session();
    if (!s) return Status::error(Result::NOT_INITIALIZED, "not connected: call connect() first");
    const Attributes a = s->attributes();
    if (!a.admitted) {
        // A session that ended says why (dropped by the master: MASTER_CONNECTION_FAILED), as
        // every other call does; one that never got in is simply not initialised.
        if (!s->alive()) return s->over_status();
        return Status::error(Result::NOT_INITIALIZED, "not connected to a run yet: call connect() first");
    }
    switch (attribute) {
        case Attribute::GLOBAL_WORLD_SIZE: value = a.global_world; return Status::ok();
        case Attribute::LOCAL_WORLD_SIZE: value = a.local_world; return Status::ok();
        case Attribute::NUM_DISTINCT_PEER_GROUPS: value = a.groups; return Status::ok();
        case Attribute::LARGEST_PEER_GROUP_WORLD_SIZE: value = a.largest_group; return Status::ok();
    }
    return Status::error(Result::INVALID_ARGUMENT, "unknown attribute");
}

std::shared_ptr<ReduceHandle> Communicator::all_reduce_async(const ReduceRequest& request) {
    auto h = std::make_shared<ReduceHandle>();
    h->request = request;
    h->scratch = scratch_;
    auto reject = [&](Result code, std::string why) {
        h->outcome.complete({Status::error(code, std::move(why)), {}});
        return h;
    };
    if (!is_valid(request.dtype) || !is_valid(request.op)) return reject(Result::INVALID_ARGUMENT, "unknown dtype or reduce op");
    if (!is_valid(request.quant_algorithm)) return reject(Result::INVALID_ARGUMENT, "unknown quantization algorithm");
    if (request.quant_algorithm != QuantizationAlgorithm::NONE) {
        const std::string why = kernels::quant::validate({request.dtype, request.quant_dtype, request.quant_algorithm});
        if (!why.empty()) return reject(Result::INVALID_ARGUMENT, why);
    }
    const size_t bytes = request.count * element_size(request.dtype);
    if (bytes > 0 && (request.send == nullptr || request.recv == nullptr))
        return reject(Result::INVALID_ARGUMENT, "null buffer with a non-zero count");
    const auto* s = static_cast<const uint8_t*>(request.send);
    const auto* r = static_cast<const uint8_t*>(request.recv);
    h->in_place = bytes > 0 && s == r;
    if (bytes > 0 && !h->in_place && s < r + bytes && r < s + bytes)
        return reject(Result::INVALID_ARGUMENT, "send and recv buffers partially overlap; pass the same buffer for in-place");
    auto session = current_session();
    if (!session) return reject(Result::NOT_INITIALIZED, "not connected: call connect() first");
    // In place, the ring saves each piece of the input here before overwriting it: the one extra
    // copy, which lets a failed op put the caller's buffer back bit for bit.
    if (h->in_place) h->backup = scratch_->take(bytes);
    session->submit(h);
    return h;
}

ReduceOutcome Communicator::wait(ReduceHandle& handle, const InterruptCheck& interrupted, bool& was_interrupted) {
    was_interrupted = false;
    while (!handle.outcome.wait_for(limits::kCallerPollInterval)) {
        if (interrupted && interrupted()) {
            was_interrupted = true;
            if (auto session = handle.session.lock()) session->cancel(handle);
            handle.outcome.wait_for(limits::kP2PHandshakeDeadline);
            break;
        }
    }
    // Reached only when interrupted: the caller raises KeyboardInterrupt and keeps the handle (and
    // its buffers) until a later wait() sees the op over; the ring may still touch them until then.
    if (!handle.outcome.done())
        return {Status::error(Result::INTERNAL_ERROR,
                              "the operation did not stop in time after the interrupt; it is still in flight: "
                              "wait() on it again before freeing its buffers"),
                {}};
    return handle.outcome.get();
}

bool Communicator::done(const ReduceHandle& handle) { return handle.outcome.done(); }

void Communicator::close() {
    std::shared_ptr<Session> s;
    {
        std::lock_guard lock(mutex_);
        s = std::move(session_);
    }
    if (s) s->shutdown(/*say_goodbye=*/true);
}

uint64_t Communicator::peer_id() const {
    auto s = current_session();
    return s ? s->peer_id() : 0;
}

bool Communicator::connected() const {
    auto s = current_session();
    return s && s->alive();
}

}  // namespace pccl::client
