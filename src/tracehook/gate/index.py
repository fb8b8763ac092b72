"""The gate's index of the consumer's derivations: request keys -> local .drv files.

Nix asks the gate for realisations by id (``sha256:<hashDerivationModulo>!<output>``) and
for narinfos by store-path hash part; neither names a derivation. The consumer instantiated
what it wants substituted, so its store holds the .drv files: this index reads each new one
once (incrementally: the store directory is rescanned only when its mtime changed, or after
a .drv that could not be read yet) and records

- realisation id -> (drv path, output), for every derivation (Nix asks with the unresolved
  id first, and with the resolved derivation's id after resolving locally);
- output hash part -> (drv path, output), for outputs whose path the .drv names
  (input-addressed and fixed-output derivations, and resolved copies of deferred ones).

Floating content-addressed output paths are not in any .drv: the gate learns them from
verified traces (see :mod:`tracehook.gate.service`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import MutableMapping

from tracehook.errors import TracehookError
from tracehook.nix.derivation_hash import DrvHash, realisation_ids
from tracehook.nix.storepath import hash_part
from tracehook.stores.nixstore import StoreReader

log = logging.getLogger(__name__)

DrvOutput = tuple[str, str]  # (drv path, output name)


class DrvIndex:
    """Thread-safe, incremental. ``refresh()`` is cheap when nothing changed (one stat)."""

    def __init__(self, reader: StoreReader) -> None:
        self.reader = reader
        self.store_dir = reader.store_dir
        root = reader.root.rstrip("/") if reader.root else ""
        self.real_dir = root + reader.store_dir
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._by_id: dict[str, DrvOutput] = {}
        self._by_output: dict[str, list[DrvOutput]] = {}
        self._hashes: MutableMapping[str, DrvHash] = {}
        self._mtime: int | None = None
        self._retry = False
        self.skipped: dict[str, str] = {}  # drv path -> why it could not be indexed (yet)

    def __len__(self) -> int:
        return len(self._seen)

    def refresh(self, force: bool = False) -> int:
        """Index .drv files added since the last scan; returns how many were added."""
        with self._lock:
            try:
                mtime = os.stat(self.real_dir).st_mtime_ns
            except OSError as exc:
                log.warning("cannot stat store directory %s: %s", self.real_dir, exc)
                return 0
            if not force and not self._retry and mtime == self._mtime:
                return 0
            self._mtime = mtime
            self._retry = False
            added = 0
            try:
                with os.scandir(self.real_dir) as entries:
                    names = [e.name for e in entries if e.name.endswith(".drv")]
            except OSError as exc:
                log.warning("cannot list store directory %s: %s", self.real_dir, exc)
                self._retry = True
                return 0
            for name in names:
                path = f"{self.store_dir}/{name}"
                if path in self._seen:
                    continue
                if self._add(path):
                    added += 1
            if added:
                log.info("indexed %d new derivation(s), %d in all", added, len(self._seen))
            return added

    def _add(self, drv_path: str) -> bool:
        try:
            drv = self.reader.read_derivation(drv_path)
            ids = realisation_ids(drv, self.reader.read_derivation, self._hashes, self.store_dir)
        except TracehookError as exc:
            # Being written right now, or an input .drv is missing or broken: try again later.
            self.skipped[drv_path] = exc.diagnostics()
            self._retry = True
            log.debug("not indexing %s: %s", drv_path, exc.diagnostics())
            return False
        self.skipped.pop(drv_path, None)
        self._seen.add(drv_path)
        for output, rid in ids.items():
            self._by_id[rid] = (drv_path, output)
        for output, out in drv.outputs.items():
            if out.path:
                self._by_output.setdefault(hash_part(out.path), []).append((drv_path, output))
        return True

    def add(self, drv_path: str) -> bool:
        """Index one derivation now (e.g. one a request named directly)."""
        with self._lock:
            return drv_path in self._seen or self._add(drv_path)

    def _lookup_id(self, rid: str) -> DrvOutput | None:
        with self._lock:
            return self._by_id.get(rid)

    def by_realisation_id(self, rid: str) -> DrvOutput | None:
        found = self._lookup_id(rid)
        if found is None and self.refresh():
            found = self._lookup_id(rid)
        return found

    def _lookup_output(self, hp: str) -> list[DrvOutput]:
        with self._lock:
            return list(self._by_output.get(hp, ()))

    def by_output_hash(self, hp: str) -> list[DrvOutput]:
        """Derivations whose .drv names an output with this hash part (usually one)."""
        found = self._lookup_output(hp)
        if not found and self.refresh():
            found = self._lookup_output(hp)
        return found

    def has_drv(self, drv_path: str) -> bool:
        with self._lock:
            if drv_path in self._seen:
                return True
        return self.reader.exists(drv_path) and self.add(drv_path)
