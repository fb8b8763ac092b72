"""The verification engine: every build step of the targets decided once, inputs first.

One engine holds one verification state: a policy, the trace stores and a reference time.
Targets are walked (:mod:`tracehook.verify.walk`); a step becomes *ready* when every input
it has is *done*; a ready step is planned at once (:func:`tracehook.verify.decide.plan_step`,
from its inputs' verified values); the trace keys of its candidate resolutions are fetched
and checked in a thread pool, or in batches by checker processes (each key once); when its
last key is in, the evidence is recorded in the verified set
(:class:`~tracehook.verify.trustedset.TrustedSet`); when the binary caches have been asked about
what the traces left unverified (policy ``narinfo-key``), the step is *done* and its
consumers may become ready. Completions come back through one queue, so only the engine's
own thread touches the verified set.

Two ways to run it:

- **a batch** (``tracehook verify``): :meth:`Engine.verify` walks the targets and works in
  the calling thread until every step is done;
- **a service** (the gate): :meth:`Engine.start` runs the same loop in a thread of its
  own, and :meth:`Engine.submit` adds a target at any time and returns a future that is
  done when the target's step is. Steps already done are never worked on again, so serving
  a whole closure one request at a time costs each step once, and a slow trace store only
  delays the steps that wait for it.

A step decided on incomplete evidence (a trace store or cache could not be read) is
*tainted*, and so is every step above it: deciding on it is a fault, not a refusal.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import BrokenExecutor, Future, ThreadPoolExecutor
from typing import Any

from tracehook.errors import EnvironmentFault, Failure, GraphError
from tracehook.nix.derivation_hash import DrvHash, realisation_ids
from tracehook.stores.binarycache import Upstream
from tracehook.stores.tracestore import TraceStore
from tracehook.trace.claim import TraceKey
from tracehook.trace.stepkey import Resolution, producer_is_content_addressed, step_key
from tracehook.verify._checkpool import (
    CheckPool,
    StoreFault,
    check_in_threads,
    start_pool,
    unpack,
)
from tracehook.verify.cachekeys import CacheKeys, CacheOutput, Refused
from tracehook.verify.cachesigs import CacheSigs
from tracehook.verify.decide import PlanLimits, StepInput, cache_lookups, plan_step
from tracehook.verify.limits import Limits
from tracehook.verify.policy import Policy
from tracehook.verify.reliance import Reading, traced
from tracehook.verify.remembered import remembered
from tracehook.verify.trusted import Checked, Facts, KeyRing
from tracehook.verify.trustedset import KeptStep, TrustedSet
from tracehook.verify.walk import Graph, Loader, Target, fewer_collections

log = logging.getLogger(__name__)


class Engine:
    MAX_BATCH = 64  # keys per task for a checker process
    MIN_BATCH = 8  # while some are busy, wait for this many before sending more

    def __init__(
        self,
        policy: Policy,
        stores: Sequence[TraceStore],
        load: Loader,
        now: dt.datetime,
        limits: Limits | None = None,
        caches: Sequence[Upstream] = (),
        facts: Facts | None = None,
    ) -> None:
        """``facts``: the persistent verification cache (:mod:`tracehook.stores.factcache`):
        signature checks and resolutions are looked up there before they are computed."""
        self.policy = policy
        self.facts = facts
        self.stores = list(stores)
        self.now = now
        self.limits = limits or Limits()
        self.graph = Graph(load, self.limits.max_depth, self._requested)
        self.ring = KeyRing(policy, now, facts=facts)
        self.trusted = TrustedSet(policy.require, policy.evidence_names)
        self.cache_sigs = (CacheSigs(CacheKeys(policy.narinfo_keys, now), caches)
                           if policy.narinfo_keys else None)
        self.plan_limits = PlanLimits(self.limits.max_resolutions,
                                      policy.weak_fixed_output_hashes)
        self.faults: list[StoreFault] = []
        self.tampered: set[str] = set()  # steps where tamper evidence was seen
        self.tainted: set[str] = set()  # steps decided on incomplete evidence
        self.graph_failures: dict[str, GraphError] = {}  # by target spec
        self._fetched: dict[str, Checked] = {}
        self.key_faults: dict[str, list[StoreFault]] = {}  # trace key -> stores unread
        self._drv_hashes: dict[str, DrvHash] = {}
        self._known_paths: dict[str, dict[str, str]] = {}  # one resolution's output paths
        self._asked: dict[str, set[str]] = {}  # outputs already looked up in the caches
        #: what verified steps rest on: reliance, tamper sightings, failed steps (memoized)
        self.reading = Reading(self.graph, self.trusted, self.cache_sigs is not None,
                               self.tampered)
        # the schedule
        self._events: queue.SimpleQueue[tuple[str, Any, Future[Any] | None]] = (
            queue.SimpleQueue())
        self._ready: collections.deque[str] = collections.deque()
        self._members: set[str] = set()
        self._done: set[str] = set()
        self._unfinished: dict[str, int] = {}
        self._consumers: dict[str, list[str]] = {}
        self._plans: dict[str, list[Resolution]] = {}
        self._missing_keys: dict[str, int] = {}
        self._key_waiters: dict[str, list[str]] = {}
        self._batch: list[TraceKey] = []
        self.planned = 0  # steps planned (each at most once)
        self.taken_back = 0  # kept steps recorded as they were (see take_back)
        self._kept: dict[str, KeptStep] = {}
        self._outstanding = 0  # futures whose completion has not been handled
        self._in_flight = 0  # batches with the checker processes
        self._waiters: dict[str, list[Future[None]]] = {}
        self._inputs: dict[tuple[str, tuple[str, ...]], StepInput] = {}  # see _input
        self._walking = False  # the walk is not re-entrant: targets arriving meanwhile wait
        self._later: collections.deque[tuple[Target, Future[None] | None]] = (
            collections.deque())
        # workers
        self._pool = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="tracehook")
        self._procs: CheckPool | None = None
        self._procs_wanted = self.limits.processes != 0
        self._eager = self.cache_sigs is None
        self._thread: threading.Thread | None = None
        self._closed = False
        #: called in the engine's thread after a step's evidence is recorded
        self.on_recorded: Callable[[Engine, str], None] | None = None

    # ------------------------------------------------------------------------ batch use

    def verify(self, targets: Sequence[Target]) -> None:
        """Walk ``targets`` and decide every step below them, in this thread."""
        with fewer_collections():
            for target in targets:
                self._add_target(target, None)
            self._drain()

    # ---------------------------------------------------------------------- service use

    def start(self) -> None:
        """Serve :meth:`submit` from a thread of the engine's own."""
        self._thread = threading.Thread(target=self._serve, name="tracehook-engine",
                                        daemon=True)
        self._thread.start()

    def decided(self, target: Target) -> bool:
        """Whether ``target`` is decided already (then :meth:`submit` need not be asked)."""
        step = target.drv_path
        return step in self._done and (self.cache_sigs is None or target.outputs
                                       in self.graph.requests.get(step, ()))

    def submit(self, target: Target) -> Future[None]:
        """Decide ``target``'s step (and everything below it); the future is done when it
        is, or fails with the GraphError or fault that stopped it."""
        fut: Future[None] = Future()
        if self.decided(target):
            fut.set_result(None)  # decided already: no need to wait behind other work
            return fut
        self._events.put(("target", target, fut))
        return fut

    def take_back(self, kept: Mapping[str, tuple[int, KeptStep]]) -> None:
        """Steps a gate's last run verified (:meth:`keep`), given back at its start when
        every file they were decided from is unchanged (:mod:`tracehook.gate.warmstart`):
        a walk that reaches one records it as it was and goes no further below it (a walk
        from a kept step itself records every kept step below it at once:
        :meth:`Graph.walk`). Before
        any target (the engine's thread takes them in turn with the targets)."""
        self._events.put(("take-back", dict(kept), None))

    def keep(self) -> Future[dict[str, tuple[int, KeptStep]]]:
        """The steps verified so far, with their heights, as plain values (and the kept
        steps not walked to yet), for a gate's next start; nothing when this engine saw a
        fault, a taint or tamper evidence, or trusts cache keys (what a step rests on
        below it is then part of its answer). Done in the engine's thread."""
        fut: Future[dict[str, tuple[int, KeptStep]]] = Future()
        if self._closed or self._thread is None:
            fut.set_result({})  # (no thread to ask: a batch engine, or a closed one)
            return fut
        self._events.put(("keep", None, fut))
        return fut

    def _keep(self) -> dict[str, tuple[int, KeptStep]]:
        if (self.cache_sigs is not None or self.faults or self.tainted or self.tampered
                or self.ring.wants_evidence):
            return {}
        kept = {path: (self.graph.leaves[path], step) for path, step in self._kept.items()
                if path in self.graph.leaves}
        for path in self._done:
            # a fixed output, or verified on traces for every set of outputs consumers use
            if not (self.trusted.is_fixed(path) or traced(self.graph, self.trusted, path)):
                continue
            step = self.trusted.keep(path)
            if step is not None:
                kept[path] = (self.graph.heights[path], step)
        return kept

    def close(self) -> None:
        """Stop the engine's thread (if any) and its workers."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._events.put(("stop", None, None))
            self._thread.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._procs is not None:
            self._procs.close()
            self._procs = None

    def _serve(self) -> None:
        while True:
            kind, payload, fut = self._events.get()
            if kind == "stop":
                return
            try:
                self._handle(kind, payload, fut)
                self._pump()
            except Exception as exc:  # never let one bad event stop the engine
                log.exception("verification engine: %s", exc)
                self._fail_all(exc)

    def is_tainted(self, step: str) -> bool:
        return step in self.tainted

    # --------------------------------------------------------------------------- targets

    def _add_target(self, target: Target, fut: Future[None] | None) -> None:
        self._later.append((target, fut))
        if self._walking:  # a target that came in while another is walked waits for it
            return
        self._walking = True
        try:  # (in turn, not by recursion: any number of targets may come in meanwhile)
            while self._later:
                self._walk_target(*self._later.popleft())
        finally:
            self._walking = False

    def _walk_target(self, target: Target, fut: Future[None] | None) -> None:
        try:
            self.graph.walk_target(target, self._add)
        except GraphError as exc:
            self.graph_failures[target.spec] = exc
            if fut is not None:
                fut.set_exception(exc)
            return
        except EnvironmentFault as exc:
            if fut is None:
                raise
            fut.set_exception(exc)
            return
        if fut is None:
            return
        if target.drv_path in self._done:
            fut.set_result(None)
        else:
            self._waiters.setdefault(target.drv_path, []).append(fut)

    def _requested(self, step: str, outputs: frozenset[str]) -> None:
        """A consumer or a target now also references ``outputs`` of a walked step: if the
        step is done, the traces did not verify them and the caches were not asked about
        them yet, ask now (the step is not done until they answer)."""
        if (self.cache_sigs is None or step not in self._done
                or outputs <= self._asked.get(step, set())
                or self.trusted.values(step, outputs)):
            return
        self._done.discard(step)
        if not self._ask_caches(step):
            self._done_with(step)

    def _fail_all(self, exc: BaseException) -> None:
        for futs in self._waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(exc)
        self._waiters.clear()

    # ------------------------------------------------------------------------ the loop

    def _add(self, path: str) -> None:
        """A step whose inputs were all added before it (or in an earlier target)."""
        if path in self._members:
            return
        self._members.add(path)
        count = 0
        for inp in self.graph.drvs[path].input_drvs:
            if inp in self._members and inp not in self._done:
                count += 1
                self._consumers.setdefault(inp, []).append(path)
        self._unfinished[path] = count
        if count == 0:
            self._ready.append(path)
        if self._procs_wanted and (self.limits.processes
                                   or len(self.graph.drvs) >= self.limits.process_wait_from):
            self._start_processes()
        if self._eager:
            self._pump()

    def _drain(self) -> None:
        """Run until every added step is done."""
        while self._ready or self._outstanding or self._batch:
            self._pump()
            if self._batch and not self._ready:
                self._flush()
            if self._outstanding and not self._ready:
                self._handle(*self._events.get())

    def _pump(self) -> None:
        """Whatever can be done without waiting."""
        while True:
            while self._ready:
                self._start(self._ready.popleft())
            if self._batch and (len(self._batch) >= self.MAX_BATCH or self._in_flight == 0 or (
                    len(self._batch) >= self.MIN_BATCH
                    and self._in_flight < 2 * self._proc_workers())):
                self._flush()
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            self._handle(*event)

    def _handle(self, kind: str, payload: Any, fut: Future[Any] | None) -> None:
        if kind == "target":
            self._add_target(payload, fut)
            return
        if kind == "take-back":
            self._kept.update({path: step for path, (_, step) in payload.items()})
            self.graph.leaves.update({path: height for path, (height, _) in payload.items()})
            return
        if kind == "keep":
            assert fut is not None
            fut.set_result(self._keep())
            return
        self._outstanding -= 1
        assert fut is not None
        if kind == "key":
            self._key_in(payload.key, self._checked_in_thread(payload, fut))
        elif kind == "batch":
            self._batch_in(payload, fut)
        else:
            self._caches_answered(payload, fut.result())

    def _submit(self, kind: str, payload: Any, fut: Future[Any]) -> None:
        self._outstanding += 1
        fut.add_done_callback(lambda f: self._events.put((kind, payload, f)))

    # ----------------------------------------------------------------------- the checks

    def _start_processes(self) -> None:
        self._procs_wanted = False  # once per engine
        self._procs = start_pool(self.policy, self.now, self.stores, self.limits.processes,
                                 self.facts)

    def _proc_workers(self) -> int:
        return self._procs.workers if self._procs is not None else 0

    def _check_in_thread(self, key: TraceKey) -> Future[tuple[Checked, list[StoreFault]]]:
        return check_in_threads(self._pool, self.ring, self.stores, key)

    def _checked_in_thread(self, key: TraceKey, fut: Future[Any]) -> Checked:
        checked, faults = fut.result()
        self._faults_in(key, faults)
        return checked  # type: ignore[no-any-return]

    def _faults_in(self, key: TraceKey, faults: Sequence[StoreFault]) -> None:
        if faults:
            self.faults.extend(faults)
            self.key_faults.setdefault(key.key, []).extend(faults)

    def _flush(self) -> None:
        """Hand the keys planned so far to the checker processes: in batches, so that a
        task carries enough work to pay for its trip, and enough of them to keep every
        process busy. If the processes failed since the keys were planned: to threads."""
        keys, self._batch = self._batch, []
        procs = self._procs
        if procs is None or (self.limits.processes is None and not procs.ready()
                             and len(self.graph.drvs) < self.limits.process_wait_from):
            for key in keys:
                self._submit("key", key, self._check_in_thread(key))
            return
        size = max(self.MIN_BATCH, min(self.MAX_BATCH, -(-len(keys) // procs.workers)))
        for i in range(0, len(keys), size):
            part = keys[i:i + size]
            self._in_flight += 1
            self._submit("batch", part, procs.submit(part))

    def _batch_in(self, keys: list[TraceKey], fut: Future[Any]) -> None:
        self._in_flight -= 1
        if isinstance(fut.exception(), BrokenExecutor):
            # A checker process died or could not start (e.g. a parent whose main module
            # cannot be imported again): check in threads from now on. Nothing is lost.
            if self._procs is not None:
                log.warning("checker processes failed (%s); checking traces in threads",
                            fut.exception())
                self._procs.broken = True
                self._procs = None
            self._batch.extend(keys)
            self._flush()
            return
        for key, packed in zip(keys, fut.result(), strict=True):
            checked, faults = unpack(packed, key, self.ring)
            self._faults_in(key, faults)
            self._key_in(key.key, checked)

    # ------------------------------------------------------------------------ the steps

    def _start(self, path: str) -> None:
        kept = self._kept.pop(path, None)
        if kept is not None:
            self._take_back(path, kept)
            return
        self.planned += 1
        plan = self._plan(path)
        if plan is None:
            self._recorded(path)
            return
        missing = 0
        for res in plan:
            key = res.key.key
            if key in self._fetched:
                continue
            waiters = self._key_waiters.get(key)
            if waiters is None:
                waiters = self._key_waiters[key] = []
                if self._procs is not None and not self._procs.broken:
                    self._batch.append(res.key)
                else:
                    self._submit("key", res.key, self._check_in_thread(res.key))
            waiters.append(path)
            missing += 1
        if (self._procs_wanted and len(self._key_waiters) >= self.limits.process_backlog
                and len(self.graph.drvs) >= self.limits.process_from):
            self._start_processes()
        if missing:
            self._plans[path] = plan
            self._missing_keys[path] = missing
        else:
            self._record(path, plan)

    def _take_back(self, path: str, kept: KeptStep) -> None:
        drv = self.graph.drvs[path]
        try:
            self.trusted.take_back(path, drv, kept, self.ring)
        except (ValueError, TypeError) as exc:  # not what keep() wrote: a fault, never trust
            message = f"a kept step of the last run could not be taken back: {exc}"
            log.warning("%s (%s)", message, path)
            self.faults.append(StoreFault("cache-dir", message))
            self.tainted.add(path)
            self.trusted.refuse(path, drv, Failure("unreadable", message))
            self._recorded(path)
            return
        self.taken_back += 1
        if self.on_recorded is not None:
            self.on_recorded(self, path)
        self._recorded(path)

    def _input(self, inp: str, outputs: tuple[str, ...]) -> StepInput:
        """The input as a step's plan takes it: one object for every consumer while its
        verified values stay the same list (they are final once it is decided; values
        signed by a cache come as a new list each time, and so as a new object), so that
        its entries are computed once."""
        values = self.trusted.values(inp, frozenset(outputs))
        key = (inp, outputs)
        kept = self._inputs.get(key)
        if kept is None or kept.values is not values:
            kept = self._inputs[key] = StepInput(
                inp, outputs, producer_is_content_addressed(self.graph.drvs[inp]), values)
        return kept

    def _plan(self, path: str) -> list[Resolution] | None:
        """The step's candidate resolutions, or None when it was decided without evidence."""
        drv = self.graph.drvs[path]
        inputs = []
        for inp, outputs in drv.input_drvs.items():
            if inp in self.tainted:
                self.tainted.add(path)
            inputs.append(self._input(inp, outputs))
        plan = plan_step(drv, inputs, self.policy.traces_can_verify, self.plan_limits,
                         step_key if self.facts is None else remembered(self.facts, path))
        if plan == "fixed":
            self.trusted.add_fixed(path, drv)
            return None
        if isinstance(plan, Failure):
            self.trusted.refuse(path, drv, plan)
            return None
        return plan

    def _key_in(self, key: str, checked: Checked) -> None:
        self._fetched[key] = checked
        for path in self._key_waiters.pop(key):
            self._missing_keys[path] -= 1
            if self._missing_keys[path] == 0:
                del self._missing_keys[path]
                self._record(path, self._plans.pop(path))

    def _record(self, path: str, resolutions: list[Resolution]) -> None:
        drv = self.graph.drvs[path]
        evidence = [(r, self._fetched[r.key.key]) for r in resolutions]
        if any(r.key.key in self.key_faults for r in resolutions):
            self.tainted.add(path)
        self.trusted.add_step(path, drv, evidence)
        if len(resolutions) == 1 and drv.kind == "deferred":
            outs = resolutions[0].rdrv.outputs
            self._known_paths[path] = {n: o.path for n, o in outs.items()}
        if self.trusted.sightings(path):
            self.tampered.add(path)
        if self.on_recorded is not None:
            self.on_recorded(self, path)
        self._recorded(path)

    def _recorded(self, path: str) -> None:
        if not self._ask_caches(path):
            self._done_with(path)

    def _ask_caches(self, path: str) -> bool:
        """Look up in the caches what consumers reference and no trace verified; False
        when there is nothing to ask."""
        if self.cache_sigs is None:
            return False
        drv = self.graph.drvs[path]
        asked = self._asked.setdefault(path, set())
        requested = [w for w in self.graph.requests.get(path, ()) if not w <= asked]
        lookups = cache_lookups(
            drv, requested, lambda want: bool(self.trusted.values(path, want)),
            self._known_paths.get(path, {}),
            lambda: realisation_ids(drv, self.graph.drvs.__getitem__, self._drv_hashes))
        if not lookups:
            return False
        asked.update(lookups)
        self._submit("cache", path, self._pool.submit(self.cache_sigs.outputs, lookups,
                                                      drv.name))
        return True

    def _caches_answered(self, path: str, results: dict[str, CacheOutput | Refused]) -> None:
        for got in results.values():
            if isinstance(got, Refused) and got.fault:
                log.debug("cache: %s", got.reason)  # reported once, by the caller
                self.faults.append(StoreFault("cache", got.reason))
                self.tainted.add(path)
        self.trusted.add_cache(path, self.graph.drvs[path], results)
        if self.trusted.sightings(path):
            self.tampered.add(path)
        self._done_with(path)

    def _done_with(self, path: str) -> None:
        self._done.add(path)
        for consumer in self._consumers.pop(path, ()):
            self._unfinished[consumer] -= 1
            if self._unfinished[consumer] == 0:
                self._ready.append(consumer)
        for fut in self._waiters.pop(path, ()):
            if not fut.done():
                fut.set_result(None)

