"""The gate's index of the consumer's derivations: request keys -> local .drv files.

Nix asks the gate for realisations by id (``sha256:<hashDerivationModulo>!<output>``) and
for narinfos by store-path hash part; neither names a derivation. The consumer instantiated
what it wants substituted, so its store holds the .drv files: this index reads each new one
once (incrementally: the store directory is rescanned only when its mtime changed, or after
a .drv that could not be read yet) and records

- realisation id -> (drv path, output), for every derivation (Nix asks with the unresolved
  id first, and with the resolved derivation's id after resolving locally);
- output hash part -> (drv path, output), for outputs whose path the .drv names
  (input-addressed and fixed-output derivations, and resolved copies of deferred ones).

Many new .drv files at once (the first scan of a large store) are read, parsed and
checked in worker processes first (:mod:`tracehook.stores.drvpool`), and their parses
handed to the store reader inputs first, each just before it is hashed, so that the
gate's own interpreter only hashes them, and never needs an input it let go of: on 2
cores, a store of 10,000 .drv files is indexed in 1.1 s instead of 1.7 s, one of 25,000
(more than the reader keeps) in 4.8 to 5.1 s instead of 7.9.

With a verification cache (``--cache-dir``), what indexing a .drv found is kept as a fact
of that .drv (its path names its content), and once a scan has indexed
:data:`SNAPSHOT_AFTER` files the whole index is kept in one more fact (written again once as
many more, and a tenth of the index, were indexed, and when the gate stops): a restarted
gate reads that one fact for the .drv files still in the store (10,000 of them in 0.08 to
0.10 s instead of 0.13 to 0.19 s: the first requests wait for it), and the facts of each
.drv for the others.

Floating content-addressed output paths are not in any .drv: the gate learns them from
verified traces (see :mod:`tracehook.gate.service`).

**Verifying ahead.** A .drv file written shortly before a scan reads it (its inode
changed within ``ahead_window`` seconds; Nix sets a store file's mtime to 1) is most
likely part of what ``nix-instantiate`` or ``nixos-rebuild`` is about to substitute. After
each scan the index tells ``ahead`` the roots of those files (the ones no other of them
names as an input: :func:`ahead_roots`), and the gate starts deciding their closures at
once, as one walk, before Nix asks for them. Only .drv files read from the store count
(not those a restarted gate knew from its verification cache: their steps are taken back,
not decided again), and only once at least :data:`AHEAD_MIN` of them were read (over
one scan or several, within the window; then, for a window's time, every one a scan
reads): a few new steps (a small change above a closure already decided) gain nothing
from it, and a local build's few new .drv files are not worth reading traces for ahead.
Nothing is answered or logged from this until a request asks.

A running gate also indexes in the background (:meth:`DrvIndex.start_watch`): at start,
then every ``interval`` seconds when the store directory changed (less often when a look
takes long: at most a tenth of one core for a store that changes all the time), and, on
Linux, as soon as a .drv file is written there (the directory is watched with inotify,
:mod:`tracehook.stores.dirwatch`; such looks follow each other at most every
:data:`WATCH_GAP` seconds, or ten times as long as listing the directory took). So the
.drv files that ``nix-instantiate`` (or ``nixos-rebuild``) writes are indexed, and their
closures decided ahead, while it writes them, before the substitution that follows asks:
with a look every second, an instantiation shorter than that was read only after it ended,
and its closure was decided while Nix was already asking. Where no watch can be had
(another system, inotify's limits reached) the index looks every interval. A request that
misses still rescans at once (or waits for the scan in progress); the watch only moves
that work earlier, and a store directory it cannot read is logged (once until it can
again), never taken as "absent".

Hardening against what a local user can put in the store directory: a .drv that does not
parse is remembered by (size, mtime) and not read again until it changes; one that could not
be indexed for want of an input is tried again only when the directory changes; the scan
runs without holding the lock that lookups use; parsed derivations are bounded in bytes by
the store reader. A store directory that cannot be listed is a fault (502), never "absent".
"""

from __future__ import annotations

import contextlib
import logging
import marshal
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, MutableMapping
from typing import Any

from tracehook.errors import EnvironmentFault, TracehookError
from tracehook.gate import nowait
from tracehook.nix.derivation import Derivation
from tracehook.nix.derivation_hash import DrvHash, realisation_ids
from tracehook.nix.storepath import hash_part
from tracehook.stores import drvpool
from tracehook.stores.dirwatch import ENDED, OVERFLOW, DirWatch
from tracehook.stores.nixstore import StoreReader
from tracehook.verify.walk import fewer_collections

log = logging.getLogger(__name__)

DrvOutput = tuple[str, str]  # (drv path, output name)


def ahead_roots(recent: Mapping[str, Collection[str]]) -> list[str]:
    """The .drv files among ``recent`` (drv path -> its input .drv paths) that none of the
    others names as an input, sorted: the tops of what was just instantiated."""
    inputs: set[str] = set()
    for named in recent.values():
        inputs.update(named)
    return sorted(path for path in recent if path not in inputs)


WATCH_GAP = 0.05  # seconds: the soonest a look follows the last when .drv files are written


def next_look(interval: float, took: float) -> float:
    """Seconds until the background indexing looks again, after a look that took ``took``
    seconds: ``interval``, or ten times as long as the look took, whichever is longer (a
    store that changes all the time, builds or a garbage collection, is listed again at
    most so often that listing it takes a tenth of one core)."""
    return max(interval, 10 * took)


YOUNG_NS = 2_000_000_000  # a .drv that failed to parse and changed this recently is looked at again
AHEAD_MIN = 100  # recent .drv files read before their closures are decided ahead
SNAPSHOT_NS = "index-all"  # the verification cache's namespace of the whole index
SNAPSHOT_AFTER = 256  # entries indexed otherwise before the whole index is written again
CLOSE_WAIT = 5.0  # seconds a stopping gate waits for a scan to keep the whole index


class DrvIndex:
    """Thread-safe, incremental. ``refresh()`` is cheap when nothing changed (one stat)."""

    def __init__(self, reader: StoreReader) -> None:
        self.reader = reader
        self.store_dir = reader.store_dir
        root = reader.root.rstrip("/") if reader.root else ""
        self.real_dir = root + reader.store_dir
        self._lock = threading.Lock()  # held only to change the maps
        self._scan_lock = threading.Lock()  # one scan at a time
        self._seen: set[str] = set()
        self._by_id: dict[str, DrvOutput] = {}
        self._by_output: dict[str, list[DrvOutput]] = {}
        self._hashes: MutableMapping[str, DrvHash] = {}
        self._mtime: int | None = None
        self._broken: dict[str, tuple[int, int]] = {}  # path -> (size, mtime) that failed
        self._waiting: set[str] = set()  # failed for want of an input: retried on change
        self.skipped: dict[str, str] = {}  # drv path -> why it could not be indexed (yet)
        self._stop = threading.Event()
        self._recent_since = 0  # ns since the epoch: see refresh
        # recent .drv files read, not yet decided ahead: path -> (change time ns, inputs)
        self._pending: dict[str, tuple[int, tuple[str, ...]]] = {}
        self._burst_until = 0  # ns: until then, each recent .drv read is decided ahead
        self._watch: threading.Thread | None = None
        self._dirwatch: DirWatch | None = None  # the watch's, while it waits on one
        self._snapshot_read = False  # the whole index was looked for in the cache
        self._unsnapped = 0  # entries indexed otherwise since the whole index was written
        #: told, after a scan, the roots of the .drv files it read that were written
        #: within ``ahead_window`` seconds before (see "Verifying ahead" above)
        self.ahead: Callable[[list[str]], None] | None = None
        self.ahead_window = 0.0
        self.ahead_min = AHEAD_MIN
        self.listed_in = 0.0  # seconds the last scan took to list the store directory

    def __len__(self) -> int:
        return len(self._seen)

    def check_readable(self) -> None:
        """EnvironmentFault unless the store directory can be listed (the gate does not
        start on a store it cannot read)."""
        try:
            with os.scandir(self.real_dir) as entries:
                next(entries, None)
        except OSError as exc:
            raise EnvironmentFault(f"cannot list the Nix store directory {self.real_dir}: "
                                   f"{exc.strerror or exc}") from None

    def refresh(self, force: bool = False) -> int:
        """Index .drv files added since the last scan; returns how many were added.
        EnvironmentFault when the store directory cannot be read."""
        with self._scan_lock:
            try:
                mtime = os.stat(self.real_dir).st_mtime_ns
            except OSError as exc:
                raise EnvironmentFault(f"cannot read the Nix store directory {self.real_dir}: "
                                       f"{exc.strerror or exc}") from None
            if not force and mtime == self._mtime:
                return 0
            # .drv files read in this scan and written since then: verified ahead
            recent: dict[str, tuple[int, tuple[str, ...]]] | None = None
            if self.ahead is not None and self.ahead_window > 0:
                recent = {}
                self._recent_since = time.time_ns() - int(self.ahead_window * 1e9)
            listing = time.monotonic()
            try:
                with os.scandir(self.real_dir) as entries:
                    found = [(e.name, e) for e in entries if e.name.endswith(".drv")]
            except OSError as exc:
                raise EnvironmentFault(f"cannot list the Nix store directory {self.real_dir}: "
                                       f"{exc.strerror or exc}") from None
            self.listed_in = time.monotonic() - listing
            self._mtime = mtime
            snapshot = self._read_snapshot()
            added = 0
            new: list[tuple[str, os.DirEntry[str]]] = []
            with fewer_collections():  # (what it enters lives on, and makes no cycles)
                for name, entry in found:
                    path = f"{self.store_dir}/{name}"
                    if path in self._seen or self._unchanged_failure(path, entry):
                        continue
                    row = snapshot.get(path)
                    if row is not None and self._enter_row(path, row):
                        added += 1
                    elif self._known(path):
                        added += 1
                        self._unsnapped += 1
                    else:
                        new.append((path, entry))
                del snapshot
            fresh = self._read_new(new, recent)
            tell = self._ahead_due(recent) if recent is not None else None
            added += fresh
            self._unsnapped += fresh
            young = time.time_ns() - YOUNG_NS
            if any(mtime_ns > young for _, mtime_ns in self._broken.values()):
                # one that failed may still be being written (Nix writes a .drv in place):
                # its end does not change the directory, so the next look lists it again
                self._mtime = None
            if added:
                log.info("indexed %d new derivation(s), %d in all", added, len(self._seen))
        if tell:
            self._tell_ahead(tell)
        if self._snapshot_due():
            # (after the requests that waited for the scan went on with it)
            with self._scan_lock:
                if self._snapshot_due():
                    self._write_snapshot()
        return added

    def _ahead_due(self, recent: dict[str, tuple[int, tuple[str, ...]]]
                   ) -> dict[str, tuple[str, ...]] | None:
        """(With the scan lock.) The recent .drv files to decide ahead now (path -> its
        inputs), with those read before and not yet told, once there are
        :attr:`ahead_min` of them or within a window after the last time; else None (they
        wait, for a window's time at most)."""
        now = time.time_ns()
        pending = {p: v for p, v in self._pending.items() if v[0] >= self._recent_since}
        pending.update(recent)
        if not pending or (len(pending) < self.ahead_min and now >= self._burst_until):
            self._pending = pending
            return None
        self._pending = {}
        self._burst_until = now + int(self.ahead_window * 1e9)
        return {path: inputs for path, (_, inputs) in pending.items()}

    def _tell_ahead(self, recent: Mapping[str, Collection[str]]) -> None:
        """Hand the roots of what a scan read that was written just before to ``ahead``
        (outside the scan lock; a failure there is logged, never the scan's)."""
        assert self.ahead is not None
        roots = ahead_roots(recent)
        log.info("verifying ahead the closures of %d derivation(s) of %d written in the "
                 "last %g s", len(roots), len(recent), self.ahead_window)
        try:
            self.ahead(roots)
        except Exception:  # a bug: said; requests decide these steps when they ask
            log.exception("verifying ahead failed")

    def _snapshot_due(self) -> bool:
        """Whether the whole index is written again: once :data:`SNAPSHOT_AFTER` entries,
        and a tenth of the index, came from elsewhere since it was last written (a large
        store that grows a little at a time is not written whole every time; the gate
        writes the rest when it stops, :meth:`close`)."""
        return self._unsnapped >= max(SNAPSHOT_AFTER, len(self._seen) // 10)

    def _read_new(self, new: list[tuple[str, os.DirEntry[str]]],
                  recent: dict[str, tuple[int, tuple[str, ...]]] | None = None) -> int:
        """Index new .drv files (after the ones indexed before: a new .drv's inputs'
        hashes are then at hand); returns how many. Many are read in processes first
        (:mod:`tracehook.stores.drvpool`) and indexed inputs first, each parse handed to
        the reader just before it is hashed; the rest (few files, what the processes
        could not read) are read here."""
        entries = dict(new)
        added = 0
        for path, drv, size in drvpool.read_ordered(self.reader, list(entries),
                                                    _sizes(entries)):
            self.reader.remember(path, drv, size)
            if self._read(path, entries.pop(path), recent):
                added += 1
        for path, entry in entries.items():
            if self._read(path, entry, recent):
                added += 1
        return added

    def _unchanged_failure(self, path: str, entry: os.DirEntry[str]) -> bool:
        known = self._broken.get(path)
        if known is None:
            return False
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            return True
        return known == (st.st_size, st.st_mtime_ns)

    def _known(self, drv_path: str) -> bool:
        """Index ``drv_path`` from what indexing it found before, if that is known."""
        known = self._from_facts(drv_path)
        if known is None:
            return False
        ids, outputs, own = known
        self._hashes.setdefault(drv_path, own)
        self._enter(drv_path, ids, outputs)
        return True

    def _read(self, drv_path: str, entry: os.DirEntry[str] | None = None,
              recent: dict[str, tuple[int, tuple[str, ...]]] | None = None) -> bool:
        """Index ``drv_path`` from the file; with ``recent``, note it there (its change
        time and inputs) if it was written since ``_recent_since`` (its inode's change
        time: Nix sets every store file's mtime to 1 when it registers it, which changes
        the ctime)."""
        # What a failure is remembered by is looked at before the file is read: a file
        # still being written and read half, whose writing ends after the read, then
        # differs from it, and is read again (looked at after the read, it matched the
        # whole file, which was then never read again).
        before: tuple[int, int] | None = None
        changed = 0
        if entry is not None:
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)  # (kept from the scan, if it looked)
                before, changed = (st.st_size, st.st_mtime_ns), st.st_ctime_ns
        try:
            drv = self.reader.read_derivation(drv_path)
            ids = realisation_ids(drv, self._input, self._hashes, self.store_dir, drv_path)
        except EnvironmentFault as exc:
            # An input .drv is missing, unreadable or does not parse (yet): try again when
            # the store changes.
            self._waiting.add(drv_path)
            self.skipped[drv_path] = exc.diagnostics()
            log.debug("not indexing %s yet: %s", drv_path, exc.diagnostics())
            return False
        except TracehookError as exc:
            # Malformed: not read again until the file changes.
            if before is not None:
                self._broken[drv_path] = before
            self.skipped[drv_path] = exc.diagnostics()
            log.debug("not indexing %s: %s", drv_path, exc.diagnostics())
            return False
        outputs = {name: out.path for name, out in drv.outputs.items() if out.path}
        if recent is not None and changed >= self._recent_since:
            recent[drv_path] = (changed, tuple(drv.input_drvs))
        if self.reader.facts is not None:
            own = self._hashes[drv_path]
            self.reader.facts.put("index", drv_path.encode(), marshal.dumps(
                (tuple(ids.items()), tuple(outputs.items()), own.kind,
                 tuple(own.hashes.items()))))
        self._enter(drv_path, ids, outputs)
        return True

    def _input(self, drv_path: str) -> Derivation:
        """An input .drv of one being indexed. One that does not parse may still be being
        written (``nix-instantiate`` writes inputs and their consumers in any order the
        scan may see): that is the consumer's want of an input, tried again when the store
        changes, never the consumer's own fault, which would keep it out of the index
        until its own file changed (the input itself is remembered as broken when it is
        indexed)."""
        try:
            return self.reader.read_derivation(drv_path)
        except EnvironmentFault:
            raise
        except TracehookError as exc:
            raise EnvironmentFault(f"input {exc.diagnostics()}") from None

    def _from_facts(self, drv_path: str
                    ) -> tuple[dict[str, str], dict[str, str], DrvHash] | None:
        """What indexing ``drv_path`` found before (realisation ids, the output paths the
        .drv names, and its own unmasked hash modulo, which a new .drv that uses it needs),
        from the persistent cache: a function of the .drv files, which their paths name;
        kept only after the .drv was read and checked."""
        facts = self.reader.facts
        data = facts.get("index", drv_path.encode()) if facts is not None else None
        if data is None:
            return None
        try:
            ids, outputs, kind, hashes = marshal.loads(data)
            own = _own_hash(kind, hashes)
            return None if own is None else (dict(ids), dict(outputs), own)
        except (ValueError, TypeError, EOFError):
            return None  # a row of another shape: index the file again

    def _enter(self, drv_path: str, ids: dict[str, str], outputs: dict[str, str]) -> None:
        self._enter_parts(drv_path, ids, [(output, hash_part(path))
                                          for output, path in outputs.items()])

    def _enter_parts(self, drv_path: str, ids: Mapping[str, str],
                     hash_parts: Iterable[tuple[str, str]]) -> None:
        with self._lock:
            self.skipped.pop(drv_path, None)
            self._waiting.discard(drv_path)
            self._seen.add(drv_path)
            for output, rid in ids.items():
                self._by_id[rid] = (drv_path, output)
            for output, hp in hash_parts:
                self._by_output.setdefault(hp, []).append((drv_path, output))

    # ------------------------------------------------------- the whole index, in one fact

    def _read_snapshot(self) -> dict[str, Any]:
        """At the first scan, what the last run wrote of the whole index
        (:meth:`_write_snapshot`): drv path -> what indexing it found, used for the .drv
        files listed now (a restarted gate reads one fact instead of one per .drv file:
        0.6 of the time at 10,000 of them); empty later, without a cache, or when
        there is none (or it is of another shape: then the facts of each .drv are read)."""
        facts = self.reader.facts
        if self._snapshot_read or facts is None:
            return {}
        self._snapshot_read = True
        data = facts.get(SNAPSHOT_NS, self.real_dir.encode())
        if data is None:
            return {}
        try:
            with fewer_collections():  # (many small objects that live on, no cycles)
                rows = marshal.loads(data)
        except (ValueError, TypeError, EOFError):
            rows = None
        if not isinstance(rows, dict):
            log.warning("the index kept in the verification cache is unreadable: "
                        "indexing from each .drv's facts")
            return {}
        return rows

    def _enter_row(self, drv_path: str, row: Any) -> bool:
        """Index ``drv_path`` from its row of the whole index; False when the row is not
        of the shape :meth:`_write_snapshot` writes (the .drv is then indexed otherwise)."""
        try:
            ids, hash_parts, kind, hashes = row
            named, own = dict(ids), _own_hash(kind, hashes)
            parts = [(output, hp) for output, hp in hash_parts]
        except (ValueError, TypeError):
            return False
        if own is None:
            return False
        self._hashes.setdefault(drv_path, own)
        self._enter_parts(drv_path, named, parts)
        return True

    def _write_snapshot(self) -> None:
        """Keep the whole index in one fact of the verification cache, for the next start
        (a function of the .drv files it names, which their paths name, as each .drv's own
        ``index`` fact is; an entry of a .drv no longer in the store is not used). Written
        after the first scan of a store, then when :meth:`_snapshot_due`, and at
        :meth:`close`; called with the scan lock held, so nothing is indexed meanwhile."""
        facts = self.reader.facts
        if facts is None:
            return
        with fewer_collections():
            facts.put(SNAPSHOT_NS, self.real_dir.encode(), marshal.dumps(self._rows()))
        self._unsnapped = 0

    def _rows(self) -> dict[str, tuple[object, ...]]:
        """The whole index, as :meth:`_write_snapshot` keeps it."""
        ids: dict[str, list[tuple[str, str]]] = {}
        for rid, (drv_path, output) in self._by_id.items():
            ids.setdefault(drv_path, []).append((output, rid))
        hash_parts: dict[str, list[tuple[str, str]]] = {}
        for hp, entries in self._by_output.items():
            for drv_path, output in entries:
                hash_parts.setdefault(drv_path, []).append((output, hp))
        rows: dict[str, tuple[object, ...]] = {}
        for drv_path in self._seen:
            own = self._hashes.get(drv_path)
            if own is not None:
                rows[drv_path] = (tuple(ids.get(drv_path, ())),
                                  tuple(hash_parts.get(drv_path, ())), own.kind,
                                  tuple(own.hashes.items()))
        return rows

    def add(self, drv_path: str) -> bool:
        """Index one derivation now (e.g. one a request named directly)."""
        if drv_path in self._seen:
            return True
        nowait.check()  # a scan may hold the lock
        with self._scan_lock:
            return drv_path in self._seen or self._known(drv_path) or self._read(drv_path)

    def by_realisation_id(self, rid: str) -> DrvOutput | None:
        found = self._by_id.get(rid)
        if found is None:
            nowait.check()
            self.refresh()  # (or wait for the scan another request started)
            found = self._by_id.get(rid)
        return found

    def by_output_hash(self, hp: str) -> list[DrvOutput]:
        """Derivations whose .drv names an output with this hash part (usually one)."""
        found = list(self._by_output.get(hp, ()))
        if not found:
            nowait.check()
            self.refresh()
            found = list(self._by_output.get(hp, ()))
        return found

    # -------------------------------------------------------------------- background

    def start_watch(self, interval: float) -> None:
        """Index now and then every ``interval`` seconds, in a thread of its own, until
        :meth:`close` (one ``stat`` of the store directory when nothing changed)."""
        if self._watch is not None or interval <= 0:
            return
        self._watch = threading.Thread(target=self._watch_loop, args=(interval,),
                                       name="tracehook-index", daemon=True)
        self._watch.start()

    def _watch_loop(self, interval: float) -> None:
        watch = self._dirwatch = DirWatch.open(self.real_dir)  # None: every interval only
        watching = watch is not None
        log.debug("background indexing of %s every %g s%s", self.real_dir, interval,
                  " and when a .drv is written" if watch is not None else "")
        failing = False
        told = False  # the watch told of a .drv written
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    # (told: listed whatever the directory's mtime says, which a file
                    # created in the same clock tick as the last look's stat leaves as it was)
                    self.refresh(force=told)
                    if failing:
                        log.warning("the Nix store directory %s can be read again",
                                    self.real_dir)
                    failing = False
                except EnvironmentFault as exc:  # requests answer 502 meanwhile
                    if not failing:
                        log.warning("background indexing: %s", exc.diagnostics())
                    failing = True
                except Exception:  # a bug: said, and requests still index what they miss
                    log.exception("background indexing failed")
                took = time.monotonic() - started
                if watch is None and watching:  # (the directory was removed: back now?)
                    watch = self._dirwatch = DirWatch.open(self.real_dir)
                if watch is None:
                    told = False
                    self._stop.wait(next_look(interval, took))
                    continue
                # (a look a .drv's writing brings is held back by the listing's cost alone:
                # reading each new .drv once is work to be done anyway)
                got = self._wait_written(watch, started + next_look(interval, took),
                                         started + next_look(WATCH_GAP, self.listed_in))
                told = got is not None
                if got == ENDED:
                    watch.close()  # it ended with its directory
                    watch = self._dirwatch = None
        finally:
            self._dirwatch = None
            if watch is not None:
                watch.close()

    def _wait_written(self, watch: DirWatch, deadline: float, earliest: float) -> str | None:
        """Until ``deadline`` (the next look: None), or until a .drv is written and
        ``earliest`` (the soonest a look may follow the last) has come (its name, or
        :data:`~tracehook.stores.dirwatch.OVERFLOW`), or the watch ended
        (:data:`~tracehook.stores.dirwatch.ENDED`: the directory was removed); or until
        :meth:`close` (None)."""
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= deadline:
                return None
            names = watch.wait(deadline - now)  # (close() wakes it)
            if ENDED in names:
                return ENDED
            written = next((n for n in names if n.endswith(".drv") or n == OVERFLOW), None)
            if written is not None:
                self._stop.wait(max(0.0, earliest - time.monotonic()))
                later = watch.drain()  # (what was written meanwhile, the look reads)
                return ENDED if ENDED in later else written
        return None

    def close(self) -> None:
        """Stop the background indexing (if any), and keep the whole index for the next
        start if it grew since it was last kept (unless a scan is still going on after
        :data:`CLOSE_WAIT` seconds)."""
        self._stop.set()
        dirwatch = self._dirwatch
        if dirwatch is not None:
            dirwatch.wake()
        if self._watch is not None:
            self._watch.join(timeout=10)
            self._watch = None
        if self._unsnapped and self._scan_lock.acquire(timeout=CLOSE_WAIT):
            try:
                if self._unsnapped:
                    self._write_snapshot()
            finally:
                self._scan_lock.release()

    def has_drv(self, drv_path: str) -> bool:
        if drv_path in self._seen:
            return True
        return self.reader.exists(drv_path) and self.add(drv_path)


def _own_hash(kind: object, hashes: Any) -> DrvHash | None:
    """A .drv's own unmasked hash modulo as the index keeps it (its kind, and (output,
    digest) pairs), or None when it is not of that shape (ValueError or TypeError when the
    pairs are not pairs)."""
    digests = dict(hashes)
    if kind not in ("regular", "deferred") or not all(
            isinstance(d, bytes) and len(d) == 32 for d in digests.values()):
        return None
    return DrvHash(digests, kind)


def _sizes(entries: dict[str, os.DirEntry[str]]) -> dict[str, int]:
    """The files' sizes (each entry keeps what it looked up, which indexing the file
    then uses as the state it was read in)."""
    sizes: dict[str, int] = {}
    for path, entry in entries.items():
        with contextlib.suppress(OSError):
            sizes[path] = entry.stat(follow_symlinks=False).st_size
    return sizes
