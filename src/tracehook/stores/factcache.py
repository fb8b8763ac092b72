"""The persistent verification cache: facts that never change for a given input.

``tracehook verify --cache-dir DIR`` and ``tracehook gate --cache-dir DIR`` keep here what
costs time to compute and can never become wrong, because its key names all of its input:

- ``drv``: a .drv file's parse, keyed by its store path (a .drv path is the hash of its
  content, and a parse is kept only once the bytes hashed back to that path);
- ``ids``: a derivation's realisation ids (from hashDerivationModulo), keyed by its path;
- ``sig``: an Ed25519 check, keyed by the exact JWS bytes and the public key's bytes: "this
  key signed these bytes" (valid or not); whether the key is trusted, revoked or expired is
  decided afresh every time from the policy in force;
- ``resolve``: a build step's resolved derivation and trace key, keyed by the step's path
  and the exact input values it was resolved with;
- ``refs``: the references found by scanning a NAR, keyed by its NAR hash.
- ``index``: what the gate's .drv index found in a .drv (its realisation ids, the output
  paths it names, its own unmasked hash modulo), keyed by its path.
- ``index-all``: the gate's whole .drv index (the same findings, for every .drv it
  indexed), keyed by the store's directory: one read at a restart instead of one a .drv.

Decisions are never cached: which traces a store holds, which keys the policy trusts, and
what satisfies the trust model are read and evaluated anew on every run, so a revoked key,
an expired key or a changed trace is never answered from here. (``tracehook verify`` may
replay a whole answer, from ``runs/`` next to this database, and a restarted gate its last
run's allowed answers, from ``gate/``, when every input they were decided from is
byte-identical: :mod:`tracehook.verify.replay`, :mod:`tracehook.gate.warmstart`.)

A namespace is read into memory in one query once :data:`BULK_AFTER` of its facts were
asked for one at a time (when it holds at most :data:`MEMORY_BOUND` bytes; a bigger one is
read a row at a time): one query instead of one per fact is what makes a warm run fast, and
a run that needs only a few facts (a restarted gate asked for the steps that changed) reads
only those. Facts another process writes meanwhile are
not seen by that snapshot; they are computed again, which is never wrong.

One SQLite database (``facts.sqlite``, WAL mode) that a gate and several CLI runs may share:
SQLite serialises writers; a writer that waits longer than ``busy_timeout`` simply does not
cache. Every row carries a BLAKE2b digest of its key and value, checked on every read: a
row that does not match is dropped. A file that is not a database, or one SQLite finds
corrupt, is moved aside and rebuilt, with a warning. Bounded in size: when the rows exceed
``max_bytes``, the least recently used go first, down to 90 %.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = 3  # 2: the row check hashes ns, key length, key, value; 3: a rowid table
# A rowid table with a unique (ns, key) index, not a WITHOUT ROWID table keyed by (ns, key):
# rows are large (a .drv parse is about 1.6 KiB), and inserting them at random places in
# the primary key's B-tree split pages all the time. Measured on 60,000 facts shaped like
# a 10,000-step closure's, in transactions of 256: 72 us a row and a 156 MB file, against
# 20 us and 53 MB (a 256-fact transaction into such a cache: 22 ms, now 3 ms).
_FACTS_TABLE = (
    "CREATE TABLE IF NOT EXISTS facts (ns TEXT NOT NULL, key BLOB NOT NULL, "
    "value BLOB NOT NULL, check_ BLOB NOT NULL, size INTEGER NOT NULL, "
    "used INTEGER NOT NULL, UNIQUE (ns, key))")
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
_TOUCH_EVERY = 24 * 3600  # seconds before a read refreshes a row's last use
_CHECK_EVERY = 1000  # writes between size checks
_RECOUNT_EVERY = 32  # size checks between counts of the whole table (else a running total)
_FLUSH_ROWS = 256  # facts written in one transaction
_OPEN_ATTEMPTS = 5  # tries to open (or, closing, to write to) a database held by another
_MAX_PENDING = 4 * _FLUSH_ROWS  # facts kept for a later write while the database is busy
MEMORY_BOUND = 64 * 1024 * 1024  # bytes of one namespace read into memory at once
BULK_AFTER = 256  # facts of a namespace read one at a time before it is read whole
_FLUSH_SECONDS = 1.0


def _check(ns: str, key: bytes, value: bytes) -> bytes:
    h = hashlib.blake2b(ns.encode(), digest_size=8)
    h.update(b"\0%d\0" % len(key))
    h.update(key)
    h.update(value)
    return h.digest()


def _size(key: bytes, value: bytes) -> int:
    """What a fact counts for against the cache's bounds (its row, roughly)."""
    return len(key) + len(value) + 40


class FactCache:
    """Thread-safe (one connection per thread)."""

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_MAX_BYTES,
                 busy_timeout: float = 2.0, background: bool = False) -> None:
        """``background``: facts are written by a thread of the cache's own (started at
        the first write due), while the threads that put them go on; SQLite leaves the
        interpreter's lock while it writes, so the writing overlaps their work (a gate
        indexing a store). Without it the thread that finds a write due does it."""
        self.directory = Path(directory)
        self.background = background
        self._writer: threading.Thread | None = None
        self._due = threading.Event()
        self._stopping = False
        self.path = self.directory / "facts.sqlite"
        self.max_bytes = max_bytes
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._writes = 0
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one writer in this process at a time
        self._total: int | None = None  # bytes of rows, as last counted plus written since
        self._checks = 0
        self._pending: dict[tuple[str, bytes], bytes] = {}
        self._flushed = time.monotonic()
        self._loaded: dict[str, dict[bytes, tuple[bytes, bytes, int]] | None] = {}
        self._loaded_bytes: dict[str, int] = {}  # what each namespace in memory holds
        self._asked: dict[str, int] = {}  # facts asked for one at a time, by namespace
        #: whole namespaces are read into memory (up to MEMORY_BOUND each); a process that
        #: mostly writes (drvpool's workers) sets this False and reads row by row
        self.mirror = True
        self._touched: set[tuple[str, bytes]] = set()
        self._off = False  # set when the database cannot be used: then nothing is cached
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("verification cache %s cannot be used (%s): going on without it",
                        self.directory, exc.strerror or exc)
            self._off = True
            return
        self._open_checked()

    def __getstate__(self) -> dict[str, object]:
        """For a checker process: where the cache is, not its connections."""
        return {"directory": self.directory, "path": self.path, "max_bytes": self.max_bytes,
                "busy_timeout": self.busy_timeout, "background": False}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        self._writes = 0
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._total = None
        self._checks = 0
        self._pending = {}
        self._flushed = time.monotonic()
        self._loaded = {}
        self._loaded_bytes = {}
        self._asked = {}
        self.mirror = True
        self._touched = set()
        self._off = False
        self._writer = None
        self._due = threading.Event()
        self._stopping = False

    # ------------------------------------------------------------------ opening

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # No fsync, ever: a cache needs no durability, and an fsync can wait for the file
        # system to flush everything else written lately (seconds on a busy disk, measured
        # here). A killed process loses nothing it wrote (the writes are in the page cache);
        # a power loss can at worst damage the file, which the row checks and the rebuild
        # below detect.
        conn.execute("PRAGMA synchronous=OFF")
        return conn

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def _open_checked(self, rebuilt: bool = False) -> None:
        """Create the schema, or rebuild a file that is not a usable cache. A database
        another process holds locked for longer than we wait is not damage: it is left
        alone, and this process goes without the cache (never a wrong answer, only work
        done again)."""
        for attempt in range(_OPEN_ATTEMPTS):
            try:
                self._create_schema()
                return
            except sqlite3.OperationalError as exc:  # busy, locked, cannot open
                self._close_conn()
                if attempt + 1 == _OPEN_ATTEMPTS:
                    log.warning("verification cache %s cannot be used now (%s): going on "
                                "without it", self.path, exc)
                    self._off = True
                    return
                time.sleep(0.05 * (attempt + 1))
            except sqlite3.DatabaseError as exc:
                if rebuilt:
                    log.warning("verification cache %s is unusable even after a rebuild "
                                "(%s): going on without it", self.path, exc)
                    self._off = True
                    return
                self._rebuild(exc)
                return

    def _create_schema(self) -> None:
        conn = self._conn()
        conn.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
        row = conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        if row is not None and row[0] != str(SCHEMA):
            if not (row[0].isdigit() and int(row[0]) < SCHEMA):
                raise sqlite3.DatabaseError(f"schema {row[0]}, expected {SCHEMA}")
            self._upgrade(conn)
        conn.execute(_FACTS_TABLE)
        conn.execute("CREATE INDEX IF NOT EXISTS facts_used ON facts (used)")
        if row is None:
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA),))
        conn.execute("SELECT count(*) FROM facts WHERE ns = 'x'").fetchone()

    def _upgrade(self, conn: sqlite3.Connection) -> None:
        """A cache an older tracehook wrote: its facts are dropped and the table made anew,
        in one transaction (another process may be doing the same: the first one does it)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
            if row is not None and row[0] != str(SCHEMA):
                conn.execute("DROP TABLE IF EXISTS facts")
                conn.execute(_FACTS_TABLE)
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA),))
                log.info("verification cache %s was written by an older tracehook (schema %s): "
                         "started afresh", self.path, row[0])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _rebuild(self, exc: BaseException) -> None:
        log.warning("verification cache %s is unusable (%s): discarded and rebuilt",
                    self.path, exc)
        self._close_conn()
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            old = Path(f"{self.path}{suffix}")
            with contextlib.suppress(FileNotFoundError):
                if suffix:
                    old.unlink()
                else:
                    old.replace(old.with_name(f"facts.broken-{stamp}-{os.getpid()}.sqlite"))
        self._open_checked(rebuilt=True)

    def close(self) -> None:
        """Write what is pending (a few tries while another process is writing) and
        close this thread's connection."""
        writer = self._writer
        if writer is not None:
            self._stopping = True
            self._due.set()
            writer.join()
        for attempt in range(_OPEN_ATTEMPTS):
            if not self._pending:
                break
            if attempt:
                time.sleep(0.05 * attempt)
            with contextlib.suppress(sqlite3.Error):
                self.flush()
        self._close_conn()

    def _close_conn(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # --------------------------------------------------------------------- use

    def get(self, ns: str, key: bytes) -> bytes | None:
        """The value stored for ``key``, or None (absent, unreadable or damaged)."""
        if self._off:
            return None
        pending = self._pending.get((ns, key))
        if pending is not None:
            return pending
        loaded = self._in_memory(ns)
        if loaded is not None:
            got = loaded.get(key)
            if got is None:
                return None
            return self._checked(ns, key, *got)
        try:
            row = self._conn().execute(
                "SELECT value, check_, used FROM facts WHERE ns = ? AND key = ?",
                (ns, key)).fetchone()
        except sqlite3.OperationalError:
            return None  # locked for longer than we wait: compute instead
        except sqlite3.DatabaseError as exc:
            self._rebuild(exc)
            return None
        if row is None:
            return None
        return self._checked(ns, key, bytes(row[0]), bytes(row[1]), int(row[2]))

    def _checked(self, ns: str, key: bytes, value: bytes, check: bytes, used: int
                 ) -> bytes | None:
        if check != _check(ns, key, value):
            log.warning("verification cache %s: a damaged entry was dropped", self.path)
            loaded = self._loaded.get(ns)
            if loaded is not None:
                loaded.pop(key, None)
            self._delete(ns, key)
            return None
        if int(time.time()) - used > _TOUCH_EVERY:
            with self._lock:
                self._touched.add((ns, key))  # its last use is written with the next flush
        return value

    def _in_memory(self, ns: str) -> dict[bytes, tuple[bytes, bytes, int]] | None:
        """The namespace in memory (:meth:`_namespace`) once :data:`BULK_AFTER` of its
        facts were asked for one at a time; None before (read that fact alone): a run that
        needs a few facts of a large cache (a restarted gate deciding the steps that
        changed) does not read every fact, and one that needs many reads them in one
        query after a few hundred single ones."""
        if ns in self._loaded:
            return self._loaded[ns]
        asked = self._asked.get(ns, 0)
        if asked < BULK_AFTER:
            self._asked[ns] = asked + 1  # (threads may miscount by a few: only a count)
            return None
        return self._namespace(ns)

    def _namespace(self, ns: str) -> dict[bytes, tuple[bytes, bytes, int]] | None:
        """Every fact of ``ns`` in memory (read in one query), or None when it is larger
        than :data:`MEMORY_BOUND` (then it is read a row at a time)."""
        if ns in self._loaded:
            return self._loaded[ns]
        if not self.mirror:
            return None
        rows: dict[bytes, tuple[bytes, bytes, int]] | None = None
        size = 0
        try:
            conn = self._conn()
            size = int(conn.execute("SELECT coalesce(sum(size), 0) FROM facts WHERE ns = ?",
                                    (ns,)).fetchone()[0])
            if size <= MEMORY_BOUND:
                rows = {bytes(k): (bytes(v), bytes(c), int(u)) for k, v, c, u in conn.execute(
                    "SELECT key, value, check_, used FROM facts WHERE ns = ?", (ns,))}
        except sqlite3.OperationalError:
            return None  # busy: read row by row
        except sqlite3.DatabaseError as exc:
            self._rebuild(exc)
            return None
        with self._lock:
            if ns not in self._loaded:
                self._loaded[ns] = rows
                self._loaded_bytes[ns] = size
        return self._loaded[ns]

    def put(self, ns: str, key: bytes, value: bytes) -> None:
        """Remember a fact; written with others in one transaction (at most a second or
        256 facts later, and at :meth:`flush`) by the cache's writer thread
        (``background``) or else by the thread that finds the write due, unless another
        thread of this process is writing: they never contend for the database, and a busy
        writer takes what piled up meanwhile in its next batch. While over
        ``_MAX_PENDING`` facts wait, the thread that puts one writes them itself if no
        one else is writing."""
        if self._off:
            return
        with self._lock:
            self._pending[(ns, key)] = value
            loaded = self._loaded.get(ns)
            if loaded is not None:
                # what is written joins the namespace in memory, as long as that stays
                # within MEMORY_BOUND (a long-running gate writes facts all day): past it,
                # the namespace is let go of and read row by row
                old = loaded.get(key)
                held = self._loaded_bytes.get(ns, 0) + _size(key, value) - (
                    0 if old is None else _size(key, old[0]))
                if held > MEMORY_BOUND:
                    self._loaded[ns] = None
                    self._loaded_bytes.pop(ns, None)
                else:
                    loaded[key] = (value, _check(ns, key, value), int(time.time()))
                    self._loaded_bytes[ns] = held
            due = (len(self._pending) >= _FLUSH_ROWS
                   or time.monotonic() - self._flushed >= _FLUSH_SECONDS)
            behind = len(self._pending) >= _MAX_PENDING
        if due and self.background and not behind and not self._stopping:
            self._wake_writer()
        elif due and self._flush_lock.acquire(blocking=False):
            try:
                self._flush()
            finally:
                self._flush_lock.release()

    def _wake_writer(self) -> None:
        if self._writer is None:
            with self._lock:
                if self._writer is None:
                    self._writer = threading.Thread(target=self._write_on, daemon=True,
                                                    name="tracehook-facts")
                    self._writer.start()
        self._due.set()

    def _write_on(self) -> None:
        """The background writer: what is pending, whenever a write is due."""
        while not self._stopping:
            self._due.wait(_FLUSH_SECONDS)
            self._due.clear()
            if self._pending:
                try:
                    with self._flush_lock:
                        self._flush()
                except Exception:  # never let one bad write stop the writer
                    log.exception("verification cache %s: writing failed", self.path)
        self._close_conn()

    def flush(self) -> None:
        """Write what is pending now."""
        with self._flush_lock:
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            touched, self._touched = self._touched, set()
            self._flushed = time.monotonic()
        if touched:
            now = int(time.time())
            with contextlib.suppress(sqlite3.Error):
                self._conn().executemany("UPDATE facts SET used = ? WHERE ns = ? AND key = ?",
                                         [(now, ns, key) for ns, key in touched])
        by_ns: dict[str, list[tuple[bytes, bytes]]] = {}
        for (ns, key), value in pending.items():
            by_ns.setdefault(ns, []).append((key, value))
        for ns, items in by_ns.items():
            if not self.put_many(ns, items):
                # Busy (another writer held the database longer than we wait): kept for
                # the next flush, unless newer facts have piled up meanwhile.
                with self._lock:
                    if len(self._pending) < _MAX_PENDING:
                        for key, value in items:
                            self._pending.setdefault((ns, key), value)

    def put_many(self, ns: str, items: Iterable[tuple[bytes, bytes]]) -> bool:
        """Write facts in one transaction; False when the database was busy."""
        if self._off:
            return True
        now = int(time.time())
        rows = [(ns, k, v, _check(ns, k, v), _size(k, v), now) for k, v in items]
        if not rows:
            return True
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT OR REPLACE INTO facts VALUES (?, ?, ?, ?, ?, ?)",
                                 rows)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError:
            return False  # busy: another writer
        except sqlite3.DatabaseError as exc:
            self._rebuild(exc)
            return True
        with self._lock:
            self._writes += len(rows)
            if self._total is not None:
                self._total += sum(row[4] for row in rows)
            due = self._writes >= _CHECK_EVERY
            if due:
                self._writes = 0
        if due:
            self.evict()
        return True

    def _delete(self, ns: str, key: bytes) -> None:
        self._execute("DELETE FROM facts WHERE ns = ? AND key = ?", (ns, key))

    def _execute(self, sql: str, params: tuple[object, ...]) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn().execute(sql, params)

    def size(self) -> int:
        row = self._conn().execute("SELECT coalesce(sum(size), 0) FROM facts").fetchone()
        return int(row[0])

    def evict(self) -> int:
        """Drop the least recently used rows until the total is under 90 % of the bound;
        returns how many went."""
        try:
            self._checks += 1
            if (self._total is not None and self._total <= self.max_bytes
                    and self._checks % _RECOUNT_EVERY):
                # counted, plus what this process wrote since (a replaced row counts twice,
                # so never an underestimate of our own writes); other processes' writes are
                # seen at the next recount
                return 0
            total = self._total = self.size()
            if total <= self.max_bytes:
                return 0
            target = int(self.max_bytes * 0.9)
            conn = self._conn()
            gone = 0
            for ns, key, size in conn.execute(
                    "SELECT ns, key, size FROM facts ORDER BY used").fetchall():
                if total <= target:
                    break
                conn.execute("DELETE FROM facts WHERE ns = ? AND key = ?", (ns, key))
                total -= int(size)
                gone += 1
            self._total = total
            return gone
        except sqlite3.Error as exc:
            log.warning("verification cache %s: eviction failed: %s", self.path, exc)
            return 0
