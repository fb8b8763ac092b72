"""The gate's HTTP front: Nix's binary-cache protocol on a loopback socket.

Routes (GET and HEAD; anything else is 405):

- ``/nix-cache-info``
- ``/<32 nix-base32>.narinfo``
- ``/realisations/sha256:<64 hex>!<output>.doi`` (Nix 2.4 to 2.34)
- ``/build-trace-v2/<drv base name>/<output>.doi`` (Nix 2.35)
- ``/nar/<file>``: streamed from the upstream in chunks, never buffered whole

Every other path is 404; a path that is malformed for its route, or that tries to escape
(``..``, ``//``, backslashes, control characters, percent-encoded slashes), is 400. Request
lines over 8 KiB (414), more than 64 headers (431), request bodies (413) and clients that
send their request too slowly (socket timeout) are dropped without reaching the service. A
bug in a handler answers 500 and is logged; it never answers 200.

The server is :class:`http.server.ThreadingHTTPServer` speaking HTTP/1.1 with keep-alive
(Nix reuses connections), with a cap on concurrent connections beyond which new ones get
503 at once.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import re
import socket
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tracehook.errors import ParseError, UpstreamFault
from tracehook.gate.decide import NAR_URL
from tracehook.gate.policywatch import PolicyWatch
from tracehook.gate.service import NOT_FOUND, Answer, GateService, NarAnswer
from tracehook.nix import realisation

log = logging.getLogger(__name__)

_NARINFO = re.compile(r"/([0-9abcdfghijklmnpqrsvwxyz]{32})\.narinfo")
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")
MAX_REQUEST_LINE = 8192
MAX_HEADERS = 64


@dataclass(frozen=True)
class HttpLimits:
    request_timeout: float = 30.0  # seconds a client may take to send one request
    max_connections: int = 512


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tracehook-gate"
    sys_version = ""
    server: GateHTTPServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.limits.request_timeout)
        # Headers and body are two writes: without this, Nagle's algorithm and the client's
        # delayed ACK hold every small answer back by about 40 ms on a kept-alive connection.
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # stdlib reads up to 64 KiB per request line and 100 headers; we allow less.
    def parse_request(self) -> bool:
        if not super().parse_request():  # reads the headers too: no reset on close
            return False
        raw: bytes = getattr(self, "raw_requestline", b"")
        if len(raw) > MAX_REQUEST_LINE:
            self.close_connection = True
            self.send_error(414)
            return False
        if len(self.headers) > MAX_HEADERS:
            self.close_connection = True
            self.send_error(431)
            return False
        return True

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _not_allowed(self) -> None:
        self.close_connection = True
        self._send(Answer(405, b"only GET and HEAD\n"), head=False, extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def _serve(self, head: bool) -> None:
        length = self.headers.get("Content-Length")
        if (length and length.strip() != "0") or self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._send(Answer(413, b"no request bodies\n"), head)
            return
        try:
            result = self.server.route(self.path)
        except Exception:  # a bug must not kill the connection thread or answer "yes"
            log.exception("internal error serving %r", self.path[:200])
            self.close_connection = True
            self._send(Answer(500, b"internal error\n"), head)
            return
        if isinstance(result, NarAnswer):
            self._stream(result, head)
        else:
            self._send(result, head)

    def _send(self, answer: Answer, head: bool, extra: dict[str, str] | None = None) -> None:
        try:
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if not head:
                self.wfile.write(answer.body)
        except OSError:
            self.close_connection = True

    def _stream(self, nar: NarAnswer, head: bool) -> None:
        body = nar.body
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/x-nix-nar")
            if body.size is not None:
                self.send_header("Content-Length", str(body.size))
            else:
                self.close_connection = True
                self.send_header("Connection", "close")
            self.end_headers()
            if head:
                return
            sent = 0
            for block in body.chunks():
                self.wfile.write(block)
                sent += len(block)
            if body.size is not None and sent != body.size:
                log.warning("NAR %s: upstream sent %d of %d bytes", self.path, sent, body.size)
                self.close_connection = True
        except UpstreamFault as exc:
            log.warning("NAR %s: %s", self.path, exc.diagnostics())
            self.close_connection = True  # the client sees a short body and fails the hash
        except OSError:
            self.close_connection = True  # the client went away
        finally:
            body.close()


class GateHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(
        self, address: tuple[str, int], service: GateService, limits: HttpLimits | None = None
    ) -> None:
        self.service = service
        self.policies: PolicyWatch | None = None  # set by build_server: SIGHUP reloads it
        self.limits = limits or HttpLimits()
        self._slots = threading.BoundedSemaphore(self.limits.max_connections)
        super().__init__(address, _Handler)

    # connection cap --------------------------------------------------------------------

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                b"Connection: close\r\n\r\n")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s ended with an error", client_address, exc_info=True)

    # routing ---------------------------------------------------------------------------

    def route(self, raw_path: str) -> Answer | NarAnswer:
        path = raw_path.split("?", 1)[0].split("#", 1)[0]
        if "%2f" in path.lower() or "%5c" in path.lower():
            return _bad("encoded slash")
        if "%" in path:
            try:
                path = urllib.parse.unquote(path, errors="strict")
            except UnicodeDecodeError:
                return _bad("percent-encoding that is not UTF-8")
        if (not path.startswith("/") or "//" in path or _BAD_CHARS.search(path)
                or any(part in (".", "..") for part in path.split("/"))):
            return _bad("malformed path")
        service = self.service
        if path == "/nix-cache-info":
            return service.cache_info()
        m = _NARINFO.fullmatch(path)
        if m:
            return service.narinfo(m.group(1))
        if path.endswith(".narinfo"):
            return _bad("a narinfo is /<32 nix-base32 characters>.narinfo")
        for prefix, handler in self._prefixed():
            if path.startswith(prefix):
                return handler(path[len(prefix):])
        return NOT_FOUND

    def _prefixed(self) -> tuple[tuple[str, Callable[[str], Answer | NarAnswer]], ...]:
        return (
            ("/realisations/", self._realisation_v1),
            ("/build-trace-v2/", self._realisation_v2),
            ("/nar/", self._nar),
        )

    def _realisation_v1(self, rest: str) -> Answer:
        if not rest.endswith(".doi"):
            return NOT_FOUND
        rid = rest[: -len(".doi")]
        try:
            realisation.parse_realisation_id(rid)
        except ParseError as exc:
            return _bad(exc.diagnostics())
        return self.service.realisation_v1(rid)

    def _realisation_v2(self, rest: str) -> Answer:
        drv_base, sep, file = rest.partition("/")
        if not sep or "/" in file or not file.endswith(".doi"):
            return _bad("expected /build-trace-v2/<drv>/<output>.doi")
        try:
            realisation.parse_build_trace_key(drv_base, file[: -len(".doi")])
        except ParseError as exc:
            return _bad(exc.diagnostics())
        return self.service.realisation_v2(drv_base, file[: -len(".doi")])

    def _nar(self, rest: str) -> Answer | NarAnswer:
        rel = "nar/" + rest
        if not NAR_URL.fullmatch(rel):
            return _bad("expected /nar/<nix-base32>.nar[.<compression>]")
        return self.service.nar(rel)


def _bad(why: str) -> Answer:
    return Answer(400, f"bad request: {why}\n".encode(), reason=why)


def serve_in_thread(server: GateHTTPServer) -> threading.Thread:
    """Start ``server.serve_forever`` in a daemon thread (tests, the bench)."""
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="tracehook-gate",
                              daemon=True)
    thread.start()
    return thread


def bound_port(server: GateHTTPServer) -> int:
    sock: socket.socket = server.socket
    return int(sock.getsockname()[1])
