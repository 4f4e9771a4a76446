#include "master/status.hpp"

#include <cmath>
#include <cstdio>

#include "common/limits.hpp"
#include "common/text.hpp"

namespace pccl::master {

const char* to_string(DropCause cause) {
    switch (cause) {
        case DropCause::CLOSED: return "closed";
        case DropCause::MALFORMED_FRAME: return "malformed_frame";
        case DropCause::SEND_FAILED: return "send_failed";
        case DropCause::TIMEOUT: return "timeout";
        case DropCause::PROTOCOL_VIOLATION: return "protocol_violation";
        case DropCause::LEFT: return "left";
        case DropCause::UNREACHABLE: return "unreachable";
        case DropCause::SILENT_TO_NEIGHBOUR: return "silent_to_neighbour";
    }
    return "unknown";
}

namespace {

void append_u_escape(std::string& out, unsigned code) {
    char buf[8];
    std::snprintf(buf, sizeof(buf), "\\u%04x", code);
    out += buf;
}

// A tiny streaming JSON writer: commas are placed by tracking whether a container is still empty.
class Json {
public:
    explicit Json(std::string& out) : out_(out) {}

    Json& begin_object() { value_prefix(); out_ += '{'; first_ = true; return *this; }
    Json& end_object() { out_ += '}'; first_ = false; return *this; }
    Json& begin_array() { value_prefix(); out_ += '['; first_ = true; return *this; }
    Json& end_array() { out_ += ']'; first_ = false; return *this; }
    Json& key(std::string_view k) {
        if (!first_) out_ += ',';
        append_json_string(out_, k);
        out_ += ':';
        after_key_ = true;  // the value that follows takes no comma
        return *this;
    }
    Json& str(std::string_view v) { value_prefix(); append_json_string(out_, v); return *this; }
    Json& u64(uint64_t v) { value_prefix(); out_ += std::to_string(v); return *this; }
    Json& i64(int64_t v) { value_prefix(); out_ += std::to_string(v); return *this; }
    Json& boolean(bool v) { value_prefix(); out_ += v ? "true" : "false"; return *this; }
    Json& null() { value_prefix(); out_ += "null"; return *this; }
    Json& seconds(double v) {
        value_prefix();
        if (!std::isfinite(v)) v = 0;
        char buf[40];
        std::snprintf(buf, sizeof(buf), "%.3f", v);
        out_ += buf;
        return *this;
    }
    Json& ids(const std::vector<uint64_t>& v) {
        begin_array();
        for (uint64_t id : v) u64(id);
        return end_array();
    }

private:
    void value_prefix() {
        if (after_key_) after_key_ = false;
        else if (!first_) out_ += ',';
        first_ = false;
    }
    std::string& out_;
    bool first_ = true;
    bool after_key_ = false;
};

}  // namespace

void append_json_string(std::string& out, std::string_view s) {
    out += '"';
    for (size_t i = 0; i < s.size();) {
        const size_t n = text::utf8_sequence(s, i);
        if (n == 0) {
            out += "\\ufffd";
            ++i;
            continue;
        }
        if (n == 1) {
            const char c = s[i];
            switch (c) {
                case '"': out += "\\\""; break;
                case '\\': out += "\\\\"; break;
                case '\n': out += "\\n"; break;
                case '\r': out += "\\r"; break;
                case '\t': out += "\\t"; break;
                case '<': case '>': case '&': append_u_escape(out, static_cast<unsigned>(c)); break;
                default:
                    if (static_cast<uint8_t>(c) < 0x20 || c == 0x7F) append_u_escape(out, static_cast<uint8_t>(c));
                    else out += c;
            }
        } else if (text::is_unicode_line_break(s, i, n)) {
            append_u_escape(out, static_cast<uint8_t>(s[i + 2]) == 0xA8 ? 0x2028 : 0x2029);
        } else {
            out.append(s.data() + i, n);
        }
        i += n;
    }
    out += '"';
}

std::string render_status_json(const StatusSnapshot& s) {
    std::string out;
    out.reserve(1024 + 256 * s.peers.size() + 256 * s.ops.size() + 512 * s.dropped.size());
    Json j(out);
    j.begin_object();
    j.key("protocol_version").u64(s.protocol_version);
    j.key("port").u64(s.port);
    j.key("uptime_s").seconds(s.uptime_s);
    j.key("peer_timeout_ms").u64(s.peer_timeout_ms);
    j.key("epoch").u64(s.epoch);
    j.key("topology_round_active").boolean(s.topology_round_active);
    j.key("topology_optimizing").boolean(s.topology_optimizing);
    j.key("world_size").u64(s.world_size);
    j.key("peer_count").u64(s.peer_count);
    j.key("connection_count").u64(s.connection_count);

    j.key("peers").begin_array();
    for (const auto& p : s.peers) {
        j.begin_object();
        j.key("id").u64(p.id);
        j.key("group").u64(p.group);
        j.key("address").str(p.address);
        j.key("state").str(p.accepted ? "accepted" : "pending");
        j.key("ring_index").i64(p.ring_index);
        j.key("voted_update_topology").boolean(p.voted_update);
        j.key("voted_peers_pending").boolean(p.voted_pending);
        j.key("in_sync").boolean(p.in_sync);
        j.key("ops_in_flight").u64(p.ops_in_flight);
        j.key("confirmed_epoch").u64(p.confirmed_epoch);
        j.key("seconds_since_heard").seconds(p.seconds_since_heard);
        j.end_object();
    }
    j.end_array();
    j.key("peers_truncated").boolean(s.peers.size() < s.peer_count);

    j.key("groups").begin_array();
    for (const auto& g : s.groups) {
        j.begin_object();
        j.key("group").u64(g.group);
        j.key("world_size").u64(g.ring.size());
        j.key("ring").ids(g.ring);
        j.key("pending").ids(g.pending);
        j.key("revision");
        if (g.revision) j.u64(*g.revision);
        else j.null();
        j.key("sync");
        if (!g.sync) {
            j.null();
        } else {
            j.begin_object();
            j.key("uid").u64(g.sync->uid);
            j.key("planned").boolean(g.sync->planned);
            j.key("revision");  // decided when planned
            if (g.sync->planned) j.u64(g.sync->revision);
            else j.null();
            j.key("voted").ids(g.sync->voted);
            j.key("receivers_pending").ids(g.sync->receivers_pending);
            j.key("distributors").ids(g.sync->distributors);
            j.end_object();
        }
        j.end_object();
    }
    j.end_array();

    j.key("ops_in_flight").begin_array();
    for (const auto& o : s.ops) {
        j.begin_object();
        j.key("group").u64(o.group);
        j.key("tag").u64(o.tag);
        j.key("uid");
        if (o.started) j.u64(o.uid);
        else j.null();
        j.key("state").str(o.started ? "running" : "waiting");
        j.key("descriptor").str(o.descriptor);
        j.key("age_s").seconds(o.age_s);
        j.key(o.started ? "participants" : "begun").ids(o.have);
        j.key(o.started ? "participants_total" : "begun_total").u64(o.have_total);
        j.key("waiting_for").ids(o.waiting_for);
        j.key("waiting_for_total").u64(o.waiting_for_total);
        j.end_object();
    }
    j.end_array();
    j.key("ops_in_flight_total").u64(s.ops_in_flight_total);
    j.key("ops_truncated").boolean(s.ops.size() < s.ops_in_flight_total);

    const auto& c = s.counters;
    j.key("counters").begin_object();
    j.key("peers_registered").u64(c.peers_registered);
    j.key("peers_dropped").u64(c.peers_dropped);
    j.key("ops_started").u64(c.ops_started);
    j.key("ops_started_early").u64(c.ops_started_early);
    j.key("ops_completed").u64(c.ops_completed);
    j.key("ops_failed").u64(c.ops_failed);
    j.key("ops_rejected").u64(c.ops_rejected);
    j.key("collective_tx_bytes").u64(c.collective_tx_bytes);
    j.key("collective_rx_bytes").u64(c.collective_rx_bytes);
    j.key("syncs_planned").u64(c.syncs_planned);
    j.key("syncs_completed").u64(c.syncs_completed);
    j.key("syncs_failed").u64(c.syncs_failed);
    j.key("sync_ranges_reassigned").u64(c.sync_ranges_reassigned);
    j.key("sync_bytes_planned").u64(c.sync_bytes_planned);
    j.key("topology_optimizations").u64(c.topology_optimizations);
    j.key("topology_reorders").u64(c.topology_reorders);
    j.end_object();

    j.key("last_op_failure");
    if (!s.last_op_failure) {
        j.null();
    } else {
        const auto& f = *s.last_op_failure;
        j.begin_object();
        j.key("group").u64(f.group);
        j.key("tag").u64(f.tag);
        j.key("uid").u64(f.uid);
        j.key("message").str(f.message);
        j.key("seconds_ago").seconds(f.seconds_ago);
        j.end_object();
    }

    j.key("dropped").begin_array();
    for (const auto& d : s.dropped) {
        j.begin_object();
        j.key("id").u64(d.id);
        j.key("group").u64(d.group);
        j.key("address").str(d.address);
        j.key("state").str(d.was_accepted ? "accepted" : "pending");
        j.key("cause").str(to_string(d.cause));
        j.key("reason").str(d.reason);
        j.key("seconds_ago").seconds(d.seconds_ago);
        j.key("unix_time").seconds(d.unix_time);
        j.end_object();
    }
    j.end_array();
    j.key("dropped_limit").u64(limits::kMaxDroppedPeersRemembered);

    j.key("links").begin_array();
    for (const auto& l : s.links) {
        j.begin_object();
        j.key("from").str(l.from);
        j.key("to").str(l.to);
        j.key("bits_per_second").u64(static_cast<uint64_t>(l.bits_per_second));
        j.key("age_s").seconds(l.age_s);
        j.end_object();
    }
    j.end_array();
    j.end_object();
    return out;
}

}  // namespace pccl::master
