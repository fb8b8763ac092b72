"""Publishing: drain the spool into every configured trace store, outside the build loop.

An entry leaves ``pending/`` only when every configured store has it; a store that fails
(down, refusing, serving a corrupt file) keeps the entry pending and is retried with
exponential backoff (per store, so one dead store does not slow the others). Delivery is
idempotent: a store that already holds the same claim by the same signer (same key, same
outputs; checked by verifying that stored signature, the ``rebuild_id`` may differ) gets
nothing new, so re-delivering after a crash or to a store that was up last time is harmless.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tracehook.errors import ParseError, TracehookError
from tracehook.nix.nar import parse_nar_hash
from tracehook.stores.eventlog import EventLog
from tracehook.stores.spool import Spool, SpooledItem
from tracehook.stores.tracestore import FileTraceStore, TraceStore
from tracehook.trace import crypto, jws
from tracehook.trace.claim import parse_claim

log = logging.getLogger(__name__)

EVENT = "publish"
BASE_BACKOFF = 1.0
MAX_BACKOFF = 300.0


def holds_claim(existing: Sequence[str], item: SpooledItem) -> bool:
    """Whether ``existing`` signatures already carry this entry's claim by its signer."""
    entry = item.entry
    if entry.jws in existing:
        return True
    if not entry.public_key:
        return False
    try:
        pk = crypto.parse_public_key(entry.public_key)
        wanted = {
            name: (o["path"], parse_nar_hash(o["hash"])) for name, o in entry.outputs.items()
        }
    except (ParseError, KeyError):
        return False
    for token_text in existing:
        try:
            token = jws.parse_compact(token_text)
            claim = parse_claim(token)
            if (claim.kid, claim.kind, claim.key) != (entry.kid, entry.kind, entry.key):
                continue
            got = {n: (c.path, c.nar_hash) for n, c in claim.outputs.items()}
            if got != wanted:
                continue
            jws.verify(token, pk)
        except TracehookError:
            continue
        return True
    return False


@dataclass
class StoreState:
    failures: int = 0
    retry_at: float = 0.0
    last_error: str | None = None


@dataclass
class Report:
    delivered: list[str] = field(default_factory=list)  # entry names, now in sent/
    kept: list[str] = field(default_factory=list)  # entry names still pending
    errors: dict[str, str] = field(default_factory=dict)  # store url -> error
    bad: list[str] = field(default_factory=list)  # unreadable entries moved to bad/

    @property
    def complete(self) -> bool:
        return not self.kept and not self.errors


class Publisher:
    """Delivers a spool to trace stores; keeps per-store backoff between rounds."""

    def __init__(
        self,
        spool: Spool,
        stores: Sequence[TraceStore],
        events: EventLog,
        *,
        clock: Callable[[], float] = time.monotonic,
        base_backoff: float = BASE_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
    ) -> None:
        self.spool = spool
        self.stores = list(stores)
        for store in self.stores:  # a publisher writes: a file store missing yet is created
            if isinstance(store, FileTraceStore):
                store.create = True
        self.events = events
        self.clock = clock
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        self.state = {s.url: StoreState() for s in self.stores}

    def _deliver(self, store: TraceStore, item: SpooledItem) -> None:
        if holds_claim(store.get(item.entry.key), item):
            return
        store.append(item.entry.key, [item.entry.jws])

    def _fail(self, store: TraceStore, exc: TracehookError, pending: int) -> str:
        state = self.state[store.url]
        state.failures += 1
        delay = min(self.max_backoff, self.base_backoff * 2 ** (state.failures - 1))
        state.retry_at = self.clock() + delay
        state.last_error = exc.diagnostics()
        self.events.emit(
            EVENT, "kept",
            f"trace store {store.url} failed ({state.last_error}); {pending} trace(s) stay "
            f"in the spool, retry in {delay:g} s",
            reason=state.last_error, store=store.url, pending=pending, retry_in_s=delay,
            failures=state.failures,
        )
        return state.last_error

    def drain(self) -> Report:
        """One round: every pending entry to every store that is not backing off."""
        report = Report()
        items, bad = self.spool.scan()
        for path, why in bad:
            moved = self.spool.quarantine(path)
            report.bad.append(path.name)
            self.events.emit(
                EVENT, "bad", f"unreadable spool entry moved to {moved}: {why}",
                reason=why, spool_file=str(moved),
            )
        delivered: dict[str, set[str]] = {it.path.name: set() for it in items}
        now = self.clock()
        for store in self.stores:
            state = self.state[store.url]
            if state.retry_at > now:
                report.errors[store.url] = state.last_error or "backing off"
                continue
            for index, item in enumerate(items):
                try:
                    self._deliver(store, item)
                except TracehookError as exc:
                    report.errors[store.url] = self._fail(store, exc, len(items) - index)
                    break
                delivered[item.path.name].add(store.url)
            else:
                if state.failures:
                    self.events.emit(
                        EVENT, "ok", f"trace store {store.url} is reachable again",
                        store=store.url, failures=state.failures,
                    )
                state.failures, state.retry_at, state.last_error = 0, 0.0, None
        wanted = {s.url for s in self.stores}
        for item in items:
            name = item.path.name
            if delivered[name] >= wanted:
                self.spool.mark_sent(item)
                report.delivered.append(name)
                self.events.emit(
                    EVENT, "ok",
                    f"published {item.entry.kind} trace {item.entry.key} for "
                    f"{item.entry.drv_path} to {len(wanted)} store(s)",
                    drv=item.entry.drv_path, trace_key=item.entry.key, kid=item.entry.kid,
                    stores=sorted(wanted), spool_file=name,
                )
            else:
                report.kept.append(name)
        return report

    def next_wakeup(self, interval: float) -> float:
        """Seconds until the next round: the poll interval, or sooner for a store retry."""
        now = self.clock()
        waits = [interval] + [
            max(0.0, s.retry_at - now) for s in self.state.values() if s.retry_at > now
        ]
        return min(waits)

    def run(self, interval: float, stop: threading.Event, rounds: int | None = None) -> None:
        """Drain continuously until ``stop`` is set (or ``rounds`` rounds have run)."""
        done = 0
        while not stop.is_set():
            try:
                self.drain()
            except TracehookError as exc:  # e.g. the spool directory became unreadable
                self.events.emit(EVENT, "failed", f"publishing round failed: {exc.diagnostics()}",
                                 reason=exc.diagnostics())
            done += 1
            if rounds is not None and done >= rounds:
                return
            stop.wait(self.next_wakeup(interval))
