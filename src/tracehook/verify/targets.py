"""What a ``tracehook verify`` TARGET names: a derivation and the outputs to verify.

A TARGET is a .drv path (every output), ``DRV^out,dev`` (those outputs), or an output path
(that output of the derivation that produced it). An output path is looked up in the store
the way docs/POLICY.md says, without spawning Nix:

- **Content-addressed and deferred outputs.** Nix records the *resolved* derivation as the
  deriver of such a path: on a builder that is a .drv whose inputs are taken as given, and
  on a consumer that substituted the path it is the builder's file, which the consumer does
  not have. The store's realisations say which derivations produced the path: each row is
  ``(sha256:<hashDerivationModulo of the unresolved .drv>, output)``. The original is the
  .drv in the store, named after the path, whose realisation id is one of them.
- **Input-addressed and fixed-output paths.** The derivations the store's database lists as
  producing the path (Nix's valid derivers), or the recorded deriver when the store has it
  and it names the path.

Several matches: an original (with inputs to verify) before a resolved one, the recorded
deriver before others, then the one registered last. No match: a ConfigError (exit 2)
saying what the store lacks and what to give instead. The store's database and .drv files
are read; nothing is written, nothing is fetched.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from tracehook.errors import ConfigError, EnvironmentFault, TracehookError
from tracehook.nix.derivation import Derivation
from tracehook.nix.derivation_hash import realisation_ids
from tracehook.nix.storepath import HASH_CHARS, parse_store_path
from tracehook.stores.nixdb import PathInfo, StoreDatabase
from tracehook.stores.nixstore import StoreReader
from tracehook.stores.readlog import note_stat
from tracehook.verify.walk import Target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Match:
    drv_path: str
    output: str
    original: bool  # has inputDrvs: its inputs are verified, not taken as given
    recorded: bool  # the deriver Nix recorded for the path
    order: int  # when the store registered it (row id): later wins among equals

    def rank(self) -> tuple[bool, bool, int]:
        return (self.original, self.recorded, self.order)


def parse_targets(specs: list[str], reader: StoreReader, root: str | None) -> list[Target]:
    """Every TARGET given on the command line, in order."""
    with StoreDatabase(root) as db:
        return [_target(spec, reader, db) for spec in specs]


def _target(spec: str, reader: StoreReader, db: StoreDatabase) -> Target:
    base, _, outs = spec.partition("^")
    try:
        parse_store_path(base, reader.store_dir)
    except TracehookError:
        raise ConfigError(f"target {spec!r} is not a store path under {reader.store_dir}"
                          ) from None
    if base.endswith(".drv"):
        wanted = frozenset(o for o in outs.split(",") if o) if outs else None
        return Target(spec, base, wanted or None)
    if outs:
        raise ConfigError(f"target {spec!r}: '^outputs' goes after a .drv path")
    return output_target(spec, base, reader, db)


def output_target(spec: str, path: str, reader: StoreReader, db: StoreDatabase) -> Target:
    """The derivation output that ``path`` is, as this store recorded it."""
    info = db.path_info(path)
    if info is None:
        raise ConfigError(f"{path} is not a valid path in the store; give its .drv instead")
    matches = _by_realisation(path, info, reader, db) or _by_deriver(path, info, reader, db)
    if not matches:
        raise ConfigError(_no_derivation(path, info, reader, db))
    best = max(matches, key=_Match.rank)
    others = sorted({m.drv_path for m in matches} - {best.drv_path})
    if others:
        log.info("%s: verifying it as %s^%s; also produced it here: %s", path,
                 best.drv_path, best.output, ", ".join(others))
    return Target(spec, best.drv_path, frozenset((best.output,)), path)


def _by_realisation(
    path: str, info: PathInfo, reader: StoreReader, db: StoreDatabase
) -> list[_Match]:
    rows = db.realisations_of(path)
    if not rows:
        return []
    wanted = {f"{drv_hash}!{output}": rid for rid, drv_hash, output in rows}
    names = {_drv_name(path, output) for _, _, output in rows}
    if info.deriver:
        names.add(_name_of(info.deriver))
    matches = []
    for drv_path in _drvs_named(reader, names):
        drv = _read(reader, drv_path)
        if drv is None:
            continue
        try:
            ids = realisation_ids(drv, reader.read_derivation, store_dir=reader.store_dir)
        except TracehookError as exc:  # an input .drv missing or unreadable: not this one
            log.debug("cannot hash %s: %s", drv_path, exc.diagnostics())
            continue
        for output, rid in ids.items():
            if rid in wanted:
                matches.append(_Match(drv_path, output, bool(drv.input_drvs),
                                      drv_path == info.deriver, wanted[rid]))
    return matches


def _by_deriver(path: str, info: PathInfo, reader: StoreReader, db: StoreDatabase
                ) -> list[_Match]:
    candidates = [(rid, drv_path) for rid, drv_path, _ in db.derivers_of(path)]
    if info.deriver and info.deriver not in {d for _, d in candidates}:
        candidates.append((-1, info.deriver))
    matches = []
    for order, drv_path in candidates:
        if not reader.exists(drv_path):
            continue
        drv = _read(reader, drv_path)
        if drv is None:
            continue
        for output, out in drv.outputs.items():
            if out.path == path:
                matches.append(_Match(drv_path, output, True, drv_path == info.deriver, order))
    return matches


def _no_derivation(path: str, info: PathInfo, reader: StoreReader, db: StoreDatabase) -> str:
    why = []
    if info.deriver and reader.exists(info.deriver):
        why.append(f"its recorded deriver {info.deriver} does not name it")
    elif info.deriver:
        why.append(f"its recorded deriver {info.deriver} is not in this store")
    else:
        why.append("no deriver is recorded for it")
    if not db.realisations_of(path):
        why.append("no realisation names it")
    return (f"{path}: the store holds no derivation for this path ({'; '.join(why)}): "
            "instantiate the expression that built it in this store (nix-instantiate), or "
            "give its .drv as TARGET")


def _drv_name(path: str, output: str) -> str:
    """The derivation name behind an output path's name (``name`` or ``name-output``)."""
    name = _name_of(path)
    suffix = f"-{output}"
    if output != "out" and name.endswith(suffix):
        return name[: -len(suffix)]
    return name


def _name_of(path: str) -> str:
    return os.path.basename(path)[HASH_CHARS + 1 :].removesuffix(".drv")


def _drvs_named(reader: StoreReader, names: set[str]) -> list[str]:
    """The .drv files in the store whose name is one of ``names`` (one directory listing)."""
    directory = Path((reader.root or "").rstrip("/") + reader.store_dir)
    wanted = {f"{n}.drv" for n in names}
    found = []
    note_stat(directory)
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                base = entry.name
                if len(base) > HASH_CHARS + 1 and base[HASH_CHARS] == "-" and \
                        base[HASH_CHARS + 1:] in wanted:
                    found.append(f"{reader.store_dir}/{base}")
    except OSError as exc:
        raise EnvironmentFault(f"cannot list the store directory {directory}: "
                               f"{exc.strerror or exc}") from None
    return sorted(found)


def _read(reader: StoreReader, drv_path: str) -> Derivation | None:
    try:
        return reader.read_derivation(drv_path)
    except TracehookError as exc:
        log.debug("cannot read %s: %s", drv_path, exc.diagnostics())
        return None

