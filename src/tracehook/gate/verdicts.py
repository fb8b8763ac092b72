"""The gate's view of the verifier: one derivation in, a verdict with every verified step out.

The verifier (:mod:`tracehook.verify.resolver`) is incremental: a :class:`Resolver` remembers the
traces it fetched and the steps it decided, so verifying the closure of a derivation and
then each of its inputs costs one walk, not one per request. The gate keeps one resolver
per *generation*: a generation ends when the trace stores' state changes (a file trace
store's ``traces/`` directory changed), when it is older than ``max_age`` seconds (key
expiry is checked against the reference time fixed when the generation started; HTTP
trace stores have no cheap state), or when a trace store could not be read (a resolver
that saw a fault holds incomplete evidence and is thrown away; the verdict is a fault,
answered 502, never a refusal that gets cached and never an allow).

A :class:`Verdict` carries what the gate answers from: for every verified build step of
the target's closure, the verified values of each output (path and NAR hash, best
supported first) and the resolved derivations the step was looked up under; for a
refusal, the verifier's reason and the deepest step that failed for a reason of its own.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tracehook.errors import TracehookError
from tracehook.stores.binarycache import Upstream
from tracehook.stores.nixstore import StoreReader
from tracehook.stores.tracestore import FileTraceStore, TraceStore
from tracehook.trace.claim import OutputClaim
from tracehook.verify.policy import Policy
from tracehook.verify.resolver import Limits, Resolver, Target


@dataclass(frozen=True)
class StepValues:
    """A verified build step: each output's verified values, best supported first."""

    drv_path: str
    name: str
    kind: str
    rdrv_paths: tuple[str, ...]
    outputs: Mapping[str, tuple[OutputClaim, ...]]
    signers: frozenset[str]


@dataclass(frozen=True)
class Verdict:
    drv_path: str
    verified: bool  # the target's wanted outputs verified
    steps: Mapping[str, StepValues] = field(default_factory=dict)  # drv path -> step
    reason: str | None = None
    failed_step: str | None = None  # drv path of the deepest step that failed on its own
    failed_name: str | None = None
    fault: str | None = None  # a trace store could not be read: no decision
    cache_signed: tuple[str, ...] = ()  # paths accepted on a cache signature alone
    covered: int = 0  # build steps below them covered without traces

    def step(self, drv_path: str) -> StepValues | None:
        return self.steps.get(drv_path)


class ChainVerifier:
    """Thread-safe: verifications run one at a time on the current generation's resolver."""

    def __init__(
        self,
        policy: Policy,
        stores: Sequence[TraceStore],
        reader: StoreReader,
        max_age: float = 60.0,
        limits: Limits | None = None,
        caches: Sequence[Upstream] = (),
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc),
    ) -> None:
        self.policy = policy
        self.stores = list(stores)
        self.reader = reader
        self.max_age = max_age
        self.limits = limits
        self.caches = list(caches)  # where cache signatures are read (the gate's upstreams)
        self.clock = clock
        self.wall = wall
        self.policy_digest = hashlib.sha256(repr(policy).encode()).hexdigest()[:16]
        self._state_lock = threading.Lock()  # held for a stat or two, never across a verify
        self._verify_lock = threading.Lock()
        self._state: Hashable = None
        self._started = 0.0
        self._serial = 0
        self._resolver: Resolver | None = None
        self._resolver_serial = -1

    def trace_state(self) -> Hashable:
        """Changes whenever a file trace store gains or changes a trace (one stat each)."""
        marks: list[int] = []
        for store in self.stores:
            if isinstance(store, FileTraceStore):
                try:
                    marks.append(os.stat(Path(store.root) / "traces").st_mtime_ns)
                except OSError:
                    marks.append(-1)
        return tuple(marks)

    def generation(self) -> tuple[str, int]:
        """The key under which decisions may be cached: the policy, the trace stores' state
        and the resolver's age. Cheap; never waits for a verification in progress."""
        with self._state_lock:
            state = self.trace_state()
            now = self.clock()
            if self._serial == 0 or state != self._state or now - self._started >= self.max_age:
                self._state = state
                self._started = now
                self._serial += 1
            return (self.policy_digest, self._serial)

    def verify(self, drv_path: str, outputs: frozenset[str] | None = None) -> Verdict:
        serial = self.generation()[1]
        with self._verify_lock:
            if self._resolver is None or self._resolver_serial != serial:
                self._resolver = Resolver(
                    self.policy, self.stores, self.reader.read_derivation, self.wall(),
                    self.limits, self.caches)
                self._resolver_serial = serial
            resolver = self._resolver
            faults_before = len(resolver.faults)
            try:
                [report] = resolver.verify([Target(drv_path, drv_path, outputs)])
            except Exception:
                self._resolver = None  # never reuse a resolver that broke half-way
                raise
            if len(resolver.faults) > faults_before:
                fault = "; ".join(f"{f.url}: {f.message}" for f in resolver.faults[faults_before:])
                self._resolver = None  # its evidence is incomplete
                return Verdict(drv_path, False, reason=f"trace store unreadable: {fault}",
                               fault=fault)
            steps = self._steps(resolver, drv_path)
        failed = report.failed_step
        return Verdict(
            drv_path,
            report.verified,
            steps,
            reason=None if report.verified else (report.reason or "not verified"),
            failed_step=None if report.verified or failed is None else failed.drv,
            failed_name=None if report.verified or failed is None else failed.name,
            cache_signed=tuple(report.cache_signed_paths),
            covered=report.covered,
        )

    def _steps(self, resolver: Resolver, root: str) -> dict[str, StepValues]:
        trusted = resolver.trusted
        steps: dict[str, StepValues] = {}
        seen = {root}
        todo = [root]
        while todo:
            path = todo.pop()
            try:
                drv = self.reader.read_derivation(path)
            except TracehookError:
                continue
            for child in drv.input_drvs:
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
            if path not in trusted or trusted.is_fixed(path):
                continue
            values: dict[str, tuple[OutputClaim, ...]] = {}
            signers: set[str] = set()
            for name in drv.outputs:
                cands = trusted.values(path, frozenset((name,)))
                if cands:
                    values[name] = tuple(dict(c.value)[name] for c in cands)
                    for c in cands:
                        signers |= c.signers
            if values:
                rdrvs = tuple(dict.fromkeys(k.rdrv_path for k in trusted.keys(path)))
                steps[path] = StepValues(path, drv.name, drv.kind, rdrvs, values,
                                         frozenset(signers))
        return steps
