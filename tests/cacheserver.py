"""A plain HTTP binary cache on 127.0.0.1 for tests and the bench, with ways to misbehave.

Serves the files under a directory (GET/HEAD). ``state`` makes it slow (``delay`` seconds
before answering), fail (``status``: answer that code to everything), or break a body off
after ``break_after`` bytes. Files are streamed in chunks, so a 1 GiB NAR costs no memory.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class CacheState:
    delay: float = 0.0
    status: int | None = None
    break_after: int | None = None
    requests: list[str] = field(default_factory=list)
    agents: list[str] = field(default_factory=list)  # each request's User-Agent


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: CacheServer

    def log_message(self, format: str, *args: object) -> None:
        return

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_HEAD(self) -> None:
        self.do_GET(head=True)

    def do_GET(self, head: bool = False) -> None:
        state = self.server.state
        state.requests.append(self.path)
        state.agents.append(self.headers.get("User-Agent", ""))
        if state.delay:
            time.sleep(state.delay)
        if state.status is not None:
            self._reply(state.status, b"failing on purpose\n")
            return
        rel = self.path.split("?", 1)[0].lstrip("/")
        path = self.server.root / rel
        if ".." in rel.split("/") or not path.is_file():
            self._reply(404, b"not found\n")
            return
        size = path.stat().st_size
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if head:
            return
        sent = 0
        with path.open("rb") as f:
            while True:
                block = f.read(256 * 1024)
                if not block:
                    break
                if state.break_after is not None and sent + len(block) > state.break_after:
                    self.wfile.write(block[: state.break_after - sent])
                    self.wfile.flush()
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(2)
                    return
                self.wfile.write(block)
                sent += len(block)

    def _reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class CacheServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, state: CacheState, port: int = 0) -> None:
        self.root = root
        self.state = state
        super().__init__(("127.0.0.1", port), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextlib.contextmanager
def serve_cache(root: Path, state: CacheState | None = None) -> Iterator[CacheServer]:
    server = CacheServer(root, state or CacheState())
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def sparse_file(path: Path, size: int) -> Path:
    """A file of ``size`` zero bytes that takes no disk space (and no memory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        os.ftruncate(f.fileno(), size)
    return path


if __name__ == "__main__":  # python tests/cacheserver.py DIR PORT (the bench's baseline)
    import sys

    CacheServer(Path(sys.argv[1]), CacheState(), int(sys.argv[2])).serve_forever()
