"""What the signer claims about one locally built derivation, read from the local store.

Given a derivation path (and Nix's ``OUT_PATHS``, which may be empty), :func:`examine`
decides whether the step gets a trace and, if so, computes its key with
:func:`tracehook.trace.stepkey.step_key` and its output claims from the store's database. It spawns
no process and opens no network connection: the post-build hook runs it on Nix's hot path.

Which calls produce a trace (docs/FORMAT.md, "Which derivations are signed"):

* fixed-output and impure derivations: none (skipped with a reason);
* a derivation without input derivations whose input sources include a path that is not
  content-addressed: none. This is Nix's resolved copy of a content-addressed (or deferred)
  derivation built from an input-addressed input; Nix also calls the hook for the original
  derivation, and that call signs the step under the ``ia`` key, which pins that input;
* anything else: one trace. Nix's two calls for a resolved step (the resolved copy, then the
  original) give the same key and the same claim, which the spool keeps once (the hook logs
  the second call as ``already-signed``). Nix 2.8.0 names and records only the outputs that
  were asked for on the original's call: the others come from the resolved derivation's
  realisations, so both calls claim every output.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass

from tracehook.errors import ConfigError, EnvironmentFault
from tracehook.nix.derivation import Derivation
from tracehook.nix.derivation_hash import DrvHash, realisation_ids
from tracehook.nix.nar import parse_nar_hash
from tracehook.nix.storepath import STORE_DIR, output_path_name, path_name
from tracehook.stores.nixdb import StoreDatabase
from tracehook.stores.nixstore import StoreReader
from tracehook.trace import claim, crypto
from tracehook.trace.claim import BuilderInfo, OutputClaim
from tracehook.trace.stepkey import InputOutput, Resolution, producer_is_content_addressed, step_key


def parse_nix_config(text: str) -> dict[str, str]:
    """``NIX_CONFIG`` (``name = value`` lines) as a dict; later lines win, as in Nix."""
    settings: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        name, sep, value = line.partition("=")
        if sep and name.strip():
            settings[name.strip()] = value.strip()
    return settings


def store_root(settings: Mapping[str, str]) -> str | None:
    """The chroot root of the store Nix built in (None: the machine's own /nix/store)."""
    store = settings.get("store", "").strip()
    if store in ("", "auto", "daemon", "local", "/") or store.startswith("unix://"):
        return None
    if store.startswith("/"):
        return store.rstrip("/") or None
    parsed = urllib.parse.urlparse(store)
    if parsed.scheme == "local" or store.startswith("local?"):
        root = urllib.parse.parse_qs(parsed.query).get("root", [""])[0]
        return root.rstrip("/") or None
    raise ConfigError(
        f"Nix's store is {store!r}: the signer reads local stores only; set store-root "
        "in the signer configuration"
    )


def secret_key_files(settings: Mapping[str, str]) -> list[str]:
    return settings.get("secret-key-files", "").split()


def builder_info(flavor: str, version: str) -> BuilderInfo:
    """A fresh ``builder`` block: a random 32-bit ``rebuild_id`` per signature, as laut."""
    rebuild_id = int.from_bytes(os.urandom(4), "big")
    return BuilderInfo(rebuild_id, STORE_DIR, flavor, version)


@dataclass(frozen=True)
class Skipped:
    reason: str


@dataclass(frozen=True)
class BuildStep:
    """A built derivation, its resolution and key, and the outputs it produced."""

    drv_path: str
    drv: Derivation
    resolution: Resolution
    outputs: dict[str, OutputClaim]


class LocalStore:
    """The derivations and database of one local store (``root`` for a chroot store)."""

    def __init__(self, root: str | None) -> None:
        self.root = root
        self.reader = StoreReader(root)
        self.db = StoreDatabase(root)
        self._hashes: MutableMapping[str, DrvHash] = {}

    def close(self) -> None:
        self.db.close()

    def nar_hash(self, path: str) -> bytes:
        return self.output_claim(path).nar_hash

    def output_claim(self, path: str) -> OutputClaim:
        """What the store recorded for a built output: its NAR hash and its references
        (the references extension of docs/FORMAT.md: attested, so a gate can refuse a
        narinfo that drops or adds one)."""
        info = self.db.path_info(path)
        if info is None:
            raise EnvironmentFault(f"{path} is not a valid path in the store (garbage collected?)")
        return OutputClaim(path,
                           parse_nar_hash(info.nar_hash, f"NAR hash of {path} in the store "
                                          "database"),
                           tuple(sorted(info.references)))

    def is_content_addressed(self, path: str) -> bool:
        info = self.db.path_info(path)
        if info is None:
            raise EnvironmentFault(f"input {path} is not a valid path in the store")
        return info.ca is not None

    def recorded_outputs(self, drv_path: str, drv: Derivation) -> dict[str, str]:
        """Output name -> path: from the ATerm when it names paths, else Nix's realisations."""
        if drv.kind in ("fixed", "input-addressed"):
            return {name: out.path for name, out in drv.outputs.items()}
        ids = realisation_ids(drv, self.reader.read_derivation, self._hashes)
        outputs: dict[str, str] = {}
        for name, rid in ids.items():
            found = self.db.realisation(rid)
            if found is not None:
                outputs[name] = found[0]
        return outputs


def _claimed_paths(
    store: LocalStore, drv_path: str, drv: Derivation, out_paths: Sequence[str],
    resolution: Resolution,
) -> dict[str, str]:
    """Output name -> path of every output of the step.

    From ``OUT_PATHS``, else Nix's records for ``drv_path``, else (for an original
    derivation that Nix resolved) Nix's records for the resolved derivation: Nix 2.8.0 passes
    an empty ``OUT_PATHS`` and, on its second call for a resolved step, names and records
    only the outputs that were asked for, although the resolved build made them all.
    """
    by_name = {output_path_name(drv.name, name): name for name in drv.outputs}
    paths: dict[str, str] = {}
    for p in out_paths:
        name = by_name.get(path_name(p))
        if name is not None:
            paths[name] = p
    if len(paths) < len(drv.outputs):  # Nix 2.8.0 passes none; --rebuild in 2.30 none
        recorded = store.recorded_outputs(drv_path, drv)
        for name in drv.outputs:
            if name not in paths and name in recorded:
                paths[name] = recorded[name]
    if len(paths) < len(drv.outputs) and resolution.rdrv_path != drv_path:
        recorded = store.recorded_outputs(resolution.rdrv_path, resolution.rdrv)
        for name in drv.outputs:
            if name not in paths and name in recorded:
                paths[name] = recorded[name]
    missing = sorted(set(drv.outputs) - set(paths))
    if missing:
        raise EnvironmentFault(
            f"cannot tell which paths {drv_path} produced for output(s) {', '.join(missing)}: "
            "OUT_PATHS does not name them and the store records no realisation"
        )
    return paths


def _inputs(store: LocalStore, drv: Derivation) -> dict[tuple[str, str], InputOutput]:
    inputs: dict[tuple[str, str], InputOutput] = {}
    for input_path, names in drv.input_drvs.items():
        input_drv = store.reader.read_derivation(input_path)
        recorded = store.recorded_outputs(input_path, input_drv)
        content_addressed = producer_is_content_addressed(input_drv)
        for name in names:
            path = recorded.get(name)
            if path is None:
                raise EnvironmentFault(
                    f"the store records no output {name!r} of input {input_path}"
                )
            nar = None if content_addressed else store.nar_hash(path)
            inputs[(input_path, name)] = InputOutput(path, content_addressed, nar)
    return inputs


def examine(store: LocalStore, drv_path: str, out_paths: Sequence[str] = ()) -> BuildStep | Skipped:
    """The build step Nix reports with ``DRV_PATH``/``OUT_PATHS``, or why it gets no trace."""
    drv = store.reader.read_derivation(drv_path)
    kind = drv.kind
    if kind == "fixed":
        return Skipped("fixed-output derivation: its output is pinned by its hash")
    if kind == "impure":
        return Skipped("impure derivation: its output is not a function of its inputs")
    if not drv.input_drvs:
        for src in drv.input_srcs:
            if not store.is_content_addressed(src):
                return Skipped(
                    f"resolved copy with input-addressed input {src}: the hook call for the "
                    "original derivation signs this step (tracehook-ia-v1, pinned)"
                )
    resolution = step_key(drv, _inputs(store, drv))
    paths = _claimed_paths(store, drv_path, drv, out_paths, resolution)
    outputs = {name: store.output_claim(p) for name, p in sorted(paths.items())}
    return BuildStep(drv_path, drv, resolution, outputs)


def sign(step: BuildStep, sk: crypto.SecretKey, builder: BuilderInfo) -> str:
    """The compact JWS of ``step``'s claim."""
    return claim.sign_trace(sk, step.resolution.key, step.outputs, builder, step.drv.name)
