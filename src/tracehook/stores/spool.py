"""The local spool: signed traces waiting to be published. No network I/O here.

The post-build hook writes each signed trace into the spool and returns; ``tracehook
publish`` delivers it later. Layout under the spool directory::

    tmp/                 half-written entries (same file system, for atomic links)
    pending/<name>.json  signed, not yet in every configured trace store
    sent/<name>.json     delivered everywhere; kept as the ledger that dedupes repeats

    bad/<name>.json      entries that can never be published, kept for a person to look at

``<name>`` is ``<trace key>-<kid thumbprint>-<claim digest>``: the claim digest covers the
key, the signer and the claimed outputs (not the random ``rebuild_id``, nor the hardware
evidence an entry may carry), so the second hook call Nix makes for one build step, and a
``--check`` rebuild that reproduced the outputs, find the entry already there and add
nothing. An entry appears in ``pending/`` whole or not
at all (written in ``tmp/``, fsynced, hard-linked into place), and moves to ``sent/`` by one
rename, so a crash at any point loses nothing and duplicates nothing.

Sharing with an unprivileged publisher: the hook runs as root (in the nix-daemon), the
publisher and its signing agent may run as their own user. A spool directory with the
setgid bit (``install -d -m 2770 -o tracehook -g tracehook DIR``) is shared with its group:
subdirectories are made ``2770`` with that group, entries ``0640`` with that group, so the
publisher can read every entry and move it (renames need only the directory's write bit).
A spool directory without the setgid bit is private: ``0700`` directories, ``0600`` entries
(the default, for a publisher running as the same user as the hook).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracehook.errors import EnvironmentFault, ParseError

ENTRY_VERSION = 1


def claim_digest(kind: str, key: str, kid: str, outputs: dict[str, dict[str, str]]) -> str:
    """16 hex digits identifying a claim: same step, signer and outputs, same digest."""
    text = f"{kind}\n{key}\n{kid}\n" + "".join(
        f"{name} {o['path']} {o['hash']}\n" for name, o in sorted(outputs.items())
    )
    return hashlib.sha256(text.encode("utf-8", errors="surrogateescape")).hexdigest()[:16]


@dataclass(frozen=True)
class SpoolEntry:
    """One signed trace and what a person needs to know about it."""

    kind: str
    key: str
    kid: str
    drv_path: str
    outputs: dict[str, dict[str, str]]  # output name -> {"path", "hash"}
    jws: str
    created: float
    public_key: str = ""  # the signer's Nix public key, to recognise its claims in a store
    # Hardware evidence for the claim (docs/FORMAT.md 9.2 entries, as JSON values), published
    # with the signature; absent in entries written before it existed.
    evidence: tuple[dict[str, Any], ...] = ()

    @property
    def name(self) -> str:
        thumb = self.kid.rpartition(":")[2] or "nokid"
        return f"{self.key}-{thumb}-{claim_digest(self.kind, self.key, self.kid, self.outputs)}"

    def to_json(self) -> bytes:
        obj = {
            "version": ENTRY_VERSION,
            "kind": self.kind,
            "key": self.key,
            "kid": self.kid,
            "drv_path": self.drv_path,
            "outputs": self.outputs,
            "created": self.created,
            "jws": self.jws,
            "public_key": self.public_key,
        }
        if self.evidence:
            obj["evidence"] = list(self.evidence)
        return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, what: str) -> SpoolEntry:
        try:
            obj: Any = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ParseError(what, f"not JSON: {exc}") from None
        if not isinstance(obj, dict) or obj.get("version") != ENTRY_VERSION:
            raise ParseError(what, f"not a version {ENTRY_VERSION} spool entry")
        try:
            entry = cls(
                kind=str(obj["kind"]),
                key=str(obj["key"]),
                kid=str(obj["kid"]),
                drv_path=str(obj["drv_path"]),
                outputs={str(k): dict(v) for k, v in obj["outputs"].items()},
                jws=str(obj["jws"]),
                created=float(obj["created"]),
                public_key=str(obj.get("public_key", "")),
                evidence=_evidence(obj.get("evidence", [])),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ParseError(what, f"missing or malformed field: {exc}") from None
        return entry


def _evidence(value: Any) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        raise TypeError("'evidence' is not a list of objects")
    return tuple(value)


@dataclass(frozen=True)
class SpooledItem:
    path: Path
    entry: SpoolEntry


@dataclass
class Scan:
    """What ``pending/`` holds: readable entries (oldest first), malformed ones (which
    belong in ``bad/``), and entries this process may not read (a permission problem, never
    moved: another user may read them)."""

    items: list[SpooledItem] = field(default_factory=list)
    bad: list[tuple[Path, str]] = field(default_factory=list)
    locked: list[tuple[Path, str]] = field(default_factory=list)


PRIVATE_DIR, SHARED_DIR = 0o700, 0o2770
PRIVATE_FILE, SHARED_FILE = 0o600, 0o640


class Spool:
    """A spool directory (created on first write, mode 0700 unless it exists already)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.pending_dir = self.root / "pending"
        self.sent_dir = self.root / "sent"
        self.tmp_dir = self.root / "tmp"
        self.bad_dir = self.root / "bad"
        self._group: int | None = None  # the spool's group when shared (setgid root)

    def _ensure(self, *dirs: Path) -> None:
        try:
            self.root.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
            st = os.stat(self.root)
            self._group = st.st_gid if st.st_mode & stat.S_ISGID else None
            for d in dirs or (self.tmp_dir, self.pending_dir, self.sent_dir):
                self._subdir(d)
        except OSError as exc:
            raise EnvironmentFault(
                f"cannot create spool directory {self.root}: {exc.strerror or exc}"
            ) from exc

    def _subdir(self, d: Path) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, PRIVATE_DIR)
        if self._group is None:
            return
        st = os.stat(d)
        if stat.S_IMODE(st.st_mode) == SHARED_DIR and st.st_gid == self._group:
            return
        # Shared spool: group rwx and setgid, whatever the umask; only the owner may change
        # it, and a directory someone else made is theirs to get right.
        with contextlib.suppress(PermissionError):
            if st.st_gid != self._group:
                os.chown(d, -1, self._group)
            os.chmod(d, SHARED_DIR)

    def _share(self, fd: int) -> None:
        """Give a new file the spool's mode (and group, when shared)."""
        if self._group is None:
            os.fchmod(fd, PRIVATE_FILE)
            return
        if os.fstat(fd).st_gid != self._group:
            with contextlib.suppress(PermissionError):
                os.fchown(fd, -1, self._group)
        os.fchmod(fd, SHARED_FILE)

    def find(self, name: str) -> SpoolEntry | None:
        """The pending or delivered entry named ``name``, if there is one and it reads."""
        for d in (self.pending_dir, self.sent_dir):
            path = d / f"{name}.json"
            try:
                return SpoolEntry.from_json(path.read_bytes(), f"spool entry {path}")
            except (OSError, ParseError):
                continue
        return None

    def known(self, name: str) -> bool:
        """Whether a claim with this name is pending or was already delivered."""
        return (self.pending_dir / f"{name}.json").exists() or (
            self.sent_dir / f"{name}.json"
        ).exists()

    def add(self, entry: SpoolEntry) -> Path | None:
        """Put ``entry`` in ``pending/``; None (nothing written) if the claim is known."""
        self._ensure()
        name = f"{entry.name}.json"
        target = self.pending_dir / name
        if (self.sent_dir / name).exists():
            return None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix=".entry.", suffix=".tmp")
        except OSError as exc:
            raise EnvironmentFault(f"cannot write to spool {self.root}: {exc.strerror}") from exc
        try:
            with os.fdopen(fd, "wb") as f:
                self._share(f.fileno())
                f.write(entry.to_json())
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, target)  # never replaces: a concurrent identical claim wins once
            except FileExistsError:
                return None
        except OSError as exc:
            raise EnvironmentFault(f"cannot write to spool {self.root}: {exc.strerror}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        # A publisher may have moved an identical entry to sent/ between our check and link.
        if (self.sent_dir / name).exists():
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
            return None
        _fsync_dir(self.pending_dir)
        return target

    def scan(self) -> Scan:
        """Pending entries (oldest first), the malformed ones and the ones we may not read."""
        found = Scan()
        for path in self._list(self.pending_dir):
            try:
                data = path.read_bytes()
            except FileNotFoundError:  # delivered by a concurrent publisher meanwhile
                continue
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EPERM):
                    found.locked.append((path, _locked_reason(path, exc)))
                else:
                    found.bad.append((path, f"cannot read: {exc.strerror}"))
                continue
            try:
                found.items.append(
                    SpooledItem(path, SpoolEntry.from_json(data, f"spool entry {path}")))
            except ParseError as exc:
                found.bad.append((path, exc.diagnostics()))
        found.items.sort(key=lambda it: (it.entry.created, it.path.name))
        return found

    def pending(self) -> list[SpooledItem]:
        """Readable pending entries, oldest first."""
        return self.scan().items

    def quarantine(self, path: Path) -> Path:
        """Move an entry that can never be published to ``bad/`` (kept for a person)."""
        self._ensure(self.bad_dir)
        target = self.bad_dir / path.name
        try:
            os.rename(path, target)
        except OSError as exc:
            raise EnvironmentFault(f"cannot move {path} to {target}: {exc.strerror}") from exc
        return target

    def sent(self) -> list[Path]:
        return self._list(self.sent_dir)

    @staticmethod
    def _list(directory: Path) -> list[Path]:
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise EnvironmentFault(f"cannot list {directory}: {exc.strerror}") from exc
        return [directory / n for n in names if n.endswith(".json") and not n.startswith(".")]

    def mark_sent(self, item: SpooledItem) -> None:
        """Move a delivered entry to ``sent/`` (one rename; a no-op if already moved)."""
        self._ensure()
        try:
            os.rename(item.path, self.sent_dir / item.path.name)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise EnvironmentFault(f"cannot update spool {self.root}: {exc.strerror}") from exc

    def prune_sent(self, older_than_seconds: float, now: float | None = None) -> int:
        """Forget entries delivered longer ago than the given age; returns how many.

        The age counts from the move into ``sent/`` (the rename sets the file's ctime).
        The ledger only dedupes repeats of a claim; one that comes back after pruning is
        spooled again and the publisher finds it already in the stores (nothing doubles)."""
        cutoff = (time.time() if now is None else now) - older_than_seconds
        removed = 0
        for path in self.sent():
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_ctime < cutoff:
                    path.unlink()
                    removed += 1
        return removed


def _locked_reason(path: Path, exc: OSError) -> str:
    try:
        st = os.stat(path)
        owner = f"owned by uid {st.st_uid}, gid {st.st_gid}, mode {stat.S_IMODE(st.st_mode):o}"
    except OSError:
        owner = "owner unknown"
    return (f"cannot read: {exc.strerror} ({owner}; this process runs as uid {os.getuid()}): "
            "give the spool directory the publisher's group and the setgid bit "
            "(docs/OPERATIONS.md)")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
