"""The gate's HTTP front: Nix's binary-cache protocol on a loopback socket.

A lean HTTP/1.1 server (GET and HEAD; anything else is 405) with keep-alive, since Nix
reuses connections; the routes are :mod:`tracehook.gate.routes`.

One thread, the loop (:meth:`GateHTTPServer.serve_forever`), accepts, reads and writes
every connection without blocking, and answers a request itself when every upstream is a
``file://`` cache and the answer needs nothing still in progress (:mod:`tracehook.gate.nowait`:
a verdict decided, an answer in the memo, a file read). A request that would wait (a step
still being verified, another request computing the same answer, an index rescan, a NAR
scan, an upstream over the network) goes to a worker thread, which routes it again and
hands the answer back to the loop to write; a NAR is streamed by a worker. So a slow
verification or upstream holds its own request only, and the common answer costs no
hand-over of the interpreter between threads (a thread per connection, as before, spent
more in those hand-overs than in the answers). Limits, all documented in
docs/OPERATIONS.md:

- a request line over 8 KiB is 414, more than 64 headers 431, a request body 413;
- **the whole request head** (request line and headers) must arrive within
  ``header_timeout`` seconds of its first byte, however it trickles in, or the connection is
  closed;
- a kept-alive connection with no request for ``idle_timeout`` seconds is closed;
- an answer the client does not read for ``header_timeout`` seconds (for a NAR: each write)
  closes the connection;
- at most ``max_connections`` connections: when a new one would exceed it, the connection
  that has waited longest without a request in progress is closed to make room (idle
  keep-alive connections first, then ones still sending their head), so a flood of slow
  or silent connections cannot keep a new client from an answer; only when every
  connection is being answered does a new one get 503 at once.

A bug in a handler answers 500 and is logged; it never answers 200.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from tracehook.errors import EnvironmentFault
from tracehook.gate import nowait
from tracehook.gate.policywatch import PolicyWatch
from tracehook.gate.routes import Routes
from tracehook.gate.service import Answer, GateService, NarAnswer
from tracehook.gate.warmstart import WarmStart
from tracehook.stores.binarycache import FileUpstream

log = logging.getLogger(__name__)

MAX_REQUEST_LINE = 8192
MAX_HEADER_LINE = 8192
MAX_HEADERS = 64
SWEEP = 0.05  # seconds between two looks at the connections' deadlines
ACCEPT_PAUSE = 0.1  # seconds without accepting after accept failed (e.g. no descriptors)
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Content Too Large", 414: "URI Too Long", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
_INTERNAL = Answer(500, b"internal error\n")
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
         b"Connection: close\r\n\r\n")


@dataclass(frozen=True)
class HttpLimits:
    header_timeout: float = 10.0  # seconds from a request's first byte to its last header
    idle_timeout: float = 60.0  # seconds a kept-alive connection may wait for a request
    max_connections: int = 512


class _Request(NamedTuple):  # (a tuple: made for every request, three times as fast)
    method: str
    target: str
    keep_alive: bool
    has_body: bool


class _Conn:
    """One connection, as the loop sees it. ``state``: idle (waiting for a request), reading
    (its head), serving (a worker or the loop is answering), writing (the answer waits for
    the client to read it), closed."""

    __slots__ = ("buf", "events", "keep", "out", "since", "sock", "state")

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.state = "idle"
        self.since = now  # when it entered this state
        self.buf = bytearray()  # received, not yet a request
        self.out = memoryview(b"")  # answer bytes still to send
        self.keep = False  # keep the connection once ``out`` is sent
        self.events = 0  # what the selector watches it for


# A head as Nix's curl sends one: the request line, header lines that each end in CRLF and
# name a field before a colon, the empty line, all within the request line's limit (so no
# line is over its limit, and at most 64 of them); with none of the fields the head says
# something by (Connection, Content-Length, Transfer-Encoding) it is a request with no
# body, kept alive in HTTP/1.1 only.
_PLAIN_HEAD = re.compile(rb"(\S+) (\S+) (HTTP/1\.[01])\r\n((?:[^\r\n:]+:[^\r\n]*\r\n){0,%d})\r\n"
                         % MAX_HEADERS)


def parse_head(buf: bytes | bytearray) -> tuple[_Request | Answer, int] | None:
    """The request head at the start of ``buf`` and how many bytes it took, or the error
    answer for a malformed one; None while it is incomplete and within the limits.

    A plain head (:data:`_PLAIN_HEAD`, what Nix sends) is read by one match, about two
    thirds of the cost of reading it line by line (the HTTP loop reads one for every
    request: 3.5 against 5.4 us); every other head, and one that names a field looked at,
    is read line by line (:func:`_parse_lines`), which gives the same result for a plain
    one."""
    m = _PLAIN_HEAD.match(buf, 0, MAX_REQUEST_LINE)
    if m is not None:
        fields = m.group(4).lower()
        if (b"connection" not in fields and b"content-length" not in fields
                and b"transfer-encoding" not in fields):
            return (_Request(m.group(1).decode("latin-1"), m.group(2).decode("latin-1"),
                             m.group(3) == b"HTTP/1.1", False), m.end())
    return _parse_lines(buf)


def _parse_lines(buf: bytes | bytearray) -> tuple[_Request | Answer, int] | None:
    """:func:`parse_head` for any head, line by line."""
    end = buf.find(b"\n")
    if end < 0 or end + 1 > MAX_REQUEST_LINE:
        if end < 0 and len(buf) <= MAX_REQUEST_LINE:
            return None
        return Answer(414, b"request line too long\n"), len(buf) if end < 0 else end + 1
    parts = buf[:end + 1].split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return Answer(400, b"bad request line\n"), end + 1
    version = parts[2].decode("latin-1")
    # the header lines, up to the blank line that ends them (a line of "\r\n" or "\n")
    blank = buf.find(b"\n\r\n", end)
    bare = buf.find(b"\n\n", end, len(buf) if blank < 0 else blank + 2)
    if bare >= 0:
        blank = bare
    lines = (buf[end + 1:blank + 1] if blank >= 0 else buf[end + 1:]).split(b"\n")
    headers: dict[bytes, bytes] = {}
    pos = end + 1
    for line in lines[:-1]:  # (the last one is what follows the last newline)
        pos += len(line) + 1
        if len(line) >= MAX_HEADER_LINE or len(headers) >= MAX_HEADERS:
            return Answer(431, b"too many or too long headers\n"), pos
        name, sep, value = line.partition(b":")
        if not sep:
            return Answer(400, b"bad header line\n"), pos
        headers[bytes(name.strip().lower())] = bytes(value.strip())
    if blank < 0:  # incomplete
        if len(lines[-1]) > MAX_HEADER_LINE:
            return Answer(431, b"too many or too long headers\n"), len(buf)
        return None
    pos += 2 if buf[pos] == 0x0D else 1  # the blank line
    connection = headers.get(b"connection", b"").lower()
    keep = (connection != b"close" if version == "HTTP/1.1" else connection == b"keep-alive")
    length = headers.get(b"content-length", b"0").strip()
    has_body = length not in (b"", b"0") or b"transfer-encoding" in headers
    return _Request(parts[0].decode("latin-1"), parts[1].decode("latin-1"), keep, has_body), pos


def victim(conns: Iterable[_Conn]) -> _Conn | None:
    """The connection to close for a new one at the cap: the one waiting longest without a
    request in progress, idle ones first; None when every one is being answered."""
    waiting = [c for c in conns if c.state in ("idle", "reading")]
    return min(waiting, key=lambda c: (c.state != "idle", c.since), default=None)


def expired(conn: _Conn, limits: HttpLimits, now: float) -> bool:
    """Whether ``conn`` waited past its state's limit (a request being answered has none
    here: its verification has its own deadline)."""
    limit = {"idle": limits.idle_timeout, "reading": limits.header_timeout,
             "writing": limits.header_timeout}.get(conn.state)
    return limit is not None and now - conn.since > limit


def _head(status: int, content_type: str, length: int | None, keep_alive: bool,
          extra: bytes = b"") -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n".encode(),
             b"Server: tracehook-gate\r\n", f"Content-Type: {content_type}\r\n".encode()]
    if length is not None:
        lines.append(f"Content-Length: {length}\r\n".encode())
    if not keep_alive:
        lines.append(b"Connection: close\r\n")
    return b"".join(lines) + extra + b"\r\n"


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


class _Workers:
    """Daemon threads for requests that wait, started as needed, at most ``most``: each
    request gets one at once (a connection has one request in progress at a time, and there
    are at most as many connections). A stopping gate does not wait for them."""

    def __init__(self, most: int) -> None:
        self._most = most
        self._jobs: queue.SimpleQueue[tuple[Callable[..., None], tuple[object, ...]] | None] = (
            queue.SimpleQueue())
        self._lock = threading.Lock()
        self._idle = 0
        self._threads = 0

    def submit(self, job: Callable[..., None], *args: object) -> None:
        with self._lock:
            start = self._idle == 0 and self._threads < self._most
            if start:
                self._threads += 1
            elif self._idle:
                self._idle -= 1
        self._jobs.put((job, args))
        if start:
            threading.Thread(target=self._run, name="tracehook-front-worker",
                             daemon=True).start()

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, args = item
            job(*args)
            with self._lock:
                self._idle += 1

    def close(self) -> None:
        with self._lock:
            threads, self._threads = self._threads, 0
        for _ in range(threads):
            self._jobs.put(None)


class GateHTTPServer:
    """The listening socket and the loop; ``serve_forever``, ``shutdown`` and
    ``server_close`` as socketserver's servers have them."""

    def __init__(
        self, address: tuple[str, int], service: GateService, limits: HttpLimits | None = None
    ) -> None:
        self.service = service
        self.routes = Routes(service)
        self.policies: PolicyWatch | None = None  # set by build_server: SIGHUP reloads it
        self.warm: WarmStart | None = None  # set by build_server with a --cache-dir
        self.limits = limits or HttpLimits()
        # answers in the loop's own thread only when no upstream is read over the network
        self.inline = all(isinstance(u, FileUpstream) for u in service.upstreams)
        self.socket = socket.create_server(address, backlog=128)
        self.socket.setblocking(False)
        self.server_address: tuple[str, int] = self.socket.getsockname()[:2]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.socket, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._wake_r)
        self._conns: set[_Conn] = set()
        # from the workers: (connection, the answer to write or None when a NAR stream
        # wrote it, HEAD, keep the connection)
        self._done: deque[tuple[_Conn, Answer | None, bool, bool]] = deque()
        self._workers = _Workers(self.limits.max_connections)
        self._woken = False  # a worker has woken the loop since it last looked
        self._buffered: deque[_Conn] = deque()  # connections with a request received
        self._accept_at: float | None = None  # accepting again then, after a failure
        self._accept_failed = False
        self._stop = False
        self._stopped = threading.Event()
        self._stopped.set()

    # the loop -------------------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._stopped.clear()
        next_sweep = 0.0
        try:
            while not self._stop:
                wait = poll_interval
                if self._conns:
                    wait = max(0.0, min(wait, next_sweep - time.monotonic()))
                if self._accept_at is not None:
                    wait = max(0.0, min(wait, self._accept_at - time.monotonic()))
                for key, mask in self._selector.select(wait):
                    if key.data is None:
                        self._accept()
                    elif key.data is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                    else:
                        self._guarded(key.data, self._writable if mask & selectors.EVENT_WRITE
                                      else self._readable)
                self._woken = False  # (before looking: a later answer wakes it again)
                while self._done:
                    conn, result, head, keep = self._done.popleft()
                    self._guarded(conn, self._handed_back, result, head, keep)
                while self._buffered:
                    conn = self._buffered.popleft()
                    if conn.state == "reading":
                        self._guarded(conn, self._next_request)
                now = time.monotonic()
                if self._accept_at is not None and now >= self._accept_at:
                    self._accept_at = None
                    self._selector.register(self.socket, selectors.EVENT_READ, None)
                if now >= next_sweep:
                    for conn in [c for c in self._conns if expired(c, self.limits, now)]:
                        self._close(conn)
                    next_sweep = now + SWEEP
        finally:
            self._stop = False
            self._stopped.set()

    def _guarded(self, conn: _Conn, handle: Callable[..., None], *args: object) -> None:
        """A bug handling one connection closes it; the loop goes on serving the others."""
        try:
            handle(conn, *args)
        except Exception:
            log.exception("internal error on a connection; closing it")
            self._close(conn)

    def shutdown(self) -> None:
        """Stop :meth:`serve_forever` (from another thread) and wait until it has."""
        self._stop = True
        self._wake()
        self._stopped.wait()

    def server_close(self) -> None:
        self._workers.close()
        for conn in list(self._conns):
            self._close(conn)
        self._selector.close()
        for sock in (self.socket, self._wake_r, self._wake_w):
            sock.close()
        self.service.index.close()  # its background indexing

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (it is woken already) or closed
            self._wake_w.send(b"x")

    # connections ----------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors
                # The connection waits in the backlog: the listening socket stays readable,
                # so the loop looks away from it a while instead of failing again at once.
                if not self._accept_failed:  # once until it works again
                    log.warning("cannot accept connections (%s): trying again every %g s",
                                exc.strerror, ACCEPT_PAUSE)
                self._accept_failed = True
                self._selector.unregister(self.socket)
                self._accept_at = time.monotonic() + ACCEPT_PAUSE
                return
            if self._accept_failed:
                self._accept_failed = False
                log.info("accepting connections again")
            if len(self._conns) >= self.limits.max_connections:
                gone = victim(self._conns)
                if gone is None:
                    with contextlib.suppress(OSError):
                        sock.setblocking(False)
                        sock.send(_BUSY)
                    sock.close()
                    continue
                self._close(gone)
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, time.monotonic())
            self._conns.add(conn)
            self._watch(conn, selectors.EVENT_READ)

    def _watch(self, conn: _Conn, events: int) -> None:
        if events == conn.events:
            return
        if not conn.events:
            self._selector.register(conn.sock, events, conn)
        elif not events:
            self._selector.unregister(conn.sock)
        else:
            self._selector.modify(conn.sock, events, conn)
        conn.events = events

    def _close(self, conn: _Conn) -> None:
        if conn.state == "closed":
            return
        self._watch(conn, 0)
        conn.state = "closed"
        self._conns.discard(conn)
        with contextlib.suppress(OSError):
            conn.sock.close()

    def _readable(self, conn: _Conn) -> None:
        if conn.state not in ("idle", "reading"):
            return
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)  # the client closed the connection (or reset it)
            return
        if conn.state == "idle":
            conn.state, conn.since = "reading", time.monotonic()
        conn.buf += data
        if b"\n" not in data and len(conn.buf) - conn.buf.rfind(b"\n") - 1 <= MAX_HEADER_LINE:
            return  # no new line, and the one it adds to is not too long: nothing to look at
        self._next_request(conn)

    def _next_request(self, conn: _Conn) -> None:
        parsed = parse_head(conn.buf)
        if parsed is None:
            return
        request, used = parsed
        del conn.buf[:used]
        conn.state, conn.since = "serving", time.monotonic()
        if isinstance(request, Answer):
            self._answer(conn, request, head=False, keep=False)
        elif request.method not in ("GET", "HEAD"):
            self._answer(conn, Answer(405, b"only GET and HEAD\n"), False, False,
                         b"Allow: GET, HEAD\r\n")
        elif request.has_body:
            self._answer(conn, Answer(413, b"no request bodies\n"), request.method == "HEAD",
                         False)
        elif not self.inline:
            self._hand_over(conn, request, None)
        else:
            try:
                with nowait.no_waiting():
                    result = self._route(request.target)
            except nowait.WouldWait:
                self._hand_over(conn, request, None)
                return
            if isinstance(result, NarAnswer):
                self._hand_over(conn, request, result)
            else:
                self._answer(conn, result, request.method == "HEAD",
                             request.keep_alive and result is not _INTERNAL)

    def _route(self, target: str) -> Answer | NarAnswer:
        try:
            return self.routes.route(target)
        except Exception:  # a bug must not stop the loop or a worker, or answer "yes"
            log.exception("internal error serving %r", target[:200])
            return _INTERNAL

    def _answer(self, conn: _Conn, answer: Answer, head: bool, keep: bool,
                extra: bytes = b"") -> None:
        data = _head(answer.status, answer.content_type, len(answer.body), keep, extra)
        conn.out = memoryview(data if head else data + answer.body)
        conn.keep = keep
        conn.state, conn.since = "writing", time.monotonic()
        self._writable(conn)

    def _writable(self, conn: _Conn) -> None:
        if conn.state != "writing":
            return
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        now = time.monotonic()
        if sent < len(conn.out):
            conn.out = conn.out[sent:]
            if sent:
                conn.since = now  # (the limit is on a client that reads nothing)
            self._watch(conn, selectors.EVENT_WRITE)
            return
        conn.out = memoryview(b"")
        self._answered(conn, conn.keep, now)

    def _answered(self, conn: _Conn, keep: bool, now: float) -> None:
        if not keep:
            self._close(conn)
            return
        conn.state, conn.since = "idle", now
        self._watch(conn, selectors.EVENT_READ)
        if conn.buf:  # the client sent its next request already: the loop reads it next
            conn.state = "reading"
            self._buffered.append(conn)

    # the workers ----------------------------------------------------------------------

    def _hand_over(self, conn: _Conn, request: _Request, nar: NarAnswer | None) -> None:
        self._watch(conn, 0)  # (nothing more is read until it is answered)
        self._workers.submit(self._work, conn, request, nar)

    def _work(self, conn: _Conn, request: _Request, nar: NarAnswer | None) -> None:
        """In a worker: route the request, waiting as long as it takes (a NAR is streamed
        here), and hand the answer back to the loop."""
        head = request.method == "HEAD"
        item: tuple[_Conn, Answer | None, bool, bool]
        streaming = False
        try:
            result = nar or self._route(request.target)
            if isinstance(result, NarAnswer):
                streaming = True
                try:
                    conn.sock.settimeout(self.limits.header_timeout)  # a client that stops
                    keep = _stream(conn.sock, result, head, request.keep_alive, request.target)
                    conn.sock.setblocking(False)
                except OSError:
                    keep = False
                item = (conn, None, head, keep)
            else:
                item = (conn, result, head, request.keep_alive)
        except Exception:  # a bug: answered 500 (or, in a NAR stream, cut off) and closed
            log.exception("internal error serving %r", request.target[:200])
            item = (conn, None if streaming else _INTERNAL, head, False)
        self._done.append(item)
        if not self._woken:
            self._woken = True
            self._wake()

    def _handed_back(self, conn: _Conn, result: Answer | None, head: bool, keep: bool
                     ) -> None:
        if conn.state != "serving":
            return  # closed meanwhile (the gate is stopping)
        if result is None:  # a NAR stream, written by the worker
            self._answered(conn, keep, time.monotonic())
        else:
            self._answer(conn, result, head, keep and result is not _INTERNAL)


def serve_in_thread(server: GateHTTPServer) -> threading.Thread:
    """Start ``server.serve_forever`` in a daemon thread (tests, the bench)."""
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="tracehook-gate",
                              daemon=True)
    thread.start()
    return thread


def bound_port(server: GateHTTPServer) -> int:
    return server.server_address[1]
