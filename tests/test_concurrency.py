"""Concurrent all-reduces: many tags in flight, threads, duplicate tags, membership calls while ops
run, fair sharing of a connection, peer death with ops in flight, and no per-tag leaks."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("pool", [1, 3])
def test_many_ops_in_flight(cluster, pool):
    c = cluster()
    peers = [c.peer("concurrency", index=i, world=3, pool=pool) for i in range(3)]
    for p in peers:
        events = {e["event"]: e for e in p.finish(timeout=180) if "event" in e}
        assert events["async8"]["ok"] and events["async8"]["exact"], events["async8"]
        dup = events["duplicate"]
        assert dup["refused"] and dup["result"] == "INVALID_ARGUMENT" and "99" in dup["message"], dup
        assert events["update_in_flight"]["refused"] and events["update_in_flight"]["result"] == "PENDING_ASYNC_OPS"
        assert events["first_after_duplicate"]["ok"] and events["first_after_duplicate"]["value"] == 3.0
        assert events["threads"]["errors"] == [] and events["threads"]["pending"] == [False] * 3
        assert not events["fair"]["big_done_first"], f"a small op must not wait behind a big one's whole queue: {events['fair']}"


def test_peer_death_fails_every_op_in_flight_then_retry_succeeds(cluster):
    c = cluster()
    peers = [c.peer("multi", index=i, world=3, count=1 << 20, pieces=8, max_in_flight=8, die=(i == 2))
             for i in range(3)]
    peers[2].wait_event(lambda e: e.get("event") == "dying")
    for p in peers[:2]:
        r = p.wait_event(lambda e: e.get("event") == "multi", timeout=60)
        assert all(r["uniform"]) and set(r["values"]) <= {3.0, 6.0}, r
        assert 3.0 in r["values"]


def test_100k_tags_do_not_grow_memory(cluster):
    c = cluster()
    peers = [c.peer("tags", index=i, world=2, tags=100_000) for i in range(2)]
    for p in peers:
        e = p.wait_event(lambda e: e.get("event") == "tags", timeout=300)
        samples = e["samples"]
        print(f"{p.name}: RSS over 100k tags (KiB): {samples}")
        # After warm-up the resident set must not creep: allow 2 MiB of noise.
        assert max(samples[2:]) - samples[1] < 2048, samples
