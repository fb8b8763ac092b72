"""The one in-memory cache helper: a bounded map, least recently used out first.

Bounded by a number of entries and, optionally, by the sum of a size measure (bytes of a
parsed .drv, say), so that no input can grow it without limit. Thread-safe. Every
in-memory cache of the package is one of these (docs/ARCHITECTURE.md lists them: what is
cached where, keyed by what, for how long).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Lru(Generic[K, V]):
    def __init__(self, max_entries: int, max_size: int | None = None,
                 size: Callable[[V], int] | None = None) -> None:
        if max_entries < 1:
            raise ValueError("an Lru holds at least one entry")
        self.max_entries = max_entries
        self.max_size = max_size
        self._size_of = size or (lambda _: 1)
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._total = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def total_size(self) -> int:
        return self._total

    def keys(self) -> list[K]:
        """The keys, least recently used first."""
        with self._lock:
            return list(self._items)

    def get(self, key: K) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: K, value: V) -> None:
        size = self._size_of(value)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._total -= old[1]
            self._items[key] = (value, size)
            self._total += size
            while self._items and (len(self._items) > self.max_entries or (
                    self.max_size is not None and self._total > self.max_size
                    and len(self._items) > 1)):
                _, (_, gone) = self._items.popitem(last=False)
                self._total -= gone

    def pop(self, key: K) -> V | None:
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                return None
            self._total -= item[1]
            return item[0]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._total = 0
