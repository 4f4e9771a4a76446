"""The benchmark scripts run: a short run of each one that has no test elsewhere, as a user would
start it. Figures are printed, never asserted; what is checked is that the run works and says what
it measured."""

from __future__ import annotations

import re
from pathlib import Path

from harness import run_script

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 180  # above the script's own bounds (start-up 120 s), so its message comes first


def run_benchmark(script: str, *args: str) -> str:
    return run_script(REPO / "benchmarks" / script, *args, timeout_s=TIMEOUT_S, cwd=REPO)


def test_failure_benchmark_measures_a_kill_and_the_retry():
    out = run_benchmark("failure.py", "--world", "3", "--size", "4MiB", "--trials", "1", "--modes", "kill",
                        "--placement", "in", "--no-gloo")
    print(out)
    assert re.search(r"pccl in place: the survivors' call (raised after median [\d.]+ ms|never raised) .*\(\d of 2 calls "
                     r"in 1 trial;", out)
    assert re.search(r"the smaller ring's sum arrived after median [\d.]+ ms .*; 0 gave up, 0 wrong", out)
    # A call that raised names the lost peer; one whose op the victim left before it was confirmed ran
    # on the smaller ring instead (both are right; which one depends on the kill's timing).
    assert "RANK_CONNECTION_LOST" in out or "did not fail: the victim was out" in out
