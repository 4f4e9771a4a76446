// The data plane's FrameWriter, driven from tests over socket pairs instead of a ring: what reaches
// the sockets, what it reports sent, and above all that a dropped op's memory is never read again
// once drop() returns (a half-written frame is finished with zeros). End-to-end tests cannot see
// that: a cancelled op's stray bytes are discarded by its receiver.
#include <chrono>
#include <cstring>
#include <deque>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sys/ioctl.h>
#include <sys/socket.h>

#include "client/frame_writer.hpp"
#include "net/event_loop.hpp"
#include "net/socket.hpp"
#include "wire/data_frame.hpp"

namespace py = pybind11;

using namespace pccl;

namespace {

constexpr uint64_t kPeer = 1;
constexpr auto kLoopTick = std::chrono::milliseconds(100);

class WriterHarness {
public:
    WriterHarness(bool threaded, int connections, int buffer_bytes)
        : connections_(connections), buffer_bytes_(buffer_bytes) {
        if (connections < 1 || connections > 64) throw py::value_error("connections must be 1..64");
        writer_ = std::make_unique<client::FrameWriter>(
            loop_, threaded,
            client::FrameWriter::Callbacks{
                [this](const std::vector<client::FrameWriter::SentFrame>& sent) {
                    std::lock_guard lock(mutex_);
                    for (const auto& f : sent) sent_.emplace_back(f.queue_key, f.bytes, f.zeros);
                },
                [this](uint64_t peer, uint64_t generation, const std::string& why) {
                    std::lock_guard lock(mutex_);
                    failures_.emplace_back(peer, generation, why);
                }});
        thread_ = std::thread([this] { loop_.run([] {}, kLoopTick); });
        open_connections();
    }

    ~WriterHarness() {
        on_loop([this] { writer_->stop(); });
        loop_.stop();
        thread_.join();
    }

    bool threaded() const { return writer_->threaded(); }

    // Frames of `frame_bytes` (the last one shorter) over a copy of `payload`, kept here so the
    // test can overwrite it after a drop.
    void push(uint64_t key, const py::bytes& payload, uint32_t frame_bytes) {
        if (key == 0 || frame_bytes == 0) throw py::value_error("key and frame_bytes must be positive");
        std::vector<uint8_t>& buffer = buffers_[key].emplace_back();
        const std::string s = payload;
        buffer.assign(s.begin(), s.end());
        std::vector<client::SendItem> frames;
        for (size_t off = 0; off < buffer.size(); off += frame_bytes) {
            wire::DataHeader h;
            h.kind = static_cast<uint8_t>(wire::DataFrameKind::DATA);
            h.length = static_cast<uint32_t>(std::min<size_t>(frame_bytes, buffer.size() - off));
            h.a = key;
            h.b = off;
            client::SendItem item;
            wire::encode_data_header(h, item.header);
            item.data = buffer.data() + off;
            item.length = h.length;
            item.uid = key;
            frames.push_back(item);
        }
        on_loop([&] { writer_->push(kPeer, generation_, std::move(frames)); });
    }

    // Overwrites every payload pushed under `key` (what a caller does with its buffer after a drop).
    void fill(uint64_t key, uint8_t value) {
        for (auto& b : buffers_[key]) std::memset(b.data(), value, b.size());
    }

    std::optional<uint64_t> drop(uint64_t key) {
        std::optional<uint64_t> unwritten;
        on_loop([&] { unwritten = writer_->drop(key); });
        return unwritten;
    }

    // Forgets the pool and opens a fresh one (a new generation) over new socket pairs.
    void replace_pool() {
        on_loop([&] { writer_->remove_pool(kPeer); });
        ++generation_;
        writers_.clear();
        readers_.clear();
        open_connections();
    }

    uint64_t generation() const { return generation_; }

    py::bytes read(int conn, size_t max_bytes) {
        std::string out(max_bytes, '\0');
        const ssize_t n = ::recv(reader(conn).get(), out.data(), max_bytes, MSG_DONTWAIT);
        out.resize(n > 0 ? static_cast<size_t>(n) : 0);
        return py::bytes(out);
    }

    int pending(int conn) {
        int n = 0;
        ::ioctl(reader(conn).get(), FIONREAD, &n);
        return n;
    }

    void close_reader(int conn) { reader(conn).reset(); }

    std::vector<std::tuple<uint64_t, uint32_t, bool>> sent() {
        std::lock_guard lock(mutex_);
        return sent_;
    }

    std::vector<std::tuple<uint64_t, uint64_t, std::string>> failures() {
        std::lock_guard lock(mutex_);
        return failures_;
    }

private:
    void open_connections() {
        for (int i = 0; i < connections_; ++i) {
            int sv[2];
            if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0)
                throw std::runtime_error("socketpair: " + net::errno_text(errno));
            if (buffer_bytes_ > 0) {
                ::setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &buffer_bytes_, sizeof(buffer_bytes_));
                ::setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &buffer_bytes_, sizeof(buffer_bytes_));
            }
            writers_.emplace_back(sv[0]);
            readers_.emplace_back(sv[1]);
        }
        on_loop([&] {
            for (int i = 0; i < connections_; ++i)
                writer_->add_connection(kPeer, generation_, next_conn_id_++, writers_[static_cast<size_t>(i)].get());
        });
    }

    net::Fd& reader(int conn) {
        if (conn < 0 || conn >= static_cast<int>(readers_.size())) throw py::index_error("no such connection");
        return readers_[static_cast<size_t>(conn)];
    }

    // Runs `fn` on the loop thread, as the data plane would, and waits for it without the GIL.
    template <typename Fn>
    void on_loop(Fn&& fn) {
        py::gil_scoped_release release;
        std::promise<void> done;
        loop_.post([&] {
            fn();
            done.set_value();
        });
        done.get_future().wait();
    }

    int connections_;
    int buffer_bytes_;
    net::EventLoop loop_;
    std::unique_ptr<client::FrameWriter> writer_;
    std::thread thread_;
    uint64_t generation_ = 1;
    uint64_t next_conn_id_ = 1;
    std::deque<net::Fd> writers_;
    std::deque<net::Fd> readers_;
    std::unordered_map<uint64_t, std::deque<std::vector<uint8_t>>> buffers_;
    std::mutex mutex_;
    std::vector<std::tuple<uint64_t, uint32_t, bool>> sent_;
    std::vector<std::tuple<uint64_t, uint64_t, std::string>> failures_;
};

}  // namespace

void bind_frame_writer(py::module_& m) {
    auto fw = m.def_submodule("frame_writer", "the data plane's frame writer over socket pairs, for tests");
    py::class_<WriterHarness>(fw, "Harness")
        .def(py::init<bool, int, int>(), py::arg("threaded"), py::arg("connections") = 1, py::arg("buffer_bytes") = 0)
        .def_property_readonly("threaded", &WriterHarness::threaded)
        .def_property_readonly("generation", &WriterHarness::generation)
        .def("push", &WriterHarness::push, py::arg("key"), py::arg("payload"), py::arg("frame_bytes"))
        .def("fill", &WriterHarness::fill, py::arg("key"), py::arg("value"))
        .def("drop", &WriterHarness::drop, py::arg("key"))
        .def("replace_pool", &WriterHarness::replace_pool)
        .def("read", &WriterHarness::read, py::arg("conn"), py::arg("max_bytes"))
        .def("pending", &WriterHarness::pending, py::arg("conn"))
        .def("close_reader", &WriterHarness::close_reader, py::arg("conn"))
        .def("sent", &WriterHarness::sent)
        .def("failures", &WriterHarness::failures);
}
