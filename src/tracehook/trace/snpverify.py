"""Verify one AMD SEV-SNP report: signature, certificate chain, TCB, then the requirements.

Pure decisions over bytes already read (certificates are read by the caller). The checks, in
order; the first that fails is the one refusal, with one reason code from :data:`REASONS`:

1. ``bad-signature``: the report's ECDSA P-384/SHA-384 signature over bytes 0 to 0x29F does
   not verify under the VCEK/VLEK certificate's key (or the algorithm is not that one).
   ``unsupported-version``: the (signed) report version is not 2 to 5.
2. ``signing-key-mismatch``: the report says VCEK and the certificate is a VLEK, or the
   reverse (certificate common name ``SEV-VCEK`` or ``SEV-VLEK``).
3. ``broken-chain``: a certificate of the chain VCEK -> ASK -> ARK (VLEK -> ASVK -> ARK)
   with the right issuer name does not carry a valid RSASSA-PSS SHA-384 signature by it, or
   the ARK is not self-signed. ``unknown-root``: the chain ends at an ARK that is not an
   allowed root, or the issuer named by a certificate is neither given nor pinned.
4. ``certificate-expired``: a certificate of the chain is not valid at the reference time.
5. ``tcb-mismatch``: the VCEK/VLEK's TCB extensions (AMD's OIDs 1.3.6.1.4.1.3704.1.3.1
   blSPL, .3.2 teeSPL, .3.3 snpSPL, .3.8 ucodeSPL, .3.9 fmcSPL on Turin) differ from the
   report's REPORTED_TCB. ``chip-mismatch``: a VCEK's hwID (.1.4) is not the report's
   CHIP_ID (a VLEK names no chip).
6. ``debug-policy``: the guest policy allows debugging (the host can read its memory),
   unless the requirements allow it (an unsafe setting, logged every time it is used).
7. ``report-data-mismatch``: REPORT_DATA is not the expected digest (the claim's).
8. ``measurement-not-accepted``: MEASUREMENT is not one of the accepted ones.
9. ``tcb-too-old``: a field of REPORTED_TCB (the TCB the signing key was derived for, which
   step 5 tied to the certificate) is below the required minimum.

Steps 7 to 9 run only for what the caller requires (None: not checked, and the verdict says
so); a policy element always requires a measurement, the CLI may only inspect.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import get_args

from tracehook.errors import BadSignature, EvidenceReason, EvidenceRefused
from tracehook.trace import pki
from tracehook.trace.pki import Certificate
from tracehook.trace.sevsnp import (
    MEASUREMENT_LEN,
    REPORT_DATA_LEN,
    SIG_ALGO_ECDSA_P384_SHA384,
    SUPPORTED_VERSIONS,
    Report,
    Tcb,
)
from tracehook.trace.snproots import SnpRoot

log = logging.getLogger(__name__)

REASONS: tuple[EvidenceReason, ...] = get_args(EvidenceReason)

AMD_OID = "1.3.6.1.4.1.3704.1"
OID_PRODUCT_NAME = f"{AMD_OID}.2"
OID_HWID = f"{AMD_OID}.4"
OID_SPL = {"bootloader": f"{AMD_OID}.3.1", "tee": f"{AMD_OID}.3.2", "snp": f"{AMD_OID}.3.3",
           "microcode": f"{AMD_OID}.3.8", "fmc": f"{AMD_OID}.3.9"}
SIGNER_KINDS = {"SEV-VCEK": "vcek", "SEV-VLEK": "vlek"}


@dataclass(frozen=True)
class SnpRequirements:
    """What a report must show. ``roots``: the allowed roots (never empty). ``measurements``:
    the accepted launch measurements (48 bytes each), or None for not checked (never an
    empty set: that would accept nothing and is refused as a mistake). ``minimum_tcb``:
    None for no minimum. ``allow_debug`` is unsafe: debug guests expose their memory."""

    roots: tuple[SnpRoot, ...]
    measurements: frozenset[bytes] | None = None
    minimum_tcb: Tcb | None = None
    allow_debug: bool = False

    def __post_init__(self) -> None:
        if not self.roots:
            raise ValueError("an SEV-SNP requirement needs at least one allowed root")
        if self.measurements is not None:
            if not self.measurements:
                raise ValueError("an empty list of accepted measurements accepts nothing: "
                                 "list at least one")
            for m in self.measurements:
                if len(m) != MEASUREMENT_LEN:
                    raise ValueError(f"a measurement is {MEASUREMENT_LEN} bytes "
                                     f"({2 * MEASUREMENT_LEN} hex digits), not {len(m)}")


@dataclass(frozen=True)
class SnpVerdict:
    """The result of examining one report: what it says, how far it linked, and the refusal
    (None when verified; else the error :meth:`raise_if_refused` raises, with its reason
    code). ``checks`` says which requirements were checked and how."""

    report: Report
    signer: Certificate
    chain: tuple[Certificate, ...]  # signer, ASK/ASVK, ARK, once linked; else ()
    root: SnpRoot | None
    refusal: EvidenceRefused | None
    checks: tuple[tuple[str, str], ...]

    @property
    def verified(self) -> bool:
        return self.refusal is None

    @property
    def product(self) -> str | None:
        return self.root.product if self.root is not None else None

    @property
    def signer_kind(self) -> str:
        return SIGNER_KINDS.get(self.signer.common_name, "unknown")

    def raise_if_refused(self) -> SnpVerdict:
        if self.refusal is not None:
            raise EvidenceRefused(self.refusal.reason, self.refusal.message)
        return self

    def summary(self) -> str:
        """One line for logs: which root, chip, measurement and TCB."""
        r = self.report
        return (f"sev-snp {self.product or 'unknown product'} {self.signer_kind} "
                f"chip {r.chip_id.hex()[:16]} measurement {r.measurement.hex()[:16]} "
                f"tcb {r.reported_tcb}")

    def to_json(self) -> dict[str, object]:
        return {
            "verified": self.verified,
            "reason": self.refusal.reason if self.refusal else None,
            "message": self.refusal.message if self.refusal else None,
            "product": self.product,
            "root": self.root.name if self.root else None,
            "signer": self.signer_kind,
            "chain": [{"subject": c.common_name, "sha256": c.sha256} for c in self.chain],
            "checks": dict(self.checks),
            "report": self.report.to_json(),
        }


@dataclass
class _Progress:
    """What the checks established so far (kept for the verdict when one refuses)."""

    chain: tuple[Certificate, ...] = ()
    root: SnpRoot | None = None
    checks: list[tuple[str, str]] = field(default_factory=list)


def _link(signer: Certificate, given: Sequence[Certificate],
          roots: Sequence[SnpRoot]) -> tuple[tuple[Certificate, ...], SnpRoot]:
    """signer -> intermediate -> allowed ARK, from the given and the roots' certificates."""
    allowed = {r.ark.der: r for r in roots}
    # Links a root's constructor verified (the ARK's self-signature, the ASKs it issued).
    checked = {(c.der, r.ark.der) for r in roots for c in (*r.intermediates, r.ark)}
    known = {c.der: c for c in given if c.der != signer.der}
    for root in roots:
        known.update({c.der: c for c in (*root.intermediates, root.ark)})
    pool = list(known.values())
    middles = [c for c in pool if not c.self_issued and c.subject == signer.issuer]
    if not middles:
        raise EvidenceRefused(
            "unknown-root", f"{signer.common_name}'s issuer "
            f"{signer.issuer_common_name!r} is neither given nor under an allowed "
            f"root ({', '.join(r.name for r in roots)})")
    problems: list[str] = []
    unknown: list[str] = []
    for middle in middles:
        problem = pki.issue_problem(signer, middle)
        if problem:
            problems.append(f"{signer.common_name} is not issued by {middle.common_name} "
                            f"(sha256 {middle.sha256[:16]}): {problem}")
            continue
        arks = [c for c in pool if c.self_issued and c.subject == middle.issuer]
        if not arks:
            unknown.append(f"{middle.common_name}'s issuer {middle.issuer_common_name!r} is "
                           "neither given nor an allowed root")
        for ark in arks:
            problem = None if (middle.der, ark.der) in checked else (
                pki.issue_problem(middle, ark) or pki.issue_problem(ark, ark))
            if problem:
                problems.append(f"{middle.common_name} -> {ark.common_name} "
                                f"(sha256 {ark.sha256[:16]}): {problem}")
            elif ark.der in allowed:
                return (signer, middle, ark), allowed[ark.der]
            else:
                unknown.append(f"the chain ends at {ark.common_name} (sha256 "
                               f"{ark.sha256[:16]}), which is not an allowed root "
                               f"({', '.join(r.name for r in roots)})")
    if unknown:
        raise EvidenceRefused("unknown-root", unknown[0])
    raise EvidenceRefused("broken-chain", problems[0])


def _check_certified_tcb(report: Report, signer: Certificate, kind: str) -> None:
    tcb = report.reported_tcb
    for name, value in tcb.items():
        raw = signer.extension(OID_SPL[name])
        certified = pki.der_integer(raw) if raw is not None else None
        if certified is None:
            raise EvidenceRefused(
                "tcb-mismatch", f"{signer.common_name} has no readable {name} SPL "
                f"extension ({OID_SPL[name]})")
        if certified != value:
            raise EvidenceRefused(
                "tcb-mismatch", f"{signer.common_name} certifies {name}={certified}, "
                f"the report's reported TCB says {name}={value} ({tcb})")
    if kind != "vcek":
        return
    hwid = signer.extension(OID_HWID)
    if hwid is not None and len(hwid) not in (8, 64):
        hwid = pki.der_octet_string(hwid)
    if hwid is None or len(hwid) not in (8, 64):
        raise EvidenceRefused(
            "chip-mismatch", f"{signer.common_name} has no readable hwID extension")
    if not hmac.compare_digest(hwid, report.chip_id[: len(hwid)]):
        masked = " (the report masks its chip id)" if report.chip_id_masked else ""
        raise EvidenceRefused(
            "chip-mismatch", f"{signer.common_name} is for chip "
            f"{hwid.hex()[:16]}..., the report is from chip "
            f"{report.chip_id.hex()[:16]}...{masked}")


def _check(report: Report, signer: Certificate, given: Sequence[Certificate],
           req: SnpRequirements, now: dt.datetime, expected_report_data: bytes | None,
           done: _Progress) -> None:
    if report.signature_algo != SIG_ALGO_ECDSA_P384_SHA384:
        raise EvidenceRefused(
            "bad-signature", f"signature algorithm {report.signature_algo} is not "
            "1 (ECDSA P-384 with SHA-384)")
    try:
        pki.verify_ecdsa_p384(signer, report.signed_bytes, *report.signature_rs,
                              what="the report's signature")
    except BadSignature as exc:
        raise EvidenceRefused("bad-signature", str(exc)) from None
    if report.version not in SUPPORTED_VERSIONS:
        raise EvidenceRefused(
            "unsupported-version", f"report version {report.version}; this "
            f"verifier knows versions {SUPPORTED_VERSIONS[0]} to "
            f"{SUPPORTED_VERSIONS[-1]}")
    kind = SIGNER_KINDS.get(signer.common_name)
    if kind is None or kind != report.signing_key:
        said = (f"its {report.signing_key.upper()}" if report.signing_key in ("vcek", "vlek")
                else f"no known key (SIGNING_KEY {report.signing_key})")
        raise EvidenceRefused(
            "signing-key-mismatch", f"the report says it is signed by {said}; the "
            f"certificate is {signer.common_name!r}, not a "
            f"{'SEV-VLEK' if report.signing_key == 'vlek' else 'SEV-VCEK'}")
    done.chain, done.root = _link(signer, given, req.roots)
    for cert in done.chain:
        if not cert.valid_at(now):
            raise EvidenceRefused(
                "certificate-expired", f"{cert.common_name} is valid from "
                f"{cert.not_before:%Y-%m-%d} to {cert.not_after:%Y-%m-%d}, not at "
                f"{now:%Y-%m-%dT%H:%M:%SZ}")
    _check_certified_tcb(report, signer, kind)
    if report.debug_allowed:
        if not req.allow_debug:
            raise EvidenceRefused(
                "debug-policy", f"the guest policy {report.policy:#x} allows "
                "debugging: the host can read and change the guest's memory")
        log.warning("UNSAFE: accepting an SEV-SNP report whose guest policy allows debugging "
                    "(allow-debug): chip %s", report.chip_id.hex()[:16])
        done.checks.append(("debug", "allowed (unsafe)"))
    else:
        done.checks.append(("debug", "off"))
    if expected_report_data is None:
        done.checks.append(("report-data", "not checked"))
    elif not hmac.compare_digest(report.report_data, expected_report_data):
        raise EvidenceRefused(
            "report-data-mismatch", f"REPORT_DATA {report.report_data.hex()[:32]}... "
            f"is not the expected {expected_report_data.hex()[:32]}... (the report "
            "was made for another claim)")
    else:
        done.checks.append(("report-data", "matched"))
    if req.measurements is None:
        done.checks.append(("measurement", "not checked"))
    elif report.measurement not in req.measurements:
        raise EvidenceRefused(
            "measurement-not-accepted", f"measurement {report.measurement.hex()} is "
            f"not an accepted one ({len(req.measurements)} accepted)")
    else:
        done.checks.append(("measurement", "accepted"))
    if req.minimum_tcb is None:
        done.checks.append(("minimum-tcb", "not checked"))
    else:
        below = report.reported_tcb.below(req.minimum_tcb)
        if below:
            raise EvidenceRefused(
                "tcb-too-old", f"reported TCB {report.reported_tcb} is below the "
                f"minimum {req.minimum_tcb}: {', '.join(below)}")
        done.checks.append(("minimum-tcb", "met"))


def examine_report(report: Report, signer: Certificate, given: Sequence[Certificate],
                   req: SnpRequirements, now: dt.datetime,
                   expected_report_data: bytes | None) -> SnpVerdict:
    """Check ``report`` as signed by ``signer`` (VCEK or VLEK), with certificates ``given``
    alongside (ASK, ARK: optional for AMD's pinned roots). Never raises for a refusal."""
    if expected_report_data is not None and len(expected_report_data) != REPORT_DATA_LEN:
        raise ValueError(f"expected report data is {REPORT_DATA_LEN} bytes, "
                         f"not {len(expected_report_data)}")
    done = _Progress()
    refusal = None
    try:
        _check(report, signer, given, req, now, expected_report_data, done)
    except EvidenceRefused as exc:
        refusal = exc
    return SnpVerdict(report, signer, done.chain, done.root, refusal, tuple(done.checks))


def verify_report(report: Report, signer: Certificate, given: Sequence[Certificate],
                  req: SnpRequirements, now: dt.datetime,
                  expected_report_data: bytes | None) -> SnpVerdict:
    """:func:`examine_report`, raising EvidenceRefused (exit 1) on a refusal."""
    return examine_report(report, signer, given, req, now, expected_report_data
                          ).raise_if_refused()
