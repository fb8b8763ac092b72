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

LOOK_EVERY = 1.0  # seconds: the thread looks at the heap at least this often


class Watchdog:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, socket.socket]] = []
        self._live: set[int] = set()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._wakes_at = 0.0  # when the sleeping thread looks next (0: it is not asleep)
        self.looks = 0  # how often the thread has looked at the heap (tests, diagnostics)

    def watch(self, sock: socket.socket, deadline: float) -> int:
        """Shut ``sock`` down at ``deadline`` (time.monotonic) unless released first."""
        token = next(self._ids)
        with self._cond:
            # The thread sleeps until the earliest deadline in the heap (released ones
            # included), or for LOOK_EVERY seconds when it holds none: it needs waking only
            # when this deadline comes before that. On a gate that is almost never (every
            # deadline is "now + the same timeout", and one request's is released before
            # the next one's is registered), so a request costs no thread switch.
            wake = deadline < self._wakes_at
            if len(self._heap) > 2 * len(self._live) + 1024:
                # released entries wait in the heap until the thread looks; drop them now
                # and then so that a high request rate cannot pile them up (amortised O(1))
                self._heap = [e for e in self._heap if e[1] in self._live]
                heapq.heapify(self._heap)
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
                self.looks += 1
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)  # finished in time
                now = time.monotonic()
                if not self._heap or self._heap[0][0] > now:
                    self._wakes_at = (min(self._heap[0][0], now + LOOK_EVERY) if self._heap
                                      else now + LOOK_EVERY)
                    self._cond.wait(self._wakes_at - now)
                    self._wakes_at = 0.0
                    continue
                _, token, sock = self._heap[0]
                heapq.heappop(self._heap)
                self._live.discard(token)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


WATCHDOG = Watchdog()
