// The data plane's fair send queue, driven from tests without sockets: which frames a sequence of
// pushes and short writes completes, in what order. Fairness bugs hide behind kernel buffers and
// CPU load in end-to-end tests; here they are deterministic.
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "client/send_queue.hpp"
#include "common/limits.hpp"

namespace py = pybind11;

using namespace pccl;

namespace {

// A frame of op `uid` with `bytes` of payload (zeros; only the sizes matter here).
client::SendItem test_frame(uint64_t uid, uint64_t bytes) {
    static const std::vector<uint8_t> payload(limits::kMaxPieceBytes * 4);
    if (uid == 0) throw py::value_error("uid 0 is reserved");
    if (bytes > payload.size()) throw py::value_error("frame larger than " + std::to_string(payload.size()));
    client::SendItem item;
    std::memset(item.header, 0, sizeof(item.header));
    item.data = payload.data();
    item.length = static_cast<uint32_t>(bytes);
    item.uid = uid;
    return item;
}

// Lets a "socket" take up to `budget` bytes of what `queue` gathers; returns what is left of it.
template <typename OnSent>
size_t write_some(client::FairSendQueue& queue, size_t budget, OnSent&& on_sent) {
    std::vector<client::SendItem*> order;
    iovec iov[limits::kMaxSendBatchIov * 2];
    while (budget > 0 && !queue.empty()) {
        const size_t n = queue.gather(iov, std::size(iov), order);
        size_t offered = 0;
        for (size_t i = 0; i < n; ++i) offered += iov[i].iov_len;
        const size_t took = std::min(budget, offered);
        queue.advance(took, order, on_sent);
        budget -= took;
    }
    return budget;
}

}  // namespace

void bind_send_queue(py::module_& m) {
    auto sq = m.def_submodule("send_queue", "the data plane's fair send queue, for tests");
    // steps: ("push", uid, payload_bytes) queues a frame; ("write", bytes) lets the "socket" take
    // that many bytes of what the queue gathers. Returns the uids of completed frames, in order.
    sq.def("simulate", [](const std::vector<std::tuple<std::string, uint64_t, uint64_t>>& steps) {
        client::FairSendQueue queue;
        std::vector<uint64_t> completed;
        for (const auto& [kind, a, b] : steps) {
            if (kind == "push") queue.push(test_frame(a, b));
            else if (kind == "write") write_some(queue, a, [&](const client::SendItem& item) { completed.push_back(item.uid); });
            else throw py::value_error("unknown step '" + kind + "': use 'push' or 'write'");
        }
        return completed;
    }, py::arg("steps"));
    // A pool of connections sharing one backlog (late binding). steps: ("push", uid, payload_bytes)
    // queues a frame in the backlog; ("write", conn, bytes) lets connection `conn` take frames (up to
    // the bound-ahead limit) and write that many bytes, taking more as it drains. Returns
    // (conn, uid) for every completed frame, in order.
    sq.def("simulate_pool", [](size_t connections, const std::vector<std::tuple<std::string, uint64_t, uint64_t>>& steps) {
        if (connections == 0 || connections > limits::kMaxPoolSize) throw py::value_error("1 to kMaxPoolSize connections");
        client::FairSendQueue backlog;
        std::vector<client::FairSendQueue> conns(connections);
        std::vector<std::pair<size_t, uint64_t>> completed;
        for (const auto& [kind, a, b] : steps) {
            if (kind == "push") {
                backlog.push(test_frame(a, b));
            } else if (kind == "write") {
                if (a >= connections) throw py::value_error("no such connection");
                auto& conn = conns[a];
                size_t budget = b;
                // Bind, write, and bind again as the connection drains, as DataPlane::feed does.
                for (;;) {
                    client::bind_frames(backlog, conn, limits::kBoundAheadBytes);
                    if (budget == 0 || conn.empty()) break;
                    budget = write_some(conn, budget, [&](const client::SendItem& item) { completed.emplace_back(a, item.uid); });
                }
            } else {
                throw py::value_error("unknown step '" + kind + "': use 'push' or 'write'");
            }
        }
        return completed;
    }, py::arg("connections"), py::arg("steps"));
    sq.attr("HEADER_BYTES") = wire::kDataHeaderBytes;
    sq.attr("BOUND_AHEAD_BYTES") = limits::kBoundAheadBytes;
}
