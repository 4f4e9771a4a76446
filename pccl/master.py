"""The master: a thin wrapper over ``pccl._core.MasterNode``, and the ``pccl-master`` command.

The master only orchestrates membership and votes; it never sees tensor data. ``run()`` returns at
once, the core serves on its own thread until ``interrupt()``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from pccl import _core
from pccl._errors import PCCLError
from pccl._types import peer_timeout_ms

_LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "WARN", "ERR", "FATAL", "NONE")


class MasterNode:
    """Serve peers at ``listen_address`` ("ip:port"; port 0 picks a free port, see ``.port``).

    ``peer_timeout_s`` (an extension) is how long a silent peer is tolerated before it is dropped;
    None takes the core's default (PCCL_PEER_TIMEOUT_MS, or 10 s).
    """

    def __init__(self, listen_address: str = "0.0.0.0:48148", *, peer_timeout_s: float | None = None) -> None:
        if not isinstance(listen_address, str):
            raise TypeError(f"listen_address must be a str like 'ip:port', not {type(listen_address).__name__}")
        self._core = _core.MasterNode(listen_address, peer_timeout_ms(peer_timeout_s))
        self.listen_address = listen_address
        self._running = False

    def run(self) -> None:
        """Bind and start serving on the core's thread; returns at once. A no-op when already running."""
        if self._running:
            return
        code, message = self._core.run()
        PCCLError.check(code, "run", message)
        self._running = True

    def interrupt(self) -> None:
        """Stop serving (peers see the master go away). Idempotent."""
        self._running = False
        self._core.interrupt()

    @property
    def port(self) -> int:
        """The port actually listened on (useful with port 0), once running."""
        return int(self._core.port)

    def __enter__(self) -> MasterNode:
        """Start serving (if not yet) for the ``with`` block; leaving it interrupts."""
        self.run()
        return self

    def __exit__(self, *exc: object) -> None:
        self.interrupt()

    def __del__(self) -> None:
        # interrupt() only signals the loop thread and joins it, which is quick; never raise here.
        try:
            if getattr(self, "_running", False):
                self.interrupt()
        except Exception:  # noqa: BLE001
            pass

    def __repr__(self) -> str:
        return f"MasterNode(listen_address={self.listen_address!r}, running={self._running})"


def _host(listen_address: str) -> str:
    host, _, _ = listen_address.rpartition(":")
    return host or listen_address


def main(argv: Sequence[str] | None = None) -> int:
    """``pccl-master``: serve until SIGINT or SIGTERM, then stop cleanly and return 0."""
    parser = argparse.ArgumentParser(prog="pccl-master", description="Run a pccl master node.")
    parser.add_argument("--listen-address", default="0.0.0.0:48148", help="ip:port to listen on (default %(default)s)")
    parser.add_argument("--peer-timeout", type=float, default=None, metavar="SECONDS",
                        help="drop a peer silent for this long (default: PCCL_PEER_TIMEOUT_MS or 10 s)")
    parser.add_argument("--log-level", choices=_LOG_LEVELS, type=str.upper, default=None,
                        help="same as PCCL_LOG_LEVEL; set before the node is created, as the core reads "
                             "PCCL_LOG_LEVEL when it first logs (set the variable itself to be safe)")
    args = parser.parse_args(argv)
    if args.log_level is not None:
        os.environ["PCCL_LOG_LEVEL"] = args.log_level

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            master = MasterNode(args.listen_address, peer_timeout_s=args.peer_timeout)
            master.run()
        except (PCCLError, ValueError) as exc:
            print(f"pccl-master: error: {exc}", file=sys.stderr)
            return 1
        print(f"pccl master listening on {_host(args.listen_address)}:{master.port}", flush=True)
        while not stop.wait(0.5):  # a timed wait lets the signal handler run promptly
            pass
        master.interrupt()
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
