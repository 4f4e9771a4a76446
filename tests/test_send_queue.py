"""The data plane's fair send queue, without sockets: concurrent ops on one connection take turns a
frame at a time, a half-written frame always finishes first, and no op waits out another's backlog
however the kernel cuts the writes."""

from __future__ import annotations

import random

import pytest

from pccl import _core

simulate = _core.send_queue.simulate
HEADER = _core.send_queue.HEADER_BYTES
PIECE = 512 * 1024


def frames(uid: int, n: int, size: int = PIECE) -> list[tuple[str, int, int]]:
    return [("push", uid, size)] * n


def writes(nbytes: int, n: int) -> list[tuple[str, int, int]]:
    return [("write", nbytes, 0)] * n


@pytest.mark.parametrize("write_size", [1, 1000, 100_000, 262_144, PIECE + HEADER, 3 * PIECE])
def test_small_op_overtakes_a_big_backlog(write_size):
    # A big op has 64 pieces queued and its first frame half written when a small op arrives.
    steps = frames(1, 64) + [("write", PIECE // 3, 0), ("push", 2, 4096)]
    steps += writes(write_size, (4 * PIECE) // write_size + 8)
    done = simulate(steps)
    assert 2 in done, done
    # The half-written frame finishes first, then the small op's frame before any other big one.
    assert done.index(2) == 1, done


def test_round_robin_one_frame_per_op():
    steps = frames(1, 4) + frames(2, 4) + frames(3, 4) + writes(PIECE // 5, 200)
    assert simulate(steps) == [1, 2, 3] * 4


def test_op_arriving_mid_frame_waits_only_for_that_frame():
    steps = frames(1, 3) + [("write", 10, 0), ("push", 2, 100), ("write", HEADER + PIECE - 10, 0)]
    assert simulate(steps) == [1]  # exactly the rest of op 1's first frame
    assert simulate(steps + [("write", HEADER + 100, 0)]) == [1, 2]


@pytest.mark.parametrize("seed", range(20))
def test_every_frame_completes_once_and_nobody_starves(seed):
    rng = random.Random(seed)
    steps: list[tuple[str, int, int]] = []
    pushed: dict[int, int] = {}
    total = 0
    for _ in range(300):
        if rng.random() < 0.4:
            uid = rng.randint(1, 5)
            size = rng.choice([0, 1, 4096, PIECE])
            steps.append(("push", uid, size))
            pushed[uid] = pushed.get(uid, 0) + 1
            total += HEADER + size
        else:
            steps.append(("write", rng.randint(1, 2 * PIECE), 0))
    steps.append(("write", total, 0))  # drain
    done = simulate(steps)
    assert sorted(done) == sorted(uid for uid, n in pushed.items() for _ in range(n))

    # Fairness: between two completions of one op, every other op with frames waiting completes
    # at least one (checked on a backlog where all ops are queued up front).
    backlog = [("push", uid, rng.choice([1, 4096, PIECE])) for _ in range(10) for uid in (1, 2, 3)]
    order = simulate(backlog + writes(rng.randint(1, PIECE), 10_000))
    for i in range(0, 27, 3):
        assert sorted(order[i:i + 3]) == [1, 2, 3], order


def test_bad_steps_are_refused():
    with pytest.raises(ValueError, match="unknown step"):
        simulate([("flush", 0, 0)])
    with pytest.raises(ValueError, match="reserved"):
        simulate([("push", 0, 10)])


# ---- late binding: a pool's connections take frames from a shared backlog as they drain

simulate_pool = _core.send_queue.simulate_pool


def test_a_faster_connection_carries_more_of_the_op():
    # Two connections, one draining 9x faster (the other lost packets and halved its window).
    # Frames bound when queued would split 50/50 and the slow one would set the op's end.
    steps = frames(1, 100) + [("write", 0, 9 * PIECE // 4), ("write", 1, PIECE // 4)] * 200
    done = simulate_pool(2, steps)
    assert len(done) == 100, len(done)
    by_fast = sum(1 for conn, _ in done if conn == 0)
    assert by_fast >= 85, by_fast


def test_a_connection_binds_only_what_it_can_write_soon():
    # One write of a byte binds one 512 KiB frame (more than the bound-ahead), not the backlog:
    # the second connection then carries every other frame.
    assert _core.send_queue.BOUND_AHEAD_BYTES < PIECE
    steps = frames(1, 4) + [("write", 0, 1), ("write", 1, 10 * PIECE)]
    done = simulate_pool(2, steps)
    assert done == [(1, 1)] * 3, done
    done = simulate_pool(2, steps + [("write", 0, 10 * PIECE)])
    assert sorted(done) == [(0, 1)] + [(1, 1)] * 3, done


def test_the_backlog_serves_ops_round_robin():
    steps = frames(1, 3) + frames(2, 3) + frames(3, 1) + [("write", 0, PIECE // 3)] * 40
    assert [uid for _, uid in simulate_pool(1, steps)] == [1, 2, 3, 1, 2, 1, 2]


@pytest.mark.parametrize("seed", range(10))
def test_every_frame_leaves_exactly_once_whatever_the_write_pattern(seed):
    rng = random.Random(seed)
    steps: list[tuple[str, int, int]] = []
    pushed = 0
    for _ in range(400):
        if rng.random() < 0.3:
            steps.append(("push", rng.randint(1, 4), rng.choice([0, 1, 4096, PIECE])))
            pushed += 1
        else:
            steps.append(("write", rng.randrange(4), rng.choice([1, 100, 65536, PIECE, 4 * PIECE])))
    steps += [("write", c, 1 << 40) for c in range(4)]
    done = simulate_pool(4, steps)
    assert len(done) == pushed
