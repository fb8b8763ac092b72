"""Read-only queries against a local Nix store's database (``nix/var/nix/db/db.sqlite``).

No Nix process is spawned: the post-build-hook and the verifier ask the database what Nix
recorded (valid paths, NAR hashes, derivation outputs, realisations). The database is opened
read-only and never locked for writing; Nix keeps it in WAL mode, so reading while Nix
builds is safe.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from tracehook.errors import EnvironmentFault
from tracehook.stores.readlog import note_stat

DEFAULT_STATE_DIR = "/nix/var/nix"


@dataclass(frozen=True)
class PathInfo:
    path: str
    nar_hash: str  # as Nix stores it: "sha256:<hex>"
    nar_size: int | None
    deriver: str | None
    ca: str | None
    sigs: tuple[str, ...]
    references: tuple[str, ...]


class StoreDatabase:
    """The database of a local store; ``root`` for a chroot-style store (``--store ROOT``)."""

    def __init__(self, root: str | None = None, state_dir: str = DEFAULT_STATE_DIR) -> None:
        base = Path(root + state_dir) if root else Path(state_dir)
        self.path = base / "db" / "db.sqlite"
        self._conn: sqlite3.Connection | None = None
        self._immutable = False

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            note_stat(self.path)  # the database changes with every Nix operation
            note_stat(f"{self.path}-wal")
            if not self.path.exists():
                raise EnvironmentFault(f"no Nix store database at {self.path}")
            try:
                self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
            except sqlite3.Error as exc:
                raise EnvironmentFault(f"cannot open {self.path}: {exc}") from exc
        return self._conn

    def _query(self, sql: str, params: tuple[object, ...]) -> list[tuple[object, ...]]:
        try:
            return self._db().execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if not self._immutable_fallback():
                raise EnvironmentFault(f"cannot read {self.path}: {exc}") from exc
        except sqlite3.Error as exc:
            raise EnvironmentFault(f"cannot read {self.path}: {exc}") from exc
        try:
            return self._db().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise EnvironmentFault(f"cannot read {self.path}: {exc}") from exc

    def _immutable_fallback(self) -> bool:
        """Reopen with ``immutable=1`` when a read-only open cannot work.

        A reader that may not write next to the database (a non-root user, a service with
        ReadOnlyPaths) cannot create the WAL index Nix's WAL-mode database needs while no
        Nix process has it open. Then no writer is active and the WAL has been checkpointed
        into the file, so reading the file as immutable sees exactly what Nix recorded.
        """
        if self._immutable or self._conn is None:
            return False
        if Path(str(self.path) + "-wal").exists() and os.access(self.path.parent, os.W_OK):
            return False  # a writer is active and we could have used the WAL: a real error
        self._conn.close()
        self._immutable = True
        try:
            self._conn = sqlite3.connect(f"file:{self.path}?immutable=1", uri=True, timeout=30)
        except sqlite3.Error:
            self._conn = None
            return False
        return True

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> StoreDatabase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # queries ---------------------------------------------------------------------------

    def is_valid(self, path: str) -> bool:
        return bool(self._query("SELECT 1 FROM ValidPaths WHERE path = ?", (path,)))

    def path_info(self, path: str) -> PathInfo | None:
        rows = self._query(
            "SELECT id, hash, narSize, deriver, ca, sigs FROM ValidPaths WHERE path = ?", (path,)
        )
        if not rows:
            return None
        pid, nar_hash, nar_size, deriver, ca, sigs = rows[0]
        refs = self._query(
            "SELECT v.path FROM Refs r JOIN ValidPaths v ON v.id = r.reference "
            "WHERE r.referrer = ? ORDER BY v.path",
            (pid,),
        )
        return PathInfo(
            path=path,
            nar_hash=str(nar_hash),
            nar_size=int(str(nar_size)) if nar_size is not None else None,
            deriver=str(deriver) if deriver else None,
            ca=str(ca) if ca else None,
            sigs=tuple(str(sigs).split()) if sigs else (),
            references=tuple(str(r[0]) for r in refs),
        )

    def derivation_outputs(self, drv_path: str) -> dict[str, str]:
        """Input-addressed outputs Nix registered for ``drv_path``: output name -> path."""
        rows = self._query(
            "SELECT o.id, o.path FROM DerivationOutputs o JOIN ValidPaths v ON v.id = o.drv "
            "WHERE v.path = ?",
            (drv_path,),
        )
        return {str(name): str(path) for name, path in rows}

    def realisation(self, realisation_id: str) -> tuple[str, tuple[str, ...]] | None:
        """``sha256:<hex>!<out>`` -> (output path, signatures), if Nix recorded it."""
        drv_hash, sep, output = realisation_id.rpartition("!")
        if not sep:
            return None
        try:
            rows = self._query(
                "SELECT v.path, r.signatures FROM Realisations r "
                "JOIN ValidPaths v ON v.id = r.outputPath "
                "WHERE r.drvPath = ? AND r.outputName = ?",
                (drv_hash, output),
            )
        except EnvironmentFault:
            if not self._has_table("Realisations"):
                return None  # a store made without ca-derivations has no such table
            raise
        if not rows:
            return None
        path, sigs = rows[0]
        return str(path), tuple(str(sigs).split()) if sigs else ()

    def realisations_of(self, out_path: str) -> list[tuple[int, str, str]]:
        """Every realisation recorded for ``out_path``: (row id, ``sha256:<hex>`` derivation
        hash, output name), oldest first. A store without ca-derivations has none."""
        try:
            rows = self._query(
                "SELECT r.id, r.drvPath, r.outputName FROM Realisations r "
                "JOIN ValidPaths v ON v.id = r.outputPath WHERE v.path = ? ORDER BY r.id",
                (out_path,),
            )
        except EnvironmentFault:
            if not self._has_table("Realisations"):
                return []
            raise
        return [(int(str(rid)), str(drv_hash), str(name)) for rid, drv_hash, name in rows]

    def derivers_of(self, out_path: str) -> list[tuple[int, str, str]]:
        """The derivations this store registered as producing ``out_path`` (Nix's valid
        derivers, input-addressed and fixed-output): (row id, .drv path, output name),
        oldest first."""
        rows = self._query(
            "SELECT v.id, v.path, o.id FROM DerivationOutputs o JOIN ValidPaths v "
            "ON v.id = o.drv WHERE o.path = ? ORDER BY v.id",
            (out_path,),
        )
        return [(int(str(vid)), str(drv), str(name)) for vid, drv, name in rows]

    def _has_table(self, name: str) -> bool:
        rows = self._db().execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchall()
        return bool(rows)
