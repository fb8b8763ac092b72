"""Replaying ``tracehook verify``'s answer when nothing it was decided from has changed.

A verification is a function of what it reads: the policy file, the trace files it looked
up (and the ones it found absent), the .drv files and the store's database it read, and
the reference time (only through the policy's ``not-after`` dates). A run that read only
local files records them (:mod:`tracehook.stores.readlog`) with its answer, in the
``runs/`` directory of the verification cache (``--cache-dir``). The same command run
again replays the answer when, and only when:

- the tracehook code is the same (its version and every module file's size and time);
- the command line, the working directory and the ``TRACEHOOK_*`` environment are the
  same (the record is named by their digest);
- every file the run read has the same bytes (SHA-256) or is still absent, and the
  database and directory listings it read have the same identity, size and times;
- the reference time is on the same side of every ``not-after`` in the policy.

So a revoked key (the policy's bytes change), an expired key (a ``not-after`` passed), a
tampered, added or removed trace file (its bytes, or its absence) are never answered from a
record: the run is done again. (Checker processes note what they read too, and send it back
with their answers.) Nothing else is replayed: a run that read an HTTP or S3 store,
used hardware evidence (its certificates have validity dates of their
own), logged a warning, or could not read something (a fault) records nothing. Files are
written atomically; a record that does not parse is removed and the run done again; at
most :data:`MAX_RECORDS` records and :data:`MAX_BYTES` bytes are kept (the least recently
written go first), and none of a run that read over :data:`MAX_ENTRIES` files.
"""

from __future__ import annotations

import contextlib
import hashlib
import marshal
import os
import stat
import sys
from collections.abc import Iterable, Mapping, Sequence

from tracehook.stores.readlog import Stat, stat_of

TYPE_CHECKING = False  # not typing's: a replayed run imports as little as it can
if TYPE_CHECKING:
    from tracehook.verify.policy import Policy

FORMAT = 1
MAX_RECORDS = 256
MAX_ENTRIES = 100_000
MAX_BYTES = 64 * 1024 * 1024
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_mark() -> str:
    """What changes when tracehook's code does: its version, and every module's size and
    modification time (an edited source tree keeps its version)."""
    from tracehook import __version__

    h = hashlib.sha256(__version__.encode())
    for directory, _, names in sorted(os.walk(_PACKAGE)):
        for name in sorted(names):
            if name.endswith(".py"):
                st = os.stat(os.path.join(directory, name))
                h.update(f"\0{directory}/{name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def run_key(argv: Mapping[str, object], cwd: str, env: Mapping[str, str]) -> str:
    """The record's name: the command line, the working directory, the code, and every
    ``TRACEHOOK_*`` variable."""
    ours = sorted((k, v) for k, v in env.items() if k.startswith("TRACEHOOK_"))
    text = repr([FORMAT, code_mark(), cwd, sorted(argv.items()), ours])
    return hashlib.sha256(text.encode()).hexdigest()


def not_after_bounds(policy: Policy) -> list[float]:
    """Every ``not-after`` of the policy's keys and cache keys, as seconds since the epoch:
    a record holds only while the time is on the same side of each."""
    ends = [k.not_after for k in (*policy.keys, *policy.narinfo_keys)]
    return [t.timestamp() for t in ends if t is not None]


def _side(now: float, bounds: Iterable[float]) -> list[bool]:
    return [now >= b for b in bounds]


def holds(record: Mapping[str, object], files: Mapping[str, str | None],
          stats: Mapping[str, Stat | None], now: float) -> bool:
    """Pure: does ``record`` still answer, given the files' digests and stats observed now
    and the reference time ``now`` (seconds since the epoch)?"""
    bounds = record.get("bounds")
    recorded_now = record.get("now")
    if not isinstance(bounds, list) or not isinstance(recorded_now, (int, float)):
        return False
    if _side(now, bounds) != _side(recorded_now, bounds):
        return False
    return record.get("files") == files and record.get("stats") == stats


def observe_file(path: str) -> str | None:
    """The SHA-256 of the regular file at ``path``; None if absent; "!" for anything that
    is not plainly a regular file now (a symlink, a FIFO, unreadable): never equal to a
    recorded digest, so the run is done again and reports what it finds."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        return "!"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "!"
        h = hashlib.sha256()
        while block := os.read(fd, 1 << 20):
            h.update(block)
        return h.hexdigest()
    except OSError:
        return "!"
    finally:
        os.close(fd)


def record_path(directory: str, key: str, kind: str = "runs") -> str:
    return os.path.join(directory, kind, f"{key}.run")


def load_record(path: str, needs: Mapping[str, type | tuple[type, ...]]
                ) -> dict[str, object] | None:
    """The record at ``path`` if it reads and has the fields ``needs`` names (with those
    types); None if there is none. A damaged one is removed, with a warning. A record in a
    directory that someone else could write is not used (whoever writes a record decides
    what is replayed)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        where = os.stat(os.path.dirname(path))
    except OSError:
        return None
    if where.st_uid != os.geteuid() or where.st_mode & 0o022:
        print(f"tracehook: warning: verification record {path} not used: its directory is "
              "writable by others or not ours (chmod go-w it)", file=sys.stderr)
        return None
    try:
        record = marshal.loads(data)
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ValueError("not a record of this format")
        for name, kind in {"files": dict, "stats": dict, **needs}.items():
            if not isinstance(record[name], kind):
                raise ValueError(f"field {name} of the wrong type")
    except (ValueError, KeyError, TypeError, EOFError) as exc:
        print(f"tracehook: warning: verification record {path} unusable ({exc}); removed, "
              "deciding again", file=sys.stderr)
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None
    return record


def inputs_hold(record: Mapping[str, object], now: float) -> bool:
    """Whether every input ``record`` was decided from is as it was (read again now)."""
    files, stats = record["files"], record["stats"]
    assert isinstance(files, dict) and isinstance(stats, dict)
    seen_files = {p: observe_file(p) for p in files}
    seen_stats = {p: stat_of(p) for p in stats}
    return holds(record, seen_files, seen_stats, now)


def save_record(directory: str, key: str, kind: str, record: dict[str, object]) -> None:
    """Write ``record`` atomically; :func:`_prune` keeps ``directory/kind`` bounded."""
    from pathlib import Path

    from tracehook.stores.files import atomic_write

    data = marshal.dumps({"format": FORMAT, **record})
    atomic_write(Path(record_path(directory, key, kind)), data)
    _prune(os.path.join(directory, kind))


def replay(directory: str, key: str, now: float) -> tuple[int, str] | None:
    """(exit code, output) of the recorded run if it still holds, else None."""
    record = load_record(record_path(directory, key),
                         {"exit": int, "output": str, "reference": str})
    if record is None or not inputs_hold(record, now):
        return None
    exit_code, output, at = record["exit"], record["output"], record["reference"]
    assert isinstance(exit_code, int) and isinstance(output, str) and isinstance(at, str)
    if record.get("float_time"):
        output = with_reference_time(output, at, _iso(now))
    return exit_code, output


def with_reference_time(output: str, old: str, new: str) -> str:
    """``output`` (human or JSON) with the reference time ``old`` shown as ``new``."""
    for shape in ("reference time {}", '"reference_time": "{}"'):
        output = output.replace(shape.format(old), shape.format(new))
    return output


def _iso(now: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat()


def save(directory: str, key: str, *, files: Mapping[str, str | None],
         stats: Mapping[str, Stat | None], now: float, reference: str,
         float_time: bool, bounds: Sequence[float], exit_code: int, output: str) -> None:
    """Record a run's answer (atomically; :func:`_prune` keeps the directory bounded).
    ``reference`` is how the reference time appears in ``output``; with ``float_time`` (no
    ``--at``) a replay shows its own reference time there instead."""
    if len(files) + len(stats) > MAX_ENTRIES:
        return
    save_record(directory, key, "runs", {
        "files": dict(files),
        "stats": dict(stats),
        "now": now, "bounds": sorted(bounds), "exit": exit_code, "output": output,
        "reference": reference, "float_time": float_time})


def _prune(runs: str) -> None:
    """Oldest written out first, until at most :data:`MAX_RECORDS` records and
    :data:`MAX_BYTES` bytes are left."""
    kept: list[tuple[float, int, str]] = []
    try:
        for e in os.scandir(runs):
            if e.name.endswith(".run"):
                with contextlib.suppress(OSError):
                    st = e.stat()
                    kept.append((st.st_mtime, st.st_size, e.path))
    except OSError:
        return
    kept.sort()
    total = sum(size for _, size, _ in kept)
    for _, size, path in kept:
        if len(kept) <= MAX_RECORDS and total <= MAX_BYTES:
            break
        with contextlib.suppress(OSError):
            os.unlink(path)
        total -= size
        kept = kept[1:]
