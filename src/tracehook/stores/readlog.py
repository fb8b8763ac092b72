"""What a run read from outside the process, so that its answer can be replayed safely.

While a :class:`ReadLog` is active (:func:`recording`), the modules that read files note
what they read: each file's path and the SHA-256 of its bytes, or that it was absent
(:func:`note_read`), and for what is judged by its metadata (the Nix store's database, a
directory listing) its identity and times (:func:`note_stat`); checker processes
record their own reads and send them back (:func:`merged`). Whatever cannot be re-checked
cheaply and completely afterwards (an HTTP or S3 read, a warning) makes the log *opaque*
(:func:`note_opaque`): such a run is never replayed. :mod:`tracehook.verify.replay`
decides from a log whether an earlier answer still holds.

When no log is active every note is one global lookup: the gate and the signer never
record.
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
        key = os.path.abspath(path)
        with self._lock:
            if self.files.get(key, digest) != digest:  # read twice, different bytes
                self.opaque.append(f"{key} changed while it was read")
            self.files[key] = digest

    def stat(self, path: str) -> None:
        key = os.path.abspath(path)
        got = stat_of(key)
        with self._lock:
            if self.stats.get(key, got) != got:
                self.opaque.append(f"{key} changed while it was read")
            self.stats[key] = got

    def merge(self, files: dict[str, str | None], opaque: list[str]) -> None:
        """What another process (a checker) read for this run."""
        with self._lock:
            for key, digest in files.items():
                if self.files.get(key, digest) != digest:
                    self.opaque.append(f"{key} changed while it was read")
                self.files[key] = digest
            self.opaque.extend(w for w in opaque if w not in self.opaque)

    def make_opaque(self, why: str) -> None:
        with self._lock:
            if why not in self.opaque:
                self.opaque.append(why)


def stat_of(path: str) -> Stat | None:
    """What changes when the file or directory at ``path`` changes (ctime cannot be set
    back by its owner); None when it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


_active: ReadLog | None = None


@contextlib.contextmanager
def recording() -> Iterator[ReadLog]:
    """Note every read made until the block ends (one log per process at a time)."""
    global _active
    log = ReadLog()
    _active = log
    try:
        yield log
    finally:
        _active = None


def is_recording() -> bool:
    return _active is not None


def merged(files: dict[str, str | None], opaque: list[str]) -> None:
    """Add what a checker process read (:meth:`ReadLog.merge`) to the active log."""
    if _active is not None:
        _active.merge(files, opaque)


def note_read(path: str | os.PathLike[str], data: bytes | None) -> None:
    if _active is not None:
        _active.read(os.fspath(path), data)


def note_stat(path: str | os.PathLike[str]) -> None:
    if _active is not None:
        _active.stat(os.fspath(path))


def note_opaque(why: str) -> None:
    if _active is not None:
        _active.make_opaque(why)
