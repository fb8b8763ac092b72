"""A fake signing agent for tests: a Unix socket that records what it gets and answers."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Listener:
    """A Unix socket that records what it receives and answers (or not)."""

    def __init__(self, path: Path, answer: bytes | None) -> None:
        self.path = path
        self.answer = answer
        self.received = b""
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            try:
                self.received = conn.recv(65536)
            except OSError:
                return
            if self.answer is None:
                time.sleep(3)  # wedged: never answers
                return
            with contextlib.suppress(OSError):  # the hook may have hung up: its choice
                conn.sendall(self.answer)

    def close(self) -> None:
        self.server.close()


@contextmanager
def listening(path: Path, answer: bytes | None = b"0\nok\n") -> Iterator[Listener]:
    listener = Listener(path, answer)
    try:
        yield listener
    finally:
        listener.close()
