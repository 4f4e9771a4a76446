"""pccl.diloco with real peers: synchronous and asynchronous DiLoCo keep every peer's shared state
bit-identical at every outer step, through late joins, peers killed mid-reduce and mid-sync, and a
world that shrinks to one peer."""

from __future__ import annotations

from collections import defaultdict
import time
from typing import Any

import pytest

from harness import TESTS, Proc

pytest.importorskip("torch")

PEER = TESTS / "diloco_peer.py"
RUN_TIMEOUT_S = 180
ALONE_S = 1.5


def start(c: Any, index: int, **spec: Any) -> Proc:
    spec.setdefault("inner_steps", 4)
    return c.peer("diloco", program=PEER, index=index, **spec)


def outer_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == "outer"]


def assert_parity(runs: dict[str, list[dict[str, Any]]]) -> dict[int, set[str]]:
    """Every peer that reports an outer step holds the same shared state there."""
    by_step: dict[int, set[str]] = defaultdict(set)
    for events in runs.values():
        for e in events:
            if e.get("event") in ("outer", "joined", "done"):
                by_step[e["step"]].add(e["digest"])
    split = {step: d for step, d in by_step.items() if len(d) != 1}
    assert not split, f"peers disagree at outer steps {sorted(split)}: {runs}"
    return by_step


@pytest.mark.parametrize("mode", ["sync", "async", "async-quantized"])
def test_three_peers_stay_bit_identical(cluster, mode):
    c = cluster()
    spec = dict(outer_steps=6, asynchronous=mode.startswith("async"), quantize=mode.endswith("quantized"), world=3)
    peers = [start(c, i, **spec) for i in range(3)]
    runs = {p.name: p.finish(timeout=RUN_TIMEOUT_S) for p in peers}
    assert_parity(runs)
    for name, events in runs.items():
        done = [e for e in events if e.get("event") == "done"][0]
        # Async: finish() applies the reduce still in flight after the sixth.
        assert done["step"] == (7 if spec["asynchronous"] else 6), (name, done)
        steps = outer_events(events)
        # Nothing fails here: a step is discarded only when nobody contributed (async: the batch
        # that every peer launches at join carries zeros).
        assert all(e["applied"] == (e["contributors"] > 0) for e in steps), (name, steps)
        full = [e for e in steps if e["world"] == 3 and e["applied"]]
        assert len(full) >= 5 and all(e["contributors"] == 3 for e in full), (name, steps)
        if mode == "async-quantized":
            params = [e for e in events if e.get("event") == "joined"][0]["params"]
            float32_bytes = 2 * (3 - 1) / 3 * params * 4
            assert all(e["tx"] < 0.4 * float32_bytes for e in full), (float32_bytes, full)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_late_joiner_is_slotted_in_bit_identically(cluster, asynchronous, tmp_path):
    c = cluster()
    spec = dict(outer_steps=12, asynchronous=asynchronous, inner_sleep=0.03)
    go = tmp_path / "go"
    first = [start(c, i, world=2, **spec) for i in range(2)]
    late = start(c, 2, start_file=str(go), **spec)
    for p in first:
        p.wait_event(lambda e: e.get("event") == "outer" and e["step"] >= 2, timeout=RUN_TIMEOUT_S)
    go.touch()
    joined = late.wait_event(lambda e: e.get("event") == "joined", timeout=RUN_TIMEOUT_S)
    assert joined["step"] >= 2 and joined["rx"] > 0, joined
    runs = {p.name: p.finish(timeout=RUN_TIMEOUT_S) for p in first + [late]}
    assert_parity(runs)
    late_steps = outer_events(runs[late.name])
    assert late_steps, "the late joiner never completed an outer step"
    # Once in, its pseudo-gradients count: some later step has all three contributors.
    assert any(e["contributors"] == 3 for e in late_steps), late_steps
    if asynchronous:
        # Its first reduce is the one already in flight when it joined: it adds a zero to it.
        first_report = late_steps[0]
        assert first_report["contributors"] == 2 and first_report["applied"], late_steps


@pytest.mark.parametrize("asynchronous", [False, True])
@pytest.mark.parametrize("die_in", ["reduce", "sync"])
def test_peer_killed_mid_reduce_or_sync(cluster, asynchronous, die_in):
    c = cluster()
    spec = dict(outer_steps=6, asynchronous=asynchronous, hidden=8192, world=3)
    survivors = [start(c, i, **spec) for i in range(2)]
    victim = start(c, 2, die_at=2, die_in=die_in, **spec)
    victim.wait_event(lambda e: e.get("event") == "dying", timeout=RUN_TIMEOUT_S)
    runs = {p.name: p.finish(timeout=RUN_TIMEOUT_S) for p in survivors}
    runs[victim.name] = list(victim.events)
    by_step = assert_parity(runs)
    assert max(by_step) >= 6
    for p in survivors:
        steps = outer_events(runs[p.name])
        assert any(e["applied"] and e["world"] == 2 and e["contributors"] == 2 for e in steps), steps


@pytest.mark.parametrize("asynchronous", [False, True])
def test_world_of_one_discards_the_step_and_waits(cluster, asynchronous, tmp_path):
    c = cluster()
    # A model big enough (330 KB of parameters) that the victim dies before its reduce completes.
    spec = dict(outer_steps=7, asynchronous=asynchronous, inner_sleep=0.01, hidden=8192)
    go = tmp_path / "go"
    survivor = start(c, 0, world=2, **spec)
    victim = start(c, 1, die_at=2, die_in="reduce", world=2, **spec)
    newcomer = start(c, 2, start_file=str(go), **spec)
    victim.wait_event(lambda e: e.get("event") == "dying", timeout=RUN_TIMEOUT_S)
    time.sleep(ALONE_S)  # the survivor finds itself alone and waits
    go.touch()
    runs = {p.name: p.finish(timeout=RUN_TIMEOUT_S) for p in (survivor, newcomer)}
    runs[victim.name] = list(victim.events)
    assert_parity(runs)
    steps = outer_events(runs[survivor.name])
    discarded = [e for e in steps if not e["applied"] and e["contributors"] == 0 and e["world"] <= 1]
    assert len(discarded) == 1, [{k: e[k] for k in ("step", "applied", "world", "contributors", "waited")} for e in steps]
    # It waited for the newcomer inside step(), then trained on with it from the same outer step.
    assert discarded[0]["waited"] >= ALONE_S * 0.8, discarded
    after = steps[steps.index(discarded[0]) + 1:]
    assert after and after[-1]["step"] >= 7 and all(e["applied"] and e["world"] == 2 for e in after), after
    joined = [e for e in runs[newcomer.name] if e.get("event") == "joined"][0]
    assert joined["step"] == discarded[0]["step"], (joined, discarded)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_cuda_model(cluster, asynchronous):
    import torch
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the model lives on the GPU only when one is present")
    c = cluster()
    peers = [start(c, i, outer_steps=4, asynchronous=asynchronous, world=2, device="cuda") for i in range(2)]
    runs = {p.name: p.finish(timeout=RUN_TIMEOUT_S) for p in peers}
    assert_parity(runs)
    assert all(any(e["applied"] for e in outer_events(r)) for r in runs.values())


def test_master_gone_for_good_is_an_error_not_a_hang(cluster):
    c = cluster()
    peers = [start(c, i, outer_steps=10**6, world=2, inner_sleep=0.01) for i in range(2)]
    for p in peers:
        p.wait_event(lambda e: e.get("event") == "outer" and e["step"] >= 2, timeout=RUN_TIMEOUT_S)
    c.master.kill()
    for p in peers:
        # Dropped sessions try to rejoin for a bounded time, then step() raises.
        e = p.wait_event(lambda e: e.get("event") == "error", timeout=60)
        assert "MASTER_CONNECTION_FAILED" in e["error"], e
