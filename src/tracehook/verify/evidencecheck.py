"""Checking the evidence entries of one resolved step against a policy's evidence elements.

The arithmetic only: :meth:`EvidenceRing.examine` reads one entry of a trace file's
``evidence`` list (docs/FORMAT.md 9.2), recomputes the binding digest of the claim it
carries, and checks the report against every evidence element of the policy
(:func:`tracehook.trace.evidence.examine_evidence`: signature, chain to an allowed root,
REPORT_DATA equal to that digest, TCB, debug policy, measurement, minimum TCB). It answers
which elements the entry satisfies (:class:`Admissible`) and, when none, why each refused
(:class:`~tracehook.errors.Rejected`, naming the element, the reason code, and the
measurement, chip or TCB found). It mints nothing: :class:`tracehook.verify.trusted.KeyRing`
turns an admissible entry into an accepted claim whose signer is the element's name.

An element that is revoked or expired (at the run's one reference time) never admits; like
a key's, that is said only of an entry that would otherwise count. An element that allows
debugging (``unsafe-allow-debug``) logs a warning every time it admits a debuggable guest.
Certificates are read here, so this module is where a policy with evidence pays for
``cryptography`` (through :mod:`tracehook.trace.pki`); a policy without evidence never builds a
ring.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tracehook.errors import ParseError, Rejected
from tracehook.trace.claim import TraceKey
from tracehook.trace.evidence import (
    BoundClaim,
    EvidenceEntry,
    examine_evidence,
    parse_evidence_entry,
)
from tracehook.trace.snproots import SnpRoot, amd_root, root_from_pem
from tracehook.trace.snpverify import SnpRequirements, SnpVerdict
from tracehook.trace.tracefile import evidence_id
from tracehook.verify.evidencepolicy import EvidenceElement

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvidenceInfo:
    """What admitted a claim, for reports and logs: the element, and what the report
    showed (hex strings, the TCB as text)."""

    element: str
    kind: str  # "sev-snp"
    product: str  # "Milan", ..., or a test root's
    signer: str  # "vcek" or "vlek"
    measurement: str
    chip_id: str
    tcb: str  # "bootloader=9 tee=0 snp=23 microcode=72"

    def describe(self) -> str:
        """One compact phrase: ``snp (sev-snp Milan vcek, measurement 9e5b..., ...)``."""
        return (f"{self.element} ({self.kind} {self.product} {self.signer}, measurement "
                f"{self.measurement[:16]}..., chip {self.chip_id[:16]}..., tcb {self.tcb})")

    def to_json(self) -> dict[str, str]:
        return {"element": self.element, "kind": self.kind, "product": self.product,
                "signer": self.signer, "measurement": self.measurement,
                "chip_id": self.chip_id, "tcb": self.tcb}

    def to_plain(self) -> tuple[str, ...]:
        return (self.element, self.kind, self.product, self.signer, self.measurement,
                self.chip_id, self.tcb)

    @classmethod
    def from_plain(cls, plain: Sequence[str]) -> EvidenceInfo:
        return cls(*plain)


@dataclass(frozen=True)
class Admissible:
    """An entry that satisfies ``element`` (current at the reference time), for ``claim``."""

    element: str
    claim: BoundClaim
    info: EvidenceInfo
    ident: str  # how rejections and claims name the entry: "sev-snp:<chip id prefix>"
    debug: bool  # the guest allows debugging (admitted only by an unsafe-allow-debug element)


Outcome = tuple[tuple[Admissible, ...], tuple[Rejected, ...]]


def entry_id(raw: Any) -> str:
    """A stable identity of one raw entry (to count an entry read from two stores once)."""
    return hashlib.sha256(evidence_id(raw).encode("ascii")).hexdigest()


def unique_entries(raw: Iterable[Any]) -> list[tuple[str, Any]]:
    """(identity, entry) of each distinct entry, in first-seen order."""
    seen: dict[str, Any] = {}
    for item in raw:
        seen.setdefault(entry_id(item), item)
    return list(seen.items())


class EvidenceRing:
    """A policy's evidence elements at one reference time, with their allowed roots read.

    Pure apart from reading AMD's pinned roots (package data, once per process); safe to
    share between threads (its memo only ever gains identical entries)."""

    def __init__(self, elements: Sequence[EvidenceElement], now: dt.datetime,
                 memo: bool = True) -> None:
        self.now = now
        self.memo = memo
        self.elements = {e.name: e for e in elements}
        self._requirements = {e.name: _requirements(e) for e in elements}
        self._memo: dict[tuple[str, str], Outcome] = {}

    def examine(self, ident: str, raw: Any, key: TraceKey) -> Outcome:
        """Which elements the entry ``raw`` (identity ``ident``, :func:`entry_id`) satisfies
        as evidence for the resolved step ``key``; if none, why each refused."""
        memo_key = (ident, key.key)
        outcome = self._memo.get(memo_key)
        if outcome is None:
            outcome = self._examine(raw, key)
            if self.memo:
                self._memo[memo_key] = outcome
        for admitted in outcome[0]:
            if admitted.debug:  # every time, memo or not
                log.warning("UNSAFE: evidence element '%s' (unsafe-allow-debug) admits a "
                            "report from a guest that allows debugging (the host can read "
                            "its memory): chip %s..., measurement %s...", admitted.element,
                            admitted.info.chip_id[:16], admitted.info.measurement[:16])
        return outcome

    def _examine(self, raw: Any, key: TraceKey) -> Outcome:
        step = f"{key.kind}:{key.key}"
        try:
            entry = parse_evidence_entry(raw, f"evidence entry for {step}")
        except ParseError as exc:
            return (), (Rejected("malformed", None, f"malformed evidence: {exc.diagnostics()}"),)
        ident = f"{entry.kind}:{entry.report.chip_id.hex()[:16]}"
        if (entry.claim.kind, entry.claim.key) != (key.kind, key.key):
            return (), (Rejected("other-step", ident, f"evidence ({ident}) binds a claim for "
                                 f"step {entry.claim.kind}:{entry.claim.key}, filed under "
                                 f"{step}"),)
        digest = entry.claim.digest()
        admitted: list[Admissible] = []
        refused: list[Rejected] = []
        for name, element in self.elements.items():
            if element.kind != entry.kind:
                continue
            try:
                verdict = examine_evidence(entry, self._requirements[name], digest, self.now)
            except ParseError as exc:
                return (), (Rejected("malformed", ident, f"malformed evidence ({ident}): "
                                     f"{exc.diagnostics()}"),)
            if verdict.refusal is not None:
                refused.append(Rejected(
                    "evidence-refused", ident, f"evidence ({ident}) not accepted by "
                    f"'{name}': {verdict.refusal.reason}: {verdict.refusal.message}"))
                continue
            status = element.status(self.now)
            if status == "revoked":
                refused.append(Rejected("revoked-evidence", ident, f"evidence element "
                                        f"'{name}' is revoked"))
            elif status == "expired":
                assert element.not_after is not None
                refused.append(Rejected("expired-evidence", ident, f"evidence element "
                                        f"'{name}' expired {element.not_after.isoformat()}"))
            else:
                admitted.append(_admissible(name, entry, verdict, ident))
        if admitted:
            return tuple(admitted), ()
        if not refused:
            refused.append(Rejected("evidence-refused", ident, f"evidence ({ident}) of kind "
                                    f"{entry.kind}: no evidence element of the policy takes "
                                    "that kind"))
        return (), tuple(refused)


def _admissible(name: str, entry: EvidenceEntry, verdict: SnpVerdict, ident: str
                ) -> Admissible:
    report = entry.report
    info = EvidenceInfo(name, entry.kind, verdict.product or "unknown", verdict.signer_kind,
                        report.measurement.hex(), report.chip_id.hex(),
                        str(report.reported_tcb))
    return Admissible(name, entry.claim, info, ident, report.debug_allowed)


def _requirements(element: EvidenceElement) -> SnpRequirements:
    roots: list[SnpRoot] = [amd_root(name) for name in element.roots]
    for path, pem in element.root_files:
        root = root_from_pem(f"{element.name}:{path}", pem, f"root file {path}")
        if not root.amd:
            log.warning("evidence element '%s' allows the root %s from %s, which is not one "
                        "of AMD's: for tests only", element.name, root.ark.common_name, path)
        roots.append(root)
    return SnpRequirements(roots=tuple(roots), measurements=element.measurements,
                           minimum_tcb=element.minimum_tcb, allow_debug=element.allow_debug)
