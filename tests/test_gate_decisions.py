"""The gate's decision cache: TTL, size bound, single flight, faults never cached."""

from __future__ import annotations

import threading
import time

import pytest

from tracehook.gate.memo import CacheConfig, DecisionCache


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_ttl_and_bound() -> None:
    clock = Clock()
    cache: DecisionCache[str] = DecisionCache(CacheConfig(max_entries=2, ttl=10), clock)
    assert cache.get("a", lambda: "A") == ("A", True)
    assert cache.get("a", lambda: "other") == ("A", False)
    clock.t = 10
    assert cache.get("a", lambda: "A2") == ("A2", True)  # expired
    cache.get("b", lambda: "B")
    cache.get("c", lambda: "C")
    assert len(cache) == 2 and cache.peek("a") is None  # least recently used went first


def test_zero_ttl_values_are_not_kept() -> None:
    cache: DecisionCache[str] = DecisionCache(CacheConfig(ttl=10))
    ttl = lambda v: 0.0 if v.startswith("fault") else 10.0  # noqa: E731
    assert cache.get("k", lambda: "fault 1", ttl) == ("fault 1", True)
    assert cache.get("k", lambda: "ok", ttl) == ("ok", True)
    assert cache.get("k", lambda: "x", ttl) == ("ok", False)


def test_errors_are_not_cached_and_reach_waiters() -> None:
    cache: DecisionCache[str] = DecisionCache(CacheConfig())
    with pytest.raises(RuntimeError):
        cache.get("k", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert cache.get("k", lambda: "fine") == ("fine", True)


def test_single_flight() -> None:
    cache: DecisionCache[int] = DecisionCache(CacheConfig())
    calls = []
    gate = threading.Event()

    def compute() -> int:
        calls.append(1)
        gate.wait(5)
        return 42

    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("k", compute)[0]))
               for _ in range(20)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join()
    assert results == [42] * 20 and len(calls) == 1
