"""Being told when files are written in one directory (Linux inotify), instead of looking.

The gate's index waits here for .drv files that ``nix-instantiate`` writes into the store
directory, so that it reads them while they are written, not up to ``--index-interval``
later (:mod:`tracehook.gate.index`). A watch covers the directory's own entries only (not
recursive): a build's output tree does not fire it, only the output's top entry.

:meth:`DirWatch.open` returns None where inotify is not there (not Linux) or cannot be had
(``fs.inotify.max_user_instances`` or ``max_user_watches`` reached, a directory that cannot
be watched); the caller then looks every interval, as before. A watch says only which
names were written (closed after writing, moved in, or created): what they hold is read by
the caller, as always. When the kernel's event queue overflowed, :meth:`DirWatch.wait` says
so with :data:`OVERFLOW` (something may have been written that no event names: look at the
whole directory); when the directory was removed, with :data:`ENDED`. A file system that
does not tell (a network one written from another machine) tells nothing: the caller's
looks every interval still find what was written there.

libc's two inotify calls through ctypes, the events read with ``os.read``: the package on
PyPI (inotify_simple) does the same, and would be a new dependency of the Nix package that
the subset of the NixOS tree its tests evaluate in does not hold.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import select
import struct
import sys
import threading

log = logging.getLogger(__name__)

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000  # the watch is gone (the directory was removed)
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
WATCHED = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE
OVERFLOW = "\0overflow"  # (no file name holds a NUL byte)
ENDED = "\0ended"  # the watch is gone: the directory was removed (or its file system)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name
_READ_SIZE = 64 * 1024


class DirWatch:
    """One directory's written names, for one thread (the gate's indexing thread); any
    thread may :meth:`wake` it."""

    def __init__(self, fd: int, path: str) -> None:
        self._fd = fd
        self.path = path
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()  # (close and wake: never a closed descriptor written)
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._poll.register(self._wake_r, select.POLLIN)

    @classmethod
    def open(cls, path: str) -> DirWatch | None:
        """A watch of ``path``, or None where none can be had (why, at debug level)."""
        libc = _libc()
        if libc is None:
            return None
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            log.debug("no inotify: %s", os.strerror(ctypes.get_errno()))
            return None
        wd = libc.inotify_add_watch(fd, os.fsencode(path), WATCHED)
        if wd < 0:
            log.debug("cannot watch %s: %s", path, os.strerror(ctypes.get_errno()))
            os.close(fd)
            return None
        try:
            return cls(fd, path)
        except OSError as exc:  # (no descriptors left for its pipe)
            log.debug("cannot watch %s: %s", path, exc.strerror)
            os.close(fd)
            return None

    def wait(self, timeout: float) -> set[str]:
        """The names written since the last call, waiting up to ``timeout`` seconds for
        the first (an empty set: none in that time); :data:`OVERFLOW` among them when the
        kernel dropped events, :data:`ENDED` when the watch ended (the directory was
        removed: open another on what is there now)."""
        ready = self._poll.poll(max(0, int(timeout * 1000)))  # (Python retries on EINTR)
        if any(fd == self._wake_r for fd, _ in ready):
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
        if not any(fd == self._fd for fd, _ in ready):
            return set()
        return self.drain()

    def wake(self) -> None:
        """End a :meth:`wait` now (from another thread; it returns what it has)."""
        with self._lock:
            if self._fd >= 0:
                with contextlib.suppress(BlockingIOError):  # (already woken)
                    os.write(self._wake_w, b"\0")

    def drain(self) -> set[str]:
        """The names written since the last call, without waiting."""
        names: set[str] = set()
        while True:
            try:
                data = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                return names
            except OSError as exc:
                log.debug("reading the watch of %s: %s", self.path, exc.strerror)
                names.add(OVERFLOW)
                return names
            if not data:
                return names
            names.update(parse_events(data))

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                for fd in (self._fd, self._wake_r, self._wake_w):
                    os.close(fd)
                self._fd = -1

    def __enter__(self) -> DirWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_events(data: bytes) -> set[str]:
    """The names in a buffer of ``struct inotify_event`` records (the kernel writes whole
    records only); :data:`OVERFLOW` for a queue overflow or a record cut short,
    :data:`ENDED` for a watch that ended."""
    names: set[str] = set()
    at = 0
    while at < len(data):
        if at + _EVENT.size > len(data):
            names.add(OVERFLOW)
            break
        _, mask, _, size = _EVENT.unpack_from(data, at)
        at += _EVENT.size
        if at + size > len(data):
            names.add(OVERFLOW)
            break
        name = data[at:at + size].rstrip(b"\0")
        at += size
        if mask & IN_IGNORED:
            names.add(ENDED)
        elif mask & IN_Q_OVERFLOW:
            names.add(OVERFLOW)
        elif name:
            names.add(os.fsdecode(name))
    return names


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """libc with inotify's calls, or None (not Linux, or no such calls)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # (the interpreter's own libc)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_init1.restype = ctypes.c_int
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        libc.inotify_add_watch.restype = ctypes.c_int
    except (OSError, AttributeError) as exc:
        log.debug("no inotify: %s", exc)
        return None
    return libc
