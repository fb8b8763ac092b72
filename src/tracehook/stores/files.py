"""Reading and writing files safely: regular files only, bounded, written atomically.

Files in a Nix store, a ``file://`` trace store or a ``file://`` binary cache may be
written by someone other than us. :func:`read_bounded` opens the final path component
without following a symlink (``O_NOFOLLOW``) and without blocking on a FIFO
(``O_NONBLOCK``), checks with ``fstat`` that it is a regular file, and reads at most
``limit`` bytes: a symlink to ``/dev/zero``, a FIFO, a device or a file over the limit is
an :class:`~tracehook.errors.EnvironmentFault` naming the file, never a hang, never a
MemoryError, never "absent".
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

from tracehook.errors import EnvironmentFault
from tracehook.stores.readlog import note_read

_ABSENT = (errno.ENOENT, errno.ENOTDIR)


def read_bounded(path: str | os.PathLike[str], limit: int, what: str) -> bytes | None:
    """The bytes of the regular file at ``path`` (at most ``limit``); None if it does not
    exist; EnvironmentFault (naming ``what`` and the path) for anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _ABSENT:
            note_read(path, None)
            return None
        if exc.errno == errno.ELOOP:
            raise EnvironmentFault(f"{what} {path} is a symlink; only regular files are "
                                   "read") from None
        raise EnvironmentFault(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise EnvironmentFault(f"{what} {path} is not a regular file")
        if st.st_size > limit:
            raise EnvironmentFault(f"{what} {path} is larger than {limit} bytes "
                                   f"({st.st_size})")
        # One read when the file is as large as fstat said (a short read of a regular
        # file is its end); more only when it grew meanwhile.
        # (os.read allocates what it is asked for: ask for the size, not a round figure.)
        want = min(st.st_size + 1, limit + 1)
        block = os.read(fd, want)
        chunks = [block]
        size = len(block)
        if size >= want:
            while size <= limit:
                block = os.read(fd, min(1 << 16, limit + 1 - size))
                if not block:
                    break
                chunks.append(block)
                size += len(block)
        if size > limit:
            raise EnvironmentFault(f"{what} {path} is larger than {limit} bytes")
        data = b"".join(chunks)
        note_read(path, data)
        return data
    except OSError as exc:
        raise EnvironmentFault(f"cannot read {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
