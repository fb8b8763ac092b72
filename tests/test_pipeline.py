"""The engine's schedule when the checker processes fail, driven by hand with a checker
that never answers (the real ones are exercised end to end in test_verify_synthetic.py)."""

from __future__ import annotations

import datetime as dt
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from test_verify_synthetic import Graph, ca_path
from tracehook.trace.claim import TraceKey
from tracehook.verify._checkpool import WorkerLost
from tracehook.verify.engine import Engine
from tracehook.verify.limits import Limits
from tracehook.verify.policy import parse_policy
from tracehook.verify.walk import Target
from verifyhelp import public_text

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)


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

    def close(self) -> None:
        return None


def test_keys_planned_but_unsent_when_the_checker_dies_go_to_threads(tmp_path: Path) -> None:
    g = Graph(tmp_path, processes=0)
    src = g.fod("src")
    steps = [g.ca(name, {src: ("out",)}) for name in ("a", "b", "c")]
    for name, step in zip("abc", steps, strict=True):
        g.sign(step, {(src, "out"): g.drvs[src].outputs["out"].path},
               {"out": ca_path(name, "a")}, "builderA")
    text = f'[keys]\nbuilderA = "{public_text("builderA")}"\n[trust]\nrequire = "builderA"\n'
    engine = Engine(parse_policy(text), [g.store], g.load, NOW, Limits(processes=0))
    pool = Pool()
    engine._procs = pool  # type: ignore[assignment]
    engine._add_target(Target(steps[0], steps[0]), None)  # sent at once: the checker is idle
    engine._add_target(Target(steps[1], steps[1]), None)  # kept: one is out, and it is small
    assert len(pool.sent) == 1 and len(pool.sent[0][0]) == 1 and len(engine._batch) == 1
    pool.sent[0][1].set_exception(WorkerLost("checker process exited"))
    engine._add_target(Target(steps[2], steps[2]), None)  # the failure is taken in here
    engine._drain()
    engine.close()
    assert pool.broken and engine._procs is None
    for name, step in zip("abc", steps, strict=True):
        assert [c.paths() for c in engine.trusted.values(step, frozenset({"out"}))] == [
            {"out": ca_path(name, "a")}]
    assert len(pool.sent) == 1  # nothing more was handed to the dead checker


def test_a_thousand_targets_at_once_are_walked_in_turn(tmp_path: Path) -> None:
    """Targets that come in while one is walked wait for it and are then walked one after
    the other (a gate with hundreds of connections waiting): not by recursion, which made
    the engine fail every waiting target with RecursionError."""
    g = Graph(tmp_path, processes=0)
    prev = g.fod("src")
    used = g.drvs[prev].outputs["out"].path
    steps = []
    for i in range(50):
        step = g.ca(f"s{i}", {prev: ("out",)})
        g.sign(step, {(prev, "out"): used}, {"out": ca_path(f"s{i}", "a")}, "builderA")
        steps.append(step)
        prev, used = step, ca_path(f"s{i}", "a")
    text = f'[keys]\nbuilderA = "{public_text("builderA")}"\n[trust]\nrequire = "builderA"\n'
    engine = Engine(parse_policy(text), [g.store], g.load, NOW, Limits(processes=0))
    # queued before the engine's thread starts: all of them come in during the first walk
    futures = [engine.submit(Target(s, s)) for _ in range(20) for s in reversed(steps)]
    engine.start()
    try:
        for fut in futures:
            assert fut.result(timeout=60) is None
    finally:
        engine.close()
    assert engine.planned == 51
