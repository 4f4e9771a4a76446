"""The README's "Filling long fat pipes" sweep: 3 peers across the WAN emulator (100 ms RTT, 1 Gbit/s,
0.01% loss, 100 Mbit/s per TCP flow), 256 MiB float32, pool sizes 1/4/16/32, one tensor and 64
tensors, fp32 and uint8 on the wire, and gloo in the same setup. Needs root (network namespaces).

    python benchmarks/wan_striping.py [extra examples/wan_bandwidth.py arguments, e.g. --reps 3]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "wan_bandwidth.py"
SETUP = ["--emulate", "rtt=100ms,rate=1gbit,loss=0.01%,flow=100mbit", "--world", "3", "--size", "256MiB",
         "--pools", "1", "4", "16", "32", "--tensors", "1", "64", "--quant", "none", "uint8", "--gloo", "--reps", "2"]

if __name__ == "__main__":
    sys.exit(subprocess.call([sys.executable, str(EXAMPLE), *SETUP, *sys.argv[1:]]))
