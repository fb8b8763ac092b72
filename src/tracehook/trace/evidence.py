"""Hardware evidence in trace files: the claim binding and the ``evidence`` field. Pure.

A builder in a confidential VM asks its hardware for an attestation report whose
REPORT_DATA is the **binding digest** of its claim: SHA-512 (64 bytes, REPORT_DATA's size)
of the ``tracehook-evidence-v1`` preimage, the UTF-8 text (docs/FORMAT.md section 9)::

    tracehook-evidence-v1\\n
    key <kind> <trace key>\\n
    output <name> <store path> sha256:<nix32 NAR hash>\\n     one per output, by name
    reference <store path>\\n                                  its references, sorted

(outputs in bytewise order of name; after each output line, that output's references,
deduplicated, in bytewise order, possibly none; every line ends in one LF). The report,
the certificate of the key that signed it and optionally the rest of its chain travel in the
trace file next to ``signatures``, with the claim they bind (laut ignores the field)::

    {"signatures": [...],
     "evidence": [{"format": "tracehook-evidence-v1", "kind": "sev-snp",
                   "claim": {"kind": "ia", "key": "...", "outputs": {"out": {
                       "path": "...", "hash": "sha256:...", "references": ["..."]}}},
                   "report": "<base64>", "vcek": "<base64 DER>", "chain": ["<base64 DER>"]}]}

A verifier never trusts a digest it is given: it computes the digest of the claim it is
about to credit and requires REPORT_DATA to equal it (:func:`verify_evidence`).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from tracehook.errors import ParseError
from tracehook.nix import nixbase32
from tracehook.nix.nar import format_nar_hash, parse_nar_hash
from tracehook.nix.storepath import STORE_DIR, parse_store_path
from tracehook.trace.claim import KeyKind
from tracehook.trace.pki import load_certificate, load_certificates
from tracehook.trace.sevsnp import Report, parse_report
from tracehook.trace.snpverify import SnpRequirements, SnpVerdict, examine_report

EVIDENCE_FORMAT = "tracehook-evidence-v1"
EVIDENCE_KINDS = ("sev-snp",)
DIGEST_LEN = 64
_OUTPUT_NAME = re.compile(r"[A-Za-z0-9+\-._?=]+\Z")


class BindableOutput(Protocol):
    """What the binding needs of one output (an issue-13 ``OutputClaim`` with references
    fits as it is)."""

    @property
    def path(self) -> str: ...

    @property
    def nar_hash(self) -> bytes: ...

    @property
    def references(self) -> Collection[str]: ...


@dataclass(frozen=True)
class BoundOutput:
    path: str
    nar_hash: bytes  # sha256 of the output's NAR
    references: tuple[str, ...]  # store paths, sorted, no duplicates


@dataclass(frozen=True)
class BoundClaim:
    """The claim a report is bound to: the step's trace key and its outputs with references."""

    kind: KeyKind
    key: str
    outputs: tuple[tuple[str, BoundOutput], ...]  # by output name

    @classmethod
    def of(cls, kind: KeyKind, key: str, outputs: Mapping[str, BindableOutput],
           store_dir: str = STORE_DIR) -> BoundClaim:
        """Normalised (sorted, deduplicated) and checked (ValueError) as the preimage needs."""
        _check(kind, key, outputs, store_dir)
        return cls(kind, key, tuple(
            (name, BoundOutput(o.path, o.nar_hash, tuple(sorted(set(o.references)))))
            for name, o in sorted(outputs.items())))

    def preimage(self) -> bytes:
        return _render(self.kind, self.key, dict(self.outputs))

    def digest(self) -> bytes:
        return hashlib.sha512(self.preimage()).digest()

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "outputs": {
            name: {"path": o.path, "hash": format_nar_hash(o.nar_hash),
                   "references": list(o.references)} for name, o in self.outputs}}


def _check(kind: str, key: str, outputs: Mapping[str, BindableOutput], store_dir: str) -> None:
    """ValueError if a part of the claim cannot be written in the preimage."""
    if kind not in ("ca", "ia"):
        raise ValueError(f"trace key kind {kind!r} is not 'ca' or 'ia'")
    if not nixbase32.is_valid(key, 20):
        raise ValueError(f"trace key {key!r} is not 32 nix-base32 characters")
    if not outputs:
        raise ValueError("a claim names at least one output")
    for name, out in outputs.items():
        if not _OUTPUT_NAME.match(name):
            raise ValueError(f"output name {name!r} is not a Nix output name")
        if len(out.nar_hash) != 32:
            raise ValueError(f"output {name}: a NAR hash is 32 bytes (sha256)")
        for path in (out.path, *out.references):
            try:
                parse_store_path(path, store_dir)
            except ParseError as exc:
                raise ValueError(f"output {name}: {exc.message}") from None


def _render(kind: str, key: str, outputs: Mapping[str, BindableOutput]) -> bytes:
    lines = [EVIDENCE_FORMAT, f"key {kind} {key}"]
    for name in sorted(outputs):
        out = outputs[name]
        lines.append(f"output {name} {out.path} {format_nar_hash(out.nar_hash)}")
        lines += [f"reference {ref}" for ref in sorted(set(out.references))]
    return ("\n".join(lines) + "\n").encode("utf-8")


def binding_preimage(kind: str, key: str, outputs: Mapping[str, BindableOutput],
                     store_dir: str = STORE_DIR) -> bytes:
    """The ``tracehook-evidence-v1`` preimage; ValueError if a part cannot be written in it."""
    _check(kind, key, outputs, store_dir)
    return _render(kind, key, outputs)


def binding_digest(kind: str, key: str, outputs: Mapping[str, BindableOutput],
                   store_dir: str = STORE_DIR) -> bytes:
    """SHA-512 of :func:`binding_preimage`: the 64 bytes a report's REPORT_DATA must hold."""
    return hashlib.sha512(binding_preimage(kind, key, outputs, store_dir)).digest()


@dataclass(frozen=True)
class EvidenceEntry:
    """One ``evidence`` entry as read: the bound claim, the report (its fields read, not yet
    verified) and the certificates as DER bytes (read when verified)."""

    kind: str
    claim: BoundClaim
    report: Report
    vcek: bytes
    chain: tuple[bytes, ...]

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "format": EVIDENCE_FORMAT, "kind": self.kind, "claim": self.claim.to_json(),
            "report": _b64(self.report.raw), "vcek": _b64(self.vcek)}
        if self.chain:
            obj["chain"] = [_b64(c) for c in self.chain]
        return obj


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, what: str, field: str) -> bytes:
    if not isinstance(value, str):
        raise ParseError(what, f"'{field}' is not a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ParseError(what, f"'{field}' is not valid base64 (standard alphabet, '=' "
                         "padding)") from None


def _parse_claim(value: Any, what: str, store_dir: str) -> BoundClaim:
    if not isinstance(value, dict) or not isinstance(value.get("outputs"), dict):
        raise ParseError(what, "'claim' needs an object 'outputs'")
    outputs: dict[str, BoundOutput] = {}
    for name, out in value["outputs"].items():
        if not isinstance(out, dict) or not isinstance(out.get("path"), str) or not isinstance(
                out.get("hash"), str):
            raise ParseError(what, f"claim output {name!r} needs string 'path' and 'hash'")
        refs = out.get("references")
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise ParseError(what, f"claim output {name!r} needs a list 'references' of store "
                             "paths (possibly empty)")
        nar_hash = parse_nar_hash(out["hash"], f"{what} claim output {name!r} hash")
        outputs[name] = BoundOutput(out["path"], nar_hash, tuple(refs))
    kind, key = value.get("kind"), value.get("key")
    try:
        _check(str(kind), str(key), outputs, store_dir)
    except ValueError as exc:
        raise ParseError(what, f"claim: {exc}") from None
    return BoundClaim.of("ca" if kind == "ca" else "ia", str(key), outputs, store_dir)


def parse_evidence_entry(value: Any, what: str = "evidence entry",
                         store_dir: str = STORE_DIR) -> EvidenceEntry:
    """Read one entry; ParseError (naming the field) if it is malformed or of another kind."""
    if not isinstance(value, dict):
        raise ParseError(what, "not an object")
    fmt = value.get("format", EVIDENCE_FORMAT)
    if fmt != EVIDENCE_FORMAT:
        raise ParseError(what, f"unknown evidence format {fmt!r} (this reader knows "
                         f"{EVIDENCE_FORMAT})")
    kind = value.get("kind")
    if kind not in EVIDENCE_KINDS:
        raise ParseError(what, f"unknown evidence kind {kind!r} (known: "
                         f"{', '.join(EVIDENCE_KINDS)})")
    claim = _parse_claim(value.get("claim"), what, store_dir)
    report = parse_report(_unb64(value.get("report"), what, "report"), f"{what} report")
    vcek = _unb64(value.get("vcek"), what, "vcek")
    chain_value = value.get("chain", [])
    if not isinstance(chain_value, list):
        raise ParseError(what, "'chain' is not a list")
    chain = tuple(_unb64(c, what, f"chain[{i}]") for i, c in enumerate(chain_value))
    return EvidenceEntry(str(kind), claim, report, vcek, chain)


def parse_evidence_field(doc: Mapping[str, Any], what: str = "trace file",
                         store_dir: str = STORE_DIR
                         ) -> tuple[tuple[EvidenceEntry, ...], tuple[ParseError, ...]]:
    """The entries of a trace file's ``evidence`` field (absent: none) and, apart, the
    errors of those that could not be read: one malformed entry hides no other."""
    value = doc.get("evidence")
    if value is None:
        return (), ()
    if not isinstance(value, list):
        return (), (ParseError(what, "'evidence' is not a list"),)
    entries: list[EvidenceEntry] = []
    errors: list[ParseError] = []
    for i, item in enumerate(value):
        try:
            entries.append(parse_evidence_entry(item, f"{what} evidence[{i}]", store_dir))
        except ParseError as exc:
            errors.append(exc)
    return tuple(entries), tuple(errors)


def parse_provider_output(stdout: bytes, claim: BoundClaim,
                          what: str = "evidence-command output") -> EvidenceEntry:
    """An ``evidence-command``'s answer (one JSON object: ``kind``, ``report``, ``vcek``,
    optional ``chain``; docs/FORMAT.md 9.4) as the entry for ``claim``. ParseError if it is
    malformed or its report is not bound to ``claim`` (its signature is not checked here)."""
    try:
        value = json.loads(stdout)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ParseError(what, f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ParseError(what, "not a JSON object")
    entry = parse_evidence_entry({**value, "claim": claim.to_json()}, what)
    if entry.report.report_data != claim.digest():
        raise ParseError(what, "the report's REPORT_DATA is not the digest it was asked for")
    return entry


def examine_evidence(entry: EvidenceEntry, requirements: SnpRequirements,
                     expected_digest: bytes, now: dt.datetime) -> SnpVerdict:
    """Check one entry against a policy element's requirements, for the claim whose
    :func:`binding_digest` is ``expected_digest``. Refusals are in the verdict; ParseError if
    a certificate cannot be read."""
    if len(expected_digest) != DIGEST_LEN:
        raise ValueError(f"a binding digest is {DIGEST_LEN} bytes, not {len(expected_digest)}")
    signer = load_certificate(entry.vcek, "evidence vcek certificate")
    given = [c for i, der in enumerate(entry.chain)
             for c in load_certificates(der, f"evidence chain[{i}] certificate")]
    return examine_report(entry.report, signer, given, requirements, now, expected_digest)


def verify_evidence(entry: EvidenceEntry, requirements: SnpRequirements,
                    expected_digest: bytes, now: dt.datetime) -> SnpVerdict:
    """:func:`examine_evidence`, raising EvidenceRefused (exit 1) on a refusal."""
    return examine_evidence(entry, requirements, expected_digest, now).raise_if_refused()

