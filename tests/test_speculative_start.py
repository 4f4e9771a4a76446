"""Early start: after a success the master hands every peer a ticket (the uid reserved for the
tag's next op), and a peer that calls the tag again starts the ring at once, one master round trip
before OP_GO confirms it. These tests check the results stay exact and bit-identical in every
situation where the early start must be held back, kept in memory or undone."""

from __future__ import annotations

import json
import signal
import time
import urllib.request

from harness import Cluster

MiB_FLOATS = 1 << 18  # float32 elements in one MiB


def status_counters(c: Cluster) -> dict:
    with urllib.request.urlopen(f"{c.status_url}/status.json", timeout=10) as r:
        return json.loads(r.read())["counters"]


def steps_of(p, n: int) -> list[dict]:
    events = p.finish(timeout=120)
    steps = [e for e in events if e.get("event") == "step"]
    assert len(steps) == n, events[-5:]
    return steps


def test_repeated_tag_starts_early_and_stays_exact():
    """8 ops on one tag, one peer late by 0.3 s each time: the others' early frames wait for it in
    memory. Ops 2-8 are confirmed early starts; every result is exact and identical everywhere."""
    count = 16 * MiB_FLOATS + 5
    with Cluster(status_port=0) as c:
        peers = [c.peer("steps", index=i, world=3, pool=2, env={"PCCL_LOG_LEVEL": "DEBUG"},
                        steps=[{"tag": 3, "count": count, "delay": 0.3 if i == 2 else 0.0,
                                "inplace": i != 1} for _ in range(8)])
                 for i in range(3)]
        results = [steps_of(p, 8) for p in peers]
        for n in range(8):
            row = [r[n] for r in results]
            assert all(s["ok"] and s["value"] == 6.0 and s["uniform"] for s in row), row
            assert len({s["digest"] for s in row}) == 1, row
        counters = status_counters(c)
        assert counters["ops_completed"] == 8 and counters["ops_started_early"] == 7, counters
        for p in peers:
            log = "".join(p.stderr)
            assert log.count("started early from its ticket") == 7, log[-2000:]
            assert log.count("go confirms the early start") == 7, log[-2000:]


def test_switched_off_peers_claim_but_wait_for_go():
    """PCCL_SPECULATIVE_START=off: the tickets are still claimed (the master confirms them), but no
    peer sends before OP_GO."""
    with Cluster(status_port=0) as c:
        env = {"PCCL_LOG_LEVEL": "DEBUG", "PCCL_SPECULATIVE_START": "off"}
        peers = [c.peer("steps", index=i, world=2, env=env, steps=[{"tag": 0, "count": 100_003}] * 4)
                 for i in range(2)]
        for p in peers:
            assert all(s["ok"] and s["value"] == 3.0 and s["uniform"] for s in steps_of(p, 4))
            assert "started early" not in "".join(p.stderr)
        assert status_counters(c)["ops_started_early"] == 3


def test_crossed_async_orders_do_not_stall_a_connection():
    """Peer 0's early frames of tag 1 arrive while peer 1 still runs tag 2 on the same connections.
    Kept in memory, they hold nothing up; parked on the connection, they would stall tag 2 until
    the 3 s deadline failed it."""
    with Cluster(peer_timeout_s=3) as c:
        peers = [c.peer("crossed", index=i, pool=2, count=8 * MiB_FLOATS + 3, rounds=3, pause=0.5)
                 for i in range(2)]
        for p in peers:
            rounds = [e for e in p.finish(timeout=120) if e.get("event") == "round"]
            assert len(rounds) == 3 and all(r["ok"] == [True, True] and r["exact"] for r in rounds), rounds


def test_mismatch_after_early_start_restores_buffers():
    """Both peers start early with different counts: the master refuses the op for both, each
    in-place buffer comes back bit for bit, and the tag works again afterwards."""
    base = 4 * MiB_FLOATS
    with Cluster() as c:
        peers = [c.peer("steps", index=i, world=2, steps=[
            {"tag": 5, "count": base},
            {"tag": 5, "count": base + (1000 if i == 1 else 0)},
            {"tag": 5, "count": base},
            {"tag": 5, "count": base},
        ]) for i in range(2)]
        for p in peers:
            s = steps_of(p, 4)
            assert s[0]["ok"] and s[0]["value"] == 3.0
            assert not s[1]["ok"] and s[1]["result"] == "INVALID_ARGUMENT" and s[1]["intact"], s[1]
            assert all(x["ok"] and x["value"] == 3.0 and x["uniform"] for x in s[2:]), s


def test_early_start_on_a_ring_that_lost_a_peer_is_undone():
    """Peer 2 hangs (SIGSTOP) after the first op; the other two call the tag again and start early
    on the old ring. When the master drops the hung peer, it names a fresh uid on the smaller ring:
    both undo the early start (the in-place buffer restored) and the op succeeds with the two."""
    count = 2 * MiB_FLOATS
    with Cluster(peer_timeout_s=2) as c:
        env = {"PCCL_LOG_LEVEL": "INFO"}
        survivors = [c.peer("steps", index=i, world=3, env=env,
                            steps=[{"tag": 0, "count": count}, {"tag": 0, "count": count, "delay": 1.0}])
                     for i in range(2)]
        hung = c.peer("steps", index=2, world=3, steps=[{"tag": 0, "count": count}], linger=60)
        hung.wait_event(lambda e: e.get("event") == "step")
        hung.signal(signal.SIGSTOP)
        for p in survivors:
            s = steps_of(p, 2)
            assert s[0]["ok"] and s[0]["value"] == 6.0, s
            assert s[1]["ok"] and s[1]["world"] == 2 and s[1]["value"] == 3.0 and s[1]["uniform"], s
            assert "did not confirm the early start" in "".join(p.stderr), "".join(p.stderr)[-2000:]
        hung.kill()


def test_switched_off_peers_keep_confirmed_frames_of_an_older_reservation():
    """With early start off, a reserved uid can be older than the last OP_GO a peer saw (tag 2 ran
    under a fresh uid after tag 1's ticket was issued). Frames of the confirmed tag-1 op that beat
    the receiver's own OP_GO must wait for it, not be taken for a finished op and discarded."""
    with Cluster(peer_timeout_s=3) as c:
        env = {"PCCL_SPECULATIVE_START": "off"}
        steps = [{"tag": 1 + (n % 2), "count": 4 * MiB_FLOATS + 1} for n in range(40)]
        peers = [c.peer("steps", index=i, world=2, pool=4, env=env, steps=steps) for i in range(2)]
        for p in peers:
            assert all(s["ok"] and s["value"] == 3.0 and s["uniform"] for s in steps_of(p, 40))


def test_interrupted_early_start_fails_the_op_for_everyone():
    """Peer 0 starts early and is interrupted before peer 1 even calls: its failure reaches the
    master before OP_GO and must be applied when OP_GO confirms the uid, so peer 1's call fails
    at once naming the interruption (not after a deadline), with its buffer intact, and the
    next op on the tag works."""
    with Cluster() as c:
        peers = [c.peer("early_cancel", index=i, count=2 * MiB_FLOATS + 3, delay=1.5) for i in range(2)]
        peers[0].wait_event(lambda e: e.get("event") == "blocking")
        time.sleep(0.3)
        peers[0].signal(signal.SIGINT)
        events = [p.finish(timeout=60) for p in peers]
    second = [next(e for e in ev if e.get("event") == "second") for ev in events]
    third = [next(e for e in ev if e.get("event") == "third") for ev in events]
    assert second[0]["interrupted"] and second[0]["intact"], second
    assert not second[1]["ok"] and "interrupted by the caller" in second[1]["message"] and second[1]["intact"], second
    assert all(t["value"] == 3.0 and t["uniform"] for t in third), third
