"""The examples in examples/ run end to end in their --smoke mode and report success.

Each runs as a subprocess that starts its own master and peers on loopback; a run that outlives its
timeout has its whole process group killed. The environment (PYTHONPATH included) is passed through
as the rest of the suite gets it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import run_script

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
TIMEOUT_S = 120


def run_example(script: str, *extra: str) -> str:
    """Run `examples/<script> --smoke`; fail on a timeout or a non-zero exit; return its stdout."""
    return run_script(EXAMPLES / script, "--smoke", *extra, timeout_s=TIMEOUT_S, cwd=REPO)


def assert_check_passed(out: str, words: str) -> None:
    """The example printed a "check: ..." line containing `words`, and it ends in "passed"."""
    lines = [line for line in out.splitlines() if line.startswith("check:") and words in line]
    assert lines, f"no check line with {words!r}:\n{out}"
    assert all(line.endswith(": passed") for line in lines), "\n".join(lines)


def test_hello_allreduce():
    pytest.importorskip("tqdm", reason="the examples need the examples extra")
    out = run_example("hello_allreduce.py")
    assert "every SUM gave 6 and every AVG 2: yes" in out, out


def test_diloco_digits():
    pytest.importorskip("torch", reason="the examples need the examples extra")
    pytest.importorskip("sklearn", reason="the examples need the examples extra")
    pytest.importorskip("tqdm", reason="the examples need the examples extra")
    out = run_example("diloco_digits.py")
    assert_check_passed(out, "outer state is identical on the 2 peer(s) here")
    assert_check_passed(out, "within 5% of data-parallel's")
    assert_check_passed(out, "fewer bytes, at least H=")


def test_async_diloco_lm():
    pytest.importorskip("torch", reason="the examples need the examples extra")
    pytest.importorskip("tqdm", reason="the examples need the examples extra")
    out = run_example("async_diloco_lm.py")
    assert "greedy sample from peer" in out, out
    assert "outer state identical on the 2 peer(s) here" in out and out.rstrip().endswith(": yes"), out


def test_fsdp_diloco():
    pytest.importorskip("torch", reason="the examples need the examples extra")
    pytest.importorskip("tqdm", reason="the examples need the examples extra")
    pytest.importorskip("torch.distributed.fsdp", reason="needs torch.distributed")
    out = run_example("fsdp_diloco.py")
    assert_check_passed(out, "reaches FSDP's sharded parameters")
    assert_check_passed(out, "rank 0 (")
    assert_check_passed(out, "rank 1 (")
    assert "parity equal" in out, out


def test_wan_bandwidth(tmp_path):
    pytest.importorskip("tqdm", reason="the examples need the examples extra")
    pytest.importorskip("matplotlib", reason="the examples need the examples extra")
    from pccl.testing.wan import emulator_available
    available, why = emulator_available()
    if not available:
        pytest.skip(f"WAN emulator unavailable: {why}")
    plot = tmp_path / "wan.png"
    out = run_example("wan_bandwidth.py", "--gloo", "--plot", str(plot))
    assert_check_passed(out, "same bits")
    rows = [line.split() for line in out.splitlines() if line.startswith(("pccl ", "gloo "))]
    assert len(rows) == 2 * 2 * 2 + 2, out  # pools x tensors x wire formats, and gloo per layout
    assert plot.stat().st_size > 10_000
