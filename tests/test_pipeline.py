"""The pipeline's bookkeeping, driven step by step with a stand-in resolver and checker pool
(the real ones are exercised end to end in test_verify_synthetic.py)."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from tracehook.trace.claim import TraceKey
from tracehook.trace.stepkey import Resolution
from tracehook.verify._checkpool import CheckPool, StoreFault, WorkerLost
from tracehook.verify._pipeline import Pipeline
from tracehook.verify.trusted import Checked


class Steps:
    """Independent steps, one key each; checks in threads answer at once."""

    def __init__(self) -> None:
        self.faults: list[StoreFault] = []
        self.fetched: dict[str, Checked] = {}
        self.recorded: list[str] = []
        self.in_threads: list[str] = []

    def inputs(self, path: str) -> Iterable[str]:
        return ()

    def processes(self) -> CheckPool | None:
        return None

    def plan(self, path: str) -> list[Resolution] | None:
        return [Resolution(f"/nix/store/{path}.drv", TraceKey("ca", path, ""), lambda: None)]  # type: ignore[arg-type, return-value]

    def checked(self, key: str) -> Checked | None:
        return self.fetched.get(key)

    def key_in(self, key: str, checked: Checked) -> None:
        self.fetched[key] = checked

    def check_in_thread(self, key: TraceKey, pool: ThreadPoolExecutor) -> Future[Checked]:
        self.in_threads.append(key.key)
        fut: Future[Checked] = Future()
        fut.set_result(Checked((), (), 0))
        return fut

    def record(self, path: str, resolutions: list[Resolution]) -> None:
        self.recorded.append(path)

    def ask_caches(self, path: str, pool: ThreadPoolExecutor) -> Future[Any] | None:
        return None

    def caches_answered(self, path: str, results: Any) -> None:
        raise AssertionError("no caches here")


class Pool:
    """One checker that never answers: its batches are failed by hand."""

    workers = 1
    broken = False

    def __init__(self) -> None:
        self.sent: list[tuple[list[str], Future[Any]]] = []

    def submit(self, keys: list[TraceKey]) -> Future[Any]:
        fut: Future[Any] = Future()
        self.sent.append(([k.key for k in keys], fut))
        return fut


def test_keys_planned_but_unsent_when_the_checker_dies_go_to_threads() -> None:
    steps, pool = Steps(), Pool()
    with ThreadPoolExecutor(1) as threads:
        pipeline = Pipeline(steps, threads, eager=True)
        pipeline.procs = pool  # type: ignore[assignment]
        pipeline.add("a")  # sent at once: the checker is idle
        pipeline.add("b")  # kept for the next batch: one is out, and it is small
        assert [keys for keys, _ in pool.sent] == [["a"]] and pipeline.batch
        pool.sent[0][1].set_exception(WorkerLost("checker process exited"))
        pipeline.add("c")  # the failure is taken in here
        pipeline.drain()
    assert pool.broken and pipeline.procs is None
    assert sorted(steps.in_threads) == ["a", "b", "c"]
    assert sorted(steps.recorded) == ["a", "b", "c"]
    assert len(pool.sent) == 1  # nothing more was handed to the dead checker
