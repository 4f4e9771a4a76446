"""pccl across the WAN emulator (pccl.testing.wan): peers in network namespaces, every byte between
them through the user-space delay line. Skipped, saying why, where namespaces or root are missing.

- A short all-reduce over an emulated link with pool 1 and pool 8: both complete and agree bit for
  bit (striping must not change the result); the times are printed, not asserted.
- optimize_topology() on 4 hosts whose join-order ring runs over two slow links while a ring over
  fast links only exists: the master must pick such a ring, and the all-reduce must get faster.
"""

from __future__ import annotations

import json
import time
import subprocess
import sys

import pytest

from pccl.testing.wan import WanEmulator, emulator_available

available, why_not = emulator_available()
pytestmark = pytest.mark.skipif(not available, reason=f"WAN emulator unavailable: {why_not}")

FAST = "rtt=2ms,rate=200mbit"
SLOW = "rtt=2ms,rate=20mbit"
JOIN_TIMEOUT_S = 90


def run_pool(wan: WanEmulator, cluster, pool: int, count: int) -> list[dict]:
    c = cluster(listen=f"{wan.host_ip(0)}:0", prefix=wan.exec_prefix(0))
    peers = [c.peer("optimize", index=i, world=2, pool=pool, count=count, optimize_calls=0,
                    prefix=wan.exec_prefix(i)) for i in range(2)]
    events = [p.wait_event(lambda e: e.get("event") == "after", timeout=JOIN_TIMEOUT_S) for p in peers]
    for p in peers:
        p.finish(timeout=30)
    c.close()
    return events


def test_pool_1_and_pool_8_agree_bit_for_bit_over_an_emulated_link(cluster):
    count = 1 << 20  # 4 MiB of float32
    with WanEmulator(2, "rtt=20ms,rate=400mbit,flow=50mbit") as wan:
        one = run_pool(wan, cluster, 1, count)
        eight = run_pool(wan, cluster, 8, count)
    for events in (one, eight):
        assert all(e["value"] == 3.0 and e["uniform"] for e in events), events
    digests = {e["digest"] for e in one + eight}
    assert len(digests) == 1, "pool 1 and pool 8 (and both peers) must end with the same bits"
    busbw = {pool: 4 * count * 8 / max(e["seconds"] for e in ev) / 1e6 for pool, ev in ((1, one), (8, eight))}
    print(f"\n4 MiB all-reduce, 2 peers, rtt 20 ms, 400 Mbit/s link, 50 Mbit/s per flow: "
          f"pool 1 {busbw[1]:.0f} Mbit/s, pool 8 {busbw[8]:.0f} Mbit/s (bus bandwidth)")


def status(wan: WanEmulator, url: str, host: int = 0) -> dict:
    """The master's status JSON, fetched from inside a host's namespace (the only way to reach it)."""
    fetch = f"import urllib.request,sys; sys.stdout.write(urllib.request.urlopen({url!r}, timeout=10).read().decode())"
    out = subprocess.run(wan.exec_prefix(host) + [sys.executable, "-c", fetch], capture_output=True, text=True,
                         timeout=30, check=True)
    return json.loads(out.stdout)


def test_optimize_topology_avoids_slow_links(cluster):
    slow = {(0, 1): SLOW, (1, 0): SLOW, (2, 3): SLOW, (3, 2): SLOW}
    with WanEmulator(4, FAST, slow) as wan:
        c = cluster(listen=f"{wan.host_ip(0)}:0", prefix=wan.exec_prefix(0), status_port=0,
                    env={"PCCL_BANDWIDTH_PROBE_MS": "400"})
        # Join one by one so the default ring is 0 -> 1 -> 2 -> 3 -> 0, over both slow pairs.
        peers = []
        for i in range(4):
            peers.append(c.peer("optimize", index=i, world=4, pool=1, count=1 << 20, rounds=2, linger=3.0,
                                prefix=wan.exec_prefix(i)))
            peers[-1].wait_event(lambda e: e.get("event") == "connected", timeout=JOIN_TIMEOUT_S)
        before = [p.wait_event(lambda e: e.get("event") == "before", timeout=JOIN_TIMEOUT_S) for p in peers]
        after = [p.wait_event(lambda e: e.get("event") == "after", timeout=JOIN_TIMEOUT_S) for p in peers]
        s = status(wan, f"http://{wan.host_ip(0)}:{c.status_port}/status.json")
        for p in peers:
            p.finish(timeout=30)
    assert all(e["value"] == 10.0 and e["uniform"] for e in before + after)
    ip_of = {wan.host_ip(i): i for i in range(4)}
    ring_ids = s["groups"][0]["ring"]
    host_of_id = {p["id"]: ip_of[p["address"].rsplit(":", 1)[0]] for p in s["peers"]}
    ring = [host_of_id[i] for i in ring_ids]
    edges = {(ring[k], ring[(k + 1) % 4]) for k in range(4)}
    assert not edges & set(slow), f"ring {ring} still runs over a slow link"
    assert s["counters"]["topology_reorders"] == 1
    assert len(s["links"]) == 12  # every directed pair of the 4 hosts measured once
    t_before = max(e["seconds"] for e in before)
    t_after = max(e["seconds"] for e in after)
    print(f"\n4 MiB all-reduce, 4 peers: join-order ring {t_before:.2f} s, optimised ring {ring} {t_after:.2f} s "
          f"({t_before / t_after:.1f}x)")
    assert t_before >= 2 * t_after, (t_before, t_after)


def test_unstaged_distributor_takes_over_a_dead_distributors_range(cluster):
    """Entries hashed in place (as CUDA tensors are) get host copies only when data moves. Here the
    one range goes to the first distributor; the second has nothing to send and stages nothing,
    until the first dies mid-transfer (a slow link keeps the transfer in flight) and the master
    hands its range over: the second must stage then, and the receiver end bit-identical."""
    pytest.importorskip("torch", reason="torch is an optional extra; CI installs it")
    w = [["w", "float32", 2 << 20, 1, 0]]   # 8 MiB: one range, from one distributor
    with WanEmulator(3, "rtt=2ms,rate=40mbit") as wan:
        c = cluster(listen=f"{wan.host_ip(0)}:0", prefix=wan.exec_prefix(0))
        common = dict(backend="torch", hash_in_place=True)
        first = c.peer("sync", index=0, tensors=w, script=[["join", 3], ["sync", {}], ["hold", 60]],
                       prefix=wan.exec_prefix(0), **common)
        first.wait_event(lambda e: e.get("event") == "connected", timeout=JOIN_TIMEOUT_S)
        second = c.peer("sync", index=1, tensors=w, script=[["join", 3], ["sync", {}], ["sync", {}], ["hold", 0.5]],
                        prefix=wan.exec_prefix(1), **common)
        second.wait_event(lambda e: e.get("event") == "connected", timeout=JOIN_TIMEOUT_S)
        receiver = c.peer("sync", index=2, tensors=[["w", "float32", 2 << 20, 9, 0]],
                          script=[["join", 3], ["report_receiving", "w"], ["sync", {}], ["sync", {}], ["hold", 0.5]],
                          prefix=wan.exec_prefix(2), **common)
        receiver.wait_event(lambda e: e.get("event") == "receiving", timeout=JOIN_TIMEOUT_S)
        first.kill()
        for p in (second, receiver):
            p.finish(timeout=120)
    got, kept = synced(receiver, 0), synced(second, 0)
    print(f"\nreceiver's first sync: ok={got['ok']} rx={got.get('rx')} {got.get('message', '')}; "
          f"second distributor: tx={kept.get('tx')} staged={kept['staged']}")
    assert synced(receiver, 1)["ok"] and synced(receiver, 1)["digests"] == synced(second, 1)["digests"]
    if got["ok"]:  # the range was handed over in the same call: the idle distributor had to stage
        assert got["digests"] == kept["digests"]
        assert kept["tx"] > 0 and kept["staged"] == 1, kept
    else:
        assert got["result"] == "RANK_CONNECTION_LOST", got


def synced(proc, index: int) -> dict:
    return [e for e in proc.events if e.get("event") == "synced"][index]


# Small ops: the cut often lands between ops, and the peer behind it gets nothing in the next one.
# Large ops (about 0.9 s each at 200 Mbit/s, cut 0.3 s into one): it lands mid-op, after the peer
# behind it got data, and its sender may already be done with its part (written to the kernel, not
# delivered); then the sender, whose bytes stay unacknowledged, holds the only first-hand evidence.
@pytest.mark.parametrize("count", [1 << 16, 1 << 22], ids=["between-ops", "mid-op"])
def test_silent_data_link_with_a_live_control_link(cluster, tmp_path, count):
    """Mid-run, the link between peers 0 and 1 goes silent both ways (packets dropped, no RST), yet
    both still reach the master on host 2: no heartbeat is missed, only the ring's data path is
    dead. The op in flight over that edge must fail by the progress deadline (never hang), the
    master must drop a peer of the dead edge (never the innocent peer 2, whose ops stall behind the
    break too), and the other two carry on with a ring avoiding it."""
    stop = tmp_path / "stop"
    with WanEmulator(3, "rtt=2ms,rate=200mbit") as wan:
        # 3 s: first-hand reports come at the deadline, cascade ones 0.75 s later; a starved CI
        # runner's late deadline check must not close that gap.
        c = cluster(listen=f"{wan.host_ip(2)}:0", prefix=wan.exec_prefix(2), peer_timeout_s=3)
        peers = [c.peer("loop", index=i, world=3, count=count, ops=10**6, max_seconds=60, stop_file=str(stop),
                        pause=0.01, prefix=wan.exec_prefix(i)) for i in range(3)]
        for p in peers:
            p.wait_event(lambda e: e.get("event") == "op" and e["world"] == 3 and e["n"] >= 3, timeout=JOIN_TIMEOUT_S)
        if count > 1 << 16:
            time.sleep(0.3)
        wan.cut([(0, 1), (1, 0)])
        t_cut = time.time()
        failed = peers[2].wait_event(lambda e: e.get("event") == "fail" and e["t"] > t_cut, timeout=30)
        print(f"\nfirst failure {failed['t'] - t_cut:.1f} s after the cut: {failed['result']} ({failed['message']})")
        # Reported first-hand by an end of the cut, not by a peer stalled behind it.
        assert "nothing from previous peer" in failed["message"] or "unacknowledged" in failed["message"], failed
        e = peers[2].wait_event(lambda e: e.get("event") == "op" and e["t"] > t_cut and e["world"] == 2, timeout=30)
        assert e["uniform"] and e["value"] in (4.0, 5.0), e   # peer 2 (3) with peer 0 (1) or peer 1 (2)
        survivor = 0 if e["value"] == 4.0 else 1
        dropped = 1 - survivor
        e = peers[survivor].wait_event(lambda e: e.get("event") == "op" and e["t"] > t_cut and e["world"] == 2,
                                       timeout=30)
        assert e["uniform"] and e["value"] == 3.0 + survivor + 1, e
        kicked = peers[dropped].wait_event(lambda e: e.get("event") == "fail" and e["t"] > t_cut
                                           and e["result"] == "MASTER_CONNECTION_FAILED", timeout=30)
        print(f"peer {dropped} dropped: {kicked['message']}; carried on {e['t'] - t_cut:.1f} s after the cut")
        stop.touch()
        for p in peers:
            p.finish(timeout=30)


def test_sync_routes_around_a_silent_distributor_link(cluster, tmp_path):
    """The link between distributor 0 and the stale peer 2 goes silent both ways while every peer
    still reaches the master (on host 1): failing the sync would fail every retry the same way. The
    stale peer reports its missing range at the progress deadline, the master hands it to
    distributor 1, and the same sync call succeeds bit for bit; the next sync moves nothing."""
    go = tmp_path / "go"
    fresh = [["w", "float32", 4 << 20, 1, 0]]  # 16 MiB: two 8 MiB ranges, one per distributor
    with WanEmulator(3, "rtt=2ms,rate=400mbit") as wan:
        c = cluster(listen=f"{wan.host_ip(1)}:0", prefix=wan.exec_prefix(1), peer_timeout_s=2, status_port=0)
        script = [["join", 3], ["mark", "joined"], ["wait_for", str(go)], ["sync", {}], ["sync", {}], ["hold", 0.5]]
        peers = [c.peer("sync", index=i, tensors=fresh if i < 2 else [["w", "float32", 4 << 20, 9, 0]],
                        script=script, prefix=wan.exec_prefix(i)) for i in range(3)]
        for p in peers:
            p.wait_event(lambda e: e.get("event") == "joined", timeout=JOIN_TIMEOUT_S)
        wan.cut([(0, 2), (2, 0)])
        go.touch()
        for p in peers:
            p.finish(timeout=90)
        s = status(wan, f"http://{wan.host_ip(1)}:{c.status_port}/status.json", host=1)
    got, kept = synced(peers[2], 0), synced(peers[1], 0)
    print(f"\nstale peer's sync across a silent link: ok={got['ok']} in {got.get('seconds', 0):.1f} s, "
          f"rx={got.get('rx')}; distributor 1 tx={kept.get('tx')}; ranges reassigned "
          f"{s['counters']['sync_ranges_reassigned']}")
    assert got["ok"], got
    assert got["digests"] == kept["digests"] == synced(peers[0], 0)["digests"]
    assert s["counters"]["sync_ranges_reassigned"] >= 1 and s["counters"]["syncs_failed"] == 0, s["counters"]
    assert kept["tx"] >= 16 << 20, kept  # distributor 1 sent both ranges
    again = synced(peers[2], 1)
    assert again["ok"] and again["rx"] == 0 and again["digests"] == got["digests"], again


def test_a_newcomer_that_cannot_reach_its_next_is_turned_away_and_the_ring_carries_on(cluster, tmp_path):
    """Host 2 cannot reach host 0 (a firewall, a broken path), yet reaches the master on host 1. A
    newcomer there is placed before member 0, cannot connect to it, and must be turned away with a
    reason it can act on; member 0 must not be evicted for it, and the members carry on."""
    stop = tmp_path / "stop"
    with WanEmulator(3, "rtt=2ms,rate=200mbit") as wan:
        c = cluster(listen=f"{wan.host_ip(1)}:0", prefix=wan.exec_prefix(1))
        members = []
        for i in range(2):  # in order, so the ring is member 0 -> member 1 and a newcomer goes before member 0
            members.append(c.peer("loop", index=i, world=2, count=1 << 12, ops=10**6, max_seconds=90,
                                  stop_file=str(stop), pause=0.02, prefix=wan.exec_prefix(i)))
            members[-1].wait_event(lambda e: e.get("event") == "connected", timeout=JOIN_TIMEOUT_S)
        for p in members:
            p.wait_event(lambda e: e.get("event") == "op" and e["world"] == 2 and e["n"] >= 3, timeout=JOIN_TIMEOUT_S)
        wan.cut([(2, 0), (0, 2)])
        newcomer = c.peer("loop", index=2, world=3, count=1 << 12, prefix=wan.exec_prefix(2))
        turned_away = newcomer.wait_event(lambda e: e.get("event") == "error", timeout=60)
        t_away = time.time()
        print(f"\nnewcomer: {turned_away['error']}")
        assert "cannot reach ring member" in turned_away["error"], turned_away
        for p in members:
            p.wait_event(lambda e: e.get("event") == "op" and e["t"] > t_away and e["world"] == 2, timeout=30)
        stop.touch()
        for p in members:
            events = p.finish(timeout=30)
            assert not [e for e in events if e.get("event") == "fail"], [e for e in events if e.get("event") == "fail"]


def test_confirmed_frames_that_beat_the_receivers_go_wait_for_it(cluster):
    """The master sits far from peer 1 (200 ms) and next to peer 0 (2 ms), which is 2 ms from
    peer 1: peer 0's OP_GO comes ~100 ms before peer 1's, so its frames reach peer 1 first. With
    early start off, tag 1's third op runs under the uid reserved at its first success, below the
    fresh uid tag 2 took since: peer 1 must hold those frames for its OP_GO (a bug once discarded
    them as a finished op's, and the op hung until the deadline). With early start on, the same
    steps show what it saves (ops this small finish before OP_GO and end in one round trip to the
    master instead of two): the times are printed, not asserted."""
    links = {(2, 1): "rtt=200ms", (1, 2): "rtt=200ms"}
    steps = [{"tag": 1}, {"tag": 2}, {"tag": 1}, {"tag": 2}, {"tag": 1}]
    times = {}
    with WanEmulator(3, "rtt=2ms", links) as wan:
        for mode in ("off", "on"):
            c = cluster(listen=f"{wan.host_ip(2)}:0", prefix=wan.exec_prefix(2), peer_timeout_s=3)
            peers = [c.peer("steps", index=i, world=2, pool=2, env={"PCCL_SPECULATIVE_START": mode},
                            steps=[dict(s, count=1 << 17) for s in steps], prefix=wan.exec_prefix(i))
                     for i in range(2)]
            results = []
            for p in peers:
                events = p.finish(timeout=JOIN_TIMEOUT_S)
                results.append([e for e in events if e.get("event") == "step"])
            c.close()
            for r in results:
                assert len(r) == len(steps) and all(s["ok"] and s["value"] == 3.0 and s["uniform"] for s in r), r
            times[mode] = [max(r[n]["seconds"] for r in results) for n in range(len(steps))]
    print(f"\n512 KiB all-reduces, master 200 ms from one peer: early start off "
          f"{', '.join(f'{t * 1000:.0f}' for t in times['off'])} ms; on "
          f"{', '.join(f'{t * 1000:.0f}' for t in times['on'])} ms")
