// pccl._core: the thin pybind11 layer over the C++ core. Every call that can block releases the
// GIL and polls for signals every limits::kCallerPollInterval, so other Python threads run and
// Ctrl-C interrupts it (raising KeyboardInterrupt after the core has cancelled what it started).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <variant>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <tuple>

#include "client/communicator.hpp"
#include "client/frame_writer.hpp"
#include "client/session.hpp"
#include "common/limits.hpp"
#include "master/master_node.hpp"
#include "wire/messages.hpp"

namespace py = pybind11;
using namespace pccl;

void bind_quant(pybind11::module_&);  // bindings/quant_bindings.cpp
void bind_send_queue(pybind11::module_&);  // bindings/send_queue_bindings.cpp
void bind_ring_solver(pybind11::module_&);  // bindings/ring_solver_bindings.cpp
void bind_ring(pybind11::module_&);  // bindings/ring_bindings.cpp
void bind_frame_writer(pybind11::module_&);  // bindings/frame_writer_bindings.cpp

namespace {

// Polled from a thread without the GIL: takes it briefly to run Python's signal handlers.
struct SignalPoll {
    bool raised = false;
    bool operator()() {
        py::gil_scoped_acquire gil;
        if (PyErr_CheckSignals() != 0) {
            raised = true;
            return true;
        }
        return false;
    }
};

std::tuple<int, std::string> as_tuple(const Status& s) { return {static_cast<int>(s.code), s.message}; }

template <typename F>
auto blocking(F&& call) {
    SignalPoll poll;
    client::InterruptCheck check = [&poll] { return poll(); };
    auto result = [&] {
        py::gil_scoped_release release;
        return call(check);
    }();
    if (poll.raised) throw py::error_already_set();
    return result;
}

// The shared-state hash of host memory, as pccl/_hashing.py defines it (XXH3-128 from the `xxhash`
// package over 256 KiB chunks). Called from the thread blocked in sync_shared_state.
std::array<uint8_t, 16> host_digest(const void* data, size_t bytes) {
    py::gil_scoped_acquire gil;
    // Leaked on purpose: a static py::object would be destroyed after the interpreter.
    static auto* digest = new py::object(py::module_::import("pccl._hashing").attr("digest_host"));
    static const char kEmpty = 0;
    auto view = py::memoryview::from_memory(bytes ? data : &kEmpty, static_cast<py::ssize_t>(bytes));
    const std::string d = py::bytes((*digest)(view));
    std::array<uint8_t, 16> out{};
    std::memcpy(out.data(), d.data(), std::min(d.size(), out.size()));
    return out;
}

class PyCommunicator {
public:
    PyCommunicator(std::string address, uint32_t group, size_t pool) : impl_(std::move(address), group, pool) {}

    std::tuple<int, std::string> connect(int attempts) {
        return as_tuple(blocking([&](auto& check) { return impl_.connect(attempts, check); }));
    }
    std::tuple<int, std::string> update_topology() {
        return as_tuple(blocking([&](auto& check) { return impl_.update_topology(check); }));
    }
    std::tuple<int, std::string> optimize_topology() {
        return as_tuple(blocking([&](auto& check) { return impl_.optimize_topology(check); }));
    }
    std::tuple<int, std::string, bool> are_peers_pending() {
        bool pending = false;
        Status s = blocking([&](auto& check) { return impl_.are_peers_pending(pending, check); });
        return {static_cast<int>(s.code), s.message, pending};
    }
    std::tuple<int, std::string, int64_t> get_attribute(int attribute) {
        int64_t value = 0;
        Status s = impl_.get_attribute(static_cast<Attribute>(attribute), value);
        return {static_cast<int>(s.code), s.message, value};
    }
    // entries: (name, host pointer, element count, dtype code, allow_content_inequality, digest).
    // An entry with a 16-byte digest may have pointer 0: `stage()` then returns every entry's host
    // pointer, called only if this peer sends or receives (CUDA tensors are staged on demand).
    std::tuple<int, std::string, uint64_t, uint64_t, uint64_t> sync_shared_state(
        uint64_t revision,
        const std::vector<std::tuple<std::string, uintptr_t, uint64_t, int, bool, py::bytes>>& entries,
        int strategy, py::object stage) {
        std::vector<client::SyncEntryDesc> descs;
        for (const auto& [name, ptr, count, dtype, unequal, digest] : entries) {
            client::SyncEntryDesc d{name, static_cast<DataType>(dtype), count, reinterpret_cast<uint8_t*>(ptr), {}, unequal};
            const std::string known = digest;
            if (known.size() == 16) {
                d.hash.emplace();
                std::memcpy(d.hash->data(), known.data(), 16);
            } else if (!known.empty()) {
                throw py::value_error("a precomputed shared-state digest has 16 bytes");
            }
            descs.push_back(std::move(d));
        }
        client::Stager stager;
        if (!stage.is_none())
            stager = [&stage](std::vector<uint8_t*>& host) -> Status {
                py::gil_scoped_acquire gil;
                try {
                    auto pointers = stage().cast<std::vector<uintptr_t>>();
                    if (pointers.size() != host.size())
                        return Status::error(Result::INTERNAL_ERROR, "stage() returned the wrong number of pointers");
                    for (size_t i = 0; i < host.size(); ++i) host[i] = reinterpret_cast<uint8_t*>(pointers[i]);
                    return Status::ok();
                } catch (const std::exception& e) {  // a Python exception, or a result that is not a list of ints
                    return Status::error(Result::INTERNAL_ERROR, e.what());
                }
            };
        client::SyncOutcome out = blocking([&](auto& check) {
            return impl_.sync_shared_state(descs, revision, static_cast<uint8_t>(strategy), host_digest, stager, check);
        });
        return {static_cast<int>(out.status.code), out.status.message, out.revision, out.tx_bytes, out.rx_bytes};
    }

    std::shared_ptr<client::ReduceHandle> all_reduce_async(uintptr_t send, uintptr_t recv, uint64_t count, int dtype,
                                                           int op, uint64_t tag, int quant_algorithm, int quant_dtype) {
        client::ReduceRequest r;
        r.send = reinterpret_cast<const void*>(send);
        r.recv = reinterpret_cast<void*>(recv);
        r.count = count;
        r.dtype = static_cast<DataType>(dtype);
        r.op = static_cast<ReduceOp>(op);
        r.tag = tag;
        r.quant_algorithm = static_cast<QuantizationAlgorithm>(quant_algorithm);
        r.quant_dtype = static_cast<DataType>(quant_dtype);
        py::gil_scoped_release release;  // an in-place op copies its input here
        return impl_.all_reduce_async(r);
    }
    void close() {
        py::gil_scoped_release release;
        impl_.close();
    }
    uint64_t peer_id() const { return impl_.peer_id(); }
    bool connected() const { return impl_.connected(); }

private:
    client::Communicator impl_;
};

std::tuple<int, std::string, uint32_t, uint64_t, uint64_t> wait_handle(client::ReduceHandle& h) {
    bool interrupted = false;
    client::ReduceOutcome out = blocking([&](auto& check) { return client::Communicator::wait(h, check, interrupted); });
    return {static_cast<int>(out.status.code), out.status.message, out.info.world, out.info.tx_bytes, out.info.rx_bytes};
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "pccl core (C++): master, communicator, ring all-reduce";
    m.def("send_thread_enabled", &client::FrameWriter::threaded_by_default,
          "Whether communicators of this process write frames on a thread of their own (PCCL_SEND_THREAD).");

    py::class_<master::MasterNode>(m, "MasterNode")
        .def(py::init([](std::string address, int64_t timeout_ms) {
                 return std::make_unique<master::MasterNode>(std::move(address), std::chrono::milliseconds(timeout_ms));
             }),
             py::arg("listen_address"), py::arg("peer_timeout_ms") = 0)
        .def("run", [](master::MasterNode& self) { return as_tuple(self.run()); })
        .def("interrupt", &master::MasterNode::interrupt, py::call_guard<py::gil_scoped_release>())
        .def_property_readonly("port", &master::MasterNode::port)
        .def_property_readonly("running", &master::MasterNode::running)
        // The status page's JSON, or None (not running, or no answer in time); waits without the GIL.
        .def("status_json", [](master::MasterNode& self) {
            std::optional<std::string> json;
            {
                py::gil_scoped_release release;
                json = self.status_json();
            }
            return json;
        });
    m.attr("STATUS_MAX_HTTP_CONNECTIONS") = limits::kMaxStatusHttpConnections;
    m.attr("STATUS_HTTP_TIMEOUT_MS") = limits::kStatusHttpTimeout.count();
    m.attr("STATUS_MAX_DROPPED_PEERS") = limits::kMaxDroppedPeersRemembered;

    py::class_<client::ReduceHandle, std::shared_ptr<client::ReduceHandle>>(m, "ReduceHandle")
        .def("wait", &wait_handle)
        .def("done", [](const client::ReduceHandle& h) { return client::Communicator::done(h); });

    py::class_<PyCommunicator>(m, "Communicator")
        .def(py::init<std::string, uint32_t, size_t>(), py::arg("master_address"), py::arg("peer_group") = 0,
             py::arg("pool_size") = 0)  // 0: limits::kDefaultPoolSize
        .def("connect", &PyCommunicator::connect, py::arg("n_attempts"))
        .def("update_topology", &PyCommunicator::update_topology)
        .def("optimize_topology", &PyCommunicator::optimize_topology)
        .def("are_peers_pending", &PyCommunicator::are_peers_pending)
        .def("get_attribute", &PyCommunicator::get_attribute, py::arg("attribute"))
        .def("all_reduce_async", &PyCommunicator::all_reduce_async, py::arg("send_ptr"), py::arg("recv_ptr"),
             py::arg("count"), py::arg("dtype"), py::arg("op"), py::arg("tag"), py::arg("quant_algorithm") = 0,
             py::arg("quant_dtype") = 0)
        .def("sync_shared_state", &PyCommunicator::sync_shared_state, py::arg("revision"), py::arg("entries"),
             py::arg("strategy"), py::arg("stage") = py::none())
        .def("close", &PyCommunicator::close)
        .def_property_readonly("peer_id", &PyCommunicator::peer_id)
        .def_property_readonly("connected", &PyCommunicator::connected);

    // Protocol codec, exposed for tests: encode a message given as a dict, decode frames.
    auto codec = m.def_submodule("codec", "wire codec, for tests");
    codec.attr("PROTOCOL_VERSION") = limits::kProtocolVersion;
    codec.attr("MAX_PEER_TO_MASTER_FRAME") = limits::kMaxPeerToMasterFrameBytes;
    codec.attr("MAX_UNREGISTERED_FRAME") = limits::kMaxUnregisteredFrameBytes;
    codec.def("encode_op_begin", [](uint64_t tag, uint64_t count, int dtype, int op) {
        std::vector<uint8_t> out;
        wire::encode_frame(wire::OpBegin{tag, count, static_cast<uint8_t>(dtype), static_cast<uint8_t>(op), 0, 0}, out);
        return py::bytes(reinterpret_cast<const char*>(out.data()), out.size());
    });
    codec.def("encode_hello", [](uint32_t group, uint16_t port) {
        std::vector<uint8_t> out;
        wire::encode_frame(wire::Hello{group, port}, out);
        return py::bytes(reinterpret_cast<const char*>(out.data()), out.size());
    });
    codec.def("encode_topology", [](uint64_t epoch, std::vector<std::tuple<uint64_t, uint32_t, uint16_t>> peers) {
        wire::Topology t;
        t.epoch = epoch;
        for (auto& [id, group, port] : peers) {
            wire::PeerEntry e;
            e.peer_id = id;
            e.group = group;
            e.ip.bytes[0] = 127;
            e.ip.bytes[3] = 1;
            e.p2p_port = port;
            t.peers.push_back(e);
        }
        std::vector<uint8_t> out;
        wire::encode_frame(t, out);
        return py::bytes(reinterpret_cast<const char*>(out.data()), out.size());
    });
    auto ranges_list = [](const std::vector<wire::SyncRange>& ranges) {
        py::list out;
        for (const auto& r : ranges) out.append(py::make_tuple(r.entry, r.offset, r.length, r.peer));
        return out;
    };
    // Splits a byte string into frames and describes each: (type name, fields as a dict).
    // Raises ValueError with the parser's message on the first malformed frame.
    codec.def("decode", [ranges_list](py::bytes data, uint32_t max_payload) {
        std::string raw = data;
        wire::FrameParser parser(max_payload);
        auto space = parser.write_space(raw.size());
        std::memcpy(space.data(), raw.data(), raw.size());
        parser.commit(raw.size());
        py::list frames;
        while (auto msg = parser.next()) {
            py::dict fields;
            std::visit(
                [&](auto& x) {
                    using T = std::decay_t<decltype(x)>;
                    if constexpr (std::is_same_v<T, wire::OpBegin>) {
                        fields["tag"] = x.tag; fields["count"] = x.count; fields["dtype"] = x.dtype; fields["op"] = x.op;
                    } else if constexpr (std::is_same_v<T, wire::Hello>) {
                        fields["peer_group"] = x.peer_group; fields["p2p_port"] = x.p2p_port;
                    } else if constexpr (std::is_same_v<T, wire::Topology>) {
                        fields["epoch"] = x.epoch;
                        py::list peers;
                        for (auto& p : x.peers) peers.append(py::make_tuple(p.peer_id, p.group, p.p2p_port));
                        fields["peers"] = peers;
                    } else if constexpr (std::is_same_v<T, wire::SyncStalled>) {
                        fields["sync_uid"] = x.sync_uid;
                        fields["missing"] = ranges_list(x.missing);
                    } else if constexpr (std::is_same_v<T, wire::SyncPlan>) {
                        fields["sync_uid"] = x.sync_uid; fields["result"] = x.result;
                        fields["receive"] = ranges_list(x.receive);
                        fields["send"] = ranges_list(x.send);
                    } else if constexpr (std::is_same_v<T, wire::SyncSendMore>) {
                        fields["sync_uid"] = x.sync_uid;
                        fields["send"] = ranges_list(x.send);
                    } else if constexpr (std::is_same_v<T, wire::SyncDone>) {
                        fields["sync_uid"] = x.sync_uid; fields["result"] = x.result; fields["message"] = x.message;
                    }
                },
                *msg);
            frames.append(py::make_tuple(wire::type_name(wire::type_of(*msg)), fields));
        }
        if (parser.has_error()) throw py::value_error(parser.error());
        return frames;
    });

    bind_quant(m);
    bind_send_queue(m);
    bind_frame_writer(m);
    bind_ring(m);
    bind_ring_solver(m);
}
