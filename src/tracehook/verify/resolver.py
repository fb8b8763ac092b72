"""``tracehook verify``'s resolver: verify a batch of targets, then report on each.

It runs the verification engine (:mod:`tracehook.verify.engine`) over the targets in the
calling thread, then builds one :class:`~tracehook.verify.report.TargetReport` per target
from the verified set: every step of the target's closure with its outcome, the chosen
output values, the deepest failing step, and what the target relied on (cache signatures,
:mod:`tracehook.verify.summary`). The outcome labels and the refusal text are decided by
pure functions of :mod:`tracehook.verify.report`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import replace

from tracehook.errors import Failure
from tracehook.stores.binarycache import Upstream
from tracehook.stores.tracestore import TraceStore
from tracehook.verify._checkpool import StoreFault
from tracehook.verify.cachekeys import CacheOutput
from tracehook.verify.engine import Engine
from tracehook.verify.limits import Limits
from tracehook.verify.policy import Policy
from tracehook.verify.report import (
    StepReport,
    TargetReport,
    build_target_report,
    graph_step,
    step_outcome,
)
from tracehook.verify.summary import relied_upon, render_summary, summary
from tracehook.verify.trusted import Facts
from tracehook.verify.trustedset import TrustedSet
from tracehook.verify.walk import Loader, Target, fewer_collections


class Resolver:
    def __init__(
        self,
        policy: Policy,
        stores: Sequence[TraceStore],
        load: Loader,
        now: dt.datetime,
        limits: Limits | None = None,
        caches: Sequence[Upstream] = (),
        facts: Facts | None = None,
        fail_on_tamper: bool = False,
    ) -> None:
        """``fail_on_tamper``: tamper evidence anywhere in a target's closure refuses it
        (it is always reported)."""
        self.policy = policy
        self.now = now
        self.fail_on_tamper = fail_on_tamper
        self.engine = Engine(policy, stores, load, now, limits, caches, facts)

    @property
    def faults(self) -> list[StoreFault]:
        return self.engine.faults

    @property
    def trusted(self) -> TrustedSet:
        return self.engine.trusted

    def verify(self, targets: Sequence[Target]) -> list[TargetReport]:
        with fewer_collections():  # the reports too: they walk everything the run made
            try:
                self.engine.verify(targets)
            finally:
                self.engine.close()
            return [self._report(t) for t in targets]

    # ------------------------------------------------------------------------ reports

    def _report(self, target: Target) -> TargetReport:
        graph = self.engine.graph
        closure = graph.closure(target.drv_path)
        needed = _above_fixed_outputs(self.engine, target.drv_path)
        steps = [self._step_report(p) if p in needed else _not_needed(self._step_report(p))
                 for p in closure]
        failure = self.engine.graph_failures.get(target.spec)
        if failure is not None:
            drv = graph.drvs.get(failure.drv_path)
            steps.append(graph_step(failure, drv))
        want = None
        if failure is None:
            want = target.outputs or frozenset(graph.drvs[target.drv_path].outputs)
        trusted = self.engine.trusted
        candidates = trusted.values(target.drv_path, want) if want else []
        why = None if want is None else (
            None if candidates else trusted.explain(target.drv_path, want))
        inputs = {p: list(graph.drvs[p].input_drvs) for p in closure}
        reliance = relied_upon(target.drv_path, steps, inputs)
        return build_target_report(target.spec, target.drv_path, target.path, candidates,
                                   why, list(reliance.steps), self.policy, self.now,
                                   tuple(dict.fromkeys(f.message for f in self.faults)),
                                   reliance.cache_signed, len(reliance.covered),
                                   (summary(reliance), render_summary(reliance)),
                                   lambda c: trusted.admitted_by(target.drv_path, c),
                                   self._tampered(target.drv_path, needed),
                                   self.fail_on_tamper)

    def _tampered(self, root: str, needed: set[str]) -> tuple[tuple[str, str], ...]:
        graph = self.engine.graph
        return tuple((graph.drvs[step].name, what)
                     for step, what in self.engine.reading.sightings_below(root)
                     if step in needed)

    def _step_report(self, path: str) -> StepReport:
        graph = self.engine.graph
        trusted = self.engine.trusted
        drv = graph.drvs[path]
        height = graph.heights[path]
        if path not in trusted:
            return StepReport(path, drv.name, drv.kind, (), (), "not-reached", None, None, (),
                              height)
        if trusted.is_fixed(path):
            return StepReport(path, drv.name, drv.kind, (), (), "fixed-output", None, None, (),
                              height)
        keys = tuple(f"{k.kind}:{k.key}" for k in trusted.keys(path))
        requests = sorted(graph.requests.get(path, ()), key=sorted)
        found = [(want, trusted.values(path, want)) for want in requests]
        outcome, signers, failure = step_outcome(
            found, lambda want: trusted.explain(path, want))
        if failure is not None and failure.kind != "input":
            failure = self._unread(path, failure)
        cache: tuple[tuple[str, CacheOutput], ...] = ()
        if outcome == "cache-signed":
            cache = tuple((n, r) for n, r in sorted(trusted.cache_results(path).items())
                          if isinstance(r, CacheOutput))
        evidence = tuple(dict.fromkeys(
            e for _, values in found for v in values for e in trusted.admitted_by(path, v)))
        return StepReport(path, drv.name, drv.kind, keys, signers, outcome,
                          failure.kind if failure else None,
                          failure.message if failure else None,
                          tuple(trusted.rejected(path)), height, cache, evidence)


    def _unread(self, path: str, failure: Failure) -> Failure:
        """A refusal of a step whose traces could not all be read names the stores that
        could not be read, never only what the others held ("no trace")."""
        faults = [f for k in self.engine.trusted.keys(path)
                  for f in self.engine.key_faults.get(k.key, ())]
        if not faults:
            return failure
        keys = ", ".join(f"{k.kind}:{k.key}" for k in self.engine.trusted.keys(path))
        unread = "; ".join(dict.fromkeys(f.message for f in faults))
        answered = len(self.engine.stores) - len({f.url for f in faults})
        rest = f" (the other trace store(s): {failure.message})" if answered > 0 else ""
        return Failure("unreadable", f"could not check {keys}: {unread}{rest}")


def _above_fixed_outputs(engine: Engine, root: str) -> set[str]:
    """The steps of ``root``'s closure that are not only below fixed-output steps: a
    fixed output is pinned by its hash, so how its inputs came to be does not matter."""
    drvs = engine.graph.drvs
    needed = {root}
    todo = [root]
    while todo:
        step = todo.pop()
        drv = drvs.get(step)
        if drv is None or drv.kind == "fixed":
            continue
        for child in drv.input_drvs:
            if child not in needed:
                needed.add(child)
                todo.append(child)
    return needed


def _not_needed(step: StepReport) -> StepReport:
    return replace(step, outcome="not-needed", failure=None,
                   reason="below a fixed-output step: not needed (the fixed output is pinned "
                          "by its hash)")
