"""Hardware evidence in the verified set: what an evidence entry mints, and every way it
does not count. Entries are made with the software provider (tests/snp_provider.py, a
stand-in for hardware) for a synthetic two-step graph (a fixed-output source and one
content-addressed step); checks run in threads and in checker processes (the plain round
trip). Negative cases are named after the attack."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from evidencekit import OTHER_MEASUREMENT, Provider, bound, element, make_provider
from snp_provider import DEFAULT_MEASUREMENT, POLICY_DEBUG
from tracehook.nix.derivation import Derivation, DerivationOutput
from tracehook.nix.storepath import derivation_path, make_fixed_output_path, make_store_path
from tracehook.stores.tracestore import FileTraceStore
from tracehook.trace.claim import Claim, OutputClaim, TraceKey, sign_trace
from tracehook.trace.stepkey import InputOutput, Resolution, step_key
from tracehook.verify.limits import Limits
from tracehook.verify.policy import Policy, parse_policy
from tracehook.verify.report import TargetReport
from tracehook.verify.resolver import Resolver
from tracehook.verify.trusted import Accepted, Checked, KeyRing, readmit, to_plain
from tracehook.verify.walk import Target
from verifyhelp import BUILDER, public_text, secret

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Provider:
    return make_provider(tmp_path_factory.mktemp("provider"))


@dataclasses.dataclass
class Step:
    drvs: dict[str, Derivation]
    target: str
    res: Resolution
    outputs: dict[str, OutputClaim]

    @property
    def key(self) -> TraceKey:
        return self.res.key


def _step() -> Step:
    digest = hashlib.sha256(b"src").digest()
    src_out = make_fixed_output_path("flat", "sha256", digest, "src")
    src = Derivation({"out": DerivationOutput(src_out, "sha256", digest.hex())}, {}, (),
                     "x86_64-linux", "/bin/sh", (), {"name": "src", "out": src_out})
    src_path = derivation_path(src)
    x = Derivation({"out": DerivationOutput("", "r:sha256", "")}, {src_path: ("out",)}, (),
                   "x86_64-linux", "/bin/sh", (), {"name": "x", "out": ""})
    x_path = derivation_path(x)
    res = step_key(x, {(src_path, "out"): InputOutput(src_out, True)})
    out = make_store_path("output:out", hashlib.sha256(b"x").digest(), "x")
    outputs = {"out": OutputClaim(out, hashlib.sha256(b"x nar").digest(), (out, src_out))}
    return Step({src_path: src, x_path: x}, x_path, res, outputs)


STEP = _step()
CLAIM = bound(STEP.key.kind, STEP.key.key, STEP.outputs)


def policy(provider: Provider, require: str = '"snp"', extra: str = "",
           keys: tuple[str, ...] = ()) -> Policy:
    text = ""
    if keys:
        text += "[keys]\n" + "".join(f'{k} = "{public_text(k)}"\n' for k in keys)
    text += element("snp", provider, extra=extra)
    text += f"[trust]\nrequire = {require}\n"
    return parse_policy(text)


# --- KeyRing.check ---------------------------------------------------------------------


def test_evidence_that_verifies_is_accepted_as_the_element(provider: Provider) -> None:
    ring = KeyRing(policy(provider), NOW)
    checked = ring.check([], STEP.key, [provider.entry(CLAIM)])
    [acc] = checked.accepted
    assert acc.signer == "snp" and checked.rejected == () and checked.seen == 1
    assert acc.claim.outputs == STEP.outputs
    assert acc.claim.outputs["out"].references == tuple(sorted(STEP.outputs["out"].references
                                                               or ()))
    assert acc.evidence is not None
    info = acc.evidence.to_json()
    assert info["element"] == "snp" and info["product"] == "Test" and info["signer"] == "vcek"
    assert info["tcb"] == "bootloader=9 tee=0 snp=23 microcode=72"
    assert info["measurement"] == DEFAULT_MEASUREMENT.hex()
    assert info["chip_id"] == provider.chain.chip_id.hex()


def _edit_claim(entry: dict[str, Any]) -> dict[str, Any]:
    entry["claim"]["outputs"]["out"]["references"] = []
    return entry


OTHER_CLAIM = bound(STEP.key.kind, STEP.key.key,
                    {"out": OutputClaim(STEP.outputs["out"].path, bytes(32), ())})
Make = Callable[[Provider], dict[str, Any]]

# attack, entry, extra policy line, reject kind, text in the detail
REFUSALS: list[tuple[str, Make, str, str, str]] = [
    ("unaccepted-guest-image", lambda p: p.entry(CLAIM, measurement=OTHER_MEASUREMENT), "",
     "evidence-refused", "not accepted by 'snp': measurement-not-accepted: measurement "
     + OTHER_MEASUREMENT.hex()),
    ("stale-firmware", lambda p: p.entry(CLAIM, chain=p.old), "", "evidence-refused",
     "tcb-too-old: reported TCB bootloader=9 tee=0 snp=8 microcode=72 is below the minimum"),
    ("report-for-another-claim", lambda p: p.entry(CLAIM, report_for=OTHER_CLAIM), "",
     "evidence-refused", "report-data-mismatch"),
    ("claim-edited-after-the-report", lambda p: _edit_claim(p.entry(CLAIM)), "",
     "evidence-refused", "report-data-mismatch"),
    ("vcek-from-another-root", lambda p: p.entry(CLAIM, chain=p.foreign), "",
     "evidence-refused", "unknown-root"),
    ("debuggable-guest", lambda p: p.entry(CLAIM, policy=POLICY_DEBUG), "",
     "evidence-refused", "debug-policy"),
    ("evidence-filed-under-another-step",
     lambda p: p.entry(bound("ca", "0" * 32, STEP.outputs)), "", "other-step",
     "binds a claim for step ca:00000000000000000000000000000000"),
    ("truncated-report", lambda p: {**p.entry(CLAIM), "report": p.entry(CLAIM)["report"][:-8]},
     "", "malformed", "malformed evidence"),
    ("unknown-evidence-kind", lambda p: {**p.entry(CLAIM), "kind": "tdx"}, "", "malformed",
     "unknown evidence kind 'tdx'"),
    ("revoked-element", lambda p: p.entry(CLAIM), "revoked = true", "revoked-evidence",
     "evidence element 'snp' is revoked"),
    ("expired-element", lambda p: p.entry(CLAIM), "not-after = 2025-06-01", "expired-evidence",
     "evidence element 'snp' expired 2025-06-01"),
]


@pytest.mark.parametrize(("attack", "make", "extra", "kind", "text"), REFUSALS,
                         ids=[r[0] for r in REFUSALS])
def test_evidence_that_does_not_count(provider: Provider, attack: str, make: Make, extra: str,
                                      kind: str, text: str) -> None:
    ring = KeyRing(policy(provider, extra=extra), NOW)
    checked = ring.check([], STEP.key, [make(provider)])
    assert checked.accepted == ()
    [rejected] = checked.rejected
    assert rejected.kind == kind
    assert text in rejected.detail, rejected.detail


def test_unsafe_allow_debug_admits_and_warns_every_time(
        provider: Provider, caplog: pytest.LogCaptureFixture) -> None:
    ring = KeyRing(policy(provider, extra="unsafe-allow-debug = true"), NOW)
    entry = provider.entry(CLAIM, policy=POLICY_DEBUG)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert [a.signer for a in ring.check([], STEP.key, [entry]).accepted] == ["snp"]
    warned = [r for r in caplog.records if "unsafe-allow-debug" in r.getMessage()]
    assert len(warned) == 2 and "'snp'" in warned[0].getMessage()


def test_one_bad_entry_hides_no_other_and_duplicates_count_once(provider: Provider) -> None:
    ring = KeyRing(policy(provider), NOW)
    good = provider.entry(CLAIM)
    reordered = dict(reversed(list(good.items())))
    checked = ring.check([], STEP.key, [{"kind": "sev-snp"}, good, reordered, "junk"])
    assert [a.signer for a in checked.accepted] == ["snp"]
    assert [r.kind for r in checked.rejected] == ["malformed", "malformed"]
    assert checked.seen == 3 and checked.evidence_seen == 3


def test_a_policy_without_evidence_elements_ignores_evidence(provider: Provider) -> None:
    ring = KeyRing(parse_policy(f'[keys]\nbuilderA = "{public_text("builderA")}"\n'
                                '[trust]\nrequire = "builderA"\n'), NOW)
    checked = ring.check([], STEP.key, [provider.entry(CLAIM), "junk"])
    assert (checked.accepted, checked.rejected, checked.seen) == ((), (), 0)
    assert not ring.wants_evidence


def test_only_the_trusted_set_mints(provider: Provider) -> None:
    claim = Claim("ca", STEP.key.key, dict(STEP.outputs), "sev-snp:0", "")
    with pytest.raises(TypeError, match="minted only by"):
        Accepted("snp", claim)
    with pytest.raises(TypeError, match="minted only by"):
        Checked((), (), 0)


def test_the_plain_round_trip_keeps_the_evidence_and_rechecks_the_element(
        provider: Provider) -> None:
    ring = KeyRing(policy(provider), NOW)
    checked = ring.check([], STEP.key, [provider.entry(CLAIM)])
    back = readmit(to_plain(checked), STEP.key, ring)
    assert back.accepted == checked.accepted and back.evidence_seen == 1
    assert back.accepted[0].evidence == checked.accepted[0].evidence
    revoked = KeyRing(policy(provider, extra="revoked = true"), NOW)
    with pytest.raises(ValueError, match="not a current key or evidence element"):
        readmit(to_plain(checked), STEP.key, revoked)
    other = KeyRing(parse_policy(element("other", provider) + '[trust]\nrequire = "other"\n'),
                    NOW)
    with pytest.raises(ValueError, match="'snp'"):
        readmit(to_plain(checked), STEP.key, other)


# --- the verified set: values, quorums -------------------------------------------------


def _verify(tmp: Path, provider: Provider, require: str, signers: tuple[str, ...],
            evidence: list[dict[str, Any]], processes: int, extra: str = "",
            signed: dict[str, OutputClaim] | None = None) -> TargetReport:
    store = FileTraceStore(f"file://{tmp}", tmp)
    tokens = [sign_trace(secret(s), STEP.key, signed or STEP.outputs, BUILDER, "x")
              for s in signers]
    store.append(STEP.key.key, tokens, evidence)
    pol = policy(provider, require, extra, keys=("builderA", "builderB"))
    limits = Limits(processes=processes, process_from=0)
    resolver = Resolver(pol, [store], STEP.drvs.__getitem__, NOW, limits)
    [report] = resolver.verify([Target(STEP.target, STEP.target)])
    return report


TWO = '{ all-of = ["builderA", "snp"] }'
OTHER_VALUE = {"out": OutputClaim(STEP.outputs["out"].path, bytes(32))}

# name, require, JWS signers, evidence, signed value (None: the step's), verified, text
QUORUMS: list[tuple[str, str, tuple[str, ...], bool, dict[str, OutputClaim] | None, bool,
                    str]] = [
    ("evidence-only", '"snp"', (), True, None, True, ""),
    ("2-of-2-evidence-and-key", TWO, ("builderA",), True, None, True, ""),
    ("2-of-2-key-alone", TWO, ("builderA",), False, None, False,
     "missing snp; no hardware evidence for it"),
    ("2-of-2-evidence-alone", TWO, (), True, None, False, "missing builderA"),
    ("2-of-2-key-signed-another-nar-hash", TWO, ("builderA",), True, OTHER_VALUE, False,
     "claims disagree"),
    ("any-of-evidence-or-key", '{ any-of = ["snp", "builderB"] }', (), True, None, True, ""),
    ("evidence-counts-once-in-2-of-3",
     '{ threshold = 2, of = ["snp", "builderA", "builderB"] }', ("builderB",), True, None,
     True, ""),
]


@pytest.mark.parametrize("processes", [0, 2], ids=["threads", "processes"])
@pytest.mark.parametrize(("name", "require", "signers", "with_evidence", "signed", "ok", "text"),
                         QUORUMS, ids=[q[0] for q in QUORUMS])
def test_evidence_counts_like_a_key(tmp_path: Path, provider: Provider, processes: int,
                                    name: str, require: str, signers: tuple[str, ...],
                                    with_evidence: bool, signed: dict[str, OutputClaim] | None,
                                    ok: bool, text: str) -> None:
    evidence = [provider.entry(CLAIM)] if with_evidence else []
    report = _verify(tmp_path, provider, require, signers, evidence, processes, signed=signed)
    assert report.verified is ok, report.reason
    assert text in (report.reason or ""), report.reason
    if ok:
        assert "snp" in report.signers or "snp" not in require
        if with_evidence and "snp" in report.signers:
            [info] = report.evidence
            assert info.element == "snp" and info.chip_id.startswith(
                provider.chain.chip_id.hex()[:16])
            [step] = [s for s in report.steps if s.drv == STEP.target]
            assert step.to_json()["evidence"][0]["measurement"] == info.measurement
