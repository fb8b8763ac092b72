"""Overall deadlines on sockets: a peer that trickles cannot hold a thread past one.

A socket timeout bounds one ``recv``; a peer that sends a byte just before each timeout
holds a reader forever. :data:`WATCHDOG` is one thread that shuts a socket down when the
deadline registered for it passes, which ends any read or write blocked on it at once. The
HTTP client (:mod:`tracehook.stores.http`) registers each request; the gate's HTTP front
registers each request's headers.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
from collections.abc import Iterator


class Watchdog:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, socket.socket]] = []
        self._live: set[int] = set()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, sock: socket.socket, deadline: float) -> int:
        """Shut ``sock`` down at ``deadline`` (time.monotonic) unless released first."""
        token = next(self._ids)
        with self._cond:
            # The thread sleeps until the earliest deadline in the heap (released ones
            # included): it needs waking only when this one comes before all of them. On a
            # busy gate that is almost never (every deadline is "now + the same timeout"),
            # so a request costs no thread switch.
            wake = not self._heap or deadline < self._heap[0][0]
            if len(self._heap) > 2 * len(self._live) + 1024:
                # released entries wait in the heap until the thread wakes; drop them now
                # and then so that a high request rate cannot pile them up (amortised O(1))
                self._heap = [e for e in self._heap if e[1] in self._live]
                heapq.heapify(self._heap)
                wake = True
            heapq.heappush(self._heap, (deadline, token, sock))
            self._live.add(token)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tracehook-deadline",
                                                daemon=True)
                self._thread.start()
            if wake:
                self._cond.notify()
        return token

    def release(self, token: int) -> None:
        with self._cond:
            self._live.discard(token)

    @contextlib.contextmanager
    def deadline(self, sock: socket.socket, seconds: float) -> Iterator[None]:
        token = self.watch(sock, time.monotonic() + seconds)
        try:
            yield
        finally:
            self.release(token)

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)  # finished in time
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, token, sock = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                self._live.discard(token)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


WATCHDOG = Watchdog()
