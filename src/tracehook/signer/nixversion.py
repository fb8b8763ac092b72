"""Which Nix built the step: ``(flavor, version)`` for the ``builder`` block of a trace.

laut's traces name the Nix that built (``nix_flavor``, ``nix_version``). Nix does not tell
the post-build hook its version, so :func:`detect` asks, cheapest first:

1. ``nix-flavor`` / ``nix-version`` in sign.toml (exact; nothing else is looked at);
2. the executable of the process that ran the hook (the hook's parent: nix-daemon, nix-build,
   nix): a Nix in a Nix store names itself (``/nix/store/<hash>-nix-2.26.3/bin/nix``,
   ``...-lix-2.91.1/...``): one ``readlink``;
3. ``EXE --version`` of that executable when it is a Nix binary (``/usr/bin/nix`` on Debian),
   else of the ``nix`` first on the caller's ``PATH``: run once per Nix installation and
   remembered by the executable's identity (path, device, inode, size, mtime), in memory (the
   signing agent, a long-running process) and in a small JSON file (the hook signing in its
   own process keeps it in the spool directory), so builds do not pay for it again;
4. ``("nix", "unknown")``.

The signing agent finds the hook's parent through the peer pid of the hook's connection
(``SO_PEERCRED``); an agent that may not read that process (another user) goes to step 3
with its own ``PATH``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path

from tracehook.errors import TracehookError

log = logging.getLogger(__name__)

UNKNOWN = ("nix", "unknown")
_IN_STORE = re.compile(r"/[0-9a-z]{32}-(nix|lix)-(\d[0-9A-Za-z.+_-]*)/")
_VERSION_LINE = re.compile(r"\bnix \((Nix|Lix)\b[^)]*\) (\d[0-9A-Za-z.+_-]*)")
_MAX_CACHED = 16
VERSION_TIMEOUT = 10.0


def from_store_path(exe: str) -> tuple[str, str] | None:
    """(flavor, version) when ``exe`` lies in a Nix package's store path."""
    m = _IN_STORE.search(exe)
    return (m.group(1), m.group(2)) if m else None


def parse_version_output(text: str) -> tuple[str, str] | None:
    """``nix (Nix) 2.26.3`` -> ("nix", "2.26.3"); ``nix (Lix, like Nix) 2.91.1`` -> lix."""
    m = _VERSION_LINE.search(text)
    return (m.group(1).lower(), m.group(2)) if m else None


def parent_pid(pid: int) -> int | None:
    """The parent of process ``pid`` (from ``/proc/PID/stat``), None if gone or unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        return int(stat.rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def process_exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:  # gone, or another user's process
        return None


def _looks_like_nix(exe: str) -> bool:
    return os.path.basename(exe).startswith("nix")


def _on_path(environ: Mapping[str, str]) -> str | None:
    for directory in environ.get("PATH", "").split(os.pathsep):
        candidate = os.path.join(directory or ".", "nix")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


class VersionCache:
    """Executable identity -> (flavor, version); optionally kept in a JSON file."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._memory: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()

    def _load(self) -> dict[str, list[str]]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, identity: str) -> tuple[str, str] | None:
        with self._lock:
            if identity in self._memory:
                return self._memory[identity]
        found = self._load().get(identity)
        if isinstance(found, list) and len(found) == 2 and all(isinstance(x, str) for x in found):
            return (found[0], found[1])
        return None

    def put(self, identity: str, value: tuple[str, str]) -> None:
        with self._lock:
            self._memory[identity] = value
        if self.path is None:
            return
        data = self._load()
        data[identity] = list(value)
        keep = dict(list(data.items())[-_MAX_CACHED:])
        with contextlib.suppress(OSError):  # a cache: failing to keep it costs one more run
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".nix-version.")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(keep, f)
                os.chmod(tmp, 0o644)
                os.replace(tmp, self.path)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def _ask(exe: str, environ: Mapping[str, str], cache: VersionCache) -> tuple[str, str]:
    try:
        st = os.stat(exe)
    except OSError:
        return UNKNOWN
    identity = f"{os.path.realpath(exe)}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    known = cache.get(identity)
    if known is not None:
        return known
    from tracehook.stores import proc  # only here: subprocess costs the hook ~5 ms to import

    try:
        result = proc.run([exe, "--version"], env=environ, timeout=VERSION_TIMEOUT, check=False)
        found = parse_version_output(result.stdout) if result.returncode == 0 else None
    except TracehookError as exc:
        log.debug("cannot ask %s for its version: %s", exe, exc.diagnostics())
        found = None
    value = found or UNKNOWN
    cache.put(identity, value)
    return value


def detect(
    flavor: str | None,
    version: str | None,
    nix_pid: int | None,
    environ: Mapping[str, str],
    cache: VersionCache,
) -> tuple[str, str]:
    """(flavor, version) of the Nix that ran the hook (see the module docstring).

    ``flavor``/``version``: the configured values (either set: no detection for it);
    ``nix_pid``: the process that ran the hook, if known; ``environ``: its environment.
    """
    if flavor and version:
        return flavor, version
    found: tuple[str, str] | None = None
    exe = process_exe(nix_pid) if nix_pid is not None else None
    if exe is not None:
        found = from_store_path(exe)
        if found is None and _looks_like_nix(exe):
            found = _ask(exe, environ, cache)
    if found is None or found == UNKNOWN:
        on_path = _on_path(environ)
        if on_path is not None:
            found = from_store_path(os.path.realpath(on_path)) or _ask(on_path, environ, cache)
    got = found or UNKNOWN
    return flavor or got[0], version or got[1]
