"""What a run read from outside the process, so that its answer can be replayed safely.

While a :class:`ReadLog` is active (:func:`recording`), the modules that read files note
what they read: each file's path and the SHA-256 of its bytes, or that it was absent
(:func:`note_read`), and for what is judged by its metadata (the Nix store's database, a
directory listing) its identity and times (:func:`note_stat`); checker processes
record their own reads and send them back (:func:`merged`). Whatever cannot be re-checked
cheaply and completely afterwards (an HTTP or S3 read, a warning) makes the log *opaque*
(:func:`note_opaque`): such a run is never replayed. :mod:`tracehook.verify.replay`
decides from a log whether an earlier answer still holds.

When no log is active every note is one global lookup: the signer never records; the gate
does when it keeps its answers for a restart (:mod:`tracehook.gate.warmstart`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator

Stat = tuple[int, int, int, int, int]  # device, inode, size, mtime_ns, ctime_ns


class ReadLog:
    """Thread-safe: the verifier's pool threads note their reads too."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.files: dict[str, str | None] = {}  # absolute path -> sha256 hex, None: absent
        self.stats: dict[str, Stat | None] = {}  # absolute path -> stat, None: absent
        self.opaque: list[str] = []  # why this run cannot be replayed

    def read(self, path: str, data: bytes | None) -> None:
        digest = None if data is None else hashlib.sha256(data).hexdigest()
        with self._lock:
            self._file(_absolute(path), digest)

    def _file(self, key: str, digest: str | None) -> None:
        """(Holding the lock.) A file read twice with different bytes spoils the log."""
        if self.files.get(key, digest) != digest:
            self.opaque.append(f"{key} changed while it was read")
        self.files[key] = digest

    def stat(self, path: str) -> None:
        key = _absolute(path)
        got = stat_of(key)
        with self._lock:
            self._stat(key, got)

    def _stat(self, key: str, got: Stat | None) -> None:
        """(Holding the lock.) A path seen twice in different states spoils the log."""
        if self.stats.get(key, got) != got:
            self.opaque.append(f"{key} changed while it was read")
        self.stats[key] = got

    def merge(self, files: dict[str, str | None], opaque: list[str],
              stats: dict[str, Stat | None] | None = None) -> None:
        """What another process (a checker) read for this run (or what an earlier one
        read, checked again, that this one rests on)."""
        with self._lock:
            for key, digest in files.items():
                self._file(key, digest)
            for key, got in (stats or {}).items():
                self._stat(key, got)
            self.opaque.extend(w for w in opaque if w not in self.opaque)

    def snapshot(self) -> tuple[dict[str, str | None], dict[str, Stat | None], list[str]]:
        """Copies of (files, stats, opaque), taken at once."""
        with self._lock:
            return dict(self.files), dict(self.stats), list(self.opaque)

    def make_opaque(self, why: str) -> None:
        with self._lock:
            if why not in self.opaque:
                self.opaque.append(why)


def _absolute(path: str) -> str:
    """``os.path.abspath(path)``; a path that is absolute and normal already is itself (the
    common case: every read of a gate's answer notes one, and abspath costs more)."""
    if (path[:1] == "/" and "//" not in path and "/./" not in path and "/../" not in path
            and not path.endswith(("/", "/.", "/.."))):
        return path
    return os.path.abspath(path)


def stat_of(path: str) -> Stat | None:
    """What changes when the file or directory at ``path`` changes (ctime cannot be set
    back by its owner); None when it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# Every log noting now (a tuple, replaced whole: readers never see it half changed). Each
# note goes to all of them: a log may see more than its own reads (a record stricter than
# needed), never fewer.
_active: tuple[ReadLog, ...] = ()
_attach_lock = threading.Lock()


def attach(log: ReadLog) -> None:
    """Note every read into ``log`` too, until :func:`detach`."""
    global _active
    with _attach_lock:
        _active = (*_active, log)


def detach(log: ReadLog) -> None:
    global _active
    with _attach_lock:
        _active = tuple(x for x in _active if x is not log)


@contextlib.contextmanager
def recording() -> Iterator[ReadLog]:
    """Note every read made until the block ends."""
    log = ReadLog()
    attach(log)
    try:
        yield log
    finally:
        detach(log)


def is_recording() -> bool:
    return bool(_active)


def merged(files: dict[str, str | None], opaque: list[str]) -> None:
    """Add what a checker process read (:meth:`ReadLog.merge`) to the active logs."""
    for log in _active:
        log.merge(files, opaque)


def note_read(path: str | os.PathLike[str], data: bytes | None) -> None:
    for log in _active:
        log.read(os.fspath(path), data)


def note_stat(path: str | os.PathLike[str]) -> None:
    for log in _active:
        log.stat(os.fspath(path))


def note_opaque(why: str) -> None:
    for log in _active:
        log.make_opaque(why)
