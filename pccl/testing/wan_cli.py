"""``python -m pccl.testing.wan``: brings an emulated WAN up in the background and tears it down.

The delay line outlives the command; a state file per emulator under /run/pccl-wan/ lets ``down``
and ``stats`` find it again.
"""

from __future__ import annotations

import argparse
import json
import sys

from pccl.testing import wan
from pccl.testing.link_spec import LinkSpec
from pccl.testing.wan import DEFAULT_MTU, NETNS_PREFIX, STATE_DIR, WanEmulator, delete_netns, existing_netns


def _parse_pair(text: str) -> tuple[tuple[int, int], LinkSpec]:
    pair, sep, spec = text.partition("=")
    src, colon, dst = pair.partition(":")
    if not (sep and colon and src.isdigit() and dst.isdigit()):
        raise argparse.ArgumentTypeError(f"--pair wants SRC:DST=SPEC, got '{text}'")
    try:
        return (int(src), int(dst)), LinkSpec.parse(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _down_all() -> None:
    for state in sorted(STATE_DIR.glob("*.json")) if STATE_DIR.is_dir() else []:
        try:
            WanEmulator.from_state(state.stem).down()
        except (OSError, ValueError, KeyError) as e:
            print(f"{state}: {e}", file=sys.stderr)
            state.unlink(missing_ok=True)
    for ns in sorted(existing_netns()):
        if ns.startswith(NETNS_PREFIX):  # left over by an emulator that died without tearing down
            delete_netns(ns)
    for log in STATE_DIR.glob("*.log") if STATE_DIR.is_dir() else []:
        log.unlink(missing_ok=True)


def _parse_cut(text: str) -> tuple[int, int]:
    try:
        src, dst = text.split(":")
        return int(src), int(dst)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a cut is SRC:DST, got '{text}'") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pccl.testing.wan", description=wan.__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="create the namespaces and leave the delay line running")
    up.add_argument("--hosts", type=int, required=True)
    up.add_argument("--link", default="", help="every direction's spec, e.g. rtt=100ms,rate=1gbit,loss=0.01%%")
    up.add_argument("--pair", type=_parse_pair, action="append", default=[],
                    help="SRC:DST=SPEC: that direction's own spec, replacing --link (repeatable)")
    up.add_argument("--name", help="names the emulator (default: random); namespaces are pcclwan-NAME-h<i>")
    up.add_argument("--mtu", type=int, default=DEFAULT_MTU)
    up.add_argument("--seed", type=int, default=1)
    up.add_argument("--cc", help="TCP congestion control in every namespace (default: the machine's)")
    down = sub.add_parser("down", help="stop the delay line and delete the namespaces")
    which = down.add_mutually_exclusive_group(required=True)
    which.add_argument("--name")
    which.add_argument("--all", action="store_true", help="every emulator, and any leftover pcclwan-* namespace")
    stats = sub.add_parser("stats", help="print the delay line's counters")
    stats.add_argument("--name", required=True)
    cut = sub.add_parser("cut", help="drop every packet on these directed links from now on (no arguments: heal)")
    cut.add_argument("--name", required=True)
    cut.add_argument("pairs", nargs="*", type=_parse_cut, metavar="SRC:DST")
    args = parser.parse_args(argv)

    if args.command == "up":
        try:
            emu = WanEmulator(args.hosts, args.link, dict(args.pair), name=args.name, mtu=args.mtu, seed=args.seed,
                              congestion_control=args.cc)
            emu.up(detach=True)
        except (RuntimeError, ValueError, FileNotFoundError) as e:
            print(f"cannot bring the emulator up: {e}", file=sys.stderr)
            return 1
        emu.save_state()
        print(f"emulator {emu.name}: delay line pid {emu.pid}, log {emu.log_path}")
        for i in range(emu.n_hosts):
            print(f"  host {i}: netns {emu.netns(i)}  {emu.host_ip(i)}  (ip netns exec {emu.netns(i)} ...)")
        for src in range(emu.n_hosts):
            for dst in range(emu.n_hosts):
                if src != dst:
                    print(f"  {src} -> {dst}: {str(emu.spec(src, dst)) or 'no limits'}")
        print(f"tear down: python -m pccl.testing.wan down --name {emu.name}")
    elif args.command == "down" and args.all:
        _down_all()
    else:
        try:
            emu = WanEmulator.from_state(args.name)
        except FileNotFoundError:
            print(f"no emulator named '{args.name}' (state file {STATE_DIR / args.name}.json)", file=sys.stderr)
            return 1
        if args.command == "stats":
            print(json.dumps(emu.stats(), indent=1))
        elif args.command == "cut":
            try:
                emu.cut(args.pairs)
            except (RuntimeError, ValueError) as e:
                print(f"cannot cut: {e}", file=sys.stderr)
                return 1
            print(f"cut: {' '.join(f'{s}:{d}' for s, d in args.pairs) or 'none (healed)'}")
        else:
            emu.down()
    return 0
