"""The master: a thin wrapper over ``pccl._core.MasterNode``, and the ``pccl-master`` command.

The master only orchestrates membership and votes; it never sees tensor data. ``run()`` returns at
once, the core serves on its own thread until ``interrupt()``.

With a status port (``MasterNode(..., status_port=P)``, ``pccl-master --status-port P``) a read-only
status page is served over HTTP on the master's host: ``/`` (HTML, refreshes itself) and
``/status.json``. The JSON comes from the core (``_core.MasterNode.status_json``, which takes a
snapshot on the master's own thread and waits for it without the GIL); this module only serves it,
from a standard-library ``ThreadingHTTPServer`` on a daemon thread.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import urllib.parse
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, Callable

from pccl import _core
from pccl._errors import PCCLError
from pccl._types import peer_timeout_ms

_LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "WARN", "ERR", "FATAL", "NONE")


class MasterNode:
    """Serve peers at ``listen_address`` ("ip:port"; port 0 picks a free port, see ``.port``).

    ``peer_timeout_s`` (an extension) is how long a silent peer is tolerated before it is dropped;
    None takes the core's default (PCCL_PEER_TIMEOUT_MS, or 10 s).

    ``status_port`` (an extension): serve the read-only status page over HTTP on this port of the
    master's host (0 picks a free port, see ``.status_port``); None serves none.
    """

    def __init__(self, listen_address: str = "0.0.0.0:48148", *, peer_timeout_s: float | None = None,
                 status_port: int | None = None) -> None:
        if not isinstance(listen_address, str):
            raise TypeError(f"listen_address must be a str like 'ip:port', not {type(listen_address).__name__}")
        if status_port is not None and (isinstance(status_port, bool) or not isinstance(status_port, int)
                                        or not 0 <= status_port <= 65535):
            raise ValueError(f"status_port must be a port number (0-65535) or None, not {status_port!r}")
        self._core = _core.MasterNode(listen_address, peer_timeout_ms(peer_timeout_s))
        self.listen_address = listen_address
        self._requested_status_port = status_port
        self._status_server: _StatusServer | None = None
        self._status_thread: threading.Thread | None = None
        self._running = False

    def run(self) -> None:
        """Bind and start serving on the core's thread; returns at once. A no-op when already running.

        With a status port, the status page is bound too; if that fails (e.g. the port is taken), the
        master is stopped again and the OSError is raised.
        """
        if self._running:
            return
        code, message = self._core.run()
        PCCLError.check(code, "run", message)
        self._running = True
        if self._requested_status_port is not None:
            try:
                self._start_status_server(self._requested_status_port)
            except BaseException:
                self.interrupt()
                raise

    def interrupt(self) -> None:
        """Stop serving (peers see the master go away), the status page first. Idempotent."""
        self._running = False
        server, self._status_server = self._status_server, None
        thread, self._status_thread = self._status_thread, None
        if server is not None:
            def stop() -> None:
                server.shutdown()  # returns once serve_forever has; requests in progress finish on their own
                server.server_close()
            if threading.current_thread() is thread:  # e.g. __del__ run by the GC there: never wait on itself
                threading.Thread(target=stop, daemon=True).start()
            else:
                stop()
        self._core.interrupt()

    @property
    def port(self) -> int:
        """The port actually listened on (useful with port 0), once running."""
        return int(self._core.port)

    @property
    def status_port(self) -> int | None:
        """The port the status page is served on (useful with port 0), while it is; else None."""
        server = self._status_server
        return None if server is None else int(server.server_address[1])

    def status(self) -> dict[str, Any] | None:
        """The status page's content as a dict (what ``/status.json`` serves), or None when the master
        is not running or did not answer in time. Works with or without a status port."""
        raw = self._core.status_json()
        return None if raw is None else json.loads(raw)

    def _start_status_server(self, port: int) -> None:
        host = _host(self.listen_address).strip("[]")
        server = _StatusServer(host, port, self._core.status_json)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": _STATUS_POLL_S},
                                  name="pccl-master-status", daemon=True)
        thread.start()
        self._status_server, self._status_thread = server, thread

    def __enter__(self) -> MasterNode:
        """Start serving (if not yet) for the ``with`` block; leaving it interrupts."""
        self.run()
        return self

    def __exit__(self, *exc: object) -> None:
        self.interrupt()

    def __del__(self) -> None:
        # interrupt() only signals the loop thread and joins it, which is quick; never raise here.
        try:
            if getattr(self, "_running", False):
                self.interrupt()
        except Exception:  # noqa: BLE001
            pass

    def __repr__(self) -> str:
        return f"MasterNode(listen_address={self.listen_address!r}, running={self._running})"


def _host(listen_address: str) -> str:
    host, _, _ = listen_address.rpartition(":")
    return host or listen_address


# ------------------------------------------------------------------ the status page over HTTP

_STATUS_POLL_S = 0.1  # how often serve_forever looks for shutdown(): bounds how long interrupt() waits
_STATUS_PATHS = ("/", "/index.html", "/status.json")


class _StatusServer(ThreadingHTTPServer):
    """One thread per request (daemon threads), at most ``_core.STATUS_MAX_HTTP_CONNECTIONS`` at once;
    a connection over that bound is closed unanswered, so a flood cannot pile up threads."""

    daemon_threads = True

    def __init__(self, host: str, port: int, status_json: Callable[[], str | None]) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.status_json = status_json
        self._slots = threading.BoundedSemaphore(_core.STATUS_MAX_HTTP_CONNECTIONS)
        super().__init__((host, port), _StatusHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host up with getfqdn(), a DNS query that can stall for
        # seconds on a machine without DNS; the name is not needed here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts the request's thread
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up or stalls is routine here; anything else is a bug worth a traceback.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class _StatusHandler(BaseHTTPRequestHandler):
    """GET/HEAD ``/`` (HTML) and ``/status.json``; 404 for other paths, 405 for other methods, 400 for
    a malformed request (the base class), 503 when the master does not answer."""

    server: _StatusServer
    server_version = "pccl-master-status"
    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers in a thread
    # What a request that does not parse is taken to be: HTTP/1.0, so its 400 comes with a status
    # line and headers (the base class's HTTP/0.9 default answers with a bare HTML body).
    default_request_version = "HTTP/1.0"
    timeout = _core.STATUS_HTTP_TIMEOUT_MS / 1000.0  # the socket's timeout for reading and writing

    def do_GET(self) -> None:  # noqa: N802 (the base class's naming)
        self._serve(with_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(with_body=False)

    def __getattr__(self, name: str) -> Any:
        # Any other method (POST, PUT, ...): the base class would answer 501; this is a read-only page.
        if name.startswith("do_"):
            return self._method_not_allowed
        raise AttributeError(name)

    def _method_not_allowed(self) -> None:
        self._reply(405, "text/plain; charset=utf-8", b"read-only status page: GET or HEAD only\n", True,
                    extra={"Allow": "GET, HEAD"})

    def _serve(self, with_body: bool) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path not in _STATUS_PATHS:
            self._reply(404, "text/plain; charset=utf-8", b"not found: try / or /status.json\n", with_body)
            return
        raw = self.server.status_json()
        if raw is None:
            self._reply(503, "text/plain; charset=utf-8", b"the master is not answering (stopped or busy)\n",
                        with_body)
            return
        if path == "/status.json":
            self._reply(200, "application/json", raw.encode("utf-8"), with_body)
        else:
            self._reply(200, "text/html; charset=utf-8", render_status_html(json.loads(raw)).encode("utf-8"),
                        with_body)

    def _reply(self, code: int, content_type: str, body: bytes, with_body: bool,
               extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # quiet: the master's own log is the core's


def _ids(ids: list[int], total: int | None = None) -> str:
    text = ", ".join(str(i) for i in ids) or "-"
    if total is not None and total > len(ids):
        text += f" ... ({total} in all)"
    return text


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _peer_phase(p: dict[str, Any]) -> str:
    phase = [p["state"]]
    if p["voted_update_topology"]:
        phase.append("in update_topology vote")
    if p["voted_peers_pending"]:
        phase.append("in are_peers_pending vote")
    if p["in_sync"]:
        phase.append("in shared-state sync")
    if p["ops_in_flight"]:
        phase.append(f"{p['ops_in_flight']} op(s) in flight")
    return ", ".join(phase)


def render_status_html(s: dict[str, Any]) -> str:
    """The human-readable page for a status dict (every value escaped)."""
    c = s["counters"]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='2'>",
        "<title>pccl master</title><style>body{font-family:sans-serif;margin:1em}"
        "table{border-collapse:collapse;margin-bottom:1em}td,th{border:1px solid #bbb;padding:2px 8px;"
        "text-align:left}th{background:#eee}</style></head><body>",
        f"<h1>pccl master on port {int(s['port'])}</h1>",
        f"<p>world size {int(s['world_size'])} (accepted peers of every group), {int(s['peer_count'])} peers "
        f"registered, epoch {int(s['epoch'])}{' (topology round in progress)' if s['topology_round_active'] else ''}"
        f"{' (measuring bandwidth for optimize_topology)' if s.get('topology_optimizing') else ''}, "
        f"peer timeout {int(s['peer_timeout_ms'])} ms, up {float(s['uptime_s']):.0f} s, "
        f"protocol {int(s['protocol_version'])}</p>",
        "<h2>Groups</h2>",
        _table(["group", "world size", "ring order", "pending", "shared-state revision", "sync in progress"],
               [[g["group"], g["world_size"], _ids(g["ring"]), _ids(g["pending"]),
                 "-" if g["revision"] is None else g["revision"],
                 "-" if g["sync"] is None else
                 (f"uid {g['sync']['uid']}, revision {g['sync']['revision']}, waiting for receivers "
                  f"{_ids(g['sync']['receivers_pending'])}" if g["sync"]["planned"]
                  else f"voting: {_ids(g['sync']['voted'])} voted")]
                for g in s["groups"]]),
        "<h2>Peers</h2>",
        _table(["id", "group", "address", "ring index", "phase", "seconds since heard"],
               [[p["id"], p["group"], p["address"], "-" if p["ring_index"] < 0 else p["ring_index"], _peer_phase(p),
                 f"{p['seconds_since_heard']:.1f}"] for p in s["peers"]]),
        "<p>(list cut)</p>" if s["peers_truncated"] else "",
        f"<h2>Operations in flight ({int(s['ops_in_flight_total'])})</h2>",
        _table(["group", "tag", "uid", "state", "descriptor", "age (s)", "begun / participants", "waiting for"],
               [[o["group"], o["tag"], "-" if o["uid"] is None else o["uid"], o["state"], o["descriptor"],
                 f"{o['age_s']:.1f}",
                 _ids(o.get("participants", o.get("begun", [])), o.get("participants_total", o.get("begun_total"))),
                 _ids(o["waiting_for"], o["waiting_for_total"])] for o in s["ops_in_flight"]]),
        "<p>(list cut)</p>" if s["ops_truncated"] else "",
        "<h2>Counters</h2>",
        _table(["counter", "value"], [[k, v] for k, v in c.items()]),
    ]
    failure = s.get("last_op_failure")
    if failure:
        parts.append("<h2>Last failed operation</h2>")
        parts.append(_table(["group", "tag", "uid", "message", "seconds ago"],
                            [[failure["group"], failure["tag"], failure["uid"], failure["message"],
                              f"{failure['seconds_ago']:.1f}"]]))
    parts.append(f"<h2>Recently dropped peers (last {int(s['dropped_limit'])})</h2>")
    parts.append(_table(["id", "group", "address", "was", "cause", "reason", "seconds ago"],
                        [[d["id"], d["group"], d["address"], d["state"], d["cause"], d["reason"],
                          f"{d['seconds_ago']:.1f}"] for d in s["dropped"]]))
    parts.append("<h2>Measured links (optimize_topology)</h2>")
    parts.append(_table(["from host", "to host", "Mbit/s", "measured (s ago)"],
                        [[l["from"], l["to"], f"{l['bits_per_second'] / 1e6:.0f}", f"{l['age_s']:.0f}"]
                         for l in s.get("links", [])]))
    parts.append("<p><a href='/status.json'>status.json</a></p></body></html>")
    return "".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """``pccl-master``: serve until SIGINT or SIGTERM, then stop cleanly and return 0."""
    parser = argparse.ArgumentParser(prog="pccl-master", description="Run a pccl master node.")
    parser.add_argument("--listen-address", default="0.0.0.0:48148", help="ip:port to listen on (default %(default)s)")
    parser.add_argument("--peer-timeout", type=float, default=None, metavar="SECONDS",
                        help="drop a peer silent for this long (default: PCCL_PEER_TIMEOUT_MS or 10 s)")
    parser.add_argument("--status-port", type=int, default=None, metavar="PORT",
                        help="serve a read-only status page (HTML at /, JSON at /status.json) over HTTP on this "
                             "port of the listen address's host; 0 picks a free port (default: none)")
    parser.add_argument("--log-level", choices=_LOG_LEVELS, type=str.upper, default=None,
                        help="same as PCCL_LOG_LEVEL; set before the node is created, as the core reads "
                             "PCCL_LOG_LEVEL when it first logs (set the variable itself to be safe)")
    args = parser.parse_args(argv)
    if args.log_level is not None:
        os.environ["PCCL_LOG_LEVEL"] = args.log_level

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            master = MasterNode(args.listen_address, peer_timeout_s=args.peer_timeout, status_port=args.status_port)
            master.run()
        except (PCCLError, ValueError, OSError) as exc:
            print(f"pccl-master: error: {exc}", file=sys.stderr)
            return 1
        print(f"pccl master listening on {_host(args.listen_address)}:{master.port}", flush=True)
        if master.status_port is not None:
            print(f"status on http://{_host(args.listen_address)}:{master.status_port}/", flush=True)
        while not stop.wait(0.5):  # a timed wait lets the signal handler run promptly
            pass
        master.interrupt()
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
