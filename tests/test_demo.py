"""``python -m pccl.demo``: asynchronous DiLoCo on loopback with peers killed and started at random.
Run as a user would (a subprocess, bounded); every outer step's line must report parity OK, and the
plot must be a real PNG."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import pccl.demo

DEMO_SECONDS = 25
DEMO_PEERS = 3
# Startup (a master, 3 torch processes), the run, the end-of-run checks and the plot, on 2 busy cores.
DEMO_TIMEOUT_S = 180
MIN_STEP_LINES = 5
STEP_LINE = re.compile(r"^step +(\d+) +world (\d+) +loss (\S+) +parity (\w+) \((\d+)/(\d+) peers identical\)$")


def test_demo_trains_through_kills_with_parity_and_writes_a_png(tmp_path):
    pytest.importorskip("torch", reason="the demo's peers train with torch; CI installs it")
    image = pytest.importorskip("matplotlib.image", reason="the demo plots with matplotlib; CI installs it")
    plot = tmp_path / "x.png"
    proc = subprocess.run([sys.executable, "-m", "pccl.demo", "--duration", str(DEMO_SECONDS),
                           "--peers", str(DEMO_PEERS), "--plot", str(plot)],
                          cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    steps = [m for m in map(STEP_LINE.match, proc.stdout.splitlines()) if m]
    assert len(steps) >= MIN_STEP_LINES, "the demo must print a line per outer step"
    assert [int(m[1]) for m in steps] == sorted(int(m[1]) for m in steps), "steps are printed in order"
    for m in steps:
        assert m[4] == "OK" and m[5] == m[6], m[0]
        assert 0 <= int(m[2]) <= DEMO_PEERS and float(m[3]) >= 0.0, m[0]
    assert "MISMATCH" not in proc.stdout
    assert any(int(m[6]) >= 2 for m in steps), "parity must be compared across at least two peers"
    assert re.search(r"peers killed [1-9]", proc.stdout), "the demo must kill peers"

    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(plot)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100


def test_demo_names_the_extra_to_install_when_a_dependency_is_missing(monkeypatch, capsys):
    find_spec = pccl.demo.importlib.util.find_spec
    monkeypatch.setattr(pccl.demo.importlib.util, "find_spec",
                        lambda name, *args: None if name == "matplotlib" else find_spec(name, *args))
    assert pccl.demo.main([]) == pccl.demo.EXIT_MISSING_DEPENDENCY
    err = capsys.readouterr().err
    assert "matplotlib" in err and 'pip install ".[demo]"' in err
