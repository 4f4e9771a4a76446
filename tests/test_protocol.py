"""The wire format: codec round trips and rejections, and a master that survives hostile bytes."""

from __future__ import annotations

import os
import random
import socket
import struct
import time

import pytest

from pccl import _core

codec = _core.codec
MAGIC = 0x4C434350
HEADER = struct.Struct("<IHHI")
LIMIT = codec.MAX_PEER_TO_MASTER_FRAME


def frame(type_id: int, payload: bytes, *, magic: int = MAGIC, version: int | None = None,
          length: int | None = None) -> bytes:
    v = codec.PROTOCOL_VERSION if version is None else version
    return HEADER.pack(magic, v, type_id, len(payload) if length is None else length) + payload


def test_round_trip_of_every_field():
    raw = codec.encode_op_begin(7, 123456789, 10, 3) + codec.encode_hello(5, 4242)
    raw += codec.encode_topology(9, [(1, 0, 1000), (2, 1, 2000)])
    frames = codec.decode(raw, 1 << 20)
    assert frames[0] == ("OP_BEGIN", {"tag": 7, "count": 123456789, "dtype": 10, "op": 3})
    assert frames[1] == ("HELLO", {"peer_group": 5, "p2p_port": 4242})
    assert frames[2] == ("TOPOLOGY", {"epoch": 9, "peers": [(1, 0, 1000), (2, 1, 2000)]})


def test_sync_stalled_frame_decodes():
    ranges = struct.pack("<IQQQ", 3, 8 << 20, 8 << 20, 2) + struct.pack("<IQQQ", 4, 0, 100, 7)
    assert codec.decode(frame(102, struct.pack("<QI", 5, 2) + ranges), LIMIT) == [
        ("SYNC_STALLED", {"sync_uid": 5, "missing": [(3, 8 << 20, 8 << 20, 2), (4, 0, 100, 7)]})]


def test_truncated_frames_wait_for_more_bytes():
    raw = codec.encode_op_begin(1, 2, 3, 4)
    for cut in range(len(raw)):
        assert codec.decode(raw[:cut], 1 << 20) == []


@pytest.mark.parametrize("bad,needle", [
    (frame(6, b"\0" * 22, magic=0xDEADBEEF), "magic"),
    (frame(6, b"\0" * 22, version=999), "version"),
    (frame(6, b"", length=LIMIT + 1), "exceeds"),
    (frame(6, b"\0" * 5), "malformed"),          # OP_BEGIN payload too short
    (frame(6, b"\0" * 30), "malformed"),         # trailing bytes
    (frame(7, struct.pack("<QQBQI", 1, 1, 1, 0, 0)), "malformed"),  # OP_END without its byte counts (version 1)
    (frame(999, b""), "unknown"),                # unknown message type
    (frame(65, struct.pack("<QBI", 1, 0, 0xFFFFFFFF)), "malformed"),  # topology claims 4G peers
    (frame(102, struct.pack("<QI", 1, 1 << 20)), "malformed"),  # SYNC_STALLED claims ranges it does not carry
    (frame(102, struct.pack("<QI", 1, 1) + b"\0" * 27), "malformed"),  # a range one byte short
])
def test_malformed_frames_are_rejected(bad, needle):
    with pytest.raises(ValueError, match=needle):
        codec.decode(bad, LIMIT)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _blast(port: int, payload: bytes, keep_open: float = 0.0) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(payload)
        except OSError:
            pass  # the master may close on us mid-send: that is the point
        if keep_open:
            time.sleep(keep_open)


def test_master_survives_hostile_bytes_then_serves_a_normal_run(cluster):
    c = cluster()
    rng = random.Random(1234)
    hello = codec.encode_hello(0, 1)
    attacks = [
        os.urandom(4096),                                     # noise
        frame(6, b"", length=0xFFFFFFFF),                     # huge length
        frame(6, b"", length=LIMIT + 1) + os.urandom(1000),   # just over the limit
        hello + os.urandom(2048),                             # valid HELLO, then garbage
        hello + frame(3, b"") + frame(3, b""),                # votes update_topology twice
        hello + frame(64, struct.pack("<QI", 1, 1)),          # a master-only message
        hello[:7],                                            # truncated, then silence
        frame(1, b"\0" * 6, version=codec.PROTOCOL_VERSION + 1),  # from the future
        hello + frame(6, struct.pack("<QQBBBBQ", 1, 10, 200, 0, 0, 0, 0)),  # invalid dtype
    ]
    attacks += [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))) for _ in range(50)]
    for payload in attacks:
        _blast(c.port, payload)
    # Many idle connections at once, each sending a partial frame.
    socks = [socket.create_connection(("127.0.0.1", c.port), timeout=5) for _ in range(100)]
    for s in socks:
        s.sendall(frame(1, b"\0" * 6)[:10])
    time.sleep(0.3)
    for s in socks:
        s.close()
    assert c.master_alive(), "the master must never crash"
    assert _rss_kib(c.master.popen.pid) < 200_000, "the master's memory must stay bounded"

    peers = [c.peer("loop", index=i, world=2, count=10000, ops=5) for i in range(2)]
    for p in peers:
        events = p.finish(timeout=60)
        ops = [e for e in events if e.get("event") == "op"]
        assert len(ops) == 5 and all(e["value"] == 3.0 and e["world"] == 2 for e in ops)
    assert c.master_alive()


def test_master_drops_a_peer_that_violates_the_protocol_and_carries_on(cluster):
    c = cluster()
    with socket.create_connection(("127.0.0.1", c.port), timeout=5) as s:
        s.sendall(codec.encode_hello(0, 1))
        time.sleep(0.2)
        s.sendall(frame(3, b"") + frame(3, b""))  # update_topology vote twice
        s.settimeout(5)
        data = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    names = [name for name, _ in codec.decode(data, 1 << 24)]
    assert names[0] == "WELCOME" and "KICKED" in names, names
    assert c.master_alive()


def test_master_ignores_a_stalled_report_for_no_sync_and_carries_on(cluster):
    """SYNC_STALLED about a sync that is not running (a late report) changes nothing: the peer stays
    registered, and a normal run goes through the same master."""
    c = cluster()
    with socket.create_connection(("127.0.0.1", c.port), timeout=5) as s:
        s.sendall(codec.encode_hello(0, 1))
        s.sendall(frame(102, struct.pack("<QI", 77, 1) + struct.pack("<IQQQ", 0, 0, 8, 1)))
        data, deadline = b"", time.monotonic() + 2.0  # well within the peer timeout (no heartbeats sent)
        s.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                break
            data += chunk
        names = [name for name, _ in codec.decode(data, 1 << 24)]
        assert names and names[0] == "WELCOME" and "KICKED" not in names, names
    p = c.peer("loop", index=0, world=2, count=4, ops=2)
    q = c.peer("loop", index=1, world=2, count=4, ops=2)
    for proc in (p, q):
        ops = [e for e in proc.finish(timeout=60) if e.get("event") == "op"]
        assert len(ops) == 2 and all(e["value"] == 3.0 for e in ops), ops
    assert c.master_alive()
