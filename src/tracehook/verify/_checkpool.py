"""Fetching and checking the traces of resolved steps, in threads or in worker processes.

The work for one trace key needs no verified state, only the policy's keys and the trace
stores: fetch ``traces/<key>`` from every store, parse each JWS, verify its Ed25519
signature, read its claim, and check each hardware evidence entry against the policy's
evidence elements (:meth:`~tracehook.verify.trusted.KeyRing.check`). libsodium
releases the GIL while it verifies, but parsing JSON and base64 does not, so for a large
closure the resolver hands this work to a :class:`CheckPool` of worker processes. Results
come back as plain tuples (about a tenth of what pickling the claim objects would cost the
resolver's thread); the claims are rebuilt there, each JWS kept as its compact string and
parsed again only if a report asks for it.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import gc
import logging
import pickle
import threading
from collections.abc import Sequence
from concurrent.futures import BrokenExecutor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tracehook.errors import EnvironmentFault, ParseError, Rejected
from tracehook.stores import readlog
from tracehook.stores.drvpool import cores
from tracehook.stores.tracestore import TraceStore
from tracehook.trace.claim import KeyKind, TraceKey
from tracehook.trace.tracefile import TraceDocument
from tracehook.verify.policy import Policy
from tracehook.verify.trusted import Checked, Facts, KeyRing, Plain, readmit, to_plain

if TYPE_CHECKING:  # multiprocessing is imported when processes start (~30 ms otherwise)
    from multiprocessing.connection import Connection

    from tracehook.stores.workers import Context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreFault:
    url: str
    message: str


def fetch_and_check(
    ring: KeyRing,
    key: TraceKey,
    fetched: Sequence[tuple[TraceStore, Future[TraceDocument]]],
) -> tuple[Checked, list[StoreFault]]:
    """Gather one key's traces and evidence from every store (futures of ``store.read``),
    check them."""
    tokens: list[str] = []
    evidence: list[Any] = []
    bad_files: list[Rejected] = []
    faults: list[StoreFault] = []
    for store, fut in fetched:
        try:
            doc = fut.result()
            tokens.extend(doc.signatures)
            evidence.extend(doc.evidence)
            if ring.wants_evidence:
                bad_files += [Rejected("malformed", None, f"{store.url}: {problem}")
                              for problem in doc.problems]
        except EnvironmentFault as exc:
            log.debug("%s", exc.diagnostics())  # reported once, by the caller (names the store)
            faults.append(StoreFault(store.url, exc.diagnostics()))
        except ParseError as exc:
            bad_files.append(Rejected("malformed", None, f"{store.url} serves a malformed "
                                      f"trace file for {key.key}: {exc.diagnostics()}"))
    return ring.check(tokens, key, evidence).with_rejected(bad_files), faults


def check_in_threads(pool: ThreadPoolExecutor, ring: KeyRing, stores: Sequence[TraceStore],
                     key: TraceKey) -> Future[tuple[Checked, list[StoreFault]]]:
    """Fetch and check one key in the thread pool (the stores fetched concurrently)."""
    if len(stores) == 1:
        store = stores[0]
        return pool.submit(
            lambda: fetch_and_check(ring, key, [(store, fetch_here(store, key.key))]))
    gets = [(s, pool.submit(s.read, key.key)) for s in stores]
    return pool.submit(fetch_and_check, ring, key, gets)


def fetch_here(store: TraceStore, key: str) -> Future[TraceDocument]:
    """``store.read(key)`` run in this thread, as a finished future (its error kept)."""
    fut: Future[TraceDocument] = Future()
    try:
        fut.set_result(store.read(key))
    except BaseException as exc:  # handed on to whoever reads the future
        fut.set_exception(exc)
    return fut


# --------------------------------------------------------------------- worker processes

# What a worker sends back for one key: the Checked result as plain values
# (trusted.to_plain) and the store faults.
Packed = tuple[Plain, tuple[StoreFault, ...]]

_worker: tuple[KeyRing, list[TraceStore]] | None = None
KeyTuple = tuple[KeyKind, str, str, tuple[tuple[str, bytes], ...]]  # a TraceKey's fields


def _init_worker(policy: Policy, now: dt.datetime, stores: list[TraceStore],
                 facts: Facts | None = None) -> None:
    global _worker
    _worker = (KeyRing(policy, now, memo=False, facts=facts), stores)
    gc.freeze()  # what the worker holds from here on lives as long as it does


def _check_batch(keys: Sequence[TraceKey]) -> list[Packed]:
    assert _worker is not None, "worker not initialised"
    ring, stores = _worker
    out: list[Packed] = []
    for key in keys:
        checked, faults = fetch_and_check(ring, key, [(s, fetch_here(s, key.key))
                                                      for s in stores])
        out.append((to_plain(checked), tuple(faults)))
    return out


def _serve(conn: Connection, policy: Policy, now: dt.datetime,
           stores: list[TraceStore], facts: Facts | None = None, record: bool = False) -> None:
    """A checker process: batches of keys in, packed results out, until an empty message
    or the pipe closes. With ``record`` (the caller notes what its run reads, for a
    replay), each answer carries what this process read for the batch."""
    _init_worker(policy, now, stores, facts)
    conn.send_bytes(b"")  # ready: until now the caller checked in threads
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if not message:
            if facts is not None and hasattr(facts, "close"):
                facts.close()  # write what this checker learnt
            return
        keys: list[KeyTuple] = pickle.loads(message)
        seen: tuple[dict[str, str | None], list[str]] | None = None
        if record:
            with readlog.recording() as log_:
                result = _check_batch([TraceKey(*k) for k in keys])
            seen = (log_.files, log_.opaque)
        else:
            result = _check_batch([TraceKey(*k) for k in keys])
        conn.send_bytes(pickle.dumps((result, seen), protocol=pickle.HIGHEST_PROTOCOL))


def unpack(packed: Packed, key: TraceKey, ring: KeyRing) -> tuple[Checked, tuple[StoreFault, ...]]:
    """A worker's answer for ``key``, back through :func:`tracehook.verify.trusted.readmit`."""
    plain, faults = packed
    return readmit(plain, key, ring), faults


class WorkerLost(BrokenExecutor):
    """A checker process died, or its pipe broke."""


class _Worker:
    """One checker process, its pipe, and the batches it has not answered (in order)."""

    def __init__(self, ctx: Context, args: tuple[Any, ...]) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_serve, args=(child, *args), daemon=True,
                                   name="tracehook-checker")
        try:
            self.process.start()
        except BaseException:
            self.conn.close()
            raise
        finally:
            child.close()
        self.pending: collections.deque[Future[list[Packed]]] = collections.deque()
        self.lock = threading.Lock()
        self.lost: BaseException | None = None
        self.ready = threading.Event()  # set when the process has started and can check
        self.reader = threading.Thread(target=self._read, name="tracehook-checker-reader",
                                       daemon=True)
        self.reader.start()

    def submit(self, keys: Sequence[TraceKey]) -> Future[list[Packed]]:
        fut: Future[list[Packed]] = Future()
        message = pickle.dumps([(k.kind, k.key, k.rdrv_path, k.pins) for k in keys],
                               protocol=pickle.HIGHEST_PROTOCOL)
        with self.lock:
            if self.lost is not None:
                fut.set_exception(WorkerLost(str(self.lost)))
                return fut
            self.pending.append(fut)
        # Sent without holding the lock: a full pipe blocks this thread only, while the
        # reader goes on taking answers (so the worker can go on to the next batch).
        try:
            self.conn.send_bytes(message)
        except OSError as exc:
            with self.lock:
                unsent = fut in self.pending
                if unsent:
                    self.pending.remove(fut)
            if unsent:
                fut.set_exception(WorkerLost(f"checker process pipe: {exc}"))
        return fut

    def _read(self) -> None:
        """Runs in a thread: answers come back in the order the batches went out."""
        while True:
            try:
                data = self.conn.recv_bytes()
            except (EOFError, OSError) as exc:
                self._lose(exc)
                return
            if not self.ready.is_set():  # the first message: the process is ready
                self.ready.set()
                continue
            with self.lock:
                fut = self.pending.popleft() if self.pending else None
            if fut is not None:
                result, seen = pickle.loads(data)
                if seen is not None:
                    readlog.merged(*seen)
                fut.set_result(result)

    def _lose(self, exc: BaseException) -> None:
        with self.lock:
            self.lost = exc
            pending, self.pending = list(self.pending), collections.deque()
        for fut in pending:
            fut.set_exception(WorkerLost(f"checker process {self.process.pid} exited "
                                         f"(code {self.process.exitcode}): {exc!r}"))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send_bytes(b"")
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()
        self.reader.join(timeout=5)


class CheckPool:
    """Worker processes that fetch and check batches of trace keys.

    Forked from a server process that imported their code (:mod:`tracehook.stores.workers`:
    safe beside the caller's threads), each
    with a pipe of its own: a batch is one message each way, read back by one thread per
    worker. A batch goes to the worker with the fewest unanswered batches.
    """

    def __init__(self, policy: Policy, now: dt.datetime, stores: Sequence[TraceStore],
                 workers: int, facts: Facts | None = None) -> None:
        self.workers = workers
        self.broken = False  # set when a batch found a worker gone
        from tracehook.stores import workers as worker_processes

        ctx = worker_processes.context()
        self._procs: list[_Worker] = []
        try:
            record = readlog.is_recording()
            for _ in range(workers):
                self._procs.append(_Worker(ctx, (policy, now, list(stores), facts, record)))
        except BaseException:  # e.g. a store that cannot be handed to a process
            self.close()
            raise

    def ready(self) -> bool:
        """Whether some process has started (until then, checks go to threads: starting
        an interpreter takes a while, and a small closure is done before that)."""
        return any(w.ready.is_set() for w in self._procs)

    def submit(self, keys: Sequence[TraceKey]) -> Future[list[Packed]]:
        ready = [w for w in self._procs if w.ready.is_set()] or self._procs
        worker = min(ready, key=lambda w: len(w.pending))
        return worker.submit(keys)

    def close(self) -> None:
        for worker in self._procs:
            worker.close()
        self._procs = []


def start_pool(policy: Policy, now: dt.datetime, stores: Sequence[TraceStore],
               wanted: int | None, facts: Facts | None) -> CheckPool | None:
    """Checker processes: ``wanted`` of them (None: one per core, if there is more than
    one); None when they are not wanted or cannot start (then threads do the checks)."""
    workers = wanted or cores()
    if wanted is None and (workers < 2 or not all(s.url.startswith("file://") for s in stores)):
        # Processes pay off where checking is CPU-bound: traces read from local files.
        # Remote stores are bound by the network, and threads waiting on it are cheaper.
        return None
    try:
        return CheckPool(policy, now, stores, workers, facts)
    except Exception as exc:
        log.warning("checker processes failed (%s); checking traces in threads", exc)
        return None
