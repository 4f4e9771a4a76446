"""Buffers (torch CPU / CUDA tensors, bad buffers) and addresses (IPv6, host names)."""

from __future__ import annotations

import socket

import numpy as np
import pytest

import pccl


def _run_matrix(c, world=2, **kwargs):
    peers = [c.peer("matrix", index=i, world=world, **kwargs) for i in range(world)]
    results = [p.finish(timeout=300) for p in peers]
    cases = [[e for e in events if "case" in e] for events in results]
    assert cases[0], "no cases ran"
    for mine in cases:
        for e in mine:
            assert e["ok"], e
    for a, b in zip(cases[0], cases[1]):
        assert a["case"] == b["case"] and a["digest"] == b["digest"], (a, b)


def test_torch_cpu_tensors_every_dtype(cluster):
    pytest.importorskip("torch", reason="torch is an optional extra; CI installs it")
    _run_matrix(cluster(), backend="torch", counts=[0, 3, 1000, 65537], pool=2)


def test_cuda_tensors_are_staged(cluster):
    if not pccl.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    import torch
    c = cluster()
    peers = [c.peer("cuda", index=i, world=2) for i in range(2)]
    for p in peers:
        e = p.wait_event(lambda e: e.get("event") == "cuda", timeout=120)
        assert e["ok"], e


def test_ipv6_loopback(cluster):
    if not socket.has_ipv6:
        pytest.skip("this Python has no IPv6 support")
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    c = cluster(listen="[::1]:0")
    assert c.address.startswith("[::1]:")
    peers = [c.peer("loop", index=i, world=2, count=5000, ops=3) for i in range(2)]
    for p in peers:
        ops = [e for e in p.finish(timeout=60) if e.get("event") == "op"]
        assert len(ops) == 3 and all(e["value"] == 3.0 for e in ops)


def test_host_name_is_resolved(cluster):
    c = cluster()
    peers = [c.peer("loop", index=i, world=2, count=5000, ops=3, master=f"localhost:{c.port}") for i in range(2)]
    for p in peers:
        ops = [e for e in p.finish(timeout=60) if e.get("event") == "op"]
        assert len(ops) == 3 and all(e["value"] == 3.0 for e in ops)


def _read_only(n: int) -> np.ndarray:
    a = np.zeros(n, np.float32)
    a.setflags(write=False)
    return a


@pytest.mark.parametrize("make,needle", [
    (lambda: (np.zeros((4, 4), np.float32)[:, 1], np.zeros(4, np.float32)), "contiguous"),
    (lambda: (np.zeros(4, np.float32), np.zeros(4, np.float64)), "dtype"),
    (lambda: (np.zeros(4, np.float32), np.zeros(5, np.float32)), "size|elements|numel"),
    (lambda: (np.zeros(4, np.float32), _read_only(4)), "read-only|writeable|writable"),
])
def test_bad_buffers_raise_before_anything_is_sent(make, needle):
    send, recv = make()
    comm = pccl.Communicator("127.0.0.1:1")  # never connected: validation must come first
    with pytest.raises(ValueError, match=needle):
        comm.all_reduce(send, recv)


def test_bad_address_is_a_clear_error():
    comm = pccl.Communicator("no-port-here")
    with pytest.raises(pccl.PCCLError) as info:
        comm.connect(n_attempts=1)
    assert "host:port" in str(info.value)


def test_unreachable_master_is_reported_after_the_attempts():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    comm = pccl.Communicator(f"127.0.0.1:{port}")
    with pytest.raises(pccl.PCCLError) as info:
        comm.connect(n_attempts=2)
    assert info.value.result == pccl.Result.MASTER_CONNECTION_FAILED
    assert "2 attempts" in str(info.value)


def test_dual_stack_master_publishes_ipv4_peers_as_ipv4(cluster):
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::", 0))
    except OSError:
        pytest.skip("no IPv6 on this machine")
    c = cluster(listen="[::]:0")
    peers = [c.peer("loop", index=i, world=2, count=5000, ops=3, master=f"127.0.0.1:{c.port}") for i in range(2)]
    for p in peers:
        ops = [e for e in p.finish(timeout=60) if e.get("event") == "op"]
        assert len(ops) == 3 and all(e["value"] == 3.0 for e in ops)
