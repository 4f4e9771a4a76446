"""A peer for tests/test_status.py: `python status_peer.py '<json spec>'`.

Connects, reports its peer id, then runs spec["steps"] in order, reporting each as a JSON line:
  ["join", n]              pump membership until the global world size is n
  ["wait_file", path]      wait (bounded by spec["wait_s"]) until the test creates `path`
  ["reduce", {tag, count}] one float32 SUM all-reduce of ones, in place
  ["sync", {revision, count, value, push}]  one shared-state sync of one float32 tensor
  ["close"]                leave gracefully (GOODBYE)
Exits 0 after the last step; the test kills it if it wants it to stay around longer.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np

import pccl
from pccl import Attribute, SharedState, TensorInfo


def emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main() -> None:
    spec = json.loads(sys.argv[1])
    wait_s = float(spec.get("wait_s", 60))
    comm = pccl.Communicator(spec["master"], peer_group=spec.get("group", 0))
    comm.connect(n_attempts=20)
    emit(event="connected", peer_id=comm.peer_id)
    tensor = np.zeros(0, dtype=np.float32)
    state: SharedState | None = None
    for i, (step, arg) in enumerate(spec["steps"]):
        if step == "join":
            deadline = time.monotonic() + wait_s
            while comm.get_attribute(Attribute.GLOBAL_WORLD_SIZE) < arg:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"global world stayed below {arg}")
                if comm.are_peers_pending():
                    comm.update_topology()
                else:
                    time.sleep(0.02)
            emit(event="joined", step=i, world=comm.get_attribute(Attribute.GLOBAL_WORLD_SIZE))
        elif step == "wait_file":
            deadline = time.monotonic() + wait_s
            while not os.path.exists(arg):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{arg} never appeared")
                time.sleep(0.02)
            emit(event="released", step=i)
        elif step == "reduce":
            x = np.ones(arg["count"], dtype=np.float32)
            emit(event="reducing", step=i, tag=arg["tag"])
            info = comm.all_reduce(x, x, tag=arg["tag"])
            emit(event="reduced", step=i, tag=arg["tag"], value=float(x[0]), tx=info.tx_bytes, rx=info.rx_bytes,
                 world=info.local_world_size)
        elif step == "sync":
            if state is None:
                tensor = np.full(arg["count"], arg["value"], dtype=np.float32)
                state = SharedState([TensorInfo.from_numpy(tensor, "weights")])
                state.revision = arg["revision"]
            if arg.get("push"):
                state.push_revision()
            info = comm.sync_shared_state(state)
            emit(event="synced", step=i, revision=state.revision, value=float(tensor[0]), tx=info.tx_bytes,
                 rx=info.rx_bytes)
        elif step == "close":
            comm.close()
            emit(event="closed", step=i)
            return
        else:
            raise ValueError(f"unknown step {step!r}")
    comm.close()
    emit(event="done")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # report, then fail the process so the test sees it
        emit(event="error", error=repr(e))
        raise
