"""Publishing: drain the spool into every configured trace store, outside the build loop.

An entry leaves ``pending/`` only when every configured store has it; a store that fails
(down, refusing, serving a corrupt file) keeps the entry pending and is retried with
exponential backoff (per store, so one dead store does not slow the others). Delivery is
idempotent: a store that already holds the same claim by the same signer (same key, same
outputs; checked by verifying that stored signature, the ``rebuild_id`` may differ) and
every hardware-evidence entry the spool entry carries (docs/FORMAT.md 9.2, equal as JSON)
gets nothing new; one that holds the claim but lacks evidence gets the evidence only. So
re-delivering after a crash or to a store that was up last time is harmless.

One item never stalls the others:

* a spool entry that can never be published (malformed, an invalid trace key, a JWS that
  does not parse or names another key) is moved to ``bad/`` with the reason logged;
* a failure for one key (a trace file in the store that is malformed as a whole, a store
  that refuses that one file) keeps that entry pending for that store, with its own backoff,
  and the round goes on with the next key;
* a store is taken as down (backoff for the whole store, nothing more sent to it this round)
  when two different keys fail one after the other with an environment error, or when
  the only key tried fails.

Delivered entries stay in ``sent/`` (the ledger that dedupes repeats) for ``keep-sent``
(default 7 days) and are then deleted, checked at most every :data:`PRUNE_EVERY` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tracehook.errors import EnvironmentFault, ParseError, TracehookError
from tracehook.nix.nar import parse_nar_hash
from tracehook.stores.eventlog import EventLog
from tracehook.stores.spool import Spool, SpooledItem
from tracehook.stores.tracestore import FileTraceStore, TraceStore, check_key
from tracehook.trace import crypto, jws
from tracehook.trace.claim import parse_claim
from tracehook.trace.tracefile import evidence_id

log = logging.getLogger(__name__)

EVENT = "publish"
BASE_BACKOFF = 1.0
MAX_BACKOFF = 300.0
PRUNE_EVERY = 600.0  # seconds between two looks at sent/ for entries past keep-sent


def unpublishable(item: SpooledItem) -> str | None:
    """Why this entry can never be published (then it belongs in ``bad/``), or None."""
    entry = item.entry
    try:
        check_key(entry.key)
        if entry.kind not in ("ca", "ia"):
            raise ParseError("spool entry", f"kind {entry.kind!r} is neither 'ca' nor 'ia'")
        claim = parse_claim(jws.parse_compact(entry.jws, "spool entry's trace"))
    except TracehookError as exc:
        return exc.diagnostics()
    if (claim.kind, claim.key) != (entry.kind, entry.key):
        return (f"its trace claims {claim.kind} key {claim.key}, the entry says "
                f"{entry.kind} key {entry.key}")
    return _bad_evidence(item) if entry.evidence else None


def _bad_evidence(item: SpooledItem) -> str | None:
    """Why an entry's evidence can never be published: malformed, or for another claim."""
    from tracehook.trace.evidence import parse_evidence_entry  # only when there is some

    entry = item.entry
    for i, value in enumerate(entry.evidence):
        try:
            parsed = parse_evidence_entry(value, f"its evidence[{i}]")
        except ParseError as exc:
            return exc.diagnostics()
        if (parsed.claim.kind, parsed.claim.key) != (entry.kind, entry.key):
            return (f"its evidence[{i}] binds {parsed.claim.kind} key {parsed.claim.key}, the "
                    f"entry says {entry.kind} key {entry.key}")
    return None


def _naming(store: TraceStore, message: str | None) -> str:
    """``message`` naming the store once (the stores' own errors name it already)."""
    text = message or "failed"
    return text if store.url in text else f"trace store {store.url}: {text}"


def holds_evidence(existing: Sequence[Any], item: SpooledItem) -> bool:
    """Whether every evidence entry of this spool entry is in ``existing`` (equal as JSON)."""
    there = {evidence_id(e) for e in existing}
    return all(evidence_id(e) in there for e in item.entry.evidence)


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
    """Backoff of one store, or of one key at one store."""

    failures: int = 0
    retry_at: float = 0.0
    last_error: str | None = None


@dataclass
class Report:
    delivered: list[str] = field(default_factory=list)  # entry names, now in sent/
    kept: list[str] = field(default_factory=list)  # entry names still pending
    errors: dict[str, str] = field(default_factory=dict)  # store url -> error
    bad: list[str] = field(default_factory=list)  # entries moved to bad/
    key_errors: dict[str, str] = field(default_factory=dict)  # "url key" -> error
    locked: list[str] = field(default_factory=list)  # entries this process may not read
    pruned: int = 0  # delivered entries forgotten this round

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
        keep_sent: float | None = None,
        prune_every: float = PRUNE_EVERY,
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
        self.keep_sent = keep_sent
        self.prune_every = prune_every
        self.state = {s.url: StoreState() for s in self.stores}
        self.key_state: dict[tuple[str, str], StoreState] = {}  # (store url, entry name)
        self._last_prune: float | None = None
        self._locked_seen: set[str] = set()

    def _deliver(self, store: TraceStore, item: SpooledItem) -> None:
        entry = item.entry
        doc = store.read(entry.key)
        claimed = holds_claim(doc.signatures, item)
        if claimed and holds_evidence(doc.evidence, item):
            return
        store.append(entry.key, [] if claimed else [entry.jws], entry.evidence)

    def _backoff(self, state: StoreState, exc: TracehookError) -> float:
        state.failures += 1
        delay = float(min(self.max_backoff, self.base_backoff * 2 ** (state.failures - 1)))
        state.retry_at = self.clock() + delay
        state.last_error = exc.diagnostics()
        return delay

    def _fail(self, store: TraceStore, exc: TracehookError, pending: int) -> str:
        state = self.state[store.url]
        delay = self._backoff(state, exc)
        self.events.emit(
            EVENT, "kept",
            f"{_naming(store, state.last_error)}; {pending} trace(s) stay in the spool, "
            f"retry in {delay:g} s",
            reason=state.last_error, store=store.url, pending=pending, retry_in_s=delay,
            failures=state.failures,
        )
        return state.last_error or ""

    def _fail_key(self, store: TraceStore, item: SpooledItem, exc: TracehookError,
                  report: Report) -> None:
        state = self.key_state.setdefault((store.url, item.path.name), StoreState())
        delay = self._backoff(state, exc)
        entry = item.entry
        report.key_errors[f"{store.url} {entry.key}"] = state.last_error or ""
        self.events.emit(
            EVENT, "kept",
            f"{entry.kind} trace {entry.key} not delivered: "
            f"{_naming(store, state.last_error)}; it stays in the spool, retry in "
            f"{delay:g} s; other traces go on",
            reason=state.last_error, store=store.url, trace_key=entry.key,
            drv=entry.drv_path, spool_file=item.path.name, retry_in_s=delay,
            failures=state.failures,
        )

    def _sweep(self, report: Report) -> list[SpooledItem]:
        """The pending entries worth trying; the others to ``bad/`` (or left, if locked)."""
        scan = self.spool.scan()
        doomed = list(scan.bad)
        items: list[SpooledItem] = []
        for item in scan.items:
            why = unpublishable(item)
            if why is None:
                items.append(item)
            else:
                doomed.append((item.path, why))
        for path, why in doomed:
            try:
                moved = self.spool.quarantine(path)
            except EnvironmentFault as exc:
                report.kept.append(path.name)
                self.events.emit(EVENT, "failed", f"spool entry {path} can never be published "
                                 f"({why}) and cannot be moved to bad/: {exc.diagnostics()}",
                                 reason=why, spool_file=str(path))
                continue
            report.bad.append(path.name)
            self.events.emit(
                EVENT, "bad", f"spool entry moved to {moved}, it can never be published: {why}",
                reason=why, spool_file=str(moved),
            )
        for path, why in scan.locked:
            report.locked.append(path.name)
            report.kept.append(path.name)
            if path.name not in self._locked_seen:  # once per entry, not every round
                self._locked_seen.add(path.name)
                self.events.emit(EVENT, "kept", f"spool entry {path} left pending: {why}",
                                 reason=why, spool_file=str(path))
        return items

    def _prune(self, report: Report) -> None:
        now = self.clock()
        if self.keep_sent is None or (
            self._last_prune is not None and now - self._last_prune < self.prune_every
        ):
            return
        self._last_prune = now
        report.pruned = self.spool.prune_sent(self.keep_sent)
        if report.pruned:
            self.events.emit(
                EVENT, "pruned",
                f"forgot {report.pruned} delivered trace(s) older than {self.keep_sent:g} s "
                f"from the spool's ledger ({self.spool.sent_dir})",
                pruned=report.pruned, keep_sent_s=self.keep_sent,
            )

    def _to_store(self, store: TraceStore, items: Sequence[SpooledItem],
                  delivered: dict[str, set[str]], report: Report, now: float) -> None:
        """One round for one store; see the module docstring for what stops it."""
        suspect: tuple[SpooledItem, TracehookError] | None = None
        any_ok = False
        for item in items:
            key_state = self.key_state.get((store.url, item.path.name))
            if key_state is not None and key_state.retry_at > now:
                continue
            try:
                self._deliver(store, item)
            except ParseError as exc:  # this key's file in the store, not the store
                self._fail_key(store, item, exc, report)
                continue
            except TracehookError as exc:
                if suspect is not None:  # two keys in a row: the store is down
                    left = sum(store.url not in delivered[it.path.name] for it in items)
                    report.errors[store.url] = self._fail(store, exc, left)
                    return
                suspect = (item, exc)
                continue
            any_ok = True
            delivered[item.path.name].add(store.url)
            self.key_state.pop((store.url, item.path.name), None)
            if suspect is not None:  # the store answers: that failure was the key's own
                self._fail_key(store, *suspect, report)
                suspect = None
        if suspect is not None:
            if any_ok:
                self._fail_key(store, *suspect, report)
            else:
                left = sum(store.url not in delivered[it.path.name] for it in items)
                report.errors[store.url] = self._fail(store, suspect[1], left)
                return
        state = self.state[store.url]
        if state.failures:
            self.events.emit(
                EVENT, "ok", f"trace store {store.url} is reachable again",
                store=store.url, failures=state.failures,
            )
        state.failures, state.retry_at, state.last_error = 0, 0.0, None

    def drain(self) -> Report:
        """One round: every pending entry to every store that is not backing off."""
        report = Report()
        self._prune(report)
        items = self._sweep(report)
        delivered: dict[str, set[str]] = {it.path.name: set() for it in items}
        now = self.clock()
        for store in self.stores:
            state = self.state[store.url]
            if state.retry_at > now:
                report.errors[store.url] = state.last_error or "backing off"
                continue
            self._to_store(store, items, delivered, report, now)
        wanted = {s.url for s in self.stores}
        live = {(url, name) for url in wanted for name in delivered}
        self.key_state = {k: v for k, v in self.key_state.items() if k in live}
        for item in items:
            name = item.path.name
            if delivered[name] >= wanted:
                self.spool.mark_sent(item)
                report.delivered.append(name)
                with_evidence = (f" with {len(item.entry.evidence)} hardware evidence "
                                 "entr" + ("y" if len(item.entry.evidence) == 1 else "ies")
                                 if item.entry.evidence else "")
                self.events.emit(
                    EVENT, "ok",
                    f"published {item.entry.kind} trace {item.entry.key}{with_evidence} for "
                    f"{item.entry.drv_path} to {len(wanted)} store(s)",
                    drv=item.entry.drv_path, trace_key=item.entry.key, kid=item.entry.kid,
                    stores=sorted(wanted), spool_file=name, evidence=len(item.entry.evidence),
                )
            else:
                report.kept.append(name)
        return report

    def next_wakeup(self, interval: float) -> float:
        """Seconds until the next round: the poll interval, or sooner for a store retry."""
        now = self.clock()
        states = [*self.state.values(), *self.key_state.values()]
        waits = [interval] + [max(0.0, s.retry_at - now) for s in states if s.retry_at > now]
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
