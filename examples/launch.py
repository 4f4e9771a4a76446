"""The process plumbing every example shares: a master on loopback (unless the run names one), peer
processes started with multiprocessing's "spawn" method, their progress events, and killing every
one of them on the way out, on success, error or Ctrl-C alike.

A peer is a module-level function ``peer(events, *args)`` of the example; it reports progress with
``events.put({...})`` (plain dicts). In its child process it ignores Ctrl-C (the launcher handles it
and kills every child), exits by itself if the launcher dies, and sends its traceback as an event
when it fails, so the launcher can show it and stop the run. ``run_main(main)`` runs an example's
``main`` and turns Ctrl-C and a failed run into a one-line message and an exit status.
``wait_for_peers`` is the one pccl piece here: the membership pump run until a group is complete.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

# How often a child checks that its launcher is still alive, and the launcher polls its children.
POLL_S = 0.2
# How long a killed child may take to be reaped.
REAP_S = 5.0
# How long a peer waits for its group to be complete.
WAIT_FOR_PEERS_S = 120.0


class PeerFailed(RuntimeError):
    """A peer process raised or exited with a non-zero status."""


def _exit_when_orphaned(launcher_pid: int) -> None:
    while os.getppid() == launcher_pid:
        time.sleep(POLL_S)
    os._exit(1)


def _child(launcher_pid: int, target: Callable[..., None], events: Any, args: tuple[Any, ...]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(launcher_pid,), daemon=True).start()
    try:
        target(events, *args)
    except BaseException:  # noqa: BLE001 - report everything, then fail this process
        events.put({"kind": "error", "peer": mp.current_process().name, "traceback": traceback.format_exc()})
        sys.exit(1)


def wait_for_peers(comm: Any, count: int) -> None:
    """Admit newcomers (``are_peers_pending`` -> ``update_topology``, collectives every member runs)
    until ``comm``'s group has ``count`` members; raise TimeoutError after WAIT_FOR_PEERS_S."""
    from pccl import Attribute
    deadline = time.monotonic() + WAIT_FOR_PEERS_S
    while comm.get_attribute(Attribute.LOCAL_WORLD_SIZE) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} peers after {WAIT_FOR_PEERS_S:.0f} s")
        if comm.are_peers_pending():
            comm.update_topology()
        time.sleep(POLL_S)


class Launcher:
    """``with Launcher(master, timeout_s) as run:`` start peers with ``run.start``, read their events
    with ``run.follow()``. ``master`` None starts a master in this process on a free loopback port."""

    def __init__(self, master: str | None, timeout_s: float) -> None:
        self.master_node = None
        if master is None:
            import pccl
            self.master_node = pccl.MasterNode("127.0.0.1:0")
            self.master_node.run()
            master = f"127.0.0.1:{self.master_node.port}"
        self.master = master
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self._context = mp.get_context("spawn")
        self._events = self._context.Queue()
        self._processes: list[Any] = []

    def start(self, name: str, target: Callable[..., None], *args: Any) -> None:
        """Run ``target(events, *args)`` in a new process called ``name``."""
        process = self._context.Process(target=_child, name=name, daemon=True,
                                        args=(os.getpid(), target, self._events, args))
        process.start()
        self._processes.append(process)

    def follow(self) -> Iterator[dict[str, Any]]:
        """Yield the peers' events until every peer has exited cleanly.

        Raises PeerFailed when a peer fails, TimeoutError when the run outlives its timeout."""
        while True:
            # Exit codes taken before the read: whatever a process sent before it exited is read first.
            exit_codes = {p.name: p.exitcode for p in self._processes}
            try:
                event = self._events.get(timeout=POLL_S)
            except queue.Empty:
                failed = {name: code for name, code in exit_codes.items() if code not in (None, 0)}
                if failed:
                    raise PeerFailed(", ".join(f"{name} exited with status {code}" for name, code in failed.items()))
                if all(code == 0 for code in exit_codes.values()):
                    return
                if time.monotonic() > self.deadline:
                    raise TimeoutError(f"the run did not finish within {self.timeout_s:.0f} s")
                continue
            if event.get("kind") == "error":
                raise PeerFailed(f"{event['peer']} failed:\n{event['traceback']}")
            yield event

    def close(self) -> None:
        """Kill every peer still running and stop the master, if this process runs one."""
        for process in self._processes:
            if process.is_alive():
                process.kill()
        for process in self._processes:
            process.join(REAP_S)
        if self.master_node is not None:
            self.master_node.interrupt()

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_main(main: Callable[[], int]) -> NoReturn:
    """Exit with ``main()``'s status; Ctrl-C exits with 130, a failed or timed-out run with 1."""
    try:
        status = main()
    except KeyboardInterrupt:
        print("interrupted: every process this run started has been stopped", file=sys.stderr)
        status = 130
    except (PeerFailed, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        status = 1
    sys.exit(status)
