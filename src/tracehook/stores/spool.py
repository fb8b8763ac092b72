"""The local spool: signed traces waiting to be published. No network I/O here.

The post-build hook writes each signed trace into the spool and returns; ``tracehook
publish`` delivers it later. Layout under the spool directory::

    tmp/                 half-written entries (same file system, for atomic links)
    pending/<name>.json  signed, not yet in every configured trace store
    sent/<name>.json     delivered everywhere; kept as the ledger that dedupes repeats

``<name>`` is ``<trace key>-<kid thumbprint>-<claim digest>``: the claim digest covers the
key, the signer and the claimed outputs (not the random ``rebuild_id``), so the second hook
call Nix makes for one build step, and a ``--check`` rebuild that reproduced the outputs,
find the entry already there and add nothing. An entry appears in ``pending/`` whole or not
at all (written in ``tmp/``, fsynced, hard-linked into place), and moves to ``sent/`` by one
rename, so a crash at any point loses nothing and duplicates nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
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
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ParseError(what, f"missing or malformed field: {exc}") from None
        return entry


@dataclass(frozen=True)
class SpooledItem:
    path: Path
    entry: SpoolEntry


class Spool:
    """A spool directory (created on first write, with mode 0700)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.pending_dir = self.root / "pending"
        self.sent_dir = self.root / "sent"
        self.tmp_dir = self.root / "tmp"
        self.bad_dir = self.root / "bad"

    def _ensure(self) -> None:
        try:
            for d in (self.root, self.tmp_dir, self.pending_dir, self.sent_dir):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise EnvironmentFault(
                f"cannot create spool directory {self.root}: {exc.strerror or exc}"
            ) from exc

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
                f.write(entry.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
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

    def scan(self) -> tuple[list[SpooledItem], list[tuple[Path, str]]]:
        """Pending entries (oldest first), and the unreadable ones with what is wrong."""
        items: list[SpooledItem] = []
        bad: list[tuple[Path, str]] = []
        for path in self._list(self.pending_dir):
            try:
                data = path.read_bytes()
            except FileNotFoundError:  # delivered by a concurrent publisher meanwhile
                continue
            except OSError as exc:
                bad.append((path, f"cannot read: {exc.strerror}"))
                continue
            try:
                items.append(SpooledItem(path, SpoolEntry.from_json(data, f"spool entry {path}")))
            except ParseError as exc:
                bad.append((path, exc.diagnostics()))
        items.sort(key=lambda it: (it.entry.created, it.path.name))
        return items, bad

    def pending(self) -> list[SpooledItem]:
        """Readable pending entries, oldest first."""
        return self.scan()[0]

    def quarantine(self, path: Path) -> Path:
        """Move an unreadable entry to ``bad/`` (kept for a person to look at)."""
        self.bad_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = self.bad_dir / path.name
        try:
            os.rename(path, target)
        except OSError as exc:
            raise EnvironmentFault(f"cannot move {path} to {target}: {exc.strerror}") from exc
        return target

    def pending_paths(self) -> list[Path]:
        return self._list(self.pending_dir)

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
        """Forget delivered entries older than the given age; returns how many."""
        cutoff = (time.time() if now is None else now) - older_than_seconds
        removed = 0
        for path in self.sent():
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed


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
