"""A WAN between network namespaces on one Linux machine, for tests and benchmarks (needs root).

Each emulated host is a network namespace with a TUN device ``wan0`` holding ``10.77.0.<i+1>/24``;
the compiled delay line (``pccl-wan-delay-line``, csrc/wan/) reads what every host sends into its
TUN and writes it into the destination's TUN after the link's loss, per-flow cap, rate, queue and
delay. Only traffic between the namespaces of one emulator crosses it. Run a process on host i with
``emulator.exec_prefix(i) + argv``.

    with WanEmulator(3, "rtt=100ms,rate=1gbit,loss=0.01%,flow=100mbit") as wan:
        subprocess.run(wan.exec_prefix(0) + ["iperf3", "-c", wan.host_ip(1)])

Command line (the delay line keeps running in the background until ``down``)::

    python -m pccl.testing.wan up --hosts 3 --link "rtt=100ms,rate=1gbit" [--pair 0:1=rate=50mbit] [--name N]
    python -m pccl.testing.wan down --name N        (or --all)
"""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from pccl.testing.link_spec import LinkSpec

__all__ = ["LinkSpec", "WanEmulator", "emulator_available", "delay_line_path"]

NETNS_PREFIX = "pcclwan-"
TUN_NAME = "wan0"
SUBNET = "10.77.0"
STATE_DIR = Path("/run/pccl-wan")
BINARY_NAME = "pccl-wan-delay-line"
BINARY_ENV = "PCCL_WAN_DELAY_LINE"
DEFAULT_MTU = 9000
# Packets a host's TUN holds before the delay line reads them; beyond it the host's kernel drops,
# out of sight of the emulated link. Only a link without a rate limit gets there (the delay line's
# own speed is then the bottleneck); the kernel's 500 already overflowed at 3 Gbit/s.
TUN_TX_QUEUE_PACKETS = 5000
MAX_HOSTS = 254  # one /24
MAX_NAME_LEN = 24
# Emulated hosts get TCP buffers big enough to fill a long fat pipe (1 Gbit/s x 100 ms is 12.5 MB;
# the receiver's autotuning wants about twice the window). The kernel default caps sends at 4 MiB.
DEFAULT_TCP_BUFFER_BYTES = 64 * 1024 * 1024
READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
STATS_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 20.0
POLL_INTERVAL_S = 0.01
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def _installed_delay_line() -> Path | None:
    """The copy `pip install .` put into the installed distribution: a source checkout run in place
    (its root first on sys.path, as in the tests) has none next to this file."""
    from importlib.metadata import PackageNotFoundError, distribution
    try:
        files = distribution("pccl-ring").files or []
    except PackageNotFoundError:
        return None
    for f in files:
        if f.parts[:2] == ("pccl", "testing") and f.name == BINARY_NAME:
            return Path(f.locate())
    return None


def delay_line_path() -> Path:
    """The delay-line binary: ``$PCCL_WAN_DELAY_LINE``, the one next to this file, or the installed one."""
    override = os.environ.get(BINARY_ENV)
    if override:
        candidates = [Path(override)]
    else:
        candidates = [Path(__file__).with_name(BINARY_NAME)]
        installed = _installed_delay_line()
        if installed is not None:
            candidates.append(installed)
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    where = f"${BINARY_ENV}={override}" if override else " or ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"{BINARY_NAME} not found at {where}: `pip install .` builds it and installs it into "
        f"pccl/testing/ (or build the CMake target {BINARY_NAME} and set {BINARY_ENV})"
    )


def emulator_available() -> tuple[bool, str]:
    """Whether this machine can run a WanEmulator; if not, why (for pytest.skip)."""
    if not sys.platform.startswith("linux"):
        return False, "the WAN emulator needs Linux network namespaces"
    if os.geteuid() != 0:
        return False, "the WAN emulator needs root (network namespaces and TUN devices)"
    if shutil.which("ip") is None:
        return False, "the WAN emulator needs iproute2's `ip`"
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        return False, "the WAN emulator needs /dev/net/tun"
    try:
        delay_line_path()
    except FileNotFoundError as e:
        return False, str(e)
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if probe.returncode != 0:
        return False, f"`ip netns list` failed: {probe.stderr.strip()}"
    return True, ""


def _run(argv: list[str], input: str | None = None) -> None:
    r = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {(r.stderr or r.stdout).strip()}")


def _write_sysctls(exec_prefix: list[str], values: dict[str, str]) -> None:
    """Writes /proc/sys/<key> inside a namespace; one shell, values passed as arguments, not code."""
    pairs = [arg for key, value in values.items() for arg in (f"/proc/sys/{key}", value)]
    loop = 'while [ $# -gt 0 ]; do echo "$2" > "$1"; shift 2; done'
    _run(exec_prefix + ["sh", "-ec", loop, "sh", *pairs])


def _pid_is_delay_line(pid: int) -> bool:
    try:
        return BINARY_NAME in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def existing_netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def delete_netns(ns: str) -> None:
    """Kills what still runs inside (a test's leftover servers would keep it alive), then deletes it."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    for pid in pids.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "-n", ns, "link", "del", TUN_NAME], capture_output=True, timeout=COMMAND_TIMEOUT_S)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=COMMAND_TIMEOUT_S)


class WanEmulator:
    """``n_hosts`` namespaces joined by directed links: ``default`` for every pair, ``links`` per
    (src, dst) replacing it for that direction. ``congestion_control`` (e.g. "cubic") is set in every
    namespace; None keeps the kernel's default (a new namespace inherits the machine's)."""

    def __init__(
        self,
        n_hosts: int,
        default: LinkSpec | str = "",
        links: dict[tuple[int, int], LinkSpec | str] | None = None,
        name: str | None = None,
        mtu: int = DEFAULT_MTU,
        seed: int = 1,
        congestion_control: str | None = None,
        tcp_buffer_bytes: int | None = DEFAULT_TCP_BUFFER_BYTES,
    ):
        if not 2 <= n_hosts <= MAX_HOSTS:
            raise ValueError(f"n_hosts must be within [2, {MAX_HOSTS}]")
        self.name = name or secrets.token_hex(3)
        if len(self.name) > MAX_NAME_LEN or not _NAME_RE.match(self.name):
            raise ValueError(f"name must be lower-case letters, digits, '-' or '_', at most {MAX_NAME_LEN}")
        self.n_hosts = n_hosts
        self.default = LinkSpec.of(default)
        self.links = {}
        for (src, dst), spec in (links or {}).items():
            if not (0 <= src < n_hosts and 0 <= dst < n_hosts and src != dst):
                raise ValueError(f"link ({src}, {dst}) names no pair of hosts")
            self.links[(src, dst)] = LinkSpec.of(spec)
        self.mtu = mtu
        self.seed = seed
        self.congestion_control = congestion_control
        self.tcp_buffer_bytes = tcp_buffer_bytes
        self.final_stats: dict | None = None
        self._proc: subprocess.Popen | None = None
        self._pid: int | None = None
        self._created: list[str] = []
        self._log = STATE_DIR / f"{self.name}.log"
        self._cuts = STATE_DIR / f"{self.name}.cuts"

    # ---- addressing ----
    def netns(self, i: int) -> str:
        return f"{NETNS_PREFIX}{self.name}-h{i}"

    def host_ip(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.netns(i)]

    def spec(self, src: int, dst: int) -> LinkSpec:
        return self.links.get((src, dst), self.default)

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def log_path(self) -> Path:
        """The delay line's output: its READY line and STATS lines."""
        return self._log

    # ---- life cycle ----
    def __enter__(self) -> WanEmulator:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self, detach: bool = False) -> WanEmulator:
        """Creates the namespaces and starts the delay line; tears everything down if a step fails.
        ``detach``: the delay line outlives this process (the command line's ``up``)."""
        ok, reason = emulator_available()
        if not ok:
            raise RuntimeError(reason)
        if self._created:
            raise RuntimeError("already up")
        taken = {ns for ns in existing_netns() if ns.startswith(f"{NETNS_PREFIX}{self.name}-h")}
        if taken:
            raise RuntimeError(f"emulator name '{self.name}' is in use ({sorted(taken)[0]}); pick another or run down")
        if not detach:
            atexit.register(self.down)
        try:
            for i in range(self.n_hosts):
                self._create_host(i)
            self._start_delay_line(detach)
        except BaseException:
            self.down()
            raise
        return self

    def _create_host(self, i: int) -> None:
        ns = self.netns(i)
        _run(["ip", "netns", "add", ns])
        self._created.append(ns)
        # A connection must not start from the previous one's cached ssthresh and RTT.
        sysctls = {"net/ipv4/tcp_no_metrics_save": "1"}
        if Path("/proc/sys/net/ipv6").is_dir():  # IPv6 would only add neighbour discovery on the TUN
            sysctls.update({"net/ipv6/conf/all/disable_ipv6": "1", "net/ipv6/conf/default/disable_ipv6": "1"})
        if self.tcp_buffer_bytes:
            sysctls["net/ipv4/tcp_rmem"] = f"4096 131072 {self.tcp_buffer_bytes}"
            sysctls["net/ipv4/tcp_wmem"] = f"4096 16384 {self.tcp_buffer_bytes}"
        _write_sysctls(self.exec_prefix(i), sysctls)
        if self.congestion_control:
            self._set_congestion_control(i)
        batch = "\n".join(
            [
                "link set dev lo up",
                f"tuntap add dev {TUN_NAME} mode tun",
                f"link set dev {TUN_NAME} mtu {self.mtu} txqueuelen {TUN_TX_QUEUE_PACKETS} up",
                f"addr add {self.host_ip(i)}/24 dev {TUN_NAME}",
            ]
        )
        _run(["ip", "-n", ns, "-batch", "-"], input=batch + "\n")

    def _set_congestion_control(self, i: int) -> None:
        try:
            _write_sysctls(self.exec_prefix(i), {"net/ipv4/tcp_congestion_control": self.congestion_control})
        except RuntimeError:
            allowed = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control").read_text().strip()
            raise RuntimeError(
                f"cannot make '{self.congestion_control}' the default congestion control of a namespace: "
                f"there the kernel allows only net.ipv4.tcp_allowed_congestion_control ({allowed}); "
                f"a root process can still pick it per socket (TCP_CONGESTION, iperf3 -C)"
            ) from None

    def delay_line_argv(self, detach: bool = False) -> list[str]:
        argv = [str(delay_line_path()), "--mtu", str(self.mtu), "--seed", str(self.seed)]
        for i in range(self.n_hosts):
            argv += ["--host", f"{self.netns(i)},{TUN_NAME},{self.host_ip(i)}"]
        argv += ["--default-link", self.default.delay_line_arg(), "--cuts-file", str(self._cuts)]
        for (src, dst), spec in sorted(self.links.items()):
            argv += ["--link", f"{src}:{dst}:{spec.delay_line_arg()}"]
        if not detach:
            argv.append("--exit-with-parent")
        return argv

    def _start_delay_line(self, detach: bool) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        with open(self._log, "wb") as log:
            self._proc = subprocess.Popen(
                self.delay_line_argv(detach), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._pid = self._proc.pid
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._log_lines("READY"):
            if self._proc.poll() is not None:
                raise RuntimeError(f"{BINARY_NAME} exited with {self._proc.returncode}: {self._log_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{BINARY_NAME} not ready after {READY_TIMEOUT_S} s: {self._log_text()}")
            time.sleep(POLL_INTERVAL_S)

    def _log_text(self) -> str:
        try:
            return self._log.read_text(errors="replace").strip()
        except OSError:
            return ""

    def _log_lines(self, prefix: str) -> list[str]:
        """Complete lines only: a long STATS line may reach the file in several writes."""
        try:
            text = self._log.read_text(errors="replace")
        except OSError:
            return []
        complete = text[: text.rfind("\n") + 1]
        return [line for line in complete.splitlines() if line.startswith(prefix)]

    def stats(self) -> dict:
        """The delay line's counters now: per link forwarded / lost / queue_drops / flow_drops."""
        line = self._signal_and_await(signal.SIGUSR1, "STATS ", "report its stats")
        return json.loads(line[len("STATS ") :])

    def _signal_and_await(self, signo: int, prefix: str, what: str) -> str:
        """Signals the delay line and returns the next line it prints that starts with `prefix`."""
        if self._pid is None:
            raise RuntimeError("not up")
        before = len(self._log_lines(prefix))
        os.kill(self._pid, signo)
        deadline = time.monotonic() + STATS_TIMEOUT_S
        while len(lines := self._log_lines(prefix)) <= before:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{BINARY_NAME} did not {what}")
            time.sleep(POLL_INTERVAL_S)
        return lines[-1]

    def cut(self, pairs) -> None:
        """From now on every packet on these directed links (src, dst) is dropped, as by a cut
        cable that nobody reports: no RST, no ICMP. Replaces the previous set; ``heal()`` empties it.
        Returns once the delay line has it in force."""
        pairs = sorted({(int(s), int(d)) for s, d in pairs})
        for s, d in pairs:
            if not (0 <= s < self.n_hosts and 0 <= d < self.n_hosts) or s == d:
                raise ValueError(f"cut {s}:{d} names no pair of the {self.n_hosts} hosts")
        if self._pid is None:
            raise RuntimeError("not up")
        tmp = self._cuts.with_suffix(".tmp")
        tmp.write_text("".join(f"{s}:{d}\n" for s, d in pairs))
        tmp.replace(self._cuts)  # the delay line never reads half a file
        line = self._signal_and_await(signal.SIGUSR2, "CUTS ", "confirm the cuts")
        if line.startswith("CUTS error"):
            raise RuntimeError(f"{BINARY_NAME}: {line}")

    def heal(self) -> None:
        """Undoes every cut."""
        self.cut([])

    def _stop_delay_line(self) -> None:
        pid, self._pid = self._pid, None
        if pid is None:
            return
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        elif _pid_is_delay_line(pid):  # detached: not our child, and the pid may have been reused
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while _pid_is_delay_line(pid) and time.monotonic() < deadline:
                time.sleep(POLL_INTERVAL_S)
            if _pid_is_delay_line(pid):
                os.kill(pid, signal.SIGKILL)
        exits = [line for line in self._log_lines("STATS ") if '"when":"exit"' in line]
        if exits:  # none after a SIGKILL: then there are no final figures
            self.final_stats = json.loads(exits[-1][len("STATS ") :])

    def down(self) -> None:
        """Stops the delay line and deletes every namespace this emulator created. Idempotent."""
        atexit.unregister(self.down)
        try:
            self._stop_delay_line()
        finally:
            for ns in reversed(self._created):
                delete_netns(ns)
            self._created = []
            self._log.unlink(missing_ok=True)
            self._cuts.unlink(missing_ok=True)
            self._state_path().unlink(missing_ok=True)

    # ---- the command line's state file ----
    def _state_path(self) -> Path:
        return STATE_DIR / f"{self.name}.json"

    def save_state(self) -> Path:
        state = {
            "name": self.name,
            "pid": self._pid,
            "hosts": [{"netns": self.netns(i), "ip": self.host_ip(i)} for i in range(self.n_hosts)],
            "default": str(self.default),
            "links": {f"{s}:{d}": str(spec) for (s, d), spec in self.links.items()},
            "mtu": self.mtu,
        }
        self._state_path().write_text(json.dumps(state, indent=1))
        return self._state_path()

    @classmethod
    def from_state(cls, name: str) -> WanEmulator:
        state = json.loads((STATE_DIR / f"{name}.json").read_text())
        emu = cls(len(state["hosts"]), state["default"], name=state["name"], mtu=state["mtu"])
        emu.links = {tuple(map(int, k.split(":"))): LinkSpec.parse(v) for k, v in state["links"].items()}
        emu._pid = state["pid"]
        emu._created = [h["netns"] for h in state["hosts"]]
        return emu


if __name__ == "__main__":
    from pccl.testing.wan_cli import main

    sys.exit(main())
