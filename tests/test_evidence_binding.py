"""The claim binding (tracehook-evidence-v1), the trace file's ``evidence`` field, the
evidence-command's answer, and one entry verified end to end with the software provider."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from typing import Any

import pytest

from snp_provider import DEFAULT_MEASUREMENT, evidence_json, fixed_chain
from tracehook.errors import EvidenceRefused, ParseError
from tracehook.trace.evidence import (
    BoundClaim,
    BoundOutput,
    EvidenceEntry,
    binding_digest,
    binding_preimage,
    parse_evidence_entry,
    parse_evidence_field,
    parse_provider_output,
    verify_evidence,
)
from tracehook.trace.snproots import root_from_pem
from tracehook.trace.snpverify import SnpRequirements

S = "/nix/store/"
OUT = S + "aa8ikhiac1834kaka8vnw5xbxs09472r-ia-c"
DEV = S + "xdkcsl1rdijfk10553vlc9dl02z1vjwv-ia-c-dev"
LIB = S + "70zb8ay0fx91sfxnf6iz98wdjbqi1l2l-ia-a"
KEY = "gv7x6l1mkxil2443mwcjiz47hfng57l1"
H1, H2 = bytes(range(32)), bytes(range(1, 33))
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
OUTPUTS = {"out": BoundOutput(OUT, H1, (OUT, LIB, LIB)), "dev": BoundOutput(DEV, H2, ())}
CLAIM = BoundClaim.of("ia", KEY, OUTPUTS)


def test_preimage_is_spelled_out() -> None:
    assert binding_preimage("ia", KEY, OUTPUTS).decode() == (
        "tracehook-evidence-v1\n"
        f"key ia {KEY}\n"
        f"output dev {DEV} sha256:080z3qfiq6qs34c1f5hm2h9i448h1w70s30b184hh1q60l2060h1\n"
        f"output out {OUT} sha256:07qy3lf1n6hr30bic58l2c91240g1q6hq2qa1440f1h50h1h4080\n"
        f"reference {LIB}\n"
        f"reference {OUT}\n"
    )


def test_digest_is_sha512_of_the_preimage_and_fills_report_data() -> None:
    digest = binding_digest("ia", KEY, OUTPUTS)
    assert digest == hashlib.sha512(binding_preimage("ia", KEY, OUTPUTS)).digest()
    assert len(digest) == 64 and CLAIM.digest() == digest


@pytest.mark.parametrize(("change", "field"), [
    (lambda o: {**o, "out": BoundOutput(OUT, H2, o["out"].references)}, "nar hash"),
    (lambda o: {**o, "out": BoundOutput(OUT, H1, (OUT,))}, "a reference dropped"),
    (lambda o: {k: v for k, v in o.items() if k != "dev"}, "an output dropped"),
    (lambda o: {"bin" if k == "dev" else k: v for k, v in o.items()}, "an output renamed"),
])
def test_every_part_of_the_claim_changes_the_digest(change: Any, field: str) -> None:
    assert binding_digest("ia", KEY, change(OUTPUTS)) != CLAIM.digest(), field


def test_kind_and_key_change_the_digest() -> None:
    assert binding_digest("ca", KEY, OUTPUTS) != CLAIM.digest()
    assert binding_digest("ia", "0" * 32, OUTPUTS) != CLAIM.digest()


def test_reference_order_and_duplicates_do_not_matter() -> None:
    shuffled = {"dev": OUTPUTS["dev"], "out": BoundOutput(OUT, H1, (LIB, OUT))}
    assert binding_digest("ia", KEY, shuffled) == CLAIM.digest()
    assert dict(CLAIM.outputs)["out"].references == (LIB, OUT)


@pytest.mark.parametrize(("kind", "key", "outputs", "message"), [
    ("fo", KEY, OUTPUTS, "kind 'fo'"),
    ("ia", "abc", OUTPUTS, "not 32 nix-base32"),
    ("ia", KEY, {}, "at least one output"),
    ("ia", KEY, {"o ut": OUTPUTS["out"]}, "not a Nix output name"),
    ("ia", KEY, {"out\nreference": OUTPUTS["out"]}, "not a Nix output name"),
    ("ia", KEY, {"out": BoundOutput("/tmp/x", H1, ())}, "not in /nix/store"),
    ("ia", KEY, {"out": BoundOutput(OUT, H1[:20], ())}, "a NAR hash is 32 bytes"),
    ("ia", KEY, {"out": BoundOutput(OUT, H1, (OUT + "\nreference x",))}, "output out: .*illegal"),
])
def test_what_the_preimage_cannot_hold_is_refused(kind: str, key: str, outputs: Any,
                                                  message: str) -> None:
    with pytest.raises(ValueError, match=message):
        binding_preimage(kind, key, outputs)


# --- the trace file field ----------------------------------------------------------------


@pytest.fixture(scope="module")
def entry_json() -> dict[str, Any]:
    chain = fixed_chain()
    report = chain.report(CLAIM.digest(), measurement=DEFAULT_MEASUREMENT)
    return {"format": "tracehook-evidence-v1", "claim": CLAIM.to_json(),
            **evidence_json(chain, report)}


@pytest.fixture(scope="module")
def requirements() -> SnpRequirements:
    root = root_from_pem("software", fixed_chain().root_pem(), "software root")
    return SnpRequirements((root,), measurements=frozenset({DEFAULT_MEASUREMENT}))


def test_an_entry_reads_back_and_writes_the_same(entry_json: dict[str, Any]) -> None:
    entry = parse_evidence_entry(entry_json)
    assert entry.kind == "sev-snp" and entry.claim == CLAIM and len(entry.chain) == 2
    assert entry.to_json() == {k: entry_json[k] for k in (
        "format", "kind", "claim", "report", "vcek", "chain")}


def test_an_entry_verifies_for_its_claim(entry_json: dict[str, Any],
                                         requirements: SnpRequirements) -> None:
    entry = parse_evidence_entry(entry_json)
    verdict = verify_evidence(entry, requirements, CLAIM.digest(), NOW)
    assert verdict.verified and verdict.product == "Test"


def test_an_entry_for_another_claim_is_refused(entry_json: dict[str, Any],
                                               requirements: SnpRequirements) -> None:
    entry = parse_evidence_entry(entry_json)
    other = binding_digest("ia", KEY, {"out": OUTPUTS["out"]})
    with pytest.raises(EvidenceRefused, match="report-data-mismatch"):
        verify_evidence(entry, requirements, other, NOW)


def test_an_entry_whose_claim_was_edited_no_longer_binds(entry_json: dict[str, Any],
                                                         requirements: SnpRequirements) -> None:
    edited = json.loads(json.dumps(entry_json))
    edited["claim"]["outputs"]["out"]["references"] = [OUT]
    entry = parse_evidence_entry(edited)
    with pytest.raises(EvidenceRefused, match="report-data-mismatch"):
        verify_evidence(entry, requirements, entry.claim.digest(), NOW)


def test_an_unreadable_certificate_in_an_entry_is_malformed(
        entry_json: dict[str, Any], requirements: SnpRequirements) -> None:
    entry = parse_evidence_entry({**entry_json, "vcek": base64.b64encode(b"junk").decode()})
    with pytest.raises(ParseError, match="evidence vcek certificate"):
        verify_evidence(entry, requirements, CLAIM.digest(), NOW)


def _without(obj: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != key}


MALFORMED: list[tuple[str, Any, str]] = [
    ("not_an_object", lambda e: [e], "not an object"),
    ("future_format", lambda e: {**e, "format": "tracehook-evidence-v2"}, "unknown evidence "
     "format"),
    ("unknown_kind", lambda e: {**e, "kind": "tdx"}, "unknown evidence kind 'tdx'"),
    ("claim_missing", lambda e: _without(e, "claim"), "'claim' needs an object 'outputs'"),
    ("references_missing", lambda e: {**e, "claim": {**e["claim"], "outputs": {"out": _without(
        e["claim"]["outputs"]["out"], "references")}}}, "needs a list 'references'"),
    ("claim_key_not_nix32", lambda e: {**e, "claim": {**e["claim"], "key": "x"}}, "not 32"),
    ("report_not_base64", lambda e: {**e, "report": "%%%"}, "'report' is not valid base64"),
    ("report_truncated", lambda e: {**e, "report": e["report"][:-8]}, "truncated"),
    ("vcek_missing", lambda e: _without(e, "vcek"), "'vcek' is not a base64 string"),
    ("chain_not_a_list", lambda e: {**e, "chain": "abc"}, "'chain' is not a list"),
]


@pytest.mark.parametrize(("make", "message"), [(m, s) for _, m, s in MALFORMED],
                         ids=[n for n, _, _ in MALFORMED])
def test_a_malformed_entry_is_a_parse_error(entry_json: dict[str, Any], make: Any,
                                            message: str) -> None:
    with pytest.raises(ParseError, match=message):
        parse_evidence_entry(make(entry_json))


def test_the_field_keeps_good_entries_beside_bad_ones(entry_json: dict[str, Any]) -> None:
    assert parse_evidence_field({"signatures": []}) == ((), ())
    entries, errors = parse_evidence_field({"evidence": [entry_json, {"kind": "tdx"}]})
    assert [e.claim for e in entries] == [CLAIM]
    assert len(errors) == 1 and "evidence[1]" in str(errors[0])
    entries, errors = parse_evidence_field({"evidence": {"kind": "sev-snp"}})
    assert entries == () and "'evidence' is not a list" in str(errors[0])


# --- the evidence-command's answer ---------------------------------------------------------


def test_provider_output_becomes_the_entry_for_the_claim(entry_json: dict[str, Any]) -> None:
    stdout = json.dumps(_without(_without(entry_json, "claim"), "format")).encode()
    entry = parse_provider_output(stdout, CLAIM)
    assert isinstance(entry, EvidenceEntry) and entry.claim == CLAIM


@pytest.mark.parametrize(("stdout", "message"), [
    (b"not json", "not JSON"),
    (b"[]", "not a JSON object"),
    (b"{}", "unknown evidence kind None"),
])
def test_malformed_provider_output_is_a_parse_error(stdout: bytes, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        parse_provider_output(stdout, CLAIM)


def test_provider_output_for_another_digest_is_refused(entry_json: dict[str, Any]) -> None:
    other = BoundClaim.of("ia", KEY, {"out": OUTPUTS["out"]})
    stdout = json.dumps(_without(entry_json, "claim")).encode()
    with pytest.raises(ParseError, match="not the digest it was asked for"):
        parse_provider_output(stdout, other)
