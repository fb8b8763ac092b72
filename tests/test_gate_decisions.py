"""The gate's decision cache: TTL, size bound, single flight, faults never cached."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from pathlib import Path

import pytest

from gateproc import gate_argv, gate_process, get
from tracehook.gate.memo import CacheConfig, DecisionCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from synth import with_policy


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


def test_no_waiting_hands_back_instead_of_waiting_for_another_computation() -> None:
    """The HTTP front's loop thread asks inside no_waiting(): a computation in progress in
    another thread raises WouldWait there instead of blocking it; outside, it is waited
    for as before."""
    from tracehook.gate import nowait

    cache: DecisionCache[int] = DecisionCache(CacheConfig())
    started, release = threading.Event(), threading.Event()

    def slow() -> int:
        started.set()
        release.wait(5)
        return 7

    owner = threading.Thread(target=lambda: cache.get("k", slow))
    owner.start()
    assert started.wait(5)
    with nowait.no_waiting(), pytest.raises(nowait.WouldWait):
        cache.get("k", lambda: 1)
    release.set()
    owner.join(5)
    with nowait.no_waiting():
        assert cache.get("k", lambda: 1) == (7, False)  # done: no waiting needed


def test_would_wait_is_not_an_error_for_whoever_waits() -> None:
    """A computation that gives up with WouldWait (in the loop thread) is neither cached
    nor passed on: a thread waiting for it computes the answer itself."""
    from tracehook.gate import nowait

    cache: DecisionCache[str] = DecisionCache(CacheConfig())
    inside, go_on = threading.Event(), threading.Event()

    def gives_up() -> str:
        inside.set()
        go_on.wait(5)
        nowait.check()
        return "never"

    def loop_thread() -> None:
        with nowait.no_waiting(), contextlib.suppress(nowait.WouldWait):
            cache.get("k", gives_up)

    first = threading.Thread(target=loop_thread)
    first.start()
    assert inside.wait(5)
    got: list[tuple[str, bool]] = []
    waiter = threading.Thread(target=lambda: got.append(cache.get("k", lambda: "worker")))
    waiter.start()
    time.sleep(0.1)  # the waiter waits for the first computation
    go_on.set()
    first.join(5)
    waiter.join(5)
    assert got == [("worker", True)]
    assert cache.get("k", lambda: "again") == ("worker", False)
    assert nowait.waiting_allowed()  # (outside the block, in this thread)


def test_a_path_no_verified_step_makes_yet_is_not_remembered_as_not_found(
        tmp_path: Path) -> None:
    """A narinfo asked for before the realisation of the step that makes it (the gate does
    not know the path yet: 404) is answered once the step is verified, not "not found"
    until the answer expires."""
    c, policy = with_policy(tmp_path, 25)
    real, narinfo = c.requests()[5]
    argv = gate_argv(policy, [f"file://{c.cache}"], c.root, tmp_path / "gate.log")
    with gate_process(argv) as gate:
        assert get(gate.url + narinfo) == (404, b"not found\n")
        assert get(gate.url + real)[0] == 200
        status, body = get(gate.url + narinfo)
        assert status == 200 and body.startswith(b"StorePath: ")
