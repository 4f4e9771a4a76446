"""Real processes for the tests: a master (the CLI) and peers (tests/peer_main.py), on loopback.

Every process started here is tracked and killed at the end of the test, every wait is bounded, and
peers report what they did as JSON lines on stdout, which the test reads back.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

TESTS = Path(__file__).resolve().parent
PEER_MAIN = TESTS / "peer_main.py"
DEFAULT_WAIT_S = 60.0


def run_script(script: Path, *args: str, timeout_s: float, cwd: Path) -> str:
    """Run a Python script as a user would (its own process group, the suite's environment); fail
    the test on a timeout (killing the whole group) or a non-zero exit; return its stdout."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{script.name} did not finish in {timeout_s:g} s\nstdout:\n{out[-3000:]}\n"
                             f"stderr:\n{err[-3000:]}") from None
    assert proc.returncode == 0, \
        f"{script.name} exited with {proc.returncode}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    return out


class Proc:
    """A child process whose stdout JSON lines are collected by a reader thread."""

    def __init__(self, argv: list[str], name: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        full_env = dict(os.environ)
        full_env.setdefault("PCCL_LOG_LEVEL", "WARN")
        full_env["PYTHONUNBUFFERED"] = "1"
        if env:
            full_env.update(env)
        # Run from the tests folder so `import pccl` finds the installed package, not the source tree.
        # errors="replace": bytes that are not UTF-8 show as U+FFFD (a test can look for it) instead
        # of killing the reader thread.
        self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      errors="replace", env=full_env, cwd=TESTS, start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.stderr: list[str] = []
        self._events_lock = threading.Lock()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.raw.append(line)
            line = line.strip()
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                with self._events_lock:
                    self.events.append(event)
            self.lines.put(line)

    def _read_stderr(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.stderr.append(line)

    def wait_event(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = DEFAULT_WAIT_S,
                   start: int = 0) -> dict[str, Any]:
        """The first event (from index `start`) matching `predicate`; fails the test after `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._events_lock:
                for event in self.events[start:]:
                    if predicate(event):
                        return event
            if self.popen.poll() is not None:
                time.sleep(0.2)  # let the reader drain the last lines
                with self._events_lock:
                    for event in self.events[start:]:
                        if predicate(event):
                            return event
                raise AssertionError(f"{self.name} exited ({self.popen.returncode}) without the awaited event; "
                                     f"events={self.events[-5:]} stderr={''.join(self.stderr)[-3000:]}")
            time.sleep(0.02)
        raise AssertionError(f"{self.name}: timed out after {timeout}s; events={self.events[-5:]} "
                             f"stderr={''.join(self.stderr)[-3000:]}")

    def finish(self, timeout: float = DEFAULT_WAIT_S) -> list[dict[str, Any]]:
        """Wait for a clean exit and return all events."""
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not finish in {timeout}s; events={self.events[-5:]} "
                                 f"stderr={''.join(self.stderr)[-3000:]}")
        time.sleep(0.05)
        assert rc == 0, f"{self.name} exited with {rc}: {''.join(self.stderr)[-4000:]}"
        return list(self.events)

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def kill(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(10)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


class Cluster:
    """A master and its peers for one test; `with Cluster() as c:` kills everything on the way out."""

    def __init__(self, peer_timeout_s: float | None = None, listen: str = "127.0.0.1:0",
                 prefix: list[str] | None = None, status_port: int | None = None,
                 env: dict[str, str] | None = None, peer_env: dict[str, str] | None = None) -> None:
        self.procs: list[Proc] = []
        self.peer_env = dict(peer_env or {})  # for every peer, under each peer's own `env`
        self.prefix = list(prefix or [])  # e.g. ["ip", "netns", "exec", NAME]: run everything there
        argv = self.prefix + [sys.executable, "-m", "pccl.master", "--listen-address", listen]
        if peer_timeout_s is not None:
            argv += ["--peer-timeout", str(peer_timeout_s)]
        if status_port is not None:
            argv += ["--status-port", str(status_port)]
        self.master = self._track(Proc(argv, "master", env))
        self.port = self._read_port()
        host = listen.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"
        # With a status port: the page's port as the master printed it ("status on http://HOST:PORT/").
        self.status_port = (None if status_port is None
                            else self._read_line(r"^status on http://.*:(\d+)/$", "status port"))
        self.status_url = None if self.status_port is None else f"http://{host}:{self.status_port}"

    def _track(self, p: Proc) -> Proc:
        self.procs.append(p)
        return p

    def _read_port(self) -> int:
        return self._read_line(r"listening on .*:(\d+)\s*$", "port")

    def _read_line(self, pattern: str, what: str) -> int:
        """The number in the first line of the master's stdout matching `pattern` (a bounded wait)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                line = self.master.lines.get(timeout=0.5)
            except queue.Empty:
                if not self.master.alive:
                    raise AssertionError(f"master exited: {''.join(self.master.stderr)}")
                continue
            m = re.search(pattern, line)
            if m:
                return int(m.group(1))
        raise AssertionError(f"master did not report its {what}")

    def peer(self, scenario: str, name: str | None = None, env: dict[str, str] | None = None,
             program: Path = PEER_MAIN, prefix: list[str] | None = None, **args: Any) -> Proc:
        """A peer process; `prefix` (e.g. another namespace's `ip netns exec`) replaces the cluster's."""
        spec = {"scenario": scenario, "master": args.pop("master", self.address), **args}
        label = name or f"peer[{scenario}:{args.get('index', len(self.procs))}]"
        prefix = self.prefix if prefix is None else prefix
        return self._track(Proc(prefix + [sys.executable, str(program), json.dumps(spec)], label,
                                {**self.peer_env, **(env or {})}))

    def master_alive(self) -> bool:
        return self.master.alive

    def close(self) -> None:
        for p in reversed(self.procs):
            p.kill()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
