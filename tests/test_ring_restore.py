"""The in-place ring all-reduce without sockets (pccl._core.ring): pieces delivered in random orders,
runs stopped after any number of deliveries (also with a piece half received), and every peer's
buffer restored bit for bit. End-to-end fault tests stop a ring only where a kill happens to land."""

from __future__ import annotations

import numpy as np
import pytest

from pccl import _core

simulate = _core.ring.simulate


def inputs(world: int, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(count).astype(np.float32) for _ in range(world)]


@pytest.mark.parametrize("world", [2, 3, 4, 5])
def test_completed_rings_agree_bit_for_bit_and_sum_right(world):
    for seed in range(5):
        ins = inputs(world, 997, seed)
        out, complete = simulate(ins, piece_elems=41, seed=seed)
        assert complete
        for o in out[1:]:
            assert o.tobytes() == out[0].tobytes()
        np.testing.assert_allclose(out[0], np.sum(ins, axis=0), rtol=1e-5, atol=1e-5)
    # Integer-valued inputs sum exactly in any order.
    ins = [np.arange(500, dtype=np.float32) * (r + 1) for r in range(world)]
    out, _ = simulate(ins, piece_elems=13, seed=7)
    assert np.array_equal(out[0], np.sum(ins, axis=0))


@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("half_received", [False, True])
def test_a_ring_stopped_anywhere_restores_every_input(world, half_received):
    count, piece = 600, 29
    ins = inputs(world, count, world)
    # Stop after 0, 1, 2, ... deliveries until a run completes: every point of the run is covered.
    for stop in range(100_000):
        out, complete = simulate(ins, piece_elems=piece, seed=stop, stop_after=stop, half_received=half_received)
        if complete:
            break
        for o, i in zip(out, ins):
            assert o.tobytes() == i.tobytes(), f"stopped after {stop} deliveries"
    assert complete and stop >= 2 * world, stop


def test_an_all_gather_piece_before_its_reduce_scatter_piece_is_refused():
    # It would land on the in-place backup while the reduce-scatter bytes may still be arriving
    # there, and a restore would mix the two.
    assert "before its reduce-scatter" in _core.ring.all_gather_before_reduce_scatter(3, 1000, 37)
