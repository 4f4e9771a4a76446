"""Shared by the benchmark scripts: wait until a group has all its peers."""

from __future__ import annotations

import time

JOIN_DEADLINE_S = 60.0
POLL_S = 0.01


def wait_for_world(comm, world: int) -> None:
    """Pump membership (the collective pending vote) until `world` peers are in the group."""
    import pccl
    deadline = time.monotonic() + JOIN_DEADLINE_S
    while comm.get_attribute(pccl.Attribute.LOCAL_WORLD_SIZE) < world:
        if time.monotonic() > deadline:
            raise TimeoutError("the world never reached its size")
        if comm.are_peers_pending():
            comm.update_topology()
        else:
            time.sleep(POLL_S)
