"""Traffic for tests/test_wan_emulator.py, run inside an emulated host (`ip netns exec NS python ...`).

Servers print READY once bound and a line of JSON when done; every command gives up after --timeout.

    echo-server PORT                      echo-client HOST PORT --count N   -> {"rtts": [s, ...]}
    tcp-sink PORT --conns K               tcp-source HOST PORT --conns K --bytes B (per connection)
                                          -> sink prints {"bytes": total, "seconds": first..last byte}
    udp-sink PORT --idle S                udp-source HOST PORT --count N --interval S
                                          -> sink prints {"received": n}
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time

CHUNK = 256 * 1024
CONNECT_RETRY_S = 0.05
UDP_PAYLOAD = 1000


def ready() -> None:
    print("READY", flush=True)


def connect(host: str, port: int, deadline: float) -> socket.socket:
    while True:  # the server may still be starting
        try:
            s = socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
            s.settimeout(max(0.1, deadline - time.monotonic()))
            return s
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(CONNECT_RETRY_S)


def listener(port: int, backlog: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(backlog)
    return s


def echo_server(args) -> None:
    with listener(args.port, 1) as s:
        ready()
        conn, _ = s.accept()
        with conn:
            while data := conn.recv(CHUNK):
                conn.sendall(data)


def echo_client(args, deadline: float) -> None:
    with connect(args.host, args.port, deadline) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(args.count):
            t0 = time.monotonic()
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise RuntimeError("echo server closed")
            rtts.append(time.monotonic() - t0)
    print(json.dumps({"rtts": rtts}))


def tcp_sink(args) -> None:
    times: list[float] = []
    totals: list[int] = []
    lock = threading.Lock()

    def drain(conn: socket.socket) -> None:
        n = 0
        with conn:
            while data := conn.recv(CHUNK):
                if n == 0:
                    with lock:
                        times.append(time.monotonic())
                n += len(data)
        with lock:
            times.append(time.monotonic())
            totals.append(n)

    with listener(args.port, args.conns) as s:
        ready()
        threads = []
        for _ in range(args.conns):
            conn, _ = s.accept()
            threads.append(threading.Thread(target=drain, args=(conn,), daemon=True))
            threads[-1].start()
        for t in threads:
            t.join()
    print(json.dumps({"bytes": sum(totals), "seconds": max(times) - min(times)}))


def tcp_source(args, deadline: float) -> None:
    payload = b"\0" * CHUNK

    def send() -> None:
        with connect(args.host, args.port, deadline) as s:
            left = args.bytes
            while left > 0:
                s.sendall(payload[: min(left, CHUNK)])
                left -= CHUNK

    threads = [threading.Thread(target=send) for _ in range(args.conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


FIRST_DATAGRAM_WAIT_S = 3.0


def udp_sink(args) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", args.port))
        ready()
        # The first datagram starts the count (the source starts after READY; none within
        # FIRST_DATAGRAM_WAIT_S: a cut link, zero received)...
        s.settimeout(max(args.idle, FIRST_DATAGRAM_WAIT_S))
        received = 0
        try:
            s.recv(UDP_PAYLOAD)
            received += 1
            s.settimeout(args.idle)  # ...and a pause of --idle ends it
            while True:
                s.recv(UDP_PAYLOAD)
                received += 1
        except socket.timeout:
            pass
    print(json.dumps({"received": received}))


def udp_source(args) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(args.count):
            s.sendto(i.to_bytes(4, "big") * (UDP_PAYLOAD // 4), (args.host, args.port))
            time.sleep(args.interval)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("host_or_port")
    parser.add_argument("port", nargs="?", type=int)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--bytes", type=int, default=1 << 20)
    parser.add_argument("--interval", type=float, default=0.001)
    parser.add_argument("--idle", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args()
    deadline = time.monotonic() + args.timeout
    # A hung peer must not hang the test: the whole process ends at --timeout.
    watchdog = threading.Timer(args.timeout, lambda: (print("TIMEOUT", file=sys.stderr, flush=True), os._exit(3)))
    watchdog.daemon = True
    watchdog.start()
    if args.port is None:
        args.port = int(args.host_or_port)
    else:
        args.host = args.host_or_port
    servers = {"echo-server": echo_server, "tcp-sink": tcp_sink, "udp-sink": udp_sink}
    clients = {"echo-client": echo_client, "tcp-source": tcp_source}
    if args.command in servers:
        servers[args.command](args)
    elif args.command in clients:
        clients[args.command](args, deadline)
    elif args.command == "udp-source":
        udp_source(args)
    else:
        parser.error(f"unknown command {args.command}")


if __name__ == "__main__":
    main()
