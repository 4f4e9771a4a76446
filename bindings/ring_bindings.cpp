// The ring all-reduce of `world` peers in one process, without sockets, for tests: pieces in flight
// are delivered in a seeded random order (any order a pool's connections could produce), and a run
// can be stopped after any number of deliveries, even with a piece half received, to check that
// restore_input() gives every in-place caller its input back bit for bit. End-to-end tests reach
// such points only by chance.
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common/types.hpp"
#include "ring/ring_allreduce.hpp"
#include "ring/ring_plan.hpp"

namespace py = pybind11;

using namespace pccl;

namespace {

struct InFlight {
    uint32_t to = 0;
    wire::RingPhase phase{};
    uint64_t offset = 0;
    std::vector<uint8_t> payload;
};

// Copies every piece at once (as a socket write would) into the shared in-flight list.
class ListSink final : public ring::PieceSink {
public:
    ListSink(ring::RingAllReduce& ring, uint32_t next, std::vector<InFlight>& out) : ring_(ring), next_(next), out_(out) {}
    void send_piece(wire::RingPhase phase, uint64_t offset, uint32_t bytes, const uint8_t* data, uint64_t token) override {
        ring_.on_piece_queued();
        out_.push_back(InFlight{next_, phase, offset, std::vector<uint8_t>(data, data + bytes)});
        ring_.on_piece_sent(token);
    }

private:
    ring::RingAllReduce& ring_;
    uint32_t next_;
    std::vector<InFlight>& out_;
};

using Floats = py::array_t<float, py::array::c_style | py::array::forcecast>;

// In place, float32 SUM. Runs until every ring completes or `stop_after` deliveries were made
// (then, with `half_received`, the next piece is accepted and half its bytes written, as a socket
// read cut short would leave it) and every ring restores its input. Returns the buffers and
// whether all rings completed.
py::tuple simulate(const std::vector<Floats>& inputs, uint64_t piece_elems, uint64_t seed, int64_t stop_after,
                   bool half_received) {
    const auto world = static_cast<uint32_t>(inputs.size());
    if (world < 2) throw py::value_error("a ring needs at least 2 peers");
    const auto count = static_cast<uint64_t>(inputs[0].size());
    std::vector<std::vector<float>> buffers, backups;
    for (const auto& in : inputs) {
        if (static_cast<uint64_t>(in.size()) != count) throw py::value_error("inputs differ in size");
        buffers.emplace_back(in.data(), in.data() + count);
        backups.emplace_back(count);
    }
    std::vector<std::unique_ptr<ring::RingAllReduce>> rings;
    for (uint32_t r = 0; r < world; ++r) {
        ring::RingAllReduce::Params p;
        p.recv = reinterpret_cast<uint8_t*>(buffers[r].data());
        p.backup = reinterpret_cast<uint8_t*>(backups[r].data());
        p.count = count;
        p.dtype = DataType::FLOAT;
        p.op = ReduceOp::SUM;
        p.world = world;
        p.rank = r;
        p.piece_elems = piece_elems;
        rings.push_back(std::make_unique<ring::RingAllReduce>(p));
    }
    std::vector<InFlight> in_flight;
    for (uint32_t r = 0; r < world; ++r) {
        ListSink sink(*rings[r], (r + 1) % world, in_flight);
        rings[r]->start(sink);
    }
    std::mt19937_64 rng(seed);
    int64_t delivered = 0;
    while (!in_flight.empty() && (stop_after < 0 || delivered < stop_after)) {
        const size_t pick = std::uniform_int_distribution<size_t>(0, in_flight.size() - 1)(rng);
        InFlight m = std::move(in_flight[pick]);
        in_flight.erase(in_flight.begin() + static_cast<std::ptrdiff_t>(pick));
        std::string error;
        const auto bytes = static_cast<uint32_t>(m.payload.size());
        uint8_t* dest = rings[m.to]->accept_piece(m.phase, m.offset, bytes, error);
        if (!dest) throw std::runtime_error("peer " + std::to_string(m.to) + " refused a piece: " + error);
        std::memcpy(dest, m.payload.data(), bytes);
        ListSink sink(*rings[m.to], (m.to + 1) % world, in_flight);
        rings[m.to]->on_piece_received(sink, m.phase, m.offset, bytes);
        ++delivered;
    }
    bool complete = true;
    for (const auto& r : rings) complete = complete && r->complete();
    if (!complete) {
        if (half_received && !in_flight.empty()) {
            const InFlight& m = in_flight.front();
            std::string error;
            uint8_t* dest = rings[m.to]->accept_piece(m.phase, m.offset, static_cast<uint32_t>(m.payload.size()), error);
            if (!dest) throw std::runtime_error("peer " + std::to_string(m.to) + " refused a piece: " + error);
            std::memcpy(dest, m.payload.data(), m.payload.size() / 2);
        }
        for (const auto& r : rings) r->restore_input();
    }
    py::list out;
    for (const auto& b : buffers) out.append(Floats(static_cast<py::ssize_t>(count), b.data()));
    return py::make_tuple(out, complete);
}

// What peer 0 of an in-place ring says of an all-gather piece of chunk 2 (which it receives in
// both phases) that arrives before the piece's reduce-scatter lap reached it: an error, or "".
std::string all_gather_before_reduce_scatter(uint32_t world, uint64_t count, uint64_t piece_elems) {
    if (world < 3) throw py::value_error("needs a chunk received in both phases: world >= 3");
    std::vector<float> buffer(count, 1.0f), backup(count);
    ring::RingAllReduce::Params p;
    p.recv = reinterpret_cast<uint8_t*>(buffer.data());
    p.backup = reinterpret_cast<uint8_t*>(backup.data());
    p.count = count;
    p.world = world;
    p.piece_elems = piece_elems;
    ring::RingAllReduce ring(p);
    const ring::RingPlan plan(count, world, piece_elems);
    const uint64_t offset = plan.chunk_begin(2);
    std::string error;
    const auto bytes = static_cast<uint32_t>(plan.piece_elems_at(offset) * sizeof(float));
    if (!ring.accept_piece(wire::RingPhase::ALL_GATHER, offset, bytes, error)) return error;
    return "";
}

}  // namespace

void bind_ring(py::module_& m) {
    auto r = m.def_submodule("ring", "the ring all-reduce without sockets, for tests");
    r.def("simulate", &simulate, py::arg("inputs"), py::arg("piece_elems"), py::arg("seed"), py::arg("stop_after") = -1,
          py::arg("half_received") = false);
    r.def("all_gather_before_reduce_scatter", &all_gather_before_reduce_scatter, py::arg("world"), py::arg("count"),
          py::arg("piece_elems"));
}
