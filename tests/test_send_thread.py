"""Frames written on a thread of their own (PCCL_SEND_THREAD=on, the default where a process has 4 or
more cores; CI's 2 cores default to writing on the reactor): the scenarios whose send path differs,
cancelled sends, dead and stopped peers, concurrent ops sharing a connection, shared-state
transfers, run again with the writer thread, and a ring mixing both modes."""

from __future__ import annotations

from pathlib import Path

import pytest

import test_allreduce_matrix
import test_concurrency
import test_faults
import test_shared_state

WRITER_THREAD_NAME = "pccl-writer"
THREADED = {"PCCL_SEND_THREAD": "on"}


@pytest.fixture
def threaded_cluster(cluster):
    def make(**kwargs):
        return cluster(peer_env=THREADED, **kwargs)
    return make


def thread_names(pid: int) -> list[str]:
    names = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:
            pass  # the thread ended meanwhile
    return names


def test_mixed_ring_is_exact_and_each_peer_follows_pccl_send_thread(cluster):
    """World 3, pool 4, peers alternating writer thread on/off: every case right and bit-identical;
    the peers told 'on' write on a thread of their own, the one told 'off' has none."""
    c = cluster()
    modes = ["on", "off", "on"]
    peers = [c.peer("matrix", index=i, world=3, pool=4, env={"PCCL_SEND_THREAD": m}) for i, m in enumerate(modes)]
    for p in peers:  # every communicator exists once its peer reported a case
        p.wait_event(lambda e: "case" in e, timeout=120)
    for p, mode in zip(peers, modes):
        names = thread_names(p.popen.pid)
        assert (WRITER_THREAD_NAME in names) == (mode == "on"), (mode, sorted(set(names)))
    test_allreduce_matrix.check_matrix(peers, world=3)


def test_sigkill_mid_operation(threaded_cluster):
    test_faults.test_sigkill_mid_operation_survivors_fail_fast_then_retry(threaded_cluster)


def test_sigstop_peer_is_dropped_and_rejoins(threaded_cluster, tmp_path):
    test_faults.test_sigstop_peer_is_dropped_by_deadline_and_rejoins(threaded_cluster, tmp_path)


def test_many_ops_in_flight_share_a_pool_fairly(threaded_cluster):
    test_concurrency.test_many_ops_in_flight(threaded_cluster, pool=3)


def test_peer_death_fails_every_op_in_flight(threaded_cluster):
    test_concurrency.test_peer_death_fails_every_op_in_flight_then_retry_succeeds(threaded_cluster)


def test_late_joiner_catches_up_bit_for_bit(threaded_cluster):
    test_shared_state.test_late_joiner_catches_up_bit_for_bit(threaded_cluster)
