"""The master command line: it serves, reports its port, and stops cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import signal
import time

import pytest

from harness import Cluster


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_master_stops_cleanly_on_signal(sig):
    c = Cluster()
    try:
        assert c.port > 0
        t0 = time.monotonic()
        c.master.signal(sig)
        rc = c.master.popen.wait(10)
        assert rc == 0, "".join(c.master.stderr)
        assert time.monotonic() - t0 < 3.0
    finally:
        c.close()


def test_in_process_master_api():
    import pccl
    master = pccl.MasterNode("127.0.0.1:0")
    master.run()
    try:
        assert master.port > 0
    finally:
        t0 = time.monotonic()
        master.interrupt()
        assert time.monotonic() - t0 < 2.0
    with pytest.raises(pccl.PCCLError):
        pccl.MasterNode("not-an-address").run()


def test_interrupt_and_run_from_many_threads_at_once():
    """interrupt() releases the GIL; several at once (and a run() among them) must not race on the
    serving thread (two joins of one thread abort the process)."""
    import threading

    import pccl
    master = pccl.MasterNode("127.0.0.1:0")
    for _ in range(20):
        master.run()
        threads = [threading.Thread(target=master.interrupt) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
            assert not t.is_alive()
    master.run()  # still usable
    assert master.port > 0
    master.interrupt()
