"""Fetching and checking the traces of resolved steps, in threads or in worker processes.

The work for one trace key needs no verified state, only the policy's keys and the trace
stores: fetch ``traces/<key>`` from every store, parse each JWS, verify its Ed25519
signature, read its claim (:meth:`~tracehook.verify_core.KeyRing.check`). libsodium
releases the GIL while it verifies, but parsing JSON and base64 does not, so for a large
closure the resolver hands this work to a :class:`CheckPool` of worker processes. Results
come back as plain tuples (about a tenth of what pickling the claim objects would cost the
resolver's thread); the claims are rebuilt there, each JWS kept as its compact string and
parsed again only if a report asks for it.
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

from tracehook.errors import EnvironmentFault, ParseError
from tracehook.policy import Policy
from tracehook.trace_format import Claim, KeyKind, OutputClaim, TraceKey
from tracehook.tracestore import TraceStore
from tracehook.verify_core import Accepted, Checked, KeyRing, Rejected

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreFault:
    url: str
    message: str


def fetch_and_check(
    ring: KeyRing,
    key: TraceKey,
    fetched: Sequence[tuple[TraceStore, Future[list[str]]]],
) -> tuple[Checked, list[StoreFault]]:
    """Gather one key's traces from every store (futures of ``store.get``), check them."""
    tokens: list[str] = []
    bad_files: list[Rejected] = []
    faults: list[StoreFault] = []
    for store, fut in fetched:
        try:
            tokens.extend(fut.result())
        except EnvironmentFault as exc:
            log.warning("trace store %s: %s", store.url, exc.diagnostics())
            faults.append(StoreFault(store.url, exc.diagnostics()))
        except ParseError as exc:
            bad_files.append(Rejected("malformed", None, f"{store.url} serves a malformed "
                                      f"trace file for {key.key}: {exc.diagnostics()}"))
    result = ring.check(tokens, key)
    return Checked(result.accepted, result.rejected + tuple(bad_files), result.seen), faults


def fetch_here(store: TraceStore, key: str) -> Future[list[str]]:
    """``store.get(key)`` run in this thread, as a finished future (its error kept)."""
    fut: Future[list[str]] = Future()
    try:
        fut.set_result(store.get(key))
    except BaseException as exc:  # handed on to whoever reads the future
        fut.set_exception(exc)
    return fut


# --------------------------------------------------------------------- worker processes

# What a worker sends back for one key: the accepted claims as plain values, the
# rejections (rare, small), how many signatures it saw, and the store faults.
_Plain = tuple[str, KeyKind, str, str, str, tuple[tuple[str, str, bytes], ...]]
Packed = tuple[tuple[_Plain, ...], tuple[Rejected, ...], int, tuple[StoreFault, ...]]

_worker: tuple[KeyRing, list[TraceStore]] | None = None


def _init_worker(policy: Policy, now: dt.datetime, stores: list[TraceStore]) -> None:
    global _worker
    _worker = (KeyRing(policy, now, memo=False), stores)
    gc.freeze()  # what the worker holds from here on lives as long as it does


def _ready() -> int:
    return os.getpid()


def _check_batch(keys: list[TraceKey]) -> list[Packed]:
    assert _worker is not None, "worker not initialised"
    ring, stores = _worker
    out: list[Packed] = []
    for key in keys:
        checked, faults = fetch_and_check(ring, key, [(s, fetch_here(s, key.key))
                                                      for s in stores])
        plain = tuple(
            (a.signer, a.claim.kind, a.claim.key, a.claim.kid, a.claim.compact,
             tuple((n, o.path, o.nar_hash) for n, o in a.claim.outputs.items()))
            for a in checked.accepted
        )
        out.append((plain, checked.rejected, checked.seen, tuple(faults)))
    return out


def unpack(packed: Packed) -> tuple[Checked, tuple[StoreFault, ...]]:
    plain, rejected, seen, faults = packed
    accepted = tuple(
        Accepted(signer, Claim(kind, key, {n: OutputClaim(p, h) for n, p, h in outs}, kid,
                               compact))
        for signer, kind, key, kid, compact, outs in plain
    )
    return Checked(accepted, rejected, seen), faults


class CheckPool:
    """Worker processes that fetch and check batches of trace keys.

    Started with ``spawn`` (a fresh interpreter: safe beside the caller's threads); the
    workers are started at once, so their start overlaps with the caller's walk.
    """

    def __init__(self, policy: Policy, now: dt.datetime, stores: Sequence[TraceStore],
                 workers: int) -> None:
        self.workers = workers
        self.broken = False  # set when a task found the pool broken
        self._pool = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(policy, now, list(stores)),
        )
        try:
            for _ in range(workers):
                self._pool.submit(_ready)
        except BaseException:  # e.g. a store that cannot be handed to a process
            self._pool.shutdown(wait=False, cancel_futures=True)
            raise

    def submit(self, keys: list[TraceKey]) -> Future[list[Packed]]:
        return self._pool.submit(_check_batch, keys)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def default_workers() -> int:
    """One worker per core the process may run on, at least one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores)
