"""Correctness of every dtype x op against numpy, for world sizes 2, 3 and 5, counts 0 to 10^6+7,
in place and out of place, pool sizes 1 and 4; and bit-identical results on every peer."""

from __future__ import annotations

from collections import defaultdict

import pytest

MATRIX_TIMEOUT_S = 600


@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("pool", [1, 4])
def test_matrix(cluster, world, pool):
    c = cluster()
    peers = [c.peer("matrix", index=i, world=world, pool=pool) for i in range(world)]
    check_matrix(peers, world)


def check_matrix(peers, world: int) -> None:
    """Every case right against numpy, bit-identical on every peer, every byte counted on both sides."""
    results = [p.finish(timeout=MATRIX_TIMEOUT_S) for p in peers]
    digests: dict[str, set[str]] = defaultdict(set)
    traffic: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    cases = 0
    for events in results:
        for e in events:
            if "case" not in e:
                continue
            cases += 1
            assert e["ok"], f"wrong result: {e}"
            assert e["world"] == world
            digests[e["case"]].add(e["digest"])
            traffic[e["case"]][0] += e["tx"]
            traffic[e["case"]][1] += e["rx"]
    assert cases > 0 and cases % world == 0
    differing = {case: d for case, d in digests.items() if len(d) != 1}
    assert not differing, f"peers disagree bit-wise on {differing}"
    # ReduceInfo counts every byte once on each side, the last op of the run included (a neighbour
    # that closes right after it must not wipe this peer's figures).
    for case, (tx, rx) in traffic.items():
        nonzero = not case.split("/")[2] == "0"
        assert tx == rx and (tx > 0) == nonzero, f"{case}: peers sent {tx} bytes in all and received {rx}"


def test_peers_with_different_pool_sizes_cut_ops_the_same_way(cluster):
    """The piece size is a function of the op, not of the pool: peers with pools 1, 8 and 3 agree on
    how a 6 MiB op (2 MiB chunks, cut differently per pool before) is split, and finish it exactly."""
    c = cluster()
    peers = [c.peer("optimize", index=i, world=3, pool=pool, count=3 * (1 << 19), optimize_calls=0)
             for i, pool in enumerate([1, 8, 3])]
    events = [p.wait_event(lambda e: e.get("event") == "after", timeout=60) for p in peers]
    assert all(e["value"] == 6.0 and e["uniform"] for e in events), events
    assert len({e["digest"] for e in events}) == 1
    for p in peers:
        p.finish(timeout=30)
