"""Calibrates the WAN emulator (pccl.testing.wan) with iperf3 between two emulated hosts.

Every case gets a fresh emulator (empty queues, fresh RNG); iperf3's server runs in host 1, its client
in host 0, for --omit + --duration seconds (plus a second of tail). Per case:
  link Gbit/s     IP bytes the delay line delivered in the data direction(s) from second --omit to
                  --omit + --duration (its own counters, so slow start and iperf3's timing are out)
  iperf3 Gbit/s   iperf3's goodput over the whole run, slow start included
  retransmits     TCP retransmits (iperf3)
  delay line CPU  its CPU time in the measured window, as a share of one core; this includes the
                  receiving host's kernel TCP processing, which runs inside the delay line's write()
  machine busy    the whole machine's CPU use in that window (all cores; near 100%: CPU-bound)
  drops           the delay line's counters: random loss / bottleneck queue / per-flow queue
Needs root, iperf3 and the delay-line binary (`pip install .`, or PCCL_WAN_DELAY_LINE).

    PYTHONPATH=. python benchmarks/wan_calibrate.py [--cc cubic bbr] [--duration 10] [--omit 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pccl.testing.wan import WanEmulator, emulator_available  # noqa: E402

WAN = "rtt=100ms,rate=1gbit,loss=0.01%"
# (label, link spec, parallel streams, both directions at once)
CASES = [
    ("1 Gbit/s, no flow cap", WAN, 1, False),
    ("1 Gbit/s, flow cap 100 Mbit/s", WAN + ",flow=100mbit", 1, False),
    ("1 Gbit/s, flow cap 100 Mbit/s", WAN + ",flow=100mbit", 4, False),
    ("1 Gbit/s, flow cap 100 Mbit/s", WAN + ",flow=100mbit", 16, False),
    ("1 Gbit/s each way, no loss, both ways", "rtt=100ms,rate=1gbit", 4, True),
    ("unlimited rate, rtt 100 ms, no loss", "rtt=100ms", 4, False),
    ("unlimited rate, no delay", "", 1, False),
]
SERVER_START_S = 0.5
TAIL_S = 1  # iperf3 runs this much past the measured window, so the window never sees it stop
IPERF_GRACE_S = 30  # connection set-up over a 100 ms RTT, slow exits
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all cores."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values) - idle) / CLOCK_TICKS, sum(values) / CLOCK_TICKS


def snapshot(wan: WanEmulator) -> dict:
    stats = wan.stats()
    return {"t": time.monotonic(), "cpu": cpu_seconds(wan.pid), "machine": machine_busy_seconds(), "stats": stats}


def data_bytes(stats: dict, bidir: bool) -> int:
    return sum(link["bytes"] for link in stats["links"] if bidir or link["src"] == 0)


def drops(stats: dict) -> str:
    totals = {k: sum(link[k] for link in stats["links"]) for k in ("lost", "queue_drops", "flow_drops")}
    return f"{totals['lost']}/{totals['queue_drops']}/{totals['flow_drops']}"


def run_case(spec: str, streams: int, bidir: bool, cc: str, duration: int, omit: int) -> dict:
    # iperf3 -C picks the congestion control per socket: a namespace's default may only be one of
    # net.ipv4.tcp_allowed_congestion_control, which often leaves cubic out.
    with WanEmulator(2, spec) as wan:
        server = subprocess.Popen(wan.exec_prefix(1) + ["iperf3", "-s", "-1"], stdout=subprocess.DEVNULL)
        client = None
        try:
            time.sleep(SERVER_START_S)
            argv = ["iperf3", "-c", wan.host_ip(1), "-t", str(omit + duration + TAIL_S), "-P", str(streams),
                    "-C", cc, "-J"] + (["--bidir"] if bidir else [])
            start = time.monotonic()
            client = subprocess.Popen(wan.exec_prefix(0) + argv, stdout=subprocess.PIPE, text=True)
            time.sleep(omit)
            a = snapshot(wan)
            time.sleep(max(0.0, start + omit + duration - time.monotonic()))
            b = snapshot(wan)
            out, _ = client.communicate(timeout=TAIL_S + IPERF_GRACE_S)
        finally:
            for p in (client, server):
                if p is not None:
                    p.kill()
                    p.wait()
    seconds = b["t"] - a["t"]
    end = json.loads(out)["end"]
    goodput = end["sum_received"]["bits_per_second"]
    retransmits = end["sum_sent"].get("retransmits", 0)
    if bidir:
        goodput += end["sum_received_bidir_reverse"]["bits_per_second"]
        retransmits += end["sum_sent_bidir_reverse"].get("retransmits", 0)
    (busy_a, total_a), (busy_b, total_b) = a["machine"], b["machine"]
    return {
        "link_gbps": (data_bytes(b["stats"], bidir) - data_bytes(a["stats"], bidir)) * 8 / seconds / 1e9,
        "iperf3_gbps": goodput / 1e9,
        "retransmits": retransmits,
        "delay_line_cpu": (b["cpu"] - a["cpu"]) / seconds,
        "machine_busy": (busy_b - busy_a) / (total_b - total_a),
        "drops": drops(b["stats"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cc", nargs="+", default=["cubic", "bbr"], help="TCP congestion controls to run")
    parser.add_argument("--duration", type=int, default=10, help="seconds measured per case")
    parser.add_argument("--omit", type=int, default=2, help="seconds of slow start left out per case")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    ok, reason = emulator_available()
    if not ok or shutil.which("iperf3") is None:
        print(f"cannot calibrate: {reason or 'iperf3 is not installed'}", file=sys.stderr)
        return 1
    print(f"{os.cpu_count()} CPUs, Linux {os.uname().release}, MTU 9000; measured from second {args.omit} "
          f"to {args.omit + args.duration}")
    print("| case | streams | cc | link Gbit/s | iperf3 Gbit/s | retransmits | delay line CPU (one core) "
          "| machine busy | lost/queue/flow drops |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for label, spec, streams, bidir in CASES:
        for cc in args.cc:
            r = run_case(spec, streams, bidir, cc, args.duration, args.omit)
            results.append({"case": label, "spec": spec, "streams": streams, "bidir": bidir, "cc": cc, **r})
            print(f"| {label} | {streams}{' each way' if bidir else ''} | {cc} | {r['link_gbps']:.3f} | "
                  f"{r['iperf3_gbps']:.3f} | {r['retransmits']} | {r['delay_line_cpu'] * 100:.0f}% | "
                  f"{r['machine_busy'] * 100:.0f}% | {r['drops']} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
