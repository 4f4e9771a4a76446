"""optimize_topology(): the master's ring solver (deterministic, through _core.ring_solver) and the
whole call end to end on loopback. The emulated-WAN test, where a better ring exists, is in
test_wan_topology.py."""

from __future__ import annotations

import itertools
import json
import random
import urllib.request

import pytest

from pccl import _core

rs = _core.ring_solver
FAST, SLOW = 1e9, 1e8


def brute_force_bottleneck(bw: list[list[float]]) -> float:
    n = len(bw)
    return max(rs.ring_bottleneck(bw, [0, *rest]) for rest in itertools.permutations(range(1, n)))


def test_exact_solver_matches_brute_force_on_random_matrices():
    rng = random.Random(7)
    for n in range(3, 8):
        for _ in range(20):
            bw = [[0.0 if i == j else float(rng.choice([1, 2, 5, 10, 50, 100, 200])) for j in range(n)] for i in range(n)]
            ring = rs.best_ring(bw, list(range(n)))
            assert sorted(ring) == list(range(n))
            best = brute_force_bottleneck(bw)
            # The current ring is kept when the best beats it by at most the margin (10%).
            assert rs.ring_bottleneck(bw, ring) >= best / 1.1 - 1e-9


def test_avoids_slow_pairs_and_keeps_a_good_current_ring():
    bw = [[FAST] * 4 for _ in range(4)]
    for a, b in [(0, 1), (1, 0), (2, 3), (3, 2)]:
        bw[a][b] = SLOW
    ring = rs.best_ring(bw, [0, 1, 2, 3])
    assert rs.ring_bottleneck(bw, ring) == FAST and ring[0] == 0
    # Noise within the margin does not reorder a ring that is already good.
    noisy = [[FAST * (1 - 0.05 * ((i + j) % 2)) for j in range(4)] for i in range(4)]
    assert rs.best_ring(noisy, [0, 1, 2, 3]) == [0, 1, 2, 3]


def test_asymmetric_links_pick_the_fast_direction():
    n = 5
    bw = [[SLOW] * n for _ in range(n)]
    for i in range(n):  # only the "backwards" direction of the default ring is fast
        bw[(i + 1) % n][i] = FAST
    ring = rs.best_ring(bw, list(range(n)))
    assert rs.ring_bottleneck(bw, ring) == FAST
    assert ring == [0, 4, 3, 2, 1]


def test_heuristic_beyond_exact_sizes_finds_a_planted_ring():
    rng = random.Random(3)
    n = 24
    planted = list(range(n))
    rng.shuffle(planted)
    bw = [[float(rng.choice([1, 2, 3])) * SLOW / 10 for _ in range(n)] for _ in range(n)]
    for i in range(n):
        bw[planted[i]][planted[(i + 1) % n]] = FAST
    start = list(range(n))
    ring = rs.best_ring(bw, start)
    assert sorted(ring) == start
    assert rs.ring_bottleneck(bw, ring) > rs.ring_bottleneck(bw, start)


def test_newcomer_goes_where_its_links_are_fast():
    unknown = -1.0
    bw = [[FAST] * 4 for _ in range(4)]
    bw[3] = [SLOW, SLOW, FAST, 0.0]  # newcomer 3 sends fast only to 2
    for i in range(3):
        bw[i][3] = FAST
    assert rs.best_insertion(bw, [0, 1, 2], 3) == 2  # ... so it goes right before 2
    blind = [[FAST, FAST, FAST, unknown], [FAST, FAST, FAST, unknown], [FAST, FAST, FAST, unknown], [unknown] * 4]
    assert rs.best_insertion(blind, [0, 1, 2], 3) == 3  # nothing known: appended
    # Measured: 0 <-> 3 and 3 -> 1, and a slow 1 -> 2. Between 1 and 2 the slow link would go, but
    # the newcomer's links there are unmeasured: it goes between 0 and 1, where both are known.
    half = [[FAST, FAST, FAST, FAST], [FAST, FAST, SLOW, unknown], [FAST, FAST, FAST, unknown],
            [FAST, FAST, unknown, unknown]]
    assert rs.best_insertion(half, [0, 1, 2], 3) == 1


def test_probe_rounds_cover_each_pair_once_without_sharing_a_sender_or_receiver():
    n = 6
    wanted = [[i != j and (i + j) % 3 != 0 for j in range(n)] for i in range(n)]
    rounds = rs.probe_rounds(n, wanted)
    seen = [pair for r in rounds for pair in r]
    assert sorted(seen) == sorted((i, j) for i in range(n) for j in range(n) if wanted[i][j])
    for r in rounds:
        assert len({s for s, _ in r}) == len(r) and len({d for _, d in r}) == len(r)


def status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=10) as r:
        return json.load(r)


@pytest.mark.parametrize("pool", [1, 3])
def test_optimize_topology_end_to_end_on_loopback(cluster, pool):
    c = cluster(status_port=0)
    peers = [c.peer("optimize", index=i, world=3, pool=pool, count=1 << 16, optimize_calls=2) for i in range(3)]
    for p in peers:
        e = p.wait_event(lambda e: e.get("event") == "after", timeout=90)
        assert e["value"] == 6.0 and e["uniform"], e
    digests = {p.wait_event(lambda e: e.get("event") == "after")["digest"] for p in peers}
    assert len(digests) == 1
    s = status(c.status_port)
    assert s["counters"]["topology_optimizations"] == 2
    # Every peer is on 127.0.0.1: one pair of hosts, measured once and cached for the second call.
    assert [(l["from"], l["to"]) for l in s["links"]] == [("127.0.0.1", "127.0.0.1")]
    assert s["links"][0]["bits_per_second"] > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{c.status_port}/", timeout=10) as r:
        page = r.read().decode()
    assert "Measured links" in page and "<td>127.0.0.1</td>" in page
    for p in peers:
        p.finish(timeout=30)
