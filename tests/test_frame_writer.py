"""The frame writer (csrc/client/frame_writer.*) over socket pairs, inline and on its own thread:
every frame arrives once and intact over a pool, a dropped op's memory is never read after drop()
returns (its half-written frame is finished with zeros, and drop() tells exactly how much of the op
never went out), and a write failure names the pool's
generation while a fresh pool works."""

from __future__ import annotations

import os
import struct
import time

import pytest

from pccl._core import frame_writer

HEADER = 32
WAIT_S = 20
MODES = pytest.mark.parametrize("threaded", [False, True], ids=["inline", "thread"])


def parse_frames(stream: bytes) -> list[tuple[int, int, bytes]]:
    """(key, offset, payload) of every whole frame in `stream`, which must end on a frame boundary."""
    frames, pos = [], 0
    while pos < len(stream):
        length, = struct.unpack_from("<I", stream, pos + 8)
        key, offset = struct.unpack_from("<QQ", stream, pos + 16)
        frames.append((key, offset, stream[pos + HEADER:pos + HEADER + length]))
        pos += HEADER + length
    assert pos == len(stream), "a frame was cut short"
    return frames


def read_until(h, conns: list[int], total: int) -> list[bytes]:
    """Reads every connection until `total` bytes arrived in all (a bounded wait)."""
    streams = [bytearray() for _ in conns]
    deadline = time.monotonic() + WAIT_S
    while sum(map(len, streams)) < total:
        assert time.monotonic() < deadline, f"only {sum(map(len, streams))} of {total} bytes arrived"
        got = False
        for i, conn in enumerate(conns):
            chunk = h.read(conn, 1 << 20)
            streams[i] += chunk
            got = got or bool(chunk)
        if not got:
            time.sleep(0.001)
    return [bytes(s) for s in streams]


def wait_for(predicate, what: str):
    deadline = time.monotonic() + WAIT_S
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)
    return value


@MODES
def test_every_frame_arrives_once_and_intact_over_the_pool(threaded):
    # Small socket buffers, whatever the system's defaults: one socket cannot swallow the backlog.
    h = frame_writer.Harness(threaded=threaded, connections=3, buffer_bytes=64 * 1024)
    assert h.threaded == threaded
    payloads = {key: os.urandom(700_000 + key) for key in (1, 2, 3)}
    for key, data in payloads.items():
        h.push(key, data, 64 * 1024)
    frames_per_key = {key: -(-len(data) // (64 * 1024)) for key, data in payloads.items()}
    total = sum(len(d) for d in payloads.values()) + HEADER * sum(frames_per_key.values())
    streams = read_until(h, [0, 1, 2], total)
    got: dict[int, dict[int, bytes]] = {key: {} for key in payloads}
    for stream in streams:
        for key, offset, payload in parse_frames(stream):
            assert offset not in got[key], f"frame {key}@{offset} arrived twice"
            got[key][offset] = payload
    for key, data in payloads.items():
        assert b"".join(got[key][o] for o in sorted(got[key])) == data
    assert sum(1 for s in streams if s) >= 2, "late binding must spread a backlog over the pool"
    sent = wait_for(lambda: len(h.sent()) == sum(frames_per_key.values()) and h.sent(), "every frame reported sent")
    assert sum(b for _, b, _ in sent) == total and not any(z for _, _, z in sent)
    assert h.failures() == []


@MODES
def test_a_dropped_op_is_never_read_again_and_its_half_frame_ends_in_zeros(threaded):
    # Small socket buffers: the writer stops inside the 1 MiB frame until the reader drains.
    h = frame_writer.Harness(threaded=threaded, connections=1, buffer_bytes=16 * 1024)
    big = 1 << 20
    h.push(7, b"\xab" * (big + 4096), big)  # one whole frame and the start of a second
    h.push(8, b"\x11" * 4096, 4096)          # another op's frame behind it stays
    wait_for(lambda: h.pending(0) > 0, "the first bytes of the frame")
    unwritten = h.drop(7)
    h.fill(7, 0xCD)  # the caller reuses its buffer: none of this may go out
    stream = read_until(h, [0], HEADER + big + HEADER + 4096)[0]
    time.sleep(0.05)
    assert h.read(0, 1 << 20) == b"", "frames of the dropped op went out after drop()"
    (key, offset, payload), (key2, _, payload2) = parse_frames(stream)
    assert (key, offset, len(payload)) == (7, 0, big) and (key2, payload2) == (8, b"\x11" * 4096)
    assert 0xCD not in payload, "the dropped op's memory was read after drop() returned"
    written = payload.rstrip(b"\x00")
    assert 0 < len(written) < big and written == b"\xab" * len(written), "the frame must end in zeros"
    # What drop() says never went out is exactly the zero tail and the second frame: a failed op's
    # tx_bytes is computed from it while a writer thread's reports are still on their way.
    assert unwritten == (big - len(written)) + HEADER + 4096
    sent = wait_for(lambda: len(h.sent()) == 2 and h.sent(), "both frames reported")
    assert sent == [(7, HEADER + big, True), (8, HEADER + 4096, False)]


@MODES
def test_a_write_failure_names_the_pool_generation_and_a_new_pool_works(threaded):
    h = frame_writer.Harness(threaded=threaded, connections=2)
    h.close_reader(0)
    h.close_reader(1)
    h.push(1, os.urandom(1 << 20), 256 * 1024)
    failures = wait_for(h.failures, "a failure report")
    assert [(peer, gen) for peer, gen, _ in failures] == [(1, 1)] and "lost" in failures[0][2]
    assert h.sent() == []
    # The frames thrown away with the pool never went out, and drop() says so: what a failed op
    # counts as sent is at most what the sockets took before the resets (a few socket buffers).
    pushed = (1 << 20) + 4 * HEADER
    unwritten = h.drop(1)
    assert unwritten is not None and pushed - 512 * 1024 <= unwritten <= pushed, unwritten
    assert h.drop(1) == 0, "a second drop of the key finds nothing left"
    h.replace_pool()
    assert h.generation == 2
    data = os.urandom(300_000)
    h.push(2, data, 128 * 1024)
    streams = read_until(h, [0, 1], len(data) + 3 * HEADER)
    frames = sorted(f for s in streams for f in parse_frames(s))
    assert b"".join(p for _, _, p in frames) == data and {k for k, _, _ in frames} == {2}
    assert len(h.failures()) == 1
