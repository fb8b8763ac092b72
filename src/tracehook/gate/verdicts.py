"""The gate's view of the verifier: one build step in, a small verdict out.

The gate keeps one verification engine (:class:`~tracehook.verify.engine.Engine`, run as a
service) per *generation*, shared by every request: a request adds its step to the engine
and waits for that step only; a step decided once is never worked on again in the
generation, so serving a whole closure costs each step once. A generation ends when

- the policy changed (its content digest; :mod:`tracehook.gate.policywatch`),
- a file trace store changed (its ``traces/`` directory's mtime; HTTP and S3 trace stores
  have no cheap state, so they are re-read when the generation ends by age),
- it is older than ``max_age`` seconds, or a policy key's ``not-after`` has passed (key
  expiry is checked against the reference time fixed when the generation started),
- a trace store or a cache could not be read (its evidence is incomplete).

A generation that ends with the policy unchanged and saw no fault hands the next one a
:class:`Succession` (through ``on_generation``): its engine's verified steps, which the
next may take back when every file they were decided from is unchanged
(:mod:`tracehook.gate.warmstart`), so a gate that runs for hours does not decide its
closures again every ``max_age`` seconds.

Every verification has an overall deadline: a step not decided in time is a fault (502,
never cached, never an allow), and so is a step decided on incomplete evidence. A
:class:`Verdict` carries only what the gate answers from: the verified values of the
outputs asked for (and, for a resolved derivation, only values attested for it), or the
reason and the deepest step that failed for a reason of its own.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from tracehook.errors import ConfigError, EnvironmentFault, GraphError, TracehookError
from tracehook.gate import nowait
from tracehook.lru import Lru
from tracehook.nix.storepath import hash_part
from tracehook.stores.binarycache import Upstream
from tracehook.stores.factcache import FactCache
from tracehook.stores.nixstore import StoreReader
from tracehook.stores.tracestore import FileTraceStore, TraceStore, open_store
from tracehook.verify.cachekeys import CacheOutput
from tracehook.verify.engine import Engine
from tracehook.verify.evidencecheck import EvidenceInfo
from tracehook.verify.limits import Limits
from tracehook.verify.policy import Policy
from tracehook.verify.trustedset import KeptStep
from tracehook.verify.walk import Target

log = logging.getLogger(__name__)

HINTS_MAX = 200_000
VERDICTS_MAX = 50_000
HANDOVER_HOLD = 5.0  # seconds a new generation's walks wait for the last one's steps
H = TypeVar("H")
Basis = str  # "traces", "cache", "fixed"


@dataclass(frozen=True)
class Value:
    """A verified value of one output: path, NAR hash, and the references its claims
    attest (None: not attested; ``conflict``: two claims attest different ones)."""

    path: str
    nar_hash: bytes
    references: frozenset[str] | None = None
    conflict: bool = False
    source: str | None = None  # for a cache signature: the cache whose narinfo was checked


@dataclass(frozen=True)
class Succession:
    """A generation that ended under the same policy and without a fault (by age, a
    trace store's change, a key's expiry) and the one that follows it."""

    old: tuple[str, int]
    new: tuple[str, int]
    started: float  # the old generation's reference time, seconds since the epoch
    #: asks the old engine for its verified steps (:meth:`Engine.keep`: nothing if it saw
    #: a fault), done in its thread; to be called at once (a retired engine is closed
    #: ``deadline`` seconds later)
    keep: Callable[[], concurrent.futures.Future[dict[str, tuple[int, KeptStep]]]]


@dataclass(frozen=True)
class Verdict:
    drv_path: str
    name: str
    kind: str
    values: tuple[Value, ...] = ()  # verified values of the output, best first
    signers: tuple[str, ...] = ()  # trace signers of the chosen value
    basis: Basis = "traces"  # what admitted it: traces, a cache signature, a fixed output
    cache_keys: tuple[str, ...] = ()  # for basis "cache": the cache keys that signed
    relied: tuple[str, ...] = ()  # output paths accepted on a cache signature it relies on
    covered: int = 0  # build steps below those that no trace verified
    reason: str | None = None  # for a refusal: why
    failed_step: str | None = None  # the deepest step that failed for a reason of its own
    failed_name: str | None = None
    fault: str | None = None  # could not decide: answered 502, never cached
    generation: tuple[str, int] = ("", 0)
    rejected: tuple[str, ...] = field(default=())  # signatures that did not count, why
    # the paths the step was built from (direct), which a NAR scan checks references
    # against: only when some value's references are not attested (else empty)
    inputs: frozenset[str] = frozenset()
    tampered: tuple[tuple[str, str], ...] = ()  # (step name, what): tamper evidence seen
    evidence: tuple[EvidenceInfo, ...] = ()  # hardware evidence counted for the first value

    @property
    def verified(self) -> bool:
        return bool(self.values) and self.fault is None


class GateVerifier:
    """Thread-safe. Verdicts for steps, on the current generation's engine."""

    def __init__(
        self,
        policy: Callable[[], tuple[Policy, str]],
        reader: StoreReader,
        max_age: float = 60.0,
        limits: Limits | None = None,
        caches: Sequence[Upstream] = (),
        deadline: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc),
        stores: Callable[[Policy], list[TraceStore]] | None = None,
        facts: FactCache | None = None,
        recheck: float = 0.25,
    ) -> None:
        """``policy()`` gives the current policy and its digest (raising ConfigError while
        the policy file is broken); ``stores(policy)`` opens its trace stores; a file trace
        store's change is noticed within ``recheck`` seconds."""
        self.policy = policy
        self.reader = reader
        self.max_age = max_age
        self.limits = limits or Limits()
        self.caches = list(caches)  # where cache signatures are read (the gate's upstreams)
        self.deadline = deadline
        self.clock = clock
        self.wall = wall
        self.open_stores = stores or (lambda p: [open_store(u) for u in p.traces])
        self.facts = facts
        self._lock = threading.Lock()  # held for a stat or two, never across a verify
        self._engine: Engine | None = None
        self._engine_key: tuple[object, ...] = ()
        self._started = 0.0
        self._ends_at = 0.0
        self._serial = 0
        self._stores: list[TraceStore] = []
        self._watched: list[str] = []  # file trace stores' traces/ directories
        self.recheck = recheck  # seconds between looks at the trace stores' state
        self._recheck_at = 0.0
        self._retired: list[tuple[float, Engine]] = []
        # hash part of an output path -> (step, output) that claims made it
        self.path_hints: Lru[str, tuple[tuple[str, str], ...]] = Lru(HINTS_MAX)
        self.rdrv_hints: Lru[str, tuple[str, ...]] = Lru(HINTS_MAX)  # resolved drv -> steps
        #: told when a generation begins (with what the last one hands on, if anything);
        #: True: it takes that over and calls :meth:`handed` when done (until then, or
        #: ``HANDOVER_HOLD`` seconds, the new generation's walks wait for what it gives)
        self.on_generation: Callable[[Succession | None], bool] | None = None
        self._handed = threading.Event()  # clear while a hand-over is under way
        self._handed.set()
        self._holding = 0  # the generation (serial) that waits for it
        self._hold_until = 0.0
        # (engine serial, step, output, resolved drv) -> verdict: a step decided in a
        # generation stays decided, so the narinfo request after a realisation's (and any
        # request after the first) needs no round trip through the engine
        self._verdicts: Lru[tuple[int, str, str, str | None], Verdict] = Lru(VERDICTS_MAX)

    # ---------------------------------------------------------------------- generations

    def _trace_state(self) -> tuple[int, ...]:
        marks: list[int] = []
        for path in self._watched:
            try:
                marks.append(os.stat(path).st_mtime_ns)
            except OSError:
                marks.append(-1)
        return tuple(marks)

    def generation(self) -> tuple[str, int]:
        """The key under which answers may be cached: the policy digest and a serial that
        changes with every new generation. Cheap; never waits for a verification."""
        return self._current()[1]

    def _current(self) -> tuple[Engine, tuple[str, int]]:
        policy, digest = self.policy()  # ConfigError while the policy file is broken
        now = self.clock()
        engine = self._engine
        if (engine is not None and now < self._recheck_at and digest == self._engine_key[0]
                and not engine.faults):
            return engine, (digest, self._serial)  # checked a moment ago: no stat, no lock
        if not self._lock.acquire(blocking=nowait.waiting_allowed()):
            raise nowait.WouldWait  # another thread is starting a generation
        try:
            engine = self._engine
            if engine is None or self._engine_key[0] != digest:
                nowait.check()
                self._stores = self.open_stores(policy)
                self._watched = [os.path.join(s.root, "traces") for s in self._stores
                                 if isinstance(s, FileTraceStore)]
            key = (digest, self._trace_state())
            if (engine is None or key != self._engine_key or now >= self._ends_at
                    or engine.faults):
                nowait.check()
                engine = self._new_engine(policy, key, now)
            self._recheck_at = min(now + self.recheck, self._ends_at)
            self._close_retired(now)
            return engine, (digest, self._serial)
        finally:
            self._lock.release()

    def _new_engine(self, policy: Policy, key: tuple[object, ...], now: float) -> Engine:
        old, old_digest = self._engine, self._engine_key[:1]
        if old is not None:
            self._retired.append((now, old))
        wall = self.wall()
        engine = Engine(policy, self._stores, self.reader.read_derivation, wall, self.limits,
                        self.caches, self.facts)
        engine.on_recorded = self._learn
        engine.start()
        self._engine, self._engine_key = engine, key
        self._serial += 1
        succession = None
        if old is not None and old_digest == key[:1] and not old.faults:
            digest = str(key[0])
            succession = Succession((digest, self._serial - 1), (digest, self._serial),
                                    old.now.timestamp(), old.keep)
        if self.on_generation is not None and self.on_generation(succession):
            self._holding, self._hold_until = self._serial, now + HANDOVER_HOLD
            self._handed.clear()
        else:
            self._handed.set()
        self._verdicts.clear()  # keyed by serial: the old generation's are never asked for
        self._started = now
        ends = [k.not_after for k in policy.keys] + [e.not_after for e in policy.evidence]
        expiries = [(t - wall).total_seconds() for t in ends if t is not None and t > wall]
        self._ends_at = now + min([self.max_age, *expiries])
        return engine

    def _close_retired(self, now: float) -> None:
        keep = []
        for retired_at, engine in self._retired:
            if now - retired_at > self.deadline + 5:
                if nowait.waiting_allowed():
                    engine.close()
                else:  # (closing joins its thread: not in the HTTP front's thread)
                    threading.Thread(target=engine.close, name="tracehook-retire",
                                     daemon=True).start()
            else:
                keep.append((retired_at, engine))
        self._retired = keep

    def take_back(self, gen: tuple[str, int], kept: Mapping[str, tuple[int, KeptStep]]) -> bool:
        """Give the engine of generation ``gen`` the steps the last run (or generation)
        kept, if that generation is still the current one (:mod:`tracehook.gate.warmstart`
        checked that nothing they rest on changed); whether it was."""
        with self._lock:
            if self._engine is None or self._serial != gen[1]:
                return False
            if kept:
                self._engine.take_back(kept)
            return True

    def handed(self, gen: tuple[str, int]) -> None:
        """The hand-over to generation ``gen`` is done (whatever it gave): its walks go on."""
        with self._lock:
            if self._holding == gen[1]:
                self._handed.set()

    def trace_dirs(self) -> list[str]:
        """The ``traces/`` directories of the current generation's file trace stores."""
        with self._lock:
            return list(self._watched)

    def keep(self, gen: tuple[str, int], timeout: float = 30.0,
             ) -> dict[str, tuple[int, KeptStep]]:
        """The verified steps of generation ``gen``'s engine, for the next start (nothing
        if another generation has begun since)."""
        with self._lock:
            engine = self._engine if self._serial == gen[1] else None
        if engine is None:
            return {}
        try:
            return engine.keep().result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            return {}

    @property
    def steps_planned(self) -> int:
        """Steps the current generation's engine has planned (each at most once)."""
        engine = self._engine
        return 0 if engine is None else engine.planned

    @property
    def steps_taken_back(self) -> int:
        """Kept steps of the last run the current generation's engine took back."""
        engine = self._engine
        return 0 if engine is None else engine.taken_back

    def close(self) -> None:
        with self._lock:
            for _, engine in self._retired:
                engine.close()
            self._retired = []
            if self._engine is not None:
                self._engine.close()
                self._engine = None
        if self.facts is not None:
            self.facts.close()

    def _learn(self, engine: Engine, step: str) -> None:
        """Hints from a recorded step (in the engine's thread): which resolved derivations
        and which output paths lead to it. Hints only say what to look at again."""
        for key in engine.trusted.keys(step):
            _add_hint(self.rdrv_hints, key.rdrv_path, step)
        for output, path in engine.trusted.claimed_outputs(step):
            _add_hint(self.path_hints, hash_part(path), (step, output))

    # ------------------------------------------------------------------------- verdicts

    def ahead(self, steps: Sequence[str]) -> None:
        """Start deciding ``steps`` and everything below them (every output) on the current
        generation's engine, without waiting for it: the roots of .drv files just written,
        which Nix is about to ask for (:mod:`tracehook.gate.index`, "Verifying ahead"). A
        request for one of their steps then waits for that step only, as always; nothing is
        answered or logged from here. Not from the HTTP front's loop (it may start a
        generation)."""
        try:
            engine, _ = self._current()
        except ConfigError as exc:  # the policy file is broken: requests answer 503
            log.debug("not verifying ahead: %s", exc.diagnostics())
            return
        self._wait_handed()  # (as a request's walk)
        for step in steps:
            try:
                outputs = frozenset(self.reader.read_derivation(step).outputs)
            except TracehookError as exc:  # (a request for it says why)
                log.debug("not verifying %s ahead: %s", step, exc.diagnostics())
                continue
            # (one decided already is not worked on again: Engine.submit looks first)
            engine.submit(Target(step, step, outputs))  # (its outcome is a request's to read)

    def _wait_handed(self) -> None:
        """Before a walk: what the last generation hands on is taken first (waited for
        until ``HANDOVER_HOLD`` seconds after the generation began, at most)."""
        if not self._handed.is_set():
            self._handed.wait(max(0.0, self._hold_until - self.clock()))

    def verdict(self, step: str, output: str, rdrv_path: str | None = None) -> Verdict:
        """The verdict on ``output`` of the build step ``step``; with ``rdrv_path``, only
        values attested for that resolved derivation."""
        engine, gen = self._current()
        key = (gen[1], step, output, rdrv_path)
        known = self._verdicts.get(key)
        if known is not None:
            return known
        started = self.clock()
        target = Target(step, step, frozenset((output,)))
        try:
            if not engine.decided(target):  # (a step decided below another asks nothing)
                nowait.check()
                self._wait_handed()
                engine.submit(target).result(timeout=self.deadline)
        except concurrent.futures.TimeoutError:
            return Verdict(step, _name(step), "?", fault=f"not decided within "
                           f"{self.deadline:g} s (a trace store or cache is slow)",
                           generation=gen)
        except GraphError as exc:
            return Verdict(step, _name(step), "?", reason=exc.diagnostics(),
                           failed_step=exc.drv_path, failed_name=_name(exc.drv_path),
                           generation=gen)
        except EnvironmentFault as exc:
            return Verdict(step, _name(step), "?", fault=exc.diagnostics(), generation=gen)
        log.debug("verdict on %s^%s in %.1f ms", step, output, (self.clock() - started) * 1e3)
        verdict = _verdict(engine, step, output, rdrv_path, gen)
        if verdict.fault is None:
            self._verdicts.put(key, verdict)
        return verdict


def _verdict(engine: Engine, step: str, output: str, rdrv_path: str | None,
             gen: tuple[str, int]) -> Verdict:
    drv = engine.graph.drvs[step]
    if engine.is_tainted(step):
        faults = "; ".join(dict.fromkeys(f.message for f in engine.faults))
        return Verdict(step, drv.name, drv.kind, generation=gen,
                       fault=f"evidence incomplete: {faults or 'a store could not be read'}")
    trusted = engine.trusted
    want = frozenset((output,))
    candidates = (trusted.values_for_resolution(step, want, rdrv_path) if rdrv_path
                  else trusted.values(step, want))
    if candidates:
        first = candidates[0]
        basis = "fixed" if trusted.is_fixed(step) else first.basis
        values = []
        for cand in candidates:
            oc = dict(cand.value)[output]
            if cand.basis == "cache":
                got = trusted.cache_results(step).get(output)
                assert isinstance(got, CacheOutput)
                values.append(Value(oc.path, oc.nar_hash, frozenset(got.references),
                                    source=got.source))
            elif cand.basis == "traces":
                refs, conflict = trusted.attested_references(step, output, oc)
                values.append(Value(oc.path, oc.nar_hash,
                                    None if refs is None else frozenset(refs), conflict))
            else:
                values.append(Value(oc.path, oc.nar_hash))
        return Verdict(step, drv.name, drv.kind, tuple(values),
                       tuple(sorted(first.signers)) if basis == "traces" else (),
                       basis, tuple(sorted(first.signers)) if basis == "cache" else (),
                       *_relied(engine, step), generation=gen,
                       inputs=(_inputs(engine, step) if any(v.references is None for v in values)
                               else frozenset()),
                       tampered=_tampered(engine, step),
                       evidence=trusted.admitted_by(step, first))
    failure = trusted.explain(step, want)
    reason = failure.message
    if rdrv_path and trusted.values(step, want):
        reason = (f"no verified value of {output} is attested for the resolved derivation "
                  f"{rdrv_path}")
    failed = engine.reading.failed_below(step)
    if failed != step:
        reason = trusted.explain(failed, _wanted(engine, failed)).message
    return Verdict(step, drv.name, drv.kind, reason=reason, failed_step=failed,
                   failed_name=_name(failed), generation=gen,
                   rejected=tuple(r.detail for r in trusted.rejected(step)))


def _inputs(engine: Engine, step: str) -> frozenset[str]:
    """What the step was built from: its sources and every verified value of the input
    outputs it references (a superset of one resolution's inputs)."""
    drv = engine.graph.drvs[step]
    paths = set(drv.input_srcs)
    for inp, outputs in drv.input_drvs.items():
        if inp not in engine.trusted:  # not decided (below a cache signature): no value
            continue
        for cand in engine.trusted.values(inp, frozenset(outputs)):
            paths.update(oc.path for _, oc in cand.value)
    return frozenset(paths)


def _tampered(engine: Engine, step: str) -> tuple[tuple[str, str], ...]:
    """Tamper evidence seen at the step or below it (step name, what), as verify reports
    it: logged by the gate even when the step verifies another way."""
    drvs = engine.graph.drvs
    return tuple((drvs[s].name, what) for s, what in engine.reading.sightings_below(step))


def _relied(engine: Engine, step: str) -> tuple[tuple[str, ...], int]:
    boundary, covered = engine.reading.reliance(step)
    paths = sorted(r.path for b in boundary
                   for r in engine.trusted.cache_results(b).values()
                   if isinstance(r, CacheOutput))
    return tuple(paths), covered


def _wanted(engine: Engine, step: str) -> frozenset[str]:
    requests = engine.graph.requests.get(step)
    if requests:
        return frozenset().union(*requests)
    return frozenset(engine.graph.drvs[step].outputs)


def _name(drv_path: str) -> str:
    base = drv_path.rsplit("/", 1)[-1]
    return base.split("-", 1)[-1].removesuffix(".drv")


def _add_hint(hints: Lru[str, tuple[H, ...]], key: str, hint: H) -> None:
    old = hints.get(key) or ()
    if hint not in old:
        hints.put(key, (hint, *old)[:8])


def fixed_policy(policy: Policy) -> Callable[[], tuple[Policy, str]]:
    """A policy that never changes, as :class:`GateVerifier` takes it."""
    digest = hashlib.sha256(repr(policy).encode()).hexdigest()[:16]
    return lambda: (policy, digest)
