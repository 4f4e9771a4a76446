"""The churn engine: DiLoCo peers that are killed, frozen and replaced at random while they train,
and the checks that the run comes through it bit for bit.

``python -m stress.churn`` (the stress test) and ``python -m pccl.demo`` (the headline demo) both
drive a ``ChurnRun``: it starts a master (``python -m pccl.master``) and peer processes
(``python -m pccl._churn_peer``, which report JSON lines), and for the configured duration:

- SIGKILLs peers at random moments (also newcomers while they connect, wait for admission or join),
  right after they launched their pseudo-gradient reduce, between the contributor-count op and the
  pseudo-gradient op of a reduce, or a moment into a shared-state sync (the last three by ordering
  the peer to kill itself there);
- SIGSTOPs peers for longer than the master's peer timeout, then SIGCONTs them: they must notice
  they were dropped and rejoin;
- sometimes kills all peers but one ("solo"), whose loop must wait until newcomers arrive;
- starts new peers to replace the dead, keeping between 1 and ``peers`` alive.

It checks as it goes:

- **parity**: every report of an outer step (and every join at that step) carries the same digest
  of the shared state as the first report of that step; the run's state at a step never changes;
- **reports**: an applied step had a ring of at least 2, no more contributors than ring members,
  and every op of its reduce (the contributor count and each pseudo-gradient bucket) ran on a ring
  of the same size, i.e. on the same peers (membership only shrinks within a phase); a peer's outer
  step never goes backwards;
- **hangs**: a peer that is available (started, not stopped) goes no longer than ``hang_bound_s``
  without progress (connected, joined, or an outer step), counting only time during which at least
  two peers were available: one peer alone is meant to wait;
- **rejoins**: a SIGCONTed peer reconnects and reports an outer step within ``hang_bound_s``;
- **processes**: a peer exits only when the engine killed it or it killed itself on order; the
  master never exits, still admits a fresh peer at the end (as the only member: every dead peer
  was dropped) and shuts down cleanly on SIGTERM.

Every process the engine started is killed on the way out (``close``, also via ``with``), every
wait is bounded, and the peers' stderr (``PCCL_LOG_LEVEL``, INFO by default) plus every event go to
the log directory, which the CLI keeps when a check fails.
"""

from __future__ import annotations

import enum
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

# The master drops a peer silent this long; short, so SIGSTOPped peers are dropped quickly.
DEFAULT_PEER_TIMEOUT_S = 2.5
# A hang: an available peer without progress this long while at least two peers are available.
DEFAULT_HANG_BOUND_S = 15.0
# How long the master may take to print the address it listens on.
MASTER_START_TIMEOUT_S = 30.0
# The engine's loop wakes at least this often (event handling, timers, the progress clock).
LOOP_TICK_S = 0.05
# A SIGSTOP lasts this many peer timeouts (uniformly drawn), so the master always drops the peer.
STOP_MIN_TIMEOUTS = 1.5
STOP_MAX_TIMEOUTS = 3.0
# A peer ordered to die in a reduce or sync that does not get there this fast is killed from outside.
DEATH_ORDER_TIMEOUT_S = 15.0
# A replacement peer is started this long (uniformly drawn) after a peer is found missing.
REPLACE_MIN_DELAY_S = 0.5
REPLACE_MAX_DELAY_S = 4.0
# After a solo episode, newcomers are held back this long: the survivor must wait alone.
SOLO_HOLD_S = 5.0
# A step's line is printed once every keeper reported it, or at the latest this long after its first report.
STEP_SETTLE_S = 2.0
# Bounds of the end-of-run checks: reaping a killed process, the fresh-peer probe, master shutdown.
REAP_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 60.0
MASTER_EXIT_TIMEOUT_S = 10.0
# Characters of a process's stderr quoted in a failure report.
STDERR_TAIL_CHARS = 2000


class Disruption(enum.Enum):
    """What the chaos schedule can do to the run."""

    KILL = "kill"                      # SIGKILL a peer that holds the run's state, at a random moment
    KILL_NEWCOMER = "kill-newcomer"    # SIGKILL a peer connecting, waiting for admission or joining
    KILL_IN_REDUCE = "kill-in-reduce"  # the peer SIGKILLs itself right after launching its reduce
    KILL_BETWEEN_OPS = "kill-between"  # ... once its contributor count is reduced, before its pseudo-gradient
    KILL_IN_SYNC = "kill-in-sync"      # the peer SIGKILLs itself a moment into a shared-state sync
    STOP = "stop"                      # SIGSTOP beyond the peer timeout, then SIGCONT: must rejoin
    SOLO = "solo"                      # SIGKILL all peers but one, hold newcomers back a while


# The disruptions a peer carries out on itself, and the point it is told to die at (_churn_peer).
_DEATH_POINTS = {Disruption.KILL_IN_REDUCE: "reduce", Disruption.KILL_BETWEEN_OPS: "between",
                 Disruption.KILL_IN_SYNC: "sync"}
# Peers holding the run's state that a disruption needs: one must remain, and killing one of two
# between its ops leaves the other alone at its pseudo-gradient op, with nothing to mix up.
_KEEPERS_NEEDED = {Disruption.KILL: 2, Disruption.KILL_NEWCOMER: 1, Disruption.KILL_IN_REDUCE: 2,
                   Disruption.KILL_BETWEEN_OPS: 3, Disruption.KILL_IN_SYNC: 2, Disruption.STOP: 2, Disruption.SOLO: 2}


@dataclass(frozen=True)
class ChaosProfile:
    """How often disruptions come (seconds between two, uniformly drawn) and their relative weights.

    Every disruption of positive weight is done once before the weights apply, so a short run covers
    them all whatever the seed.
    """

    min_interval_s: float = 1.5
    max_interval_s: float = 4.0
    weights: tuple[tuple[Disruption, float], ...] = (
        (Disruption.KILL, 3.0), (Disruption.KILL_NEWCOMER, 1.0), (Disruption.KILL_IN_REDUCE, 2.0),
        (Disruption.KILL_BETWEEN_OPS, 1.0), (Disruption.KILL_IN_SYNC, 2.0), (Disruption.STOP, 2.0),
        (Disruption.SOLO, 0.3))


@dataclass(frozen=True)
class ChurnConfig:
    """One churn run: the population, the training each peer does, the chaos and the checks' bounds."""

    peers: int = 4
    duration_s: float = 60.0           # of chaos: counted from the first outer step (see ChurnRun.run)
    asynchronous: bool = False
    quantize: bool = False
    seed: int = 0
    peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S
    hang_bound_s: float = DEFAULT_HANG_BOUND_S
    inner_steps: int = 8
    inner_step_sleep_s: float = 0.02   # keeps 8 peers on 2 cores from starving each other
    hidden: int = 32
    outer_optimizer: str = "default"   # "default" (DiLoCo's default for the mode) or "sgd" (plain SGD 0.5): _churn_peer
    chaos: ChaosProfile = ChaosProfile()
    log_level: str = "INFO"            # PCCL_LOG_LEVEL of the master and the peers (their stderr files)
    log_dir: Path | None = None        # None: a fresh temporary directory

    def describe(self) -> str:
        return (f"{self.peers} peers for {self.duration_s:g} s, {'async' if self.asynchronous else 'sync'} DiLoCo, "
                f"{'uint8-quantized' if self.quantize else 'unquantized'}, seed {self.seed}, "
                f"peer timeout {self.peer_timeout_s:g} s")


@dataclass(frozen=True)
class StepSummary:
    """One outer step of the run, once settled: what its reports said."""

    step: int
    t: float            # seconds since the run started, at the step's first report
    world: int          # the largest ring that reduced the applied batch (0: nothing applied)
    loss: float         # validation loss of the shared parameters
    peers: int          # peers that reported this step (joins at it included)
    identical: int      # of which hold the step's reference digest


@dataclass(frozen=True)
class Action:
    """One thing the engine did to the run."""

    t: float
    kind: str           # a Disruption value, "start", "resume", or "kill" of a peer not reaching its order
    peer: str
    detail: str = ""


@dataclass
class ChurnResult:
    """Everything a run counted; ``ok`` when no check failed."""

    config: ChurnConfig
    log_dir: Path
    elapsed_s: float = 0.0
    outer_steps: int = 0
    step_reports: int = 0
    parity_checked_steps: int = 0
    parity_violations: list[str] = field(default_factory=list)
    report_violations: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    longest_stall_s: float = 0.0
    kills: Counter[str] = field(default_factory=Counter)
    unreached_death_orders: int = 0
    stops: int = 0
    rejoins: int = 0
    rejoin_failures: list[str] = field(default_factory=list)
    started: int = 0
    joins: int = 0
    solo_episodes: int = 0
    master_crashes: list[str] = field(default_factory=list)
    unexpected_exits: list[str] = field(default_factory=list)
    steps: list[StepSummary] = field(default_factory=list)
    population: list[tuple[float, int]] = field(default_factory=list)   # (t, peer processes alive)
    actions: list[Action] = field(default_factory=list)

    @property
    def violations(self) -> int:
        return (len(self.parity_violations) + len(self.report_violations) + len(self.hangs)
                + len(self.rejoin_failures) + len(self.master_crashes) + len(self.unexpected_exits))

    @property
    def ok(self) -> bool:
        return self.violations == 0

    def summary(self) -> str:
        """The run's figures, one per line, then every violation in full."""
        k = self.kills
        lines = [
            f"churn run: {self.config.describe()}; ran {self.elapsed_s:.0f} s",
            f"outer steps completed       {self.outer_steps}  ({self.step_reports} step reports, "
            f"{self.parity_checked_steps} steps compared across >= 2 peers)",
            f"peers killed                {sum(k.values())}  (random {k['random']}, newcomers {k['newcomer']}, "
            f"mid-reduce {k['reduce']}, "
            f"between ops {k['between']}, mid-sync {k['sync']}, solo {k['solo']}; death orders not reached "
            f"{self.unreached_death_orders})",
            f"peers stopped               {self.stops}  (rejoined {self.rejoins}, failed to rejoin "
            f"{len(self.rejoin_failures)})",
            f"peers joined                {self.joins}  (processes started {self.started}, solo episodes "
            f"{self.solo_episodes})",
            f"parity violations           {len(self.parity_violations)}",
            f"report violations           {len(self.report_violations)}",
            f"hangs                       {len(self.hangs)}  (an available peer without progress for more than "
            f"{self.config.hang_bound_s:g} s while >= 2 peers were available)",
            f"longest time without progress {self.longest_stall_s:.1f} s",
            f"master crashes              {len(self.master_crashes)}",
            f"unexpected peer exits       {len(self.unexpected_exits)}",
        ]
        for title, items in (("parity violation", self.parity_violations),
                             ("report violation", self.report_violations), ("hang", self.hangs),
                             ("rejoin failure", self.rejoin_failures), ("master crash", self.master_crashes),
                             ("unexpected exit", self.unexpected_exits)):
            lines += [f"  {title}: {item}" for item in items]
        lines.append("result: OK" if self.ok
                     else f"result: FAILED ({self.violations} violations; logs in {self.log_dir})")
        return "\n".join(lines)


def _child_env(log_level: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PCCL_LOG_LEVEL"] = log_level
    env["PYTHONUNBUFFERED"] = "1"
    return env


class _Child:
    """A process the engine started: stdout lines go to ``on_line`` (on a reader thread), stderr to
    ``<log_dir>/<name>.stderr``; ``close`` kills it."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str],
                 on_line: Callable[[str], None], with_stdin: bool = False) -> None:
        self.name = name
        self.stderr_path = log_dir / f"{name}.stderr"
        self._stderr = open(self.stderr_path, "w")
        self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE if with_stdin else subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env,
                                      start_new_session=True)
        self._reader = threading.Thread(target=self._read, args=(on_line,), name=f"read-{name}", daemon=True)
        self._reader.start()

    def _read(self, on_line: Callable[[str], None]) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            on_line(line)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            try:
                os.kill(self.popen.pid, sig)
            except ProcessLookupError:
                pass

    def reap(self, timeout: float = REAP_TIMEOUT_S) -> int | None:
        """Wait for the exit and for the last stdout lines to be handed on; the exit status, or None
        if still running after ``timeout``."""
        try:
            returncode = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._reader.join(REAP_TIMEOUT_S)  # the pipe is at EOF: the process is gone
        return returncode

    def stderr_tail(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")[-STDERR_TAIL_CHARS:]

    def close(self) -> None:
        """Kill (also when stopped) and reap; close the log file and pipes."""
        self.signal(signal.SIGKILL)
        self.reap()
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._stderr.close()


class _Peer:
    """A peer process and what the engine knows about it."""

    def __init__(self, child: _Child) -> None:
        self.child = child
        self.name = child.name
        self.started = False          # its imports are done (the "started" event)
        self.joined = False           # it holds the run's state
        self.last_step = -1
        self.stopped_until: float | None = None
        self.resumed_at: float | None = None     # SIGCONTed and not yet rejoined
        self.reconnected = False                 # a "connected" event since the SIGCONT
        self.death_order: str | None = None      # "reduce", "between" or "sync": ordered to die there
        self.death_ordered_at = 0.0
        self.died_on_order = False               # it reported "dying"
        self.killed = False                      # the engine SIGKILLed it
        self.gone = False                        # its exit was handled
        self.stall_s = 0.0                       # time without progress (while >= 2 available)
        self.hang_reported = False
        self.error = ""

    @property
    def alive(self) -> bool:
        return self.child.alive

    @property
    def available(self) -> bool:
        """Can make progress now: running, past its imports, not stopped."""
        return self.alive and self.started and self.stopped_until is None

    @property
    def keeper(self) -> bool:
        """Holds the run's state and will keep it: joined, running, not doomed, not rejoining."""
        return self.available and self.joined and self.death_order is None and self.resumed_at is None

    def progress(self) -> None:
        self.stall_s = 0.0
        self.hang_reported = False

    def order_death(self, point: str, now: float) -> None:
        assert self.child.popen.stdin is not None
        self.death_order, self.death_ordered_at = point, now
        try:
            self.child.popen.stdin.write(f"die {point}\n")
            self.child.popen.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died already; its exit is handled as any other

    def kill(self) -> None:
        """SIGKILL it, unless it exited already: an exit of its own must not pass for a kill."""
        if self.alive:
            self.killed = True
            self.child.signal(signal.SIGKILL)


class _StepRecord:
    """The reports of one outer step, held against the first digest reported for it."""

    def __init__(self, step: int, t: float, digest: str) -> None:
        self.step, self.t, self.digest = step, t, digest
        self.digests: dict[str, str] = {}
        self.world = 0
        self.loss = float("nan")
        self.reported = False   # an outer step report (not only joins) names this step

    def summary(self) -> StepSummary:
        identical = sum(d == self.digest for d in self.digests.values())
        return StepSummary(self.step, self.t, self.world, self.loss, len(self.digests), identical)


class ChaosSchedule:
    """Picks the next disruption among the feasible ones: first every enabled kind once (the feasible
    one needing the most keepers first, as it is the rarest to be feasible), then at random by weight."""

    def __init__(self, profile: ChaosProfile, rng: random.Random) -> None:
        self._profile, self._rng = profile, rng
        self._weights = {kind: w for kind, w in profile.weights if w > 0}
        self._untried = list(self._weights)

    def pick(self, feasible: set[Disruption]) -> Disruption | None:
        untried = [kind for kind in self._untried if kind in feasible]
        if untried:
            most = max(_KEEPERS_NEEDED[kind] for kind in untried)
            kind = self._rng.choice([kind for kind in untried if _KEEPERS_NEEDED[kind] == most])
            self._untried.remove(kind)
            return kind
        choices = [kind for kind in self._weights if kind in feasible]
        if not choices:
            return None
        return self._rng.choices(choices, [self._weights[kind] for kind in choices])[0]

    def interval(self) -> float:
        return self._rng.uniform(self._profile.min_interval_s, self._profile.max_interval_s)


class ChurnRun:
    """One churn run. ``with ChurnRun(config) as run: result = run.run()``; leaving the block kills
    every process it started."""

    def __init__(self, config: ChurnConfig, on_step: Callable[[StepSummary], None] | None = None,
                 on_action: Callable[[Action], None] | None = None) -> None:
        if config.peers < 2:
            raise ValueError(f"a churn run needs at least 2 peers, not {config.peers}")
        self.config = config
        self._on_step = on_step or (lambda summary: None)
        self._on_action = on_action or (lambda action: None)
        self._rng = random.Random(config.seed)
        self._chaos = ChaosSchedule(config.chaos, self._rng)
        log_dir = config.log_dir or Path(tempfile.mkdtemp(prefix="pccl-churn-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.result = ChurnResult(config, log_dir)
        self._env = _child_env(config.log_level)
        self._events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self._event_log: TextIO = open(log_dir / "events.jsonl", "w")
        self._master: _Child | None = None
        self._master_lines: queue.Queue[str] = queue.Queue()
        self._address = ""
        self._peers: dict[str, _Peer] = {}         # every peer ever started, by name (gone ones too)
        self._others: list[_Child] = []            # the end-of-run probe
        self._steps: dict[int, _StepRecord] = {}
        self._next_unsettled = 0
        self._replacements: list[float] = []       # when to start each replacement peer
        self._hold_until = 0.0                     # no newcomers before this (solo episodes)
        self._chaos_at: float | None = None        # the next disruption; None until the first outer step
        self._chaos_began: float | None = None     # the first outer step: the run's clock starts there
        self._t0 = time.monotonic()
        self._last_tick = self._t0

    # -- lifetime --------------------------------------------------------------------------------

    def __enter__(self) -> ChurnRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill every process this run started (peers, probe, master) and close the logs. Idempotent."""
        children = [p.child for p in self._live()] + self._others + ([self._master] if self._master else [])
        for child in children:
            child.close()
        if not self._event_log.closed:
            self._event_log.close()

    def run(self) -> ChurnResult:
        """Run for the configured duration, then stop the peers and check the master; the result.

        The duration counts from the first outer step, when the chaos begins: starting the master
        and the peers (torch imports) takes seconds on an idle machine and far longer on a loaded
        one, and a clock started before it left a short run on a busy machine with no disruption
        at all. A run whose ring never works ends the duration after its start.
        """
        self._t0 = self._last_tick = time.monotonic()
        self._start_master()
        for _ in range(self.config.peers):
            self._start_peer()
        while time.monotonic() < self._ends_at() and not self.result.master_crashes:
            self._handle_events(LOOP_TICK_S)
            now = time.monotonic()
            self._check_master(now)
            self._reap_exited()
            self._tick_progress(now)
            self._resume_stopped(now)
            self._enforce_death_orders(now)
            self._check_rejoins(now)
            self._replace_missing(now)
            self._settle_steps(now, final=False)
            if self._chaos_at is not None and now >= self._chaos_at:
                self._disrupt(now)
                self._chaos_at = now + self._chaos.interval()
        self._finish()
        return self.result

    # -- processes -------------------------------------------------------------------------------

    def _ends_at(self) -> float:
        return (self._t0 if self._chaos_began is None else self._chaos_began) + self.config.duration_s

    def _live(self) -> list[_Peer]:
        """Peers whose exit was not handled yet."""
        return [p for p in self._peers.values() if not p.gone]

    def _elapsed(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self._t0

    def _record(self, kind: str, peer: str, detail: str = "") -> None:
        action = Action(self._elapsed(), kind, peer, detail)
        self.result.actions.append(action)
        self._log_event("engine", {"event": "action", "kind": kind, "peer": peer, "detail": detail})
        self._on_action(action)

    def _log_event(self, source: str, event: dict[str, Any]) -> None:
        self._event_log.write(json.dumps({"source": source, "elapsed": round(self._elapsed(), 3), **event}) + "\n")

    def _start_master(self) -> None:
        argv = [sys.executable, "-m", "pccl.master", "--listen-address", "127.0.0.1:0",
                "--peer-timeout", str(self.config.peer_timeout_s)]
        self._master = _Child("master", argv, self.result.log_dir, self._env, self._master_lines.put)
        deadline = time.monotonic() + MASTER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self._master_lines.get(timeout=LOOP_TICK_S)
            except queue.Empty:
                if not self._master.alive:
                    break
                continue
            match = re.search(r"listening on (\S+:\d+)\s*$", line)
            if match:
                self._address = match.group(1)
                return
        raise RuntimeError(f"the master did not report its address in {MASTER_START_TIMEOUT_S:g} s: "
                           f"{self._master.stderr_tail()}")

    def _start_peer(self) -> None:
        name = f"peer{self.result.started:03d}"
        spec = {"master": self._address, "seed": self.config.seed * 100_000 + self.result.started,
                "inner_steps": self.config.inner_steps, "inner_step_sleep_s": self.config.inner_step_sleep_s,
                "hidden": self.config.hidden, "quantize": self.config.quantize,
                "asynchronous": self.config.asynchronous, "outer_optimizer": self.config.outer_optimizer}
        argv = [sys.executable, "-m", "pccl._churn_peer", json.dumps(spec)]
        child = _Child(name, argv, self.result.log_dir, self._env, lambda line: self._on_peer_line(name, line),
                       with_stdin=True)
        self._peers[name] = _Peer(child)
        self.result.started += 1
        self._record("start", name)
        self._note_population()

    def _on_peer_line(self, name: str, line: str) -> None:
        """Reader thread: queue the peer's JSON events for the engine's loop."""
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            event = {"event": "garbage", "line": line.rstrip()}
        self._events.put((name, event))

    def _note_population(self) -> None:
        self.result.population.append((self._elapsed(), len(self._live())))

    # -- events ----------------------------------------------------------------------------------

    def _handle_events(self, timeout: float) -> None:
        """Handle every queued event, waiting up to ``timeout`` for the first."""
        try:
            name, event = self._events.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self._handle_event(self._peers[name], event)
            try:
                name, event = self._events.get_nowait()
            except queue.Empty:
                return

    def _handle_event(self, peer: _Peer, event: dict[str, Any]) -> None:
        self._log_event(peer.name, event)
        kind = event.get("event")
        if kind == "started":
            peer.started = True
            peer.progress()
        elif kind == "connected":
            peer.progress()
            if peer.resumed_at is not None:
                peer.reconnected = True
        elif kind == "joined":
            peer.progress()
            if not peer.joined:
                self.result.joins += 1
            peer.joined = True
            self._check_step(peer, event["step"], event["digest"])
        elif kind == "outer":
            peer.progress()
            self._on_outer(peer, event)
        elif kind == "dying":
            peer.died_on_order = True
            self.result.kills[event["point"]] += 1
        elif kind in ("error", "garbage"):
            peer.error = event.get("error") or event.get("line", "")

    def _on_outer(self, peer: _Peer, event: dict[str, Any]) -> None:
        step, world, contributors = event["step"], event["world"], event["contributors"]
        self.result.step_reports += 1
        self.result.outer_steps = max(self.result.outer_steps, step)
        op_worlds = sorted(set(event["op_worlds"]))
        if event["applied"] and (world < 2 or contributors > world or contributors < 1 or len(op_worlds) != 1):
            self.result.report_violations.append(
                f"{peer.name} applied the step to {step} with world {world}, {contributors} contributors, "
                f"its reduce's ops on rings of {op_worlds} peers")
        record = self._check_step(peer, step, event["digest"])
        if event["applied"]:
            record.world = max(record.world, world)
        if not record.reported:
            record.reported, record.loss = True, event["loss"]
        if peer.resumed_at is not None and peer.reconnected:
            self.result.rejoins += 1
            peer.resumed_at = None
        if self._chaos_at is None:  # the ring works: let the chaos begin
            self._chaos_began = time.monotonic()
            self._chaos_at = self._chaos_began + self._chaos.interval()

    def _check_step(self, peer: _Peer, step: int, digest: str) -> _StepRecord:
        """Parity and monotony of one report; the step's record."""
        if step < peer.last_step:
            self.result.report_violations.append(f"{peer.name} went back from outer step {peer.last_step} to {step}")
        peer.last_step = max(peer.last_step, step)
        record = self._steps.get(step)
        if record is None:
            record = self._steps[step] = _StepRecord(step, self._elapsed(), digest)
        elif digest != record.digest:
            holders = sorted(name for name, d in record.digests.items() if d == record.digest)
            self.result.parity_violations.append(
                f"step {step}: {peer.name} holds {digest}, {', '.join(holders) or 'an earlier report'} "
                f"held {record.digest}")
        record.digests[peer.name] = digest
        return record

    def _settle_steps(self, now: float, final: bool) -> None:
        """Hand out summaries of the steps that outer reports named, in order, each once every keeper
        got past it (or it is old enough). Steps only joins named are checked for parity, not handed out."""
        keepers = [p for p in self._live() if p.keeper]
        latest = max(self._steps, default=-1)
        while self._next_unsettled <= latest:
            record = self._steps.get(self._next_unsettled)
            if record is None or not record.reported:
                if self._next_unsettled == latest and not final:
                    return  # its outer reports may be on their way
                self._next_unsettled += 1
                continue
            done = all(p.last_step >= record.step for p in keepers) or self._elapsed(now) - record.t >= STEP_SETTLE_S
            if not (done or final):
                return
            summary = record.summary()
            self.result.steps.append(summary)
            if summary.peers >= 2:
                self.result.parity_checked_steps += 1
            self._on_step(summary)
            self._next_unsettled += 1

    # -- timers ----------------------------------------------------------------------------------

    def _check_master(self, now: float) -> None:
        assert self._master is not None
        if not self._master.alive and not self.result.master_crashes:
            self.result.master_crashes.append(f"the master exited with {self._master.popen.returncode} "
                                              f"{self._elapsed(now):.1f} s into the run: {self._master.stderr_tail()}")

    def _reap_exited(self) -> None:
        """Account for every peer that exited: expected (killed, or died on order) or not."""
        exited = [p for p in self._live() if not p.alive]
        for peer in exited:
            peer.child.reap()
        self._handle_events(0)  # e.g. a "dying" line still in the pipe when the exit was noticed
        for peer in exited:
            peer.gone = True
            returncode = peer.child.popen.returncode
            expected = peer.killed or (peer.died_on_order and returncode == -signal.SIGKILL)
            if not expected:
                self.result.unexpected_exits.append(
                    f"{peer.name} exited with {returncode}: {peer.error or 'no error event'}; stderr: "
                    f"{peer.child.stderr_tail()}")
            peer.child.close()
        if exited:
            self._note_population()

    def _tick_progress(self, now: float) -> None:
        """Advance the no-progress clock of every available peer while at least two are available."""
        dt, self._last_tick = now - self._last_tick, now
        available = [p for p in self._live() if p.available]
        if len(available) < 2:
            return
        for peer in available:
            peer.stall_s += dt
            self.result.longest_stall_s = max(self.result.longest_stall_s, peer.stall_s)
            if peer.stall_s > self.config.hang_bound_s and not peer.hang_reported:
                peer.hang_reported = True
                self.result.hangs.append(f"{peer.name}: no progress for {peer.stall_s:.1f} s at "
                                         f"{self._elapsed(now):.1f} s (joined {peer.joined}, last outer step "
                                         f"{peer.last_step}, {len(available)} peers available)")

    def _resume_stopped(self, now: float) -> None:
        for peer in self._live():
            if peer.stopped_until is not None and now >= peer.stopped_until:
                peer.child.signal(signal.SIGCONT)
                peer.stopped_until = None
                peer.resumed_at, peer.reconnected = now, False
                peer.progress()  # its clock starts again from the SIGCONT
                self._record("resume", peer.name)

    def _enforce_death_orders(self, now: float) -> None:
        for peer in self._live():
            if (peer.death_order and not peer.died_on_order and not peer.killed
                    and now - peer.death_ordered_at > DEATH_ORDER_TIMEOUT_S):
                self.result.unreached_death_orders += 1
                self.result.kills["random"] += 1
                peer.kill()
                self._record("kill", peer.name, f"never reached its {peer.death_order}")

    def _check_rejoins(self, now: float) -> None:
        for peer in self._live():
            if peer.resumed_at is not None and now - peer.resumed_at > self.config.hang_bound_s:
                self.result.rejoin_failures.append(
                    f"{peer.name} did not {'report an outer step' if peer.reconnected else 'reconnect'} within "
                    f"{self.config.hang_bound_s:g} s of its SIGCONT")
                peer.resumed_at = None

    def _replace_missing(self, now: float) -> None:
        """Start replacements for missing peers, each after its own random delay, outside solo holds."""
        missing = self.config.peers - len(self._live()) - len(self._replacements)
        self._replacements += [now + self._rng.uniform(REPLACE_MIN_DELAY_S, REPLACE_MAX_DELAY_S)
                               for _ in range(missing)]
        if now < self._hold_until:
            return
        due = [t for t in self._replacements if t <= now]
        for t in due:
            self._replacements.remove(t)
            if len(self._live()) < self.config.peers:
                self._start_peer()

    # -- chaos -----------------------------------------------------------------------------------

    def _disrupt(self, now: float) -> None:
        live = self._live()
        keepers = [p for p in live if p.keeper]
        newcomers = [p for p in live if p.available and not p.joined and not p.killed]
        stopped = sum(p.stopped_until is not None for p in live)
        rejoining = sum(p.resumed_at is not None for p in live)
        feasible = {kind for kind, needed in _KEEPERS_NEEDED.items() if len(keepers) >= needed}
        if not newcomers:
            feasible.discard(Disruption.KILL_NEWCOMER)
        if stopped >= max(1, self.config.peers // 4):
            feasible.discard(Disruption.STOP)
        if stopped or rejoining:  # let every SIGSTOPped peer come back and rejoin before a solo
            feasible.discard(Disruption.SOLO)
        kind = self._chaos.pick(feasible)
        if kind in (Disruption.KILL, Disruption.KILL_NEWCOMER):
            victim = self._rng.choice(keepers if kind is Disruption.KILL else newcomers)
            victim.kill()
            self.result.kills["random" if kind is Disruption.KILL else "newcomer"] += 1
            self._record(kind.value, victim.name)
        elif kind in _DEATH_POINTS:
            victim = self._rng.choice(keepers)
            victim.order_death(_DEATH_POINTS[kind], now)
            self._record(kind.value, victim.name)
        elif kind is Disruption.STOP:
            victim = self._rng.choice(keepers)
            seconds = self.config.peer_timeout_s * self._rng.uniform(STOP_MIN_TIMEOUTS, STOP_MAX_TIMEOUTS)
            victim.child.signal(signal.SIGSTOP)
            victim.stopped_until = now + seconds
            self.result.stops += 1
            self._record(kind.value, victim.name, f"for {seconds:.1f} s")
        elif kind is Disruption.SOLO:
            survivor = self._rng.choice(keepers)
            for peer in live:
                if peer is not survivor and peer.alive and not peer.killed and not peer.died_on_order:
                    peer.kill()
                    self.result.kills["solo"] += 1
            self._hold_until = now + SOLO_HOLD_S
            self.result.solo_episodes += 1
            self._record(kind.value, survivor.name, f"the only survivor for at least {SOLO_HOLD_S:g} s")

    # -- the end ---------------------------------------------------------------------------------

    def _finish(self) -> None:
        """Kill the peers, hand out the last steps, then check that the master admits a fresh peer
        as its only member and shuts down cleanly."""
        live = self._live()
        for peer in live:
            peer.kill()
        for peer in live:
            if peer.child.reap() is None:
                self.result.unexpected_exits.append(f"{peer.name} survived SIGKILL for {REAP_TIMEOUT_S:g} s")
        self._check_master(time.monotonic())
        self._reap_exited()
        self._settle_steps(time.monotonic(), final=True)
        self.result.elapsed_s = self._elapsed()
        if self.result.master_crashes:
            return
        self._probe_master()
        assert self._master is not None
        self._master.signal(signal.SIGTERM)
        returncode = self._master.reap(MASTER_EXIT_TIMEOUT_S)
        if returncode != 0:
            self.result.master_crashes.append(f"the master did not shut down cleanly on SIGTERM (status {returncode}): "
                                              f"{self._master.stderr_tail()}")

    def _probe_master(self) -> None:
        lines: queue.Queue[str] = queue.Queue()
        argv = [sys.executable, "-m", "pccl._churn_peer", json.dumps({"probe": True, "master": self._address})]
        probe = _Child("probe", argv, self.result.log_dir, self._env, lines.put)
        self._others.append(probe)
        returncode = probe.reap(PROBE_TIMEOUT_S)
        reports = []
        while not lines.empty():
            try:
                reports.append(json.loads(lines.get_nowait()))
            except json.JSONDecodeError:
                continue
        connected = [e for e in reports if e.get("event") == "connected"]
        if returncode != 0 or not connected or connected[0].get("world") != 1:
            self.result.master_crashes.append(
                f"the master did not admit a fresh peer as its only member after the run (probe status "
                f"{returncode}, reports {reports}): {probe.stderr_tail()}")
