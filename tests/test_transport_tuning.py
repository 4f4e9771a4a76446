"""Socket tuning of data connections that decides WAN speed: the TCP congestion control that a pool's
many flows use (PCCL_TCP_CONGESTION, default CUBIC: many BBR flows overrun a shared bottleneck),
and a clean fallback to the system's default when the algorithm cannot be used."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.skipif(shutil.which("ss") is None,
                                reason="needs ss (iproute2) to read a socket's congestion control")

KNOWN = ("cubic", "reno", "bbr", "bbr2", "bbr3", "htcp", "vegas", "westwood", "dctcp", "bic")


def data_sockets(pids: set[int], master_port: int) -> list[tuple[str, str]]:
    """(peer address, `ss -tmi` details) of every established TCP socket of `pids` not to or from
    the master."""
    out = subprocess.run(["ss", "-tmipH", "state", "established"], capture_output=True, text=True, timeout=10).stdout
    found = []
    lines = out.splitlines()
    for head, info in zip(lines, lines[1:]):
        pid = re.search(r"pid=(\d+)", head)
        if not pid or int(pid.group(1)) not in pids:
            continue
        local, peer = head.split()[2:4]
        if local.endswith(f":{master_port}") or peer.endswith(f":{master_port}"):
            continue
        found.append((peer, head + " " + info))
    return found


def algorithms_by_socket(pids: set[int], master_port: int) -> list[tuple[str, str]]:
    """(peer address, congestion control algorithm) of every data socket of `pids`."""
    return [(peer, next((w for w in info.split() if w in KNOWN), "?")) for peer, info in data_sockets(pids, master_port)]


def run_loop(c, tmp_path, env):
    stop = tmp_path / "stop"
    peers = [c.peer("loop", index=i, world=2, count=1 << 16, ops=10**6, max_seconds=60, stop_file=str(stop),
                    pool=2, pause=0.01, env=env) for i in range(2)]
    for p in peers:
        p.wait_event(lambda e: e.get("event") == "op" and e["n"] >= 3, timeout=30)
    return peers, stop


def test_data_connections_use_the_chosen_congestion_control(cluster, tmp_path):
    c = cluster()
    peers, stop = run_loop(c, tmp_path, {"PCCL_TCP_CONGESTION": "reno"})
    sockets = algorithms_by_socket({p.popen.pid for p in peers}, c.port)
    stop.touch()
    # Each peer opened a pool of 2 to the other and accepted the other's 2 (accepted sockets take
    # the listener's setting).
    assert len(sockets) >= 8, sockets
    assert {a for _, a in sockets} == {"reno"}, sockets
    for p in peers:
        p.finish(timeout=30)


def test_an_unusable_algorithm_falls_back_to_the_system_default_and_says_so(cluster, tmp_path):
    c = cluster()
    env = {"PCCL_TCP_CONGESTION": "no-such-algorithm"}  # the warning shows at the default level
    peers, stop = run_loop(c, tmp_path, env)
    system = open("/proc/sys/net/ipv4/tcp_congestion_control").read().strip()
    sockets = algorithms_by_socket({p.popen.pid for p in peers}, c.port)
    stop.touch()
    assert sockets and {a for _, a in sockets} == {system}, (system, sockets)
    for p in peers:
        p.finish(timeout=30)
        said = [line for line in p.stderr if "cannot use 'no-such-algorithm'" in line]
        assert len(said) == 1, "".join(p.stderr)[-2000:]


def test_fixed_socket_buffers_apply_to_every_data_socket(cluster, tmp_path):
    # PCCL_SOCKET_BUFFER_BYTES replaces autotuning (set before connect(), so the window scale the
    # handshake agrees on covers it); the kernel reports twice the value asked for.
    c = cluster()
    peers, stop = run_loop(c, tmp_path, {"PCCL_SOCKET_BUFFER_BYTES": str(3 << 20)})
    sockets = data_sockets({p.popen.pid for p in peers}, c.port)
    stop.touch()
    assert len(sockets) >= 8, sockets
    for _, info in sockets:
        rb, tb = (int(re.search(rf"\b{k}(\d+)", info).group(1)) for k in ("rb", "tb"))
        assert rb == tb == 6 << 20, info
    for p in peers:
        p.finish(timeout=30)
