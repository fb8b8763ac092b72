"""Reading derivations straight from a Nix store on disk, without spawning Nix.

With ``root`` the store is chroot-style, as Nix's ``--store ROOT``: a path
``<store_dir>/<hash>-<name>`` lives at ``ROOT<store_dir>/<hash>-<name>``.
A .drv is read only if it is a regular file of at most :data:`MAX_DRV` bytes.
"""

from __future__ import annotations

import logging
import marshal
import os

from tracehook.errors import EnvironmentFault, ParseError
from tracehook.lru import Lru
from tracehook.nix.aterm import from_plain, parse, to_plain
from tracehook.nix.derivation import Derivation, decode_drv
from tracehook.nix.storepath import STORE_DIR, make_text_path, parse_store_path
from tracehook.stores.factcache import FactCache
from tracehook.stores.files import read_bounded

log = logging.getLogger(__name__)

MAX_DRV = 32 * 1024 * 1024  # a .drv larger than this is refused as unreadable


class StoreReader:
    """Reads and memoizes derivations from one store (thread-safe)."""

    def __init__(
        self,
        root: str | None = None,
        store_dir: str = STORE_DIR,
        verify_paths: bool = True,
        max_cached: int | None = None,
        max_bytes: int | None = None,
        facts: FactCache | None = None,
    ) -> None:
        """``verify_paths``: check that each .drv's contents hash to its own store path.
        ``max_cached``/``max_bytes``: keep at most this many parsed derivations, of at
        most this many .drv bytes in all, least recently used first out (a long-running
        gate); None keeps every one (one verification run)."""
        self.root = root
        self.store_dir = store_dir
        self.verify_paths = verify_paths
        self.facts = facts
        self._drvs: Lru[str, tuple[Derivation, int]] | dict[str, tuple[Derivation, int]] = (
            {} if max_cached is None and max_bytes is None
            else Lru(max_cached or 1 << 30, max_bytes, size=lambda v: v[1]))

    def real_path(self, store_path: str) -> str:
        """Where a store path's file is on this machine (ParseError if not a store path)."""
        parse_store_path(store_path, self.store_dir)
        return store_path if self.root is None else self.root.rstrip("/") + store_path

    def exists(self, path: str) -> bool:
        return os.path.lexists(self.real_path(path))

    def read_derivation(self, drv_path: str) -> Derivation:
        """The parsed derivation at ``drv_path``.

        EnvironmentFault when it cannot be read; ParseError (naming the file) when it is
        malformed or, with ``verify_paths``, does not hash to its own path.
        """
        known = self._drvs.get(drv_path)
        if known is not None:
            return known[0]
        drv, size = self.load(drv_path)
        self.remember(drv_path, drv, size)
        return drv

    def load(self, drv_path: str) -> tuple[Derivation, int]:
        """:meth:`read_derivation` without the memo: the derivation (from the verification
        cache, or read, parsed and checked) and its size in bytes, not remembered here."""
        _, name = parse_store_path(drv_path, self.store_dir)
        if not name.endswith(".drv"):
            raise ParseError("derivation path", f"{drv_path} is not a .drv", len(drv_path))
        drv, size = self._from_facts(drv_path)
        if drv is None:
            drv, size = self._read(drv_path, name)
        return drv, size

    def remember(self, drv_path: str, drv: Derivation, size: int) -> None:
        """Keep a derivation that was read and checked elsewhere (by :meth:`load` in a
        worker process: :mod:`tracehook.stores.drvpool`) as if this reader had read it."""
        if isinstance(self._drvs, Lru):
            self._drvs.put(drv_path, (drv, size))
        else:
            self._drvs[drv_path] = (drv, size)

    def _from_facts(self, drv_path: str) -> tuple[Derivation | None, int]:
        if self.facts is None:
            return None, 0
        data = self.facts.get("drv", drv_path.encode())
        if data is None:
            return None, 0
        try:
            return from_plain(marshal.loads(data)), len(data)
        except (ValueError, TypeError, EOFError):
            return None, 0  # a row of another shape: parse the file again

    def _read(self, drv_path: str, name: str) -> tuple[Derivation, int]:
        """Read, parse and (with ``verify_paths``) check one .drv; remember the parse."""
        real = self.real_path(drv_path)
        data = read_bounded(real, MAX_DRV, "derivation")
        if data is None:
            raise EnvironmentFault(f"cannot read derivation {drv_path} ({real}): no such file")
        drv = parse(decode_drv(data), what=f"derivation {drv_path}")
        if self.verify_paths:
            # The path is the text-file hash of the bytes as stored (what Nix hashed when it
            # wrote them); hashing them as read also spares re-serializing the derivation.
            refs = [*drv.input_srcs, *drv.input_drvs]
            computed = make_text_path(name, data, refs, self.store_dir)
            if computed != drv_path:
                raise ParseError(
                    f"derivation {drv_path}", f"its contents hash to {computed}, not to its path"
                )
        log.debug("read derivation %s", drv_path)
        if self.facts is not None and self.verify_paths:
            drv.kind  # noqa: B018  (only a derivation Nix could have written is remembered)
            self.facts.put("drv", drv_path.encode(), marshal.dumps(to_plain(drv)))
        return drv, len(data)

    def load_closure(self, drv_path: str) -> dict[str, Derivation]:
        """Every derivation reachable through inputDrvs from ``drv_path``, itself included."""
        closure: dict[str, Derivation] = {}
        todo = [drv_path]
        while todo:
            path = todo.pop()
            if path in closure:
                continue
            drv = self.read_derivation(path)
            closure[path] = drv
            todo.extend(p for p in drv.input_drvs if p not in closure)
        return closure
