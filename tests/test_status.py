"""The master's read-only status page (pccl-master --status-port): real processes, real HTTP."""

from __future__ import annotations

import json
import signal
import socket
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest

from harness import TESTS, Cluster

from pccl import _core

STATUS_PEER = TESTS / "status_peer.py"
codec = _core.codec
HEADER = struct.Struct("<IHHI")
MAGIC = 0x4C434350
WAIT_S = 30.0


# ------------------------------------------------------------------ helpers

def get(url: str, timeout: float = 5.0) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET; 4xx/5xx answers are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def status(c: Cluster) -> dict[str, Any]:
    code, ctype, body = get(f"{c.status_url}/status.json")
    assert code == 200 and ctype == "application/json", (code, body[:500])
    return json.loads(body)


def wait_status(c: Cluster, predicate: Callable[[dict[str, Any]], bool], what: str,
                timeout: float = WAIT_S) -> dict[str, Any]:
    """The first status for which `predicate` holds; fails after `timeout` showing the last one."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = status(c)
        try:
            if predicate(last):
                return last
        except (KeyError, IndexError, StopIteration):
            pass
        assert c.master_alive(), "".join(c.master.stderr)[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"status never showed {what}; last status: {json.dumps(last)[:4000]}")


def peer(c: Cluster, name: str, steps: list[Any], **spec: Any):
    return c.peer("steps", name=name, program=STATUS_PEER, steps=steps, wait_s=WAIT_S, **spec)


def peer_id(p) -> int:
    return p.wait_event(lambda e: e.get("event") == "connected", timeout=WAIT_S)["peer_id"]


def by_id(s: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {p["id"]: p for p in s["peers"]}


def group(s: dict[str, Any], g: int) -> dict[str, Any]:
    return next(x for x in s["groups"] if x["group"] == g)


# Raw control connections that speak the wire protocol directly (deterministic, no peer processes).

def frame(type_id: int, payload: bytes = b"", version: int | None = None) -> bytes:
    v = codec.PROTOCOL_VERSION if version is None else version
    return HEADER.pack(MAGIC, v, type_id, len(payload)) + payload


def wire_string(b: bytes) -> bytes:
    return struct.pack("<I", len(b)) + b


class RawPeer:
    """A hand-driven control connection: says HELLO, then sends what the test tells it to."""

    def __init__(self, port: int, group: int = 0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buf = b""
        self.seen: list[tuple[str, dict]] = []
        self.sock.sendall(codec.encode_hello(group, 1))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def await_frame(self, name: str, count: int = 1, timeout: float = 10.0) -> None:
        """Reads until `count` frames called `name` have arrived in all (bounded)."""
        deadline = time.monotonic() + timeout
        while sum(n == name for n, _ in self.seen) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"no {name} from the master; got {[n for n, _ in self.seen]}"
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            assert chunk, f"the master closed the connection; got {[n for n, _ in self.seen]}"
            self.buf += chunk
            # Split off whole frames and decode them.
            while len(self.buf) >= HEADER.size:
                length = HEADER.unpack_from(self.buf)[3]
                if len(self.buf) < HEADER.size + length:
                    break
                whole, self.buf = self.buf[:HEADER.size + length], self.buf[HEADER.size + length:]
                self.seen += codec.decode(whole, 1 << 24)

    def drain(self, seconds: float) -> list[str]:
        """Reads whatever arrives for `seconds`; the names of all frames seen so far."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            self.buf += chunk
            while len(self.buf) >= HEADER.size and len(self.buf) >= HEADER.size + HEADER.unpack_from(self.buf)[3]:
                n = HEADER.size + HEADER.unpack_from(self.buf)[3]
                whole, self.buf = self.buf[:n], self.buf[n:]
                self.seen += codec.decode(whole, 1 << 24)
        return [n for n, _ in self.seen]

    def close(self) -> None:
        self.sock.close()


def p2p_ready(epoch: int) -> bytes:
    return frame(4, struct.pack("<QQ", epoch, 0))


def op_begin(tag: int, count: int = 10) -> bytes:
    return frame(6, struct.pack("<QQBBBBQ", tag, count, 10, 0, 0, 0, 0))  # float32 SUM, no ticket claimed


def op_end(tag: int, uid: int, ok: bool, reason: bytes = b"", tx: int = 0, rx: int = 0, suspect: int = 0,
           silent: bool = False) -> bytes:
    return frame(7, struct.pack("<QQBQ", tag, uid, int(ok), suspect) + wire_string(reason)
                 + struct.pack("<QQB", tx, rx, int(silent)))


# ------------------------------------------------------------------ tests

def test_joins_ring_world_sizes_and_html(tmp_path: Path):
    release = str(tmp_path / "release")
    with Cluster(status_port=0) as c:
        assert c.status_port and c.status_port != c.port
        empty = status(c)
        assert empty["peers"] == [] and empty["world_size"] == 0 and empty["port"] == c.port
        steps = [["join", 3], ["wait_file", release]]
        peers = [peer(c, "a", steps, group=0), peer(c, "b", steps, group=0), peer(c, "c", steps, group=1)]
        ids = [peer_id(p) for p in peers]
        for p in peers:
            p.wait_event(lambda e: e.get("event") == "joined")
        s = wait_status(c, lambda s: s["world_size"] == 3 and all(p["state"] == "accepted" for p in s["peers"]),
                        "three accepted peers")
        assert s["peer_count"] == 3 and len(s["peers"]) == 3 and not s["peers_truncated"]
        g0, g1 = group(s, 0), group(s, 1)
        assert sorted(g0["ring"]) == sorted(ids[:2]) and g0["world_size"] == 2
        assert g1["ring"] == [ids[2]] and g1["world_size"] == 1
        assert g0["pending"] == [] and g0["revision"] is None and g0["sync"] is None
        table = by_id(s)
        for i, pid in enumerate(ids):
            p = table[pid]
            assert p["group"] == (0 if i < 2 else 1)
            host, port = p["address"].rsplit(":", 1)
            assert host == "127.0.0.1" and int(port) > 0
            assert p["ring_index"] == group(s, p["group"])["ring"].index(pid)
            assert 0 <= p["seconds_since_heard"] < 5
            assert p["ops_in_flight"] == 0 and not p["in_sync"] and not p["voted_update_topology"]
        assert s["counters"]["peers_registered"] == 3 and s["counters"]["peers_dropped"] == 0

        code, ctype, body = get(f"{c.status_url}/")
        page = body.decode()
        assert code == 200 and ctype.startswith("text/html")
        for pid in ids:
            assert f"<td>{pid}</td>" in page
            assert table[pid]["address"] in page
        assert "Recently dropped peers" in page
        (tmp_path / "release").touch()
        for p in peers:
            p.finish(timeout=WAIT_S)
        s = wait_status(c, lambda s: s["peer_count"] == 0, "every peer gone")
        assert {d["id"] for d in s["dropped"]} == set(ids)
        assert all(d["cause"] == "left" and d["reason"] == "left gracefully" for d in s["dropped"]), s["dropped"]


def test_op_in_flight_then_counters(tmp_path: Path):
    go = str(tmp_path / "go")
    count = 1 << 18
    with Cluster(status_port=0) as c:
        a = peer(c, "a", [["join", 2], ["reduce", {"tag": 7, "count": count}]])
        b = peer(c, "b", [["join", 2], ["wait_file", go], ["reduce", {"tag": 7, "count": count}]])
        ida, idb = peer_id(a), peer_id(b)
        # a waits in the op for b, which has not begun it.
        s = wait_status(c, lambda s: s["ops_in_flight"] and s["ops_in_flight"][0]["tag"] == 7, "the op in flight")
        op = s["ops_in_flight"][0]
        assert op["group"] == 0 and op["state"] == "waiting" and op["uid"] is None
        assert op["begun"] == [ida] and op["waiting_for"] == [idb] and op["waiting_for_total"] == 1
        assert f"count={count}" in op["descriptor"] and "float" in op["descriptor"]
        assert by_id(s)[ida]["ops_in_flight"] == 1 and by_id(s)[idb]["ops_in_flight"] == 0
        assert s["ops_in_flight_total"] == 1 and s["counters"]["ops_started"] == 0
        page = get(f"{c.status_url}/")[2].decode()
        assert "Operations in flight (1)" in page

        (tmp_path / "go").touch()
        done = [p.wait_event(lambda e: e.get("event") == "reduced") for p in (a, b)]
        assert all(e["value"] == 2.0 and e["world"] == 2 for e in done)
        for p in (a, b):
            p.finish(timeout=WAIT_S)
        s = wait_status(c, lambda s: s["counters"]["ops_completed"] == 1, "the op completed")
        counters = s["counters"]
        assert s["ops_in_flight"] == [] and counters["ops_started"] == 1
        assert counters["ops_failed"] == 0 and counters["ops_rejected"] == 0
        # The master sums what each peer reported in OP_END: exactly what the peers' calls returned.
        assert counters["collective_tx_bytes"] == sum(e["tx"] for e in done) >= 2 * count * 4
        assert counters["collective_rx_bytes"] == sum(e["rx"] for e in done) == counters["collective_tx_bytes"]


def test_shared_state_sync_revision_per_group(tmp_path: Path):
    count = 100_000
    done = str(tmp_path / "done")
    with Cluster(status_port=0) as c:
        # a is ahead (revision 5) with other content: b (revision 3) receives the whole tensor; then
        # both push to 6 with equal content, which moves nothing.
        a = peer(c, "a", [["join", 2], ["sync", {"revision": 5, "count": count, "value": 1.0}],
                          ["sync", {"push": True}], ["wait_file", done]])
        b = peer(c, "b", [["join", 2], ["sync", {"revision": 3, "count": count, "value": 2.0}],
                          ["sync", {"push": True}], ["wait_file", done]])
        for p in (a, b):
            p.wait_event(lambda e: e.get("event") == "synced" and e["revision"] == 6)
            synced = [e for e in p.events if e.get("event") == "synced"]
            assert [e["revision"] for e in synced] == [5, 6] and synced[-1]["value"] == 1.0
        s = wait_status(c, lambda s: s["counters"]["syncs_completed"] == 2, "two syncs")
        counters = s["counters"]
        assert counters["syncs_planned"] == 2 and counters["syncs_failed"] == 0
        assert counters["sync_bytes_planned"] == count * 4  # the second sync moved nothing
        g = group(s, 0)
        assert g["revision"] == 6 and g["sync"] is None and not any(p["in_sync"] for p in s["peers"])
        page = get(f"{c.status_url}/")[2].decode()
        assert "<td>6</td>" in page
        (tmp_path / "done").touch()
        for p in (a, b):
            p.finish(timeout=WAIT_S)


def test_sigkilled_peer_is_listed_as_dropped_and_leaves_the_ring():
    with Cluster(status_port=0) as c:
        steps = [["join", 3], ["wait_file", "/nonexistent"]]
        peers = [peer(c, name, steps) for name in "abc"]
        ids = [peer_id(p) for p in peers]
        wait_status(c, lambda s: s["world_size"] == 3, "world size 3")
        peers[2].kill()  # SIGKILL
        s = wait_status(c, lambda s: s["dropped"] and s["dropped"][0]["id"] == ids[2], "the killed peer dropped")
        d = s["dropped"][0]
        assert d["cause"] == "closed" and d["reason"] and d["state"] == "accepted" and d["group"] == 0
        assert d["address"].startswith("127.0.0.1:") and 0 <= d["seconds_ago"] < 10
        assert s["world_size"] == 2 and sorted(group(s, 0)["ring"]) == sorted(ids[:2])
        assert ids[2] not in by_id(s) and s["counters"]["peers_dropped"] == 1
        page = get(f"{c.status_url}/")[2].decode()
        assert d["reason"] in page or "closed" in page
        assert peers[0].alive and peers[1].alive


def test_raw_protocol_ops_bytes_failure_and_escaping():
    """Two hand-driven peers: an op waiting, then running, then ending with exact byte counts; a
    second op failed with a hostile reason string, which the JSON and the HTML carry escaped, and
    the master's log line too (no control byte, no forged line, valid UTF-8)."""
    with Cluster(status_port=0, env={"PCCL_LOG_LEVEL": "INFO"}) as c:
        a = RawPeer(c.port)
        a.await_frame("TOPOLOGY")      # alone: admitted at once (epoch 1)
        a.send(p2p_ready(1))
        b = RawPeer(c.port)
        s = wait_status(c, lambda s: group(s, 0)["pending"] == [2], "b pending")
        assert by_id(s)[2]["state"] == "pending" and by_id(s)[2]["ring_index"] == -1
        a.send(frame(3))               # a votes update_topology: b is admitted (epoch 2)
        a.await_frame("TOPOLOGY", count=2)
        b.await_frame("TOPOLOGY")
        s = wait_status(c, lambda s: s["epoch"] == 2 and s["topology_round_active"], "the admission round")
        assert by_id(s)[1]["voted_update_topology"] and by_id(s)[2]["state"] == "accepted"
        for p in (a, b):
            p.send(p2p_ready(2))
        s = wait_status(c, lambda s: s["world_size"] == 2 and not s["topology_round_active"], "the ring of two")
        assert group(s, 0)["ring"] == [1, 2]

        a.send(op_begin(5))
        s = wait_status(c, lambda s: s["ops_in_flight"], "op waiting")
        op = s["ops_in_flight"][0]
        assert (op["tag"], op["state"], op["begun"], op["waiting_for"]) == (5, "waiting", [1], [2])
        b.send(op_begin(5))
        s = wait_status(c, lambda s: s["ops_in_flight"][0]["state"] == "running", "op running")
        op = s["ops_in_flight"][0]
        assert op["uid"] == 1 and op["participants"] == [1, 2] and op["waiting_for"] == [1, 2]
        a.send(op_end(5, 1, True, tx=1000, rx=2000))
        s = wait_status(c, lambda s: s["ops_in_flight"][0]["waiting_for"] == [2], "a ended")
        b.send(op_end(5, 1, True, tx=30, rx=40))
        s = wait_status(c, lambda s: s["counters"]["ops_completed"] == 1, "op completed")
        assert s["counters"]["collective_tx_bytes"] == 1030 and s["counters"]["collective_rx_bytes"] == 2040

        hostile = (b'bad "quote" \\ <script>alert(1)</script> \x01\x1f \xff\xfe caf\xc3\xa9 \xe2\x80\xa8 \xc2\x85 end'
                   b'\n[pccl 1 ERR pid=1] forged')
        for p in (a, b):
            p.send(op_begin(6))
        s = wait_status(c, lambda s: s["ops_in_flight"][0]["state"] == "running", "second op running")
        uid = s["ops_in_flight"][0]["uid"]
        assert uid == 3  # uid 2 went to the ticket for tag 5's next op
        a.send(op_end(6, uid, False, reason=hostile, tx=5, rx=6))
        wait_status(c, lambda s: s["last_op_failure"] is not None, "the failed op")
        code, _, raw = get(f"{c.status_url}/status.json")
        assert code == 200
        assert b"<" not in raw and b">" not in raw and b"\x01" not in raw and b"\xe2\x80\xa8" not in raw
        s = json.loads(raw)  # valid UTF-8 and valid JSON
        f = s["last_op_failure"]
        expected = hostile.decode("utf-8", errors="replace")
        assert expected in f["message"] and (f["group"], f["tag"], f["uid"]) == (0, 6, uid)
        assert s["counters"]["ops_failed"] == 1 and s["counters"]["collective_tx_bytes"] == 1035
        page = get(f"{c.status_url}/")[2].decode()
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>" not in page
        deadline = time.monotonic() + 10
        while not (lines := [ln for ln in "".join(c.master.stderr).splitlines() if "bad \"quote\"" in ln]):
            assert time.monotonic() < deadline, "the master logged no line for the failed op"
            time.sleep(0.02)
        line = lines[0]
        assert "\ufffd" not in line and not any(ord(ch) < 0x20 for ch in line), line
        assert (r'bad "quote" \x5c <script>alert(1)</script> \x01\x1f \xff\xfe café \xe2\x80\xa8 \xc2\x85 end'
                r"\x0a[pccl 1 ERR pid=1] forged") in line, line
        assert not any(ln.startswith("[pccl 1 ERR") for ln in "".join(c.master.stderr).splitlines())
        a.close()
        b.close()


def test_drop_causes_and_bounded_dropped_list():
    limit = _core.STATUS_MAX_DROPPED_PEERS
    with Cluster(status_port=0, peer_timeout_s=1.0) as c:
        # Each cause once: a protocol violation, a malformed frame, a goodbye, a silent peer.
        v = RawPeer(c.port)
        v.await_frame("WELCOME")
        v.send(frame(3) + frame(3))  # update_topology twice
        m = RawPeer(c.port)
        m.await_frame("WELCOME")
        m.send(frame(2, version=codec.PROTOCOL_VERSION + 1))
        g = RawPeer(c.port)
        g.await_frame("WELCOME")
        g.send(frame(8))             # GOODBYE
        quiet = RawPeer(c.port)      # says HELLO, then nothing: timed out after 1 s
        quiet.await_frame("WELCOME")
        s = wait_status(c, lambda s: len(s["dropped"]) == 4, "four drops")
        causes = {d["id"]: (d["cause"], d["reason"]) for d in s["dropped"]}
        assert causes[1][0] == "protocol_violation" and "update_topology" in causes[1][1]
        assert causes[2][0] == "malformed_frame" and "protocol version" in causes[2][1]
        assert causes[3] == ("left", "left gracefully")
        assert causes[4][0] == "timeout" and "1000 ms" in causes[4][1]
        for p in (v, m, g, quiet):
            p.close()

        # More drops than the list keeps: the newest `limit` stay, newest first.
        for _ in range(limit + 3):
            p = RawPeer(c.port)
            p.await_frame("WELCOME")
            p.close()
        last_id = 4 + limit + 3
        s = wait_status(c, lambda s: s["dropped"][0]["id"] == last_id and s["peer_count"] == 0, "every drop")
        assert s["dropped_limit"] == limit and len(s["dropped"]) == limit
        assert [d["id"] for d in s["dropped"]] == list(range(last_id, last_id - limit, -1))
        assert s["counters"]["peers_dropped"] == 4 + limit + 3


def test_bad_requests_get_4xx_and_the_page_keeps_serving():
    with Cluster(status_port=0) as c:
        assert get(f"{c.status_url}/nope")[0] == 404
        assert get(f"{c.status_url}/status.json/x")[0] == 404
        assert get(f"{c.status_url}/status.json?refresh=1")[0] == 200
        req = urllib.request.Request(f"{c.status_url}/status.json", data=b"x", method="POST")
        try:
            urllib.request.urlopen(req, timeout=5)
            raise AssertionError("POST must be refused")
        except urllib.error.HTTPError as e:
            assert e.code == 405 and e.headers["Allow"] == "GET, HEAD"

        def raw(request: bytes) -> bytes:
            """The whole answer to `request`; b"" when the server closes without one."""
            with socket.create_connection(("127.0.0.1", c.status_port), timeout=5) as s:
                out = b""
                try:
                    s.sendall(request)
                    while chunk := s.recv(65536):
                        out += chunk
                except ConnectionResetError:  # closed with our request unread
                    pass
                return out

        for bad in (b"garbage\r\n\r\n", b"GET /" + b"x" * 70000 + b" HTTP/1.1\r\n\r\n",
                    b"BREW /pot HTTP/1.1\r\n\r\n", b"\x00\xff\xfe\r\n\r\n"):
            answer = raw(bad)
            assert answer.startswith(b"HTTP/") and answer.split(b" ")[1][:1] == b"4", (bad[:40], answer[:200])
        # Garbage then a hang-up, and idle connections up to the bound: the page still answers.
        with socket.create_connection(("127.0.0.1", c.status_port), timeout=5) as s:
            s.sendall(b"\x16\x03\x01 not http at all")
        idle = [socket.create_connection(("127.0.0.1", c.status_port), timeout=5)
                for _ in range(_core.STATUS_MAX_HTTP_CONNECTIONS)]
        time.sleep(0.3)
        try:
            # Over the bound: closed unanswered (at once, not after a timeout).
            t0 = time.monotonic()
            assert raw(b"GET /status.json HTTP/1.0\r\n\r\n") == b""
            assert time.monotonic() - t0 < 3
        finally:
            for s in idle:
                s.close()
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                if get(f"{c.status_url}/status.json")[0] == 200:
                    break
            except (ConnectionError, urllib.error.URLError):
                pass
            assert time.monotonic() < deadline, "the page never came back"
            time.sleep(0.05)
        assert get(f"{c.status_url}/")[0] == 200
        assert c.master_alive()
        c.master.signal(signal.SIGTERM)
        assert c.master.popen.wait(10) == 0


def test_in_process_master_status_api():
    import pccl
    with pytest.raises(ValueError):
        pccl.MasterNode("127.0.0.1:0", status_port=70000)
    plain = pccl.MasterNode("127.0.0.1:0")
    plain.run()
    try:
        assert plain.status_port is None and plain.status()["peers"] == []
    finally:
        plain.interrupt()
    assert plain.status() is None
    master = pccl.MasterNode("127.0.0.1:0", status_port=0)
    master.run()
    port = master.status_port
    try:
        assert port and port != master.port
        code, ctype, body = get(f"http://127.0.0.1:{port}/status.json")
        assert code == 200 and json.loads(body)["port"] == master.port
        # A taken port fails run() with the OSError, and leaves nothing running.
        clash = pccl.MasterNode("127.0.0.1:0", status_port=port)
        with pytest.raises(OSError):
            clash.run()
        assert clash.status() is None
    finally:
        t0 = time.monotonic()
        master.interrupt()
        assert time.monotonic() - t0 < 2.0
    assert master.status_port is None
    with pytest.raises((ConnectionError, urllib.error.URLError)):
        get(f"http://127.0.0.1:{port}/status.json", timeout=2)


def test_cli_refuses_a_taken_status_port():
    import subprocess
    import sys
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "pccl.master", "--listen-address", "127.0.0.1:0",
                            "--status-port", str(port)], capture_output=True, text=True, timeout=30, cwd=TESTS)
    assert r.returncode == 1 and "pccl-master: error:" in r.stderr, (r.returncode, r.stdout, r.stderr)


def test_optimize_topology_survives_probers_that_never_report():
    """Raw peers vote optimize_topology and then ignore their BANDWIDTH_PROBE: the master gives the
    round its streaming time plus the slack, counts the probe as failed (nothing cached), and lets
    every voter through; meanwhile the status page says it is measuring. A report naming the wrong
    target is a protocol violation."""
    vote_optimize = frame(200)
    with Cluster(status_port=0, peer_timeout_s=120.0, env={"PCCL_BANDWIDTH_PROBE_MS": "50"}) as c:
        a = RawPeer(c.port)
        a.await_frame("TOPOLOGY")
        a.send(p2p_ready(1))
        a.await_frame("TOPOLOGY_COMPLETE")
        b, d = RawPeer(c.port), RawPeer(c.port)
        for p in (b, d):
            p.await_frame("WELCOME")
        wait_status(c, lambda s: s["peer_count"] == 3, "three registered")
        a.send(frame(3))  # update_topology: admit b and d
        for p in (a, b, d):
            p.await_frame("TOPOLOGY", count=2 if p is a else 1)
            p.send(p2p_ready(2))
        for p in (a, b, d):
            p.await_frame("TOPOLOGY_COMPLETE", count=2 if p is a else 1)
        start = time.monotonic()
        for p in (a, b, d):
            p.send(vote_optimize)
        # All on 127.0.0.1: one host pair (the host's own path), probed from the first peer.
        a.await_frame("BANDWIDTH_PROBE")
        assert status(c)["topology_optimizing"]
        for p in (a, b, d):
            p.await_frame("TOPOLOGY_COMPLETE", count=3 if p is a else 2, timeout=60)
        assert time.monotonic() - start >= 10, "the round must wait out its slack before giving up"
        s = status(c)
        assert not s["topology_optimizing"] and s["links"] == []
        assert s["counters"]["topology_optimizations"] == 1 and s["counters"]["topology_reorders"] == 0

        # Again: this time a answers for a peer it was not asked to measure.
        for p in (a, b, d):
            p.send(vote_optimize)
        a.await_frame("BANDWIDTH_PROBE", count=2)
        a.send(frame(201, struct.pack("<QQQB", 2, 999, 10**9, 1) + wire_string(b"")))
        s = wait_status(c, lambda s: len(s["dropped"]) == 1, "the liar dropped")
        assert s["dropped"][0]["cause"] == "protocol_violation" and "bandwidth probe" in s["dropped"][0]["reason"]
        for p in (a, b, d):
            p.close()


def ring_of_raw_peers(c: Cluster, n: int) -> list[RawPeer]:
    """n raw peers admitted one by one into one ring (ids 1..n)."""
    peers = [RawPeer(c.port)]
    peers[0].await_frame("TOPOLOGY")
    peers[0].send(p2p_ready(1))
    for k in range(1, n):
        peers.append(RawPeer(c.port))
        wait_status(c, lambda s: group(s, 0)["pending"] == [k + 1], f"peer {k + 1} pending")
        for p in peers[:-1]:
            p.send(frame(3))                   # every member votes update_topology
        epoch = wait_status(c, lambda s: s["topology_round_active"], "the admission round")["epoch"]
        for p in peers:
            p.send(p2p_ready(epoch))
        wait_status(c, lambda s: s["world_size"] == k + 1 and not s["topology_round_active"], f"a ring of {k + 1}")
    return peers


def run_op(c: Cluster, peers: list[RawPeer], tag: int) -> int:
    for p in peers:
        p.send(op_begin(tag))
    s = wait_status(c, lambda s: s["ops_in_flight"] and s["ops_in_flight"][0]["state"] == "running", f"op {tag}")
    return s["ops_in_flight"][0]["uid"]


def test_silent_ring_neighbour_is_dropped_and_a_repeat_reporter_is_dropped_itself():
    """A failed op whose reporter got nothing from a peer that still talks to the master: that peer
    is dropped (its heartbeats alone would keep every op failing). A reporter that names a second
    silent neighbour soon after is the likelier culprit and is dropped itself."""
    with Cluster(status_port=0) as c:
        a, b, x, y = ring_of_raw_peers(c, 4)                  # ids 1, 2, 3, 4
        uid = run_op(c, [a, b, x, y], 5)
        b.send(op_end(5, uid, False, reason=b"nothing from previous peer 1", suspect=1, silent=True))
        s = wait_status(c, lambda s: s["dropped"], "the silent suspect dropped")
        d = s["dropped"][0]
        assert d["id"] == 1 and d["cause"] == "silent_to_neighbour" and "peer 2" in d["reason"], d
        a.await_frame("KICKED")
        # A report without the silence flag (a plain failure) drops nobody.
        uid = run_op(c, [b, x, y], 6)
        x.send(op_end(6, uid, False, reason=b"connection reset", suspect=2))
        s = wait_status(c, lambda s: s["counters"]["ops_failed"] == 2, "the plain failure")
        assert len(s["dropped"]) == 1 and s["world_size"] == 3
        # b reports a second silent neighbour within the window: b goes, not the one it names.
        uid = run_op(c, [b, x, y], 7)
        b.send(op_end(7, uid, False, reason=b"nothing from previous peer 4", suspect=4, silent=True))
        s = wait_status(c, lambda s: len(s["dropped"]) == 2, "the repeat reporter dropped")
        d = s["dropped"][0]
        assert d["id"] == 2 and d["cause"] == "silent_to_neighbour" and "its own network" in d["reason"], d
        assert sorted(group(s, 0)["ring"]) == [3, 4]
        for p in (a, b, x, y):
            p.close()


def sync_vote(content: bytes, count: int = 4 << 20) -> bytes:
    """SYNC_VOTE at revision 0, ENFORCE_POPULAR, one float32 entry "w" whose hash is `content`."""
    entry = wire_string(b"w") + struct.pack("<BQ", 10, count) + content.ljust(16, b"\0")[:16] + b"\0"
    return frame(100, struct.pack("<QBI", 0, 0, 1) + entry)


def sync_stalled(uid: int, ranges: list[tuple[int, int, int, int]]) -> bytes:
    return frame(102, struct.pack("<QI", uid, len(ranges)) + b"".join(struct.pack("<IQQQ", *r) for r in ranges))


def last(peer: RawPeer, name: str) -> dict[str, Any]:
    return [fields for n, fields in peer.seen if n == name][-1]


def test_sync_stalled_reports_move_ranges_are_bounded_and_checked():
    """A receiver's SYNC_STALLED moves the ranges it misses to distributors that have not gone
    silent towards it; a repeat within half the deadline is ignored; once every distributor went
    silent the sync fails for all; a report naming a range never planned is a protocol violation."""
    with Cluster(status_port=0, peer_timeout_s=6.0) as c:
        a, b, x = ring_of_raw_peers(c, 3)                                  # ids 1, 2, 3
        everyone = (a, b, x)
        for p, content in ((a, b"popular"), (b, b"popular"), (x, b"stale")):
            p.send(sync_vote(content))
        for p in everyone:
            p.await_frame("SYNC_PLAN")
        plan = last(x, "SYNC_PLAN")
        uid, ranges = plan["sync_uid"], plan["receive"]
        assert len(ranges) == 2 and {r[3] for r in ranges} == {1, 2}, plan  # 16 MiB: 8 MiB from each
        first, other = ranges[0], (b if ranges[0][3] == 1 else a)
        x.send(sync_stalled(uid, [first]))
        other.await_frame("SYNC_SEND_MORE")
        assert last(other, "SYNC_SEND_MORE") == {"sync_uid": uid, "send": [(first[0], first[1], first[2], 3)]}
        x.send(sync_stalled(uid, [first]))                                 # too soon: ignored
        assert "SYNC_DONE" not in x.drain(0.5)   # honoured, it would fail the sync (nobody left for it)
        s = wait_status(c, lambda s: s["counters"]["sync_ranges_reassigned"] == 1, "one reassignment")
        assert s["counters"]["syncs_failed"] == 0
        for _ in range(4):                                                  # half the deadline passes
            for p in everyone:
                p.send(frame(2))
            time.sleep(0.9)
        x.send(sync_stalled(uid, [first]))      # the second distributor went silent too: nobody is left
        for p in everyone:
            p.await_frame("SYNC_DONE")
        done = last(x, "SYNC_DONE")
        assert done["result"] == 8 and "received nothing" in done["message"], done   # RANK_CONNECTION_LOST
        for p, content in ((a, b"popular"), (b, b"popular"), (x, b"stale")):
            p.send(sync_vote(content))
        x.await_frame("SYNC_PLAN", count=2)
        x.send(sync_stalled(last(x, "SYNC_PLAN")["sync_uid"], [(0, 123, 8, 1)]))
        x.await_frame("KICKED")
        s = wait_status(c, lambda s: s["dropped"], "the violator dropped")
        assert s["dropped"][0]["id"] == 3 and "never sent" in s["dropped"][0]["reason"], s["dropped"]
        for p in everyone:
            p.close()


def p2p_unreachable(epoch: int, peer: int) -> bytes:
    return frame(4, struct.pack("<QQ", epoch, peer))


def test_a_newcomer_that_cannot_reach_a_member_is_dropped_not_the_member():
    """A newcomer whose path to a ring member is broken (its firewall, say) must not evict that
    healthy member on every join attempt: the newcomer goes. A member that cannot reach a newcomer
    drops the newcomer too; the ring of members carries on either way."""
    with Cluster(status_port=0) as c:
        a, b = ring_of_raw_peers(c, 2)                                   # ids 1, 2
        for newcomer_id, reporter_is_newcomer in ((3, True), (4, False)):
            n = RawPeer(c.port)
            wait_status(c, lambda s: group(s, 0)["pending"] == [newcomer_id], f"peer {newcomer_id} pending")
            for p in (a, b):
                p.send(frame(3))
            epoch = wait_status(c, lambda s: s["topology_round_active"], "the admission round")["epoch"]
            if reporter_is_newcomer:
                n.send(p2p_unreachable(epoch, 1))
            else:
                b.send(p2p_unreachable(epoch, newcomer_id))
            n.await_frame("KICKED")
            s = wait_status(c, lambda s: len(s["dropped"]) == newcomer_id - 2, f"peer {newcomer_id} dropped")
            d = s["dropped"][0]
            assert d["id"] == newcomer_id and d["cause"] == "unreachable", d
            if reporter_is_newcomer:
                assert "cannot reach ring member peer 1" in d["reason"], d
            epoch = wait_status(c, lambda s: s["topology_round_active"] and sorted(group(s, 0)["ring"]) == [1, 2],
                                "the round without the newcomer")["epoch"]
            for p in (a, b):
                p.send(p2p_ready(epoch))
            wait_status(c, lambda s: s["world_size"] == 2 and not s["topology_round_active"], "the ring of 2 again")
            n.close()
        # Two newcomers; one vanishes mid-round (the epoch moves on, the round goes on): the other,
        # still joining, cannot reach member 1 and is the one dropped.
        n5, n6 = RawPeer(c.port), RawPeer(c.port)
        wait_status(c, lambda s: group(s, 0)["pending"] == [5, 6], "peers 5 and 6 pending")
        for p in (a, b):
            p.send(frame(3))
        first_epoch = wait_status(c, lambda s: s["topology_round_active"], "the admission round")["epoch"]
        n5.close()
        epoch = wait_status(c, lambda s: s["epoch"] > first_epoch and sorted(group(s, 0)["ring"]) == [1, 2, 6],
                            "the round without peer 5")["epoch"]
        n6.send(p2p_unreachable(epoch, 1))
        n6.await_frame("KICKED")
        wait_status(c, lambda s: [d["id"] for d in s["dropped"]][:2] == [6, 5], "peer 6 dropped, not peer 1")
        epoch = wait_status(c, lambda s: sorted(group(s, 0)["ring"]) == [1, 2] and s["topology_round_active"],
                            "the round of members")["epoch"]
        for p in (a, b):
            p.send(p2p_ready(epoch))
        wait_status(c, lambda s: s["world_size"] == 2 and not s["topology_round_active"], "the ring of 2 once more")
        # Naming a peer that is not one's next in the ring is a protocol violation.
        n7 = RawPeer(c.port)
        wait_status(c, lambda s: group(s, 0)["pending"] == [7], "peer 7 pending")
        for p in (a, b):
            p.send(frame(3))
        epoch = wait_status(c, lambda s: s["topology_round_active"], "the admission round")["epoch"]
        a.send(p2p_unreachable(epoch, 7))                                   # a's next is b
        a.await_frame("KICKED")
        s = wait_status(c, lambda s: s["dropped"][0]["id"] == 1, "the violator dropped")
        assert s["dropped"][0]["cause"] == "protocol_violation", s["dropped"][0]
        for p in (a, b, n6, n7):
            p.close()
