"""The order of the verifier's work: a pipeline over build steps, inputs first.

The resolver's walk hands steps over in post-order (every input before its consumers). A
step becomes *ready* when every input it has in this pass is *done*; a ready step is
planned at once (its candidate resolutions, from its inputs' verified values); its trace
keys are checked in the thread pool, or in batches by the checker processes (each key once
per run); when the last of its keys is in, it is recorded; when the caches have been asked
about what the traces left unverified (if the policy trusts cache keys), it is done, and
its consumers may become ready.

Completions come back through one queue, so only the calling thread touches the trusted
set. With ``eager``, steps are planned while the walk is still reading derivations, so the
checkers start on the first keys at once instead of after the walk.
"""

from __future__ import annotations

import collections
import logging
import queue
from collections.abc import Iterable
from concurrent.futures import BrokenExecutor, Future, ThreadPoolExecutor
from typing import Any, Protocol

from tracehook.trace.claim import TraceKey
from tracehook.trace.stepkey import Resolution
from tracehook.verify._checkpool import CheckPool, StoreFault, unpack
from tracehook.verify.trusted import Checked

log = logging.getLogger(__name__)


class Steps(Protocol):
    """What the pipeline asks of the resolver."""

    faults: list[StoreFault]

    def inputs(self, path: str) -> Iterable[str]: ...

    def processes(self) -> CheckPool | None:
        """The checker processes, once started (the walk may start them midway) and while
        none has failed."""

    def plan(self, path: str) -> list[Resolution] | None: ...

    def checked(self, key: str) -> Checked | None: ...

    def key_in(self, key: str, checked: Checked) -> None: ...

    def check_in_thread(self, key: TraceKey, pool: ThreadPoolExecutor) -> Future[Checked]: ...

    def record(self, path: str, resolutions: list[Resolution]) -> None: ...

    def ask_caches(self, path: str, pool: ThreadPoolExecutor) -> Future[Any] | None: ...

    def caches_answered(self, path: str, results: Any) -> None: ...


class Pipeline:
    MAX_BATCH = 64  # keys per task for a checker process
    MIN_BATCH = 8  # while some are busy, wait for this many before sending more

    def __init__(self, steps: Steps, pool: ThreadPoolExecutor, eager: bool) -> None:
        self.steps = steps
        self.pool = pool
        self.procs: CheckPool | None = None
        self.eager = eager
        self.events: queue.SimpleQueue[tuple[str, Any, Future[Any]]] = queue.SimpleQueue()
        self.outstanding = 0  # futures whose completion has not been handled
        self.in_flight = 0  # batches with the checker processes
        self.ready: collections.deque[str] = collections.deque()
        self.members: set[str] = set()
        self.done: set[str] = set()
        self.unfinished_inputs: dict[str, int] = {}
        self.consumers: dict[str, list[str]] = {}
        self.plans: dict[str, list[Resolution]] = {}
        self.missing_keys: dict[str, int] = {}
        self.key_waiters: dict[str, list[str]] = {}
        self.batch: list[TraceKey] = []

    # --------------------------------------------------------------------- feeding

    def add(self, path: str) -> None:
        """A step whose inputs were all added before it (or decided in an earlier pass)."""
        self.members.add(path)
        count = 0
        for inp in self.steps.inputs(path):
            if inp in self.members and inp not in self.done:
                count += 1
                self.consumers.setdefault(inp, []).append(path)
        self.unfinished_inputs[path] = count
        if count == 0:
            self.ready.append(path)
        if self.eager:
            self._pump()

    def drain(self) -> None:
        """Run until every added step is done."""
        while self.ready or self.outstanding or self.batch:
            self._pump()
            if self.batch and not self.ready:
                self._flush()
            if self.outstanding and not self.ready:
                self._handle(*self.events.get())

    def _pump(self) -> None:
        """Whatever can be done without waiting."""
        while True:
            while self.ready:
                self._start(self.ready.popleft())
            if self.batch and (len(self.batch) >= self.MAX_BATCH or self.in_flight == 0 or (
                    len(self.batch) >= self.MIN_BATCH and self.in_flight < 2 * self._workers())):
                self._flush()
            if self.events.empty():
                return
            self._handle(*self.events.get_nowait())

    # ------------------------------------------------------------------- the checks

    def _workers(self) -> int:
        return self.procs.workers if self.procs is not None else 0

    def _flush(self) -> None:
        """Hand the keys planned so far to the checker processes: in batches, so that a
        task carries enough work to pay for its trip, and enough of them to keep every
        process busy. If the processes failed since the keys were planned: to threads."""
        keys, self.batch = self.batch, []
        if self.procs is None:
            for key in keys:
                self._submit("key", key.key, self.steps.check_in_thread(key, self.pool))
            return
        size = max(self.MIN_BATCH, min(self.MAX_BATCH, -(-len(keys) // self.procs.workers)))
        for i in range(0, len(keys), size):
            part = keys[i:i + size]
            self.in_flight += 1
            self._submit("batch", part, self.procs.submit(part))

    def _submit(self, kind: str, name: Any, fut: Future[Any]) -> None:
        self.outstanding += 1
        fut.add_done_callback(lambda f: self.events.put((kind, name, f)))

    def _handle(self, kind: str, name: Any, fut: Future[Any]) -> None:
        self.outstanding -= 1
        if kind == "key":
            self._one_in(name, fut)
        elif kind == "batch":
            self._batch_in(name, fut)
        else:
            self._cache_in(name, fut)

    def _one_in(self, key: str, fut: Future[Checked]) -> None:
        self._key_in(key, fut.result())

    def _batch_in(self, keys: list[TraceKey], fut: Future[Any]) -> None:
        self.in_flight -= 1
        if isinstance(fut.exception(), BrokenExecutor):
            # A checker process died or could not start (e.g. a parent whose main module
            # cannot be imported again): check in threads from now on. Nothing is lost.
            if self.procs is not None:
                log.warning("checker processes failed (%s); checking traces in threads",
                            fut.exception())
                self.procs.broken = True
                self.procs = None
            self.batch.extend(keys)
            self._flush()
            return
        for key, packed in zip(keys, fut.result(), strict=True):
            checked, faults = unpack(packed)
            self.steps.faults.extend(faults)
            self._key_in(key.key, checked)

    def _cache_in(self, path: str, fut: Future[Any]) -> None:
        self.steps.caches_answered(path, fut.result())
        self._done(path)

    # -------------------------------------------------------------------- the steps

    def _start(self, path: str) -> None:
        steps = self.steps
        resolutions = steps.plan(path)
        if resolutions is None:
            self._recorded(path)
            return
        missing = 0
        for res in resolutions:
            key = res.key.key
            if steps.checked(key) is not None:
                continue
            waiters = self.key_waiters.get(key)
            if waiters is None:
                waiters = self.key_waiters[key] = []
                if self.procs is None:
                    self.procs = steps.processes()
                if self.procs is not None:
                    self.batch.append(res.key)
                else:
                    self._submit("key", key, steps.check_in_thread(res.key, self.pool))
            waiters.append(path)
            missing += 1
        if missing:
            self.plans[path] = resolutions
            self.missing_keys[path] = missing
        else:
            steps.record(path, resolutions)
            self._recorded(path)

    def _key_in(self, key: str, checked: Checked) -> None:
        self.steps.key_in(key, checked)
        for path in self.key_waiters.pop(key):
            self.missing_keys[path] -= 1
            if self.missing_keys[path] == 0:
                del self.missing_keys[path]
                self.steps.record(path, self.plans.pop(path))
                self._recorded(path)

    def _recorded(self, path: str) -> None:
        fut = self.steps.ask_caches(path, self.pool)
        if fut is not None:
            self._submit("cache", path, fut)
        else:
            self._done(path)

    def _done(self, path: str) -> None:
        self.done.add(path)
        for consumer in self.consumers.pop(path, ()):
            self.unfinished_inputs[consumer] -= 1
            if self.unfinished_inputs[consumer] == 0:
                self.ready.append(consumer)
