// The decision of one shared-state sync round, as a pure function of the votes: which key set and
// revision the group agrees on, which content wins (the most popular), who distributes, and which
// byte ranges each stale peer receives from whom. Votes are taken sorted by peer id and ties are
// broken by content, never by arrival order, so the outcome does not depend on timing.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "common/types.hpp"
#include "wire/messages.hpp"

namespace pccl::master {

enum class SyncStrategy : uint8_t { ENFORCE_POPULAR = 0, RECEIVE_ONLY = 1, SEND_ONLY = 2 };
inline constexpr uint8_t kSyncStrategyCount = 3;

struct SyncVoter {
    uint64_t peer = 0;
    wire::SyncVote vote;
};

struct SyncRejection {
    Result code = Result::INVALID_ARGUMENT;
    std::string message;
};

struct SyncDecision {
    uint64_t revision = 0;
    // Set when nobody can distribute: every voter fails with it.
    std::optional<SyncRejection> group_failure;
    std::map<uint64_t, SyncRejection> rejected;
    std::vector<uint64_t> distributors;
    std::map<uint64_t, std::vector<wire::SyncExpect>> expect;  // per receiver
    std::map<uint64_t, std::vector<wire::SyncRange>> receive;  // per receiver, peer = distributor
    std::map<uint64_t, std::vector<wire::SyncRange>> send;     // per distributor, peer = receiver
    std::map<uint32_t, uint64_t> pinned;  // entries that allow inequality: only this distributor sends them
};

// `voters` sorted by peer id; `group_revision` is the group's last synced revision, if any.
SyncDecision elect_sync(const std::vector<SyncVoter>& voters, std::optional<uint64_t> group_revision);

// Hands a dead distributor's ranges (receiver -> ranges) to the surviving distributors that may send
// them; returns per distributor what to send. Ranges of entries only the dead one could send stay
// in `unplaced`.
std::map<uint64_t, std::vector<wire::SyncRange>> reassign_ranges(
    const std::map<uint64_t, std::vector<wire::SyncRange>>& orphaned, const std::vector<uint64_t>& distributors,
    const std::map<uint32_t, uint64_t>& pinned_entries, std::vector<wire::SyncRange>& unplaced);

}  // namespace pccl::master
