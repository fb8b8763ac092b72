"""The gate's answer memo: bounded, expiring, one computation per key at a time.

A decision is keyed by what it depends on: the policy (its digest), the state of the trace
stores (a token that changes when a file trace store changes), and the request's subject
(a derivation path). A changed policy or trace store therefore misses the cache instead of
serving a stale answer; entries also expire after ``ttl`` seconds (HTTP trace stores have
no cheap state token), and the least recently used entries go first beyond ``max_entries``.

Concurrent requests for the same key wait for the one computation in progress
("single flight"), so a burst of Nix clients asking for one closure verifies it once. A
computation that raises is not cached: the next request tries again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from tracehook.gate import nowait
from tracehook.lru import Lru

V = TypeVar("V")


@dataclass(frozen=True)
class CacheConfig:
    max_entries: int = 50_000
    ttl: float = 60.0  # seconds a positive or negative decision is reused at most
    fault_ttl: float = 0.0  # decisions that came from a fault are not reused by default


class _Flight(Generic[V]):
    """One computation in progress: its owner holds ``running`` until it is done (a bare
    lock, cheaper to make than an Event; most computations have no one waiting)."""

    __slots__ = ("error", "running", "value")

    def __init__(self) -> None:
        self.running = threading.Lock()
        self.running.acquire()
        self.error: BaseException | None = None
        self.value: V | None = None

    def wait(self) -> None:
        with self.running:
            pass


class DecisionCache(Generic[V]):
    def __init__(self, config: CacheConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: Lru[Hashable, tuple[float, V]] = Lru(config.max_entries)
        self._flights: dict[Hashable, _Flight[V]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, key: Hashable) -> V | None:
        """The cached value if present and fresh, without computing anything."""
        with self._lock:
            return self._fresh(key)

    def _fresh(self, key: Hashable) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if self.clock() >= expires:
            self._entries.pop(key)
            return None
        return value

    def get(
        self, key: Hashable, compute: Callable[[], V], ttl: Callable[[V], float] | None = None
    ) -> tuple[V, bool]:
        """(value, computed_now). ``ttl(value)`` overrides the configured TTL per value."""
        while True:
            with self._lock:
                value = self._fresh(key)
                if value is not None:
                    self.hits += 1
                    return value, False
                flight = self._flights.get(key)
                if flight is None:
                    flight = _Flight()
                    self._flights[key] = flight
                    mine = True
                    self.misses += 1
                else:
                    mine = False
            if not mine:
                nowait.check()  # (the HTTP front's thread hands this request on instead)
                flight.wait()
                if flight.error is not None:
                    raise flight.error
                if flight.value is not None:  # the owner's answer, cached or not
                    return flight.value, False
                continue
            try:
                value = compute()
            except nowait.WouldWait:
                with self._lock:  # not an error: whoever waits computes it again
                    del self._flights[key]
                flight.running.release()
                raise
            except BaseException as exc:
                flight.error = exc
                with self._lock:
                    del self._flights[key]
                flight.running.release()
                raise
            lifetime = self.config.ttl if ttl is None else ttl(value)
            with self._lock:
                if lifetime > 0:
                    self._entries.put(key, (self.clock() + lifetime, value))
                del self._flights[key]
            flight.value = value
            flight.running.release()
            return value, True

    def put(self, key: Hashable, value: V, expires: float | None = None) -> None:
        """Keep ``value`` for ``key`` (for the configured TTL, as if computed now, or until
        ``expires`` on this cache's clock)."""
        with self._lock:
            until = self.clock() + self.config.ttl if expires is None else expires
            self._entries.put(key, (until, value))

    def fresh_items(self) -> list[tuple[Hashable, V]]:
        """Every entry not expired, least recently used first."""
        return [(k, v) for k, _, v in self.fresh_entries()]

    def fresh_entries(self) -> list[tuple[Hashable, float, V]]:
        """Every entry not expired with its expiry, least recently used first."""
        with self._lock:
            now, found = self.clock(), []
            keys = self._entries.keys()  # a copy: what has expired is dropped
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None and now >= entry[0]:
                    self._entries.pop(key)
                elif entry is not None:
                    found.append((key, entry[0], entry[1]))
            return found

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
