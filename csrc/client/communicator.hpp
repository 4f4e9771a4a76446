// A peer's handle on the run: registers with the master, follows membership, and runs collective
// operations. Public methods are called from any thread; everything with a socket happens on the
// session's reactor thread (see ARCHITECTURE.md). Blocking calls poll `interrupted` every
// limits::kCallerPollInterval so the caller can abandon them (Ctrl-C).
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "client/completion.hpp"
#include "client/scratch_pool.hpp"
#include "common/status.hpp"
#include "common/types.hpp"

namespace pccl::client {

using InterruptCheck = std::function<bool()>;
// Hashes host memory (the shared-state hash); the bindings supply one, so the core stays free of Python.
using Hasher = std::function<std::array<uint8_t, 16>(const void* data, size_t bytes)>;
// Called on the caller's thread, at most once per sync and only when this peer sends or receives
// data: fills in host memory for every entry that has none yet (index-aligned with the entries).
using Stager = std::function<Status(std::vector<uint8_t*>& host_data)>;

struct ReduceRequest {
    const void* send = nullptr;
    void* recv = nullptr;
    uint64_t count = 0;
    DataType dtype = DataType::FLOAT;
    ReduceOp op = ReduceOp::SUM;
    uint64_t tag = 0;
    QuantizationAlgorithm quant_algorithm = QuantizationAlgorithm::NONE;
    DataType quant_dtype = DataType::UINT8;
};

struct ReduceInfo {
    uint32_t world = 0;
    uint64_t tx_bytes = 0;
    uint64_t rx_bytes = 0;
};

struct ReduceOutcome {
    Status status;
    ReduceInfo info;
};

class Session;
class ReduceHandle;
struct SyncEntryDesc;
struct SyncOutcome;

class Communicator {
public:
    // pool_size 0 means 1; peer_timeout 0 means what the master announces.
    Communicator(std::string master_address, uint32_t peer_group, size_t pool_size);
    ~Communicator();
    Communicator(const Communicator&) = delete;
    Communicator& operator=(const Communicator&) = delete;

    // Registers and returns once admitted to the ring. `interrupted` set: INVALID_USAGE + message.
    Status connect(int n_attempts, const InterruptCheck& interrupted);
    Status update_topology(const InterruptCheck& interrupted);
    // update_topology() that also measures the bandwidth between peers (pairs not measured yet) and
    // adopts the ring whose slowest link is fastest. Collective: every accepted peer calls it.
    Status optimize_topology(const InterruptCheck& interrupted);
    Status are_peers_pending(bool& pending, const InterruptCheck& interrupted);
    Status get_attribute(Attribute attribute, int64_t& value) const;

    // Collective per peer group: agree on one revision and content of the shared state, fetching
    // what differs from up-to-date peers (see ARCHITECTURE.md). `hasher` hashes host memory;
    // `stager` provides host memory for entries passed without (see Stager).
    SyncOutcome sync_shared_state(const std::vector<SyncEntryDesc>& entries, uint64_t revision, uint8_t strategy,
                                  const Hasher& hasher, const Stager& stager,
                                  const InterruptCheck& interrupted);

    // Never blocks on the network: errors (bad arguments, duplicate tag, not connected) arrive
    // through the handle.
    std::shared_ptr<ReduceHandle> all_reduce_async(const ReduceRequest& request);
    // Waits for the outcome. If `interrupted` fires, the op is cancelled (an in-place buffer is
    // restored unless this peer already finished it), `was_interrupted` is set and the outcome
    // says so.
    static ReduceOutcome wait(ReduceHandle& handle, const InterruptCheck& interrupted, bool& was_interrupted);
    static bool done(const ReduceHandle& handle);

    // Leaves the run (the master is told) and frees every socket. Idempotent.
    void close();
    uint64_t peer_id() const;
    bool connected() const;

private:
    std::shared_ptr<Session> current_session() const;

    std::string master_address_;
    uint32_t peer_group_;
    size_t pool_size_;
    mutable std::mutex mutex_;
    std::shared_ptr<Session> session_;
    std::shared_ptr<ScratchPool> scratch_;
};

}  // namespace pccl::client
