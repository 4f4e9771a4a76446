#include "master/sync_election.hpp"

#include <algorithm>

#include "common/limits.hpp"
#include "common/text.hpp"

namespace pccl::master {

namespace {

std::string describe_entry(const wire::SyncEntry& e) {
    return text::concat("'", e.name, "' ", to_string(static_cast<DataType>(e.dtype)), "[", e.count, "]");
}

// The key set as bytes, for counting and for a deterministic tie-break.
std::string key_signature(const wire::SyncVote& v) {
    std::string sig;
    for (const auto& e : v.entries) {
        sig += e.name;
        sig.push_back('\0');
        sig.push_back(static_cast<char>(e.dtype));
        sig.append(reinterpret_cast<const char*>(&e.count), sizeof(e.count));
    }
    return sig;
}

// The content that must agree: hashes of the entries that do not allow inequality.
std::string content_signature(const wire::SyncVote& v) {
    std::string sig;
    for (const auto& e : v.entries)
        if (!e.allow_inequality) sig.append(reinterpret_cast<const char*>(e.hash.data()), e.hash.size());
    return sig;
}

std::string first_difference(const wire::SyncVote& mine, const wire::SyncVote& group) {
    const size_t n = std::max(mine.entries.size(), group.entries.size());
    for (size_t i = 0; i < n; ++i) {
        if (i >= mine.entries.size())
            return "entry #" + std::to_string(i) + ": the group has " + describe_entry(group.entries[i]) + ", this peer has none";
        if (i >= group.entries.size())
            return "entry #" + std::to_string(i) + ": this peer has " + describe_entry(mine.entries[i]) + ", the group has none";
        if (!mine.entries[i].same_key(group.entries[i]))
            return "entry #" + std::to_string(i) + ": this peer has " + describe_entry(mine.entries[i]) + ", the group has " +
                   describe_entry(group.entries[i]);
    }
    return "no difference";
}

// The most common signature; ties go to the smallest signature, so arrival order never matters.
template <typename Sig>
std::string most_popular(const std::vector<const SyncVoter*>& voters, Sig&& sig) {
    std::map<std::string, size_t> counts;
    for (const auto* v : voters) ++counts[sig(v->vote)];
    std::string best;
    size_t best_n = 0;
    for (const auto& [s, n] : counts)
        if (n > best_n) { best = s; best_n = n; }  // std::map iterates smallest first: strict > keeps it
    return best;
}

}  // namespace

SyncDecision elect_sync(const std::vector<SyncVoter>& voters, std::optional<uint64_t> group_revision) {
    SyncDecision d;
    std::vector<const SyncVoter*> all;
    for (const auto& v : voters) all.push_back(&v);

    // 1. One key set: the most popular; the others are told their first differing key.
    const std::string keys = most_popular(all, key_signature);
    const SyncVoter* reference = nullptr;
    std::vector<const SyncVoter*> valid;
    for (const auto* v : all)
        if (key_signature(v->vote) == keys) { valid.push_back(v); if (!reference) reference = v; }
    for (const auto* v : all)
        if (key_signature(v->vote) != keys)
            d.rejected[v->peer] = {Result::INVALID_ARGUMENT,
                                   "shared state differs in its keys from the group's: " +
                                       first_difference(v->vote, reference->vote) +
                                       "; every peer must pass the same names, dtypes and sizes in the same order"};

    // 2. Revisions: a synced group advances by exactly one per sync.
    if (group_revision) {
        const uint64_t limit = *group_revision + 1;
        std::vector<const SyncVoter*> kept;
        for (const auto* v : valid) {
            if (v->vote.revision > limit)
                d.rejected[v->peer] = {Result::INVALID_ARGUMENT,
                                       "shared state revision " + std::to_string(v->vote.revision) +
                                           " is ahead of the group (at " + std::to_string(*group_revision) +
                                           "): a sync advances the revision by exactly one"};
            else kept.push_back(v);
        }
        valid.swap(kept);
    }
    std::vector<const SyncVoter*> candidates;
    for (const auto* v : valid)
        if (v->vote.strategy != static_cast<uint8_t>(SyncStrategy::RECEIVE_ONLY)) candidates.push_back(v);
    if (candidates.empty()) {
        d.group_failure = SyncRejection{Result::NO_SHARED_STATE_AVAILABLE,
                                        "no peer of the group can provide the shared state (all are RECEIVE_ONLY, "
                                        "rejected, or none voted)"};
        return d;
    }
    uint64_t target = 0;
    for (const auto* v : candidates) target = std::max(target, v->vote.revision);
    d.revision = target;

    // 3. The content: most popular among the candidates at the target revision; SEND_ONLY peers,
    //    if any, are the authority.
    std::vector<const SyncVoter*> at_target, senders;
    for (const auto* v : candidates)
        if (v->vote.revision == target) {
            at_target.push_back(v);
            if (v->vote.strategy == static_cast<uint8_t>(SyncStrategy::SEND_ONLY)) senders.push_back(v);
        }
    const auto& electorate = senders.empty() ? at_target : senders;
    const std::string content = most_popular(electorate, content_signature);
    const SyncVoter* model = nullptr;
    for (const auto* v : at_target)
        if (content_signature(v->vote) == content) {
            d.distributors.push_back(v->peer);
            if (!model) model = v;
        }
    for (const auto* v : senders)
        if (content_signature(v->vote) != content)
            d.rejected[v->peer] = {Result::INVALID_ARGUMENT,
                                   "this SEND_ONLY peer's shared state differs from the state the group elected; "
                                   "a SEND_ONLY peer never receives, so it cannot be brought in line"};

    // 4. What each peer lacks, split over the distributors. Entries that allow inequality come from
    //    one distributor (the model), only to peers that are behind.
    const auto& model_entries = model->vote.entries;
    for (uint32_t i = 0; i < model_entries.size(); ++i)
        if (model_entries[i].allow_inequality) d.pinned[i] = model->peer;
    size_t rotation = 0;
    for (const auto* v : valid) {
        if (d.rejected.contains(v->peer)) continue;
        if (std::find(d.distributors.begin(), d.distributors.end(), v->peer) != d.distributors.end()) continue;
        const bool behind = v->vote.revision < target;
        for (uint32_t i = 0; i < model_entries.size(); ++i) {
            const auto& want = model_entries[i];
            const auto& have = v->vote.entries[i];
            if (have.hash == want.hash) continue;
            if (want.allow_inequality && !behind) continue;
            d.expect[v->peer].push_back({i, want.hash});
            const uint64_t bytes = want.count * element_size(static_cast<DataType>(want.dtype));
            const bool pinned = want.allow_inequality != 0;
            const uint64_t sources = pinned ? 1 : d.distributors.size();
            const uint64_t ranges = std::clamp<uint64_t>((bytes + limits::kMinSyncRangeBytes - 1) / limits::kMinSyncRangeBytes,
                                                         1, sources);
            for (uint64_t r = 0; r < ranges; ++r) {
                const uint64_t begin = bytes * r / ranges, end = bytes * (r + 1) / ranges;
                if (end == begin) continue;
                const uint64_t from = pinned ? model->peer : d.distributors[(rotation + r) % sources];
                d.receive[v->peer].push_back({i, begin, end - begin, from});
                d.send[from].push_back({i, begin, end - begin, v->peer});
            }
            rotation += ranges;  // the next entry or peer starts with the next distributor
        }
    }
    return d;
}

std::map<uint64_t, std::vector<wire::SyncRange>> reassign_ranges(
    const std::map<uint64_t, std::vector<wire::SyncRange>>& orphaned, const std::vector<uint64_t>& distributors,
    const std::map<uint32_t, uint64_t>& pinned_entries, std::vector<wire::SyncRange>& unplaced) {
    std::map<uint64_t, std::vector<wire::SyncRange>> out;
    size_t rotation = 0;
    for (const auto& [receiver, ranges] : orphaned) {
        for (const auto& r : ranges) {
            if (distributors.empty() || pinned_entries.contains(r.entry)) {
                unplaced.push_back({r.entry, r.offset, r.length, receiver});
                continue;
            }
            out[distributors[rotation++ % distributors.size()]].push_back({r.entry, r.offset, r.length, receiver});
        }
    }
    return out;
}

}  // namespace pccl::master
