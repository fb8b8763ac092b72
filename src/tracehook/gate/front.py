"""The gate's HTTP front: Nix's binary-cache protocol on a loopback socket.

A lean HTTP/1.1 server (GET and HEAD; anything else is 405) with keep-alive, since Nix
reuses connections; the routes are :mod:`tracehook.gate.routes`. Each answer is written
with one ``send``. Limits, all documented in docs/OPERATIONS.md:

- a request line over 8 KiB is 414, more than 64 headers 431, a request body 413;
- **the whole request head** (request line and headers) must arrive within
  ``header_timeout`` seconds of its first byte, however it trickles in (a watchdog shuts the
  socket down at the deadline);
- a kept-alive connection with no request for ``idle_timeout`` seconds is closed;
- a NAR stream waits at most ``header_timeout`` seconds for each write to a client that
  stopped reading (other answers are small enough to be written at once);
- at most ``max_connections`` connections: when a new one would exceed it, the connection
  that has waited longest without a request in progress is closed to make room (idle
  keep-alive connections first, then ones still sending their head), so a flood of slow
  or silent connections cannot keep a new client from an answer; only when every
  connection is being answered does a new one get 503 at once.

A bug in a handler answers 500 and is logged; it never answers 200.
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

from tracehook.errors import EnvironmentFault
from tracehook.gate.policywatch import PolicyWatch
from tracehook.gate.routes import Routes
from tracehook.gate.service import Answer, GateService, NarAnswer
from tracehook.gate.warmstart import WarmStart
from tracehook.stores.deadline import WATCHDOG

log = logging.getLogger(__name__)

MAX_REQUEST_LINE = 8192
MAX_HEADER_LINE = 8192
MAX_HEADERS = 64
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Content Too Large", 414: "URI Too Long", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


@dataclass(frozen=True)
class HttpLimits:
    header_timeout: float = 10.0  # seconds from a request's first byte to its last header
    idle_timeout: float = 60.0  # seconds a kept-alive connection may wait for a request
    max_connections: int = 512


@dataclass
class _Conn:
    sock: socket.socket
    state: str = "idle"  # idle, reading (the request head), serving
    since: float = 0.0


@dataclass(frozen=True)
class _Request:
    method: str
    target: str
    keep_alive: bool
    has_body: bool


class _Handler(socketserver.BaseRequestHandler):
    server: GateHTTPServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rfile: io.BufferedReader = sock.makefile("rb", buffering=65536)  # type: ignore[assignment]
        conn = self.server.enter(sock)
        limits = self.server.limits
        # The idle limit bounds the wait for a request, the watchdog the whole head, and a
        # NAR stream sets its own timeout. The idle limit is the kernel's (SO_RCVTIMEO,
        # SO_SNDTIMEO on a blocking socket), not Python's socket timeout: that one polls
        # before every recv and send, two more system calls a request, each giving up the
        # interpreter lock to another thread.
        _kernel_timeouts(sock, limits.idle_timeout)
        try:
            while True:
                self.server.mark(conn, "idle")
                try:
                    if not rfile.peek(1):
                        return  # the client closed the connection
                except OSError:
                    return  # idle too long, evicted, or reset
                self.server.mark(conn, "reading")
                try:
                    with WATCHDOG.deadline(sock, limits.header_timeout):
                        request = _read_head(rfile)
                except OSError:
                    return  # too slow: the watchdog or the timeout cut it off
                self.server.mark(conn, "serving")
                if isinstance(request, Answer):
                    _send(sock, request, head=False, keep_alive=False)
                    return
                if not self._answer(sock, request):
                    return
        finally:
            self.server.leave(conn)
            rfile.close()

    def _answer(self, sock: socket.socket, req: _Request) -> bool:
        """Answer one request; False when the connection must close."""
        head = req.method == "HEAD"
        if req.method not in ("GET", "HEAD"):
            _send(sock, Answer(405, b"only GET and HEAD\n"), False, False,
                  b"Allow: GET, HEAD\r\n")
            return False
        if req.has_body:
            _send(sock, Answer(413, b"no request bodies\n"), head, False)
            return False
        try:
            result = self.server.routes.route(req.target)
        except Exception:  # a bug must not kill the connection thread or answer "yes"
            log.exception("internal error serving %r", req.target[:200])
            _send(sock, Answer(500, b"internal error\n"), head, False)
            return False
        if isinstance(result, NarAnswer):
            limits = self.server.limits
            sock.settimeout(limits.header_timeout)  # a client that stops reading a NAR
            try:
                return _stream(sock, result, head, req.keep_alive, req.target)
            finally:
                with contextlib.suppress(OSError):
                    _kernel_timeouts(sock, limits.idle_timeout)
        return _send(sock, result, head, req.keep_alive)


def _kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """Make ``sock`` blocking with a receive and a send timeout of ``seconds`` kept by the
    kernel: a read or write waiting longer fails (EAGAIN), and the connection closes."""
    sock.settimeout(None)
    whole = int(seconds)
    timeval = struct.pack("@ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _read_head(rfile: io.BufferedReader) -> _Request | Answer:
    """The request line and headers, or the error answer for a malformed head."""
    line = rfile.readline(MAX_REQUEST_LINE + 1)
    if len(line) > MAX_REQUEST_LINE:
        return Answer(414, b"request line too long\n")
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return Answer(400, b"bad request line\n")
    method, target, version = (p.decode("latin-1") for p in parts)
    headers: dict[bytes, bytes] = {}
    while True:
        raw = rfile.readline(MAX_HEADER_LINE + 1)
        if raw in (b"\r\n", b"\n"):
            break
        if not raw:
            raise OSError("connection closed in the request head")
        if len(raw) > MAX_HEADER_LINE or len(headers) >= MAX_HEADERS:
            return Answer(431, b"too many or too long headers\n")
        name, sep, value = raw.partition(b":")
        if not sep:
            return Answer(400, b"bad header line\n")
        headers[name.strip().lower()] = value.strip()
    connection = headers.get(b"connection", b"").lower()
    keep = (connection != b"close" if version == "HTTP/1.1" else connection == b"keep-alive")
    length = headers.get(b"content-length", b"0").strip()
    has_body = length not in (b"", b"0") or b"transfer-encoding" in headers
    return _Request(method, target, keep, has_body)


def _head(status: int, content_type: str, length: int | None, keep_alive: bool,
          extra: bytes = b"") -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n".encode(),
             b"Server: tracehook-gate\r\n", f"Content-Type: {content_type}\r\n".encode()]
    if length is not None:
        lines.append(f"Content-Length: {length}\r\n".encode())
    if not keep_alive:
        lines.append(b"Connection: close\r\n")
    return b"".join(lines) + extra + b"\r\n"


def _send(sock: socket.socket, answer: Answer, head: bool, keep_alive: bool,
          extra: bytes = b"") -> bool:
    data = _head(answer.status, answer.content_type, len(answer.body), keep_alive, extra)
    try:
        sock.sendall(data if head else data + answer.body)
    except OSError:
        return False
    return keep_alive


def _stream(sock: socket.socket, nar: NarAnswer, head: bool, keep_alive: bool,
            target: str) -> bool:
    body = nar.body
    keep = keep_alive and body.size is not None
    try:
        sock.sendall(_head(200, "application/x-nix-nar", body.size, keep))
        if head:
            return keep
        sent = 0
        for block in body.chunks():
            sock.sendall(block)
            sent += len(block)
        if body.size is not None and sent != body.size:
            log.warning("NAR %s: upstream sent %d of %d bytes", target, sent, body.size)
            return False
        return keep
    except EnvironmentFault as exc:
        log.warning("NAR %s: %s", target, exc.diagnostics())
        return False  # the client sees a short body and fails the hash
    except OSError:
        return False  # the client went away
    finally:
        body.close()


class GateHTTPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self, address: tuple[str, int], service: GateService, limits: HttpLimits | None = None
    ) -> None:
        self.service = service
        self.routes = Routes(service)
        self.policies: PolicyWatch | None = None  # set by build_server: SIGHUP reloads it
        self.warm: WarmStart | None = None  # set by build_server with a --cache-dir
        self.limits = limits or HttpLimits()
        self._conns: dict[int, _Conn] = {}
        self._lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_close(self) -> None:
        super().server_close()
        self.service.index.close()  # its background indexing

    # connections -----------------------------------------------------------------------

    def enter(self, sock: socket.socket) -> _Conn:
        conn = _Conn(sock, "idle", time.monotonic())
        with self._lock:
            self._conns[id(conn)] = conn
        return conn

    def leave(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.pop(id(conn), None)

    def mark(self, conn: _Conn, state: str) -> None:
        conn.state, conn.since = state, time.monotonic()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """At the cap: make room by closing the connection that has waited longest without
        a request in progress; 503 only when every connection is being answered."""
        with self._lock:
            if len(self._conns) < self.limits.max_connections:
                return True
            waiting = [c for c in self._conns.values() if c.state != "serving"]
            victim = min(waiting, key=lambda c: (c.state != "idle", c.since), default=None)
            if victim is not None:
                del self._conns[id(victim)]
        if victim is not None:
            with contextlib.suppress(OSError):
                victim.sock.shutdown(socket.SHUT_RDWR)
            return True
        with contextlib.suppress(OSError):
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                            b"Connection: close\r\n\r\n")
        return False

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


def serve_in_thread(server: GateHTTPServer) -> threading.Thread:
    """Start ``server.serve_forever`` in a daemon thread (tests, the bench)."""
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="tracehook-gate",
                              daemon=True)
    thread.start()
    return thread


def bound_port(server: GateHTTPServer) -> int:
    sock: socket.socket = server.socket
    return int(sock.getsockname()[1])
