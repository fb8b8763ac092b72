"""A real HTTP trace store on 127.0.0.1 for tests: laut's protocol with conditional PUTs.

``GET /traces/<key>`` answers the file with a strong ``ETag`` (404 when absent). ``PUT``
must be conditional: ``If-None-Match: *`` creates (412 if the file exists), ``If-Match:
<etag>`` replaces (412 if the file changed or is absent); an unconditional PUT gets 428.
Check and write happen under one lock, as a real server's would be atomic. Tests can make
it fail (``down``: every request 503), slow (``delay``), answer a bad body, or behave like
nginx WebDAV (``ignore_preconditions``: every PUT is applied, conditions or not). The
writers' precondition probe (``/traces/.tracehook-probe``) is served too, kept apart
(``probe_file``, ``probes``), not in ``files``, ``puts`` or ``conflicts``.

    with serve_traces() as server:
        store = open_store(server.url)
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_KEY = re.compile(r"/traces/([0-9a-df-np-sv-z]{32}|\.tracehook-probe)")
PROBE = ".tracehook-probe"


@dataclass
class TraceServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    down: bool = False
    delay: float = 0.0
    puts: int = 0
    conflicts: int = 0
    send_etag: bool = True
    ignore_preconditions: bool = False
    probes: int = 0
    probe_file: bytes | None = None
    requests: list[tuple[str, str]] = field(default_factory=list)
    hang: dict[str, threading.Event] = field(default_factory=dict)  # key -> answer when set


def etag_of(data: bytes) -> str:
    return '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        return

    def _reply(self, code: int, body: bytes = b"", etag: str | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        if etag is not None and self.server.state.send_etag:
            self.send_header("ETag", etag)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _key(self) -> str | None:
        state = self.server.state
        state.requests.append((self.command, self.path))
        if state.delay:
            time.sleep(state.delay)
        if state.down:
            self._reply(503, b"down for maintenance\n")
            return None
        m = _KEY.fullmatch(self.path)
        if m is None:
            self._reply(404)
            return None
        return m.group(1)

    def do_GET(self) -> None:
        key = self._key()
        if key is None:
            return
        state = self.server.state
        release = state.hang.get(key)
        if release is not None:
            release.wait(60)  # a store that does not answer this key (until released)
        with state.lock:
            data = state.probe_file if key == PROBE else state.files.get(key)
        if data is None:
            self._reply(404)
        else:
            self._reply(200, data, etag_of(data))

    def do_PUT(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        key = self._key()
        if key is None:
            return
        state = self.server.state
        if_none, if_match = self.headers.get("If-None-Match"), self.headers.get("If-Match")
        probe = key == PROBE
        with state.lock:
            current = state.probe_file if probe else state.files.get(key)
            if state.ignore_preconditions:
                ok = True
            elif if_none == "*":
                ok = current is None
            elif if_match is not None:
                ok = current is not None and etag_of(current) == if_match
            else:
                self._reply(428, b"conditional PUT required\n")
                return
            if probe:
                state.probes += 1
            if not ok:
                if not probe:
                    state.conflicts += 1
                self._reply(412)
                return
            if probe:
                state.probe_file = body
            else:
                state.files[key] = body
                state.puts += 1
        self._reply(201 if current is None else 204, etag=etag_of(body))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, state: TraceServerState) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state


@dataclass
class TraceServer:
    url: str
    state: TraceServerState

    def serve_copy(self, store: Path) -> None:
        """Serve (a copy of) every trace of the file trace store at ``store``."""
        for f in (store / "traces").iterdir():
            self.state.files[f.name] = f.read_bytes()

    def stand_in(self, store: Path, policy: Path) -> None:
        """Serve a copy of the file trace store at ``store`` in its place: ``policy`` names
        this server instead."""
        self.serve_copy(store)
        policy.write_text(policy.read_text().replace(f"file://{store}", self.url))


@contextlib.contextmanager
def serve_traces() -> Iterator[TraceServer]:
    state = TraceServerState()
    server = _Server(state)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield TraceServer(f"http://127.0.0.1:{server.server_address[1]}", state)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
