"""Evidence elements of a trust policy: ``[evidence.NAME]`` (docs/POLICY.md).

An evidence element names what hardware evidence must show for a claim to count; its NAME
then counts in ``[trust] require`` exactly as a key's name does::

    [evidence.snp-attested]
    kind = "sev-snp"                                  # required; the one kind so far
    measurements = ["9e5b7ce8...", ...]               # required: accepted launch images
    min-tcb = { bootloader = 9, tee = 0, snp = 23, microcode = 72 }    # optional
    roots = ["amd-milan", "amd-genoa", "amd-turin"]   # default: all three pinned AMD roots
    root-files = ["/etc/tracehook/test-root.pem"]     # TESTS ONLY: another root, by PEM
    not-after = 2027-06-01T00:00:00Z                  # optional, as for keys
    revoked = false                                   # optional, as for keys
    unsafe-allow-debug = false                        # UNSAFE: accept debuggable guests

The element keeps only plain values (bytes, strings, a :class:`~tracehook.trace.sevsnp.Tcb`):
a policy is handed to checker processes, and certificates are read where they are checked
(:mod:`tracehook.verify.evidencecheck`). A root file is read and checked here, once, so a
mistake in it is a configuration error (exit 2) rather than a refusal later. Every mistake
is a ConfigError whose one line names the element and what to fix.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracehook.errors import ConfigError, ParseError
from tracehook.trace.sevsnp import MEASUREMENT_LEN, Tcb
from tracehook.trace.snproots import AMD_PRODUCTS, root_from_pem
from tracehook.verify.policyfields import KeyStatus, parse_date, parse_revoked, status

EVIDENCE_KINDS = ("sev-snp",)
AMD_ROOT_NAMES = tuple(f"amd-{p.lower()}" for p in AMD_PRODUCTS)
_FIELDS = ("kind", "measurements", "min-tcb", "roots", "root-files", "not-after", "revoked",
           "unsafe-allow-debug")


@dataclass(frozen=True)
class EvidenceElement:
    """What evidence must show to count as ``name``. ``roots``: AMD's pinned roots by name;
    ``root_files``: other roots as (file, PEM bytes), for tests. ``allow_debug`` is unsafe:
    a guest that allows debugging exposes its memory to the host."""

    name: str
    kind: str
    measurements: frozenset[bytes]
    minimum_tcb: Tcb | None = None
    roots: tuple[str, ...] = AMD_ROOT_NAMES
    root_files: tuple[tuple[str, bytes], ...] = ()
    not_after: dt.datetime | None = None
    revoked: bool = False
    allow_debug: bool = False

    def status(self, now: dt.datetime) -> KeyStatus:
        return status(self.revoked, self.not_after, now)

    def describe(self) -> str:
        roots = [*self.roots, *(Path(f).name for f, _ in self.root_files)]
        tcb = f", minimum TCB {self.minimum_tcb}" if self.minimum_tcb else ""
        return (f"{self.name}: {self.kind}, {len(self.measurements)} measurement(s), roots "
                f"{', '.join(roots)}{tcb}{', UNSAFE: debug allowed' if self.allow_debug else ''}")


def parse_evidence(raw: Any, source: str, base_dir: Path | None) -> tuple[EvidenceElement, ...]:
    """The ``[evidence]`` table; ``base_dir``: where relative ``root-files`` are."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: [evidence] must hold at least one [evidence.NAME] table")
    return tuple(_element(name, entry, f"{source}: [evidence.{name}]", base_dir)
                 for name, entry in raw.items())


def _element(name: str, entry: Any, where: str, base_dir: Path | None) -> EvidenceElement:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a table (kind, measurements, ...)")
    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}; allowed: "
                          f"{', '.join(_FIELDS)}")
    kind = entry.get("kind")
    if kind not in EVIDENCE_KINDS:
        raise ConfigError(f"{where}: kind must be one of {', '.join(map(repr, EVIDENCE_KINDS))}"
                          f", not {kind!r}")
    allow_debug = entry.get("unsafe-allow-debug", False)
    if not isinstance(allow_debug, bool):
        raise ConfigError(f"{where}: 'unsafe-allow-debug' must be true or false")
    roots, root_files = _roots(entry, where, base_dir)
    return EvidenceElement(
        name=name, kind=kind, measurements=_measurements(entry.get("measurements"), where),
        minimum_tcb=_tcb(entry.get("min-tcb"), where), roots=roots, root_files=root_files,
        not_after=parse_date(entry.get("not-after"), where),
        revoked=parse_revoked(entry.get("revoked", False), where), allow_debug=allow_debug)


def _measurements(raw: Any, where: str) -> frozenset[bytes]:
    if raw is None:
        raise ConfigError(f"{where}: add 'measurements = [\"<96 hex digits>\", ...]', the "
                          "launch measurements of the guest images you accept")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: 'measurements' must be a non-empty list of hex strings "
                          "(an empty list would accept no image)")
    found: set[bytes] = set()
    for i, text in enumerate(raw):
        value = b""
        if isinstance(text, str) and all(c in "0123456789abcdefABCDEF" for c in text):
            value = bytes.fromhex(text) if len(text) % 2 == 0 else b""
        if len(value) != MEASUREMENT_LEN:
            raise ConfigError(f"{where}: measurements[{i}] {text!r} is not "
                              f"{2 * MEASUREMENT_LEN} hex digits (a {MEASUREMENT_LEN}-byte "
                              "SEV-SNP launch measurement)")
        found.add(value)
    return frozenset(found)


def _tcb(raw: Any, where: str) -> Tcb | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: min-tcb must be a table, e.g. {{ bootloader = 9, tee = 0, "
                          "snp = 23, microcode = 72 }")
    try:
        return Tcb.from_mapping(raw, f"{where}: min-tcb")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _roots(entry: dict[str, Any], where: str, base_dir: Path | None
           ) -> tuple[tuple[str, ...], tuple[tuple[str, bytes], ...]]:
    raw = entry.get("roots", list(AMD_ROOT_NAMES))
    if not isinstance(raw, list) or not all(isinstance(r, str) for r in raw):
        raise ConfigError(f"{where}: 'roots' must be a list of pinned AMD roots "
                          f"({', '.join(AMD_ROOT_NAMES)})")
    for name in raw:
        if name not in AMD_ROOT_NAMES:
            raise ConfigError(f"{where}: unknown root {name!r}; the pinned AMD roots are "
                              f"{', '.join(AMD_ROOT_NAMES)} (another root: root-files, for "
                              "tests)")
    files_raw = entry.get("root-files", [])
    if not isinstance(files_raw, list) or not all(isinstance(f, str) and f for f in files_raw):
        raise ConfigError(f"{where}: 'root-files' must be a list of PEM file paths")
    files = tuple(_root_file(f, where, base_dir) for f in files_raw)
    if not raw and not files:
        raise ConfigError(f"{where}: no allowed root; list roots (default: "
                          f"{', '.join(AMD_ROOT_NAMES)}) or root-files")
    return tuple(dict.fromkeys(raw)), files


def _root_file(name: str, where: str, base_dir: Path | None) -> tuple[str, bytes]:
    path = Path(name)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read root file {path}: "
                          f"{exc.strerror or exc}") from None
    try:  # reads the certificates (and so loads cryptography): only for a policy that has one
        root_from_pem(path.stem, data, f"root file {path}")
    except ParseError as exc:
        raise ConfigError(f"{where}: {exc.diagnostics()}") from None
    return str(path), data
