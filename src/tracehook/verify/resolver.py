"""The verifier's resolver: walks derivations, fetches traces, feeds the trusted set.

For each target it reads the derivation graph bottom-up (explicit stack, visited set,
maximum depth, cycles named), then decides the build steps as a pipeline: a step is
planned as soon as its inputs are decided. Planning computes each candidate resolution from
the *verified* values of the input outputs it references (never from what a signer says
it used); the trace of every resolved key is fetched from every trace store concurrently
(each key once per run and store) and its signatures checked in worker threads (libsodium
releases the GIL), while the calling thread plans the next ready steps; the evidence is
recorded in :class:`~tracehook.verify.trusted.TrustedSet` by the calling thread only. When
the policy trusts cache keys, a step whose referenced outputs the traces did not verify
(including a step whose inputs did not verify) is then looked up in the caches
(:mod:`tracehook.verify.cachesigs`) before its consumers are planned. Decisions live in the
core; the fetching and the order of work live here.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from tracehook.errors import Failure, GraphError, ParseError, TracehookError
from tracehook.nix.derivation import Derivation
from tracehook.nix.derivation_hash import DrvHash, realisation_ids
from tracehook.nix.storepath import basename
from tracehook.stores.binarycache import Upstream
from tracehook.stores.tracestore import TraceStore
from tracehook.trace.claim import TraceKey
from tracehook.trace.stepkey import InputOutput, Resolution, producer_is_content_addressed, step_key
from tracehook.verify._checkpool import (
    CheckPool,
    StoreFault,
    default_workers,
    fetch_and_check,
    fetch_here,
)
from tracehook.verify._pipeline import Pipeline
from tracehook.verify.cachesigs import CacheKeys, CacheOutput, CacheSigs, Refused
from tracehook.verify.policy import Policy
from tracehook.verify.report import StepReport, TargetReport, build_target_report
from tracehook.verify.summary import relied_upon, render_summary, summary
from tracehook.verify.trusted import Checked, KeyRing, TrustedSet

log = logging.getLogger(__name__)

Loader = Callable[[str], Derivation]


@dataclass(frozen=True)
class Limits:
    max_depth: int = 2000  # longest input chain below a target
    max_resolutions: int = 256  # candidate resolutions of one step
    workers: int = 8  # threads fetching and checking traces
    # Worker processes checking traces instead (libsodium releases the GIL, JSON parsing
    # does not): None starts one per core once the walk has read ``process_from``
    # derivations, if there is more than one core; 0 never; N > 0 starts N at once.
    processes: int | None = None
    process_from: int = 500


@dataclass(frozen=True)
class Target:
    spec: str  # as the user gave it
    drv_path: str
    outputs: frozenset[str] | None = None  # None: every output of the derivation
    path: str | None = None  # an output path the user asked about


class Resolver:
    def __init__(
        self,
        policy: Policy,
        stores: Sequence[TraceStore],
        load: Loader,
        now: dt.datetime,
        limits: Limits | None = None,
        caches: Sequence[Upstream] = (),
    ) -> None:
        self.policy = policy
        self.stores = list(stores)
        self.load = load
        self.now = now
        self.limits = limits or Limits()
        self.ring = KeyRing(policy, now)
        self.trusted = TrustedSet(policy.require)
        self.faults: list[StoreFault] = []
        self._drvs: dict[str, Derivation] = {}
        self._heights: dict[str, int] = {}
        self._requests: dict[str, set[frozenset[str]]] = {}
        self._fetched: dict[str, Checked] = {}
        self._graph_failures: dict[str, GraphError] = {}
        self.cache_sigs = (CacheSigs(CacheKeys(policy.narinfo_keys, now), caches)
                           if policy.narinfo_keys else None)
        self._drv_hashes: dict[str, DrvHash] = {}
        self._deferred_paths: dict[str, dict[str, str]] = {}  # one resolution's outputs
        self._procs: CheckPool | None = None
        self._procs_wanted = self.limits.processes != 0

    # ------------------------------------------------------------------------ public

    def verify(self, targets: Sequence[Target]) -> list[TargetReport]:
        with _fewer_collections():
            try:
                with ThreadPoolExecutor(self.limits.workers,
                                        thread_name_prefix="tracehook") as pool:
                    for target in targets:
                        # Planning while the walk goes on needs every consumer's request of
                        # a step before it is done, when the caches may be asked about it.
                        pipeline = Pipeline(self, pool, eager=self.cache_sigs is None)
                        self._walk_target(target, pipeline.add)
                        pipeline.drain()
            finally:
                if self._procs is not None:
                    self._procs.close()
                    self._procs = None
                self._procs_wanted = self.limits.processes != 0
            return [self._report(t) for t in targets]

    def _start_processes(self) -> CheckPool | None:
        """The checker processes, started now if the limits allow (None if not)."""
        wanted = self.limits.processes
        if self._procs is None and self._procs_wanted:
            self._procs_wanted = False  # once per run
            workers = wanted or default_workers()
            if wanted is not None or workers > 1:
                try:
                    self._procs = CheckPool(self.policy, self.now, self.stores, workers)
                except Exception as exc:
                    log.warning("checker processes failed (%s); checking traces in threads",
                                exc)
        return self._procs

    # ----------------------------------------------------------------------- the walk

    def _read(self, drv_path: str, referrer: str | None) -> Derivation:
        drv = self._drvs.get(drv_path)
        if drv is None:
            try:
                drv = self.load(drv_path)
                drv.kind  # noqa: B018  (validates the outputs)
            except ParseError as exc:
                via = f" (input of {basename(referrer)})" if referrer else ""
                text = exc.diagnostics()
                if drv_path not in text:  # the parser names the file; a validation may not
                    text = f"{drv_path}: {text}"
                raise GraphError(drv_path, f"{text}{via}") from None
            self._drvs[drv_path] = drv
            if self._procs_wanted and (len(self._drvs) >= self.limits.process_from
                                       or self.limits.processes):
                self._start_processes()  # while the walk goes on; the pipeline takes them up
        return drv

    def _walk_target(self, target: Target, emit: Callable[[str], None]) -> None:
        try:
            drv = self._read(target.drv_path, None)
            want = target.outputs or frozenset(drv.outputs)
            missing = sorted(want - set(drv.outputs))
            if missing:
                raise GraphError(target.drv_path, f"{target.drv_path} has no output "
                                 f"'{missing[0]}'")
            self._requests.setdefault(target.drv_path, set()).add(want)
            self._walk(target.drv_path, emit)
        except GraphError as exc:
            self._graph_failures[target.spec] = exc

    def _walk(self, root: str, emit: Callable[[str], None]) -> None:
        """Post-order over the inputs of ``root`` with an explicit stack: ``emit`` gets each
        step not seen before, after all of its inputs."""
        if root in self._heights:
            return
        max_depth = self.limits.max_depth
        stack = [(root, iter(self._read(root, None).input_drvs.items()))]
        on_stack = {root: 0}
        while stack:
            path, children = stack[-1]
            for child, outputs in children:
                self._requests.setdefault(child, set()).add(frozenset(outputs))
                if child in self._heights:
                    continue
                if child in on_stack:
                    cycle = [p for p, _ in stack[on_stack[child]:]] + [child]
                    raise GraphError(child, "cycle in the derivation graph: "
                                     + " -> ".join(basename(p) for p in cycle))
                if len(stack) >= max_depth:
                    raise GraphError(child, f"derivation graph deeper than {max_depth} "
                                     f"steps below {basename(root)} (raise --max-depth)")
                drv = self._read(child, path)
                on_stack[child] = len(stack)
                stack.append((child, iter(drv.input_drvs.items())))
                break
            else:
                stack.pop()
                del on_stack[path]
                inputs = self._drvs[path].input_drvs
                height = 1 + max((self._heights[c] for c in inputs), default=0)
                if height > max_depth:
                    raise GraphError(path, f"derivation graph deeper than {max_depth} steps "
                                     f"at {basename(path)} (raise --max-depth)")
                self._heights[path] = height
                emit(path)

    # -------------------------------------------------- what the pipeline asks of us

    def inputs(self, path: str) -> Iterable[str]:
        return self._drvs[path].input_drvs

    def processes(self) -> CheckPool | None:
        return None if self._procs is None or self._procs.broken else self._procs

    def checked(self, key: str) -> Checked | None:
        return self._fetched.get(key)

    def key_in(self, key: str, checked: Checked) -> None:
        self._fetched[key] = checked

    def ask_caches(self, path: str, pool: ThreadPoolExecutor
                   ) -> Future[dict[str, CacheOutput | Refused]] | None:
        if self.cache_sigs is None:
            return None
        wanted = self._cache_needs(path)
        if not wanted:
            return None
        return pool.submit(self.cache_sigs.outputs, wanted, self._drvs[path].name)

    def _cache_needs(self, path: str) -> dict[str, tuple[str, str]]:
        """The outputs of ``path`` that a consumer references and no trace verified, and
        how to look each up in the caches: ``("path", p)`` or ``("realisation", id)``."""
        drv = self._drvs[path]
        if drv.kind in ("fixed", "impure"):
            return {}
        need: set[str] = set()
        for want in self._requests.get(path, ()):
            if not self.trusted.values(path, want):
                need |= want
        wanted: dict[str, tuple[str, str]] = {}
        ids: dict[str, str] | None = None
        for name in sorted(need):
            fixed = drv.outputs[name].path or self._deferred_paths.get(path, {}).get(name)
            if fixed:
                wanted[name] = ("path", fixed)
                continue
            if ids is None:
                ids = realisation_ids(drv, self._drvs.__getitem__, self._drv_hashes)
            wanted[name] = ("realisation", ids[name])
        return wanted

    def caches_answered(self, path: str, results: dict[str, CacheOutput | Refused]) -> None:
        for got in results.values():
            if isinstance(got, Refused) and got.fault:
                log.warning("cache: %s", got.reason)
                self.faults.append(StoreFault("cache", got.reason))
        self.trusted.add_cache(path, self._drvs[path], results)

    def record(self, path: str, resolutions: list[Resolution]) -> None:
        evidence = [(r, self._fetched[r.key.key]) for r in resolutions]
        drv = self._drvs[path]
        self.trusted.add_step(path, drv, evidence)
        if len(resolutions) == 1 and drv.kind == "deferred":
            outs = resolutions[0].rdrv.outputs
            self._deferred_paths[path] = {n: o.path for n, o in outs.items()}

    def check_in_thread(self, key: TraceKey, pool: ThreadPoolExecutor) -> Future[Checked]:
        """Fetch and check one key in the thread pool (the stores fetched concurrently)."""
        if len(self.stores) == 1:
            store = self.stores[0]
            return pool.submit(lambda: self._check(key, [(store, fetch_here(store, key.key))]))
        gets = [(s, pool.submit(s.get, key.key)) for s in self.stores]
        return pool.submit(self._check, key, gets)

    def _check(self, key: TraceKey, gets: list[tuple[TraceStore, Future[list[str]]]]) -> Checked:
        """Runs in a worker thread."""
        checked, faults = fetch_and_check(self.ring, key, gets)
        self.faults.extend(faults)
        return checked

    def plan(self, path: str) -> list[Resolution] | None:
        """The step's candidate resolutions, or None when it was decided without evidence."""
        drv = self._drvs[path]
        kind = drv.kind
        if kind == "fixed":
            self.trusted.add_fixed(path, drv)
            return None
        if kind == "impure":
            self.trusted.refuse(path, drv, Failure("impure", "impure derivations cannot be "
                                                   "verified: their outputs are not traced"))
            return None
        if not self.policy.traces_can_verify:
            self.trusted.refuse(path, drv, Failure("no-trace", "the policy trusts no trace, "
                                                   "only cache signatures"))
            return None
        choices = []
        for inp, outputs in drv.input_drvs.items():
            values = self.trusted.values(inp, frozenset(outputs))
            if not values:
                self.trusted.refuse(path, drv, Failure(
                    "input", f"input {basename(inp)} ({', '.join(outputs)}) is not verified",
                    cause=inp))
                return None
            choices.append((inp, producer_is_content_addressed(self._drvs[inp]), values))
        total = 1
        for _, _, values in choices:
            total *= len(values)
        if total > self.limits.max_resolutions:
            spread = ", ".join(f"{basename(i)}: {len(v)}" for i, _, v in choices if len(v) > 1)
            self.trusted.refuse(path, drv, Failure(
                "too-many-resolutions",
                f"{total} candidate resolutions (verified values per input: {spread}) exceed "
                f"the cap of {self.limits.max_resolutions}; builders disagree on inputs this "
                "step uses: fix the divergence or raise --max-resolutions"))
            return None
        resolutions: dict[str, Resolution] = {}
        for combo in itertools.product(*(values for _, _, values in choices)):
            inputs: dict[tuple[str, str], InputOutput] = {}
            for (inp, ca, _), cand in zip(choices, combo, strict=False):
                for name, oc in cand.value:
                    inputs[(inp, name)] = InputOutput(oc.path, ca, None if ca else oc.nar_hash)
            try:
                res = step_key(drv, inputs)
            except TracehookError as exc:
                self.trusted.refuse(path, drv, Failure("resolution", f"cannot resolve: "
                                                       f"{exc.diagnostics()}"))
                return None
            resolutions.setdefault(res.key.key, res)
        return list(resolutions.values())

    # ------------------------------------------------------------------------ reports

    def _report(self, target: Target) -> TargetReport:
        closure = self._closure(target.drv_path)
        steps = [self._step_report(p) for p in closure]
        graph = self._graph_failures.get(target.spec)
        if graph is not None:
            drv = self._drvs.get(graph.drv_path)
            steps.append(StepReport(graph.drv_path, drv.name if drv else basename(graph.drv_path),
                                    "unknown" if drv is None else drv.kind, (), (), "refused",
                                    "graph", graph.diagnostics(), (), 0))
        want = None
        if graph is None:
            want = target.outputs or frozenset(self._drvs[target.drv_path].outputs)
        candidates = self.trusted.values(target.drv_path, want) if want else []
        failure = None if want is None else (
            None if candidates else self.trusted.explain(target.drv_path, want))
        inputs = {p: list(self._drvs[p].input_drvs) for p in closure}
        reliance = relied_upon(target.drv_path, steps, inputs)
        return build_target_report(target.spec, target.drv_path, target.path, candidates,
                                   failure, list(reliance.steps), self.policy, self.now,
                                   tuple(f"{f.url}: {f.message}" for f in self.faults),
                                   reliance.cache_signed, len(reliance.covered),
                                   (summary(reliance), render_summary(reliance)))

    def _closure(self, root: str) -> list[str]:
        if root not in self._heights:
            return []
        seen = {root}
        todo = [root]
        while todo:
            for child in self._drvs[todo.pop()].input_drvs:
                if child not in seen and child in self._heights:
                    seen.add(child)
                    todo.append(child)
        return sorted(seen, key=lambda p: (self._heights[p], p))

    def _step_report(self, path: str) -> StepReport:
        drv = self._drvs[path]
        height = self._heights[path]
        if path not in self.trusted:
            return StepReport(path, drv.name, drv.kind, (), (), "not-reached", None, None, (),
                              height)
        if self.trusted.is_fixed(path):
            return StepReport(path, drv.name, drv.kind, (), (), "fixed-output", None, None, (),
                              height)
        keys = tuple(f"{k.kind}:{k.key}" for k in self.trusted.keys(path))
        rejected = tuple(self.trusted.rejected(path))
        signers: set[str] = set()
        failure: Failure | None = None
        cached = False
        for want in sorted(self._requests.get(path, ()), key=sorted):
            values = self.trusted.values(path, want)
            if values:
                for v in values:
                    cached |= v.basis == "cache"
                    signers |= v.signers if v.basis == "traces" else set()
            elif failure is None:
                failure = self.trusted.explain(path, want)
        outcome = "refused" if failure else "cache-signed" if cached else "verified"
        cache = tuple((n, r) for n, r in sorted(self.trusted.cache_results(path).items())
                      if isinstance(r, CacheOutput)) if cached else ()
        return StepReport(path, drv.name, drv.kind, keys, tuple(sorted(signers)), outcome,
                          failure.kind if failure else None,
                          failure.message if failure else None, rejected, height, cache)


@contextlib.contextmanager
def _fewer_collections() -> Iterator[None]:
    """Pause the cyclic garbage collector while a closure is verified: the verifier
    allocates many small objects that live to the end (derivations, claims) and makes few
    cycles, and the collector would spend about a tenth of the time walking them. Reference
    counting still frees everything else; the collector resumes afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
