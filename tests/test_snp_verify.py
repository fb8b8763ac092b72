"""SEV-SNP verification with the software provider (a stand-in for hardware): one case per
attack, each refused with its own reason, and the requirements' own checks."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from snp_provider import (
    DEFAULT_MEASUREMENT,
    FIXED_TCB,
    POLICY_DEBUG,
    SoftwareChain,
    build_report,
    fixed_chain,
    make_chain,
    vcek_extensions,
)
from tracehook.errors import EvidenceRefused
from tracehook.trace import pki, snproots
from tracehook.trace.sevsnp import Tcb, parse_report
from tracehook.trace.snproots import SnpRoot, root_from_pem
from tracehook.trace.snpverify import REASONS, SnpRequirements, SnpVerdict, examine_report

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
DIGEST = hashlib.sha512(b"the claim").digest()
OTHER_DIGEST = hashlib.sha512(b"another claim").digest()
TURIN_TCB = Tcb(bootloader=4, tee=1, snp=3, microcode=80, fmc=2)


def cert(c: x509.Certificate) -> pki.Certificate:
    return pki.load_certificate(c.public_bytes(Encoding.DER), "test certificate")


def root_of(chain: SoftwareChain, name: str = "test") -> SnpRoot:
    return root_from_pem(name, chain.root_pem(), f"{name} root")


@dataclass
class Kit:
    """Chains made once per session (RSA key generation is the slow part)."""

    fixed: SoftwareChain  # the committed chain: its root is the one the requirements allow
    made: SoftwareChain  # a made chain under the same names, with its RSA keys (other root)
    forged_milan: SoftwareChain  # a made chain that names itself SEV-Milan / ARK-Milan
    vlek: SoftwareChain
    turin: SoftwareChain

    def requirements(self, **changes: object) -> SnpRequirements:
        base = SnpRequirements(roots=(root_of(self.fixed), root_of(self.vlek, "vlek"),
                                      root_of(self.turin, "turin")),
                               measurements=frozenset({DEFAULT_MEASUREMENT}),
                               minimum_tcb=FIXED_TCB)
        return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def kit() -> Kit:
    return Kit(fixed=fixed_chain(), made=make_chain(), forged_milan=make_chain(product="Milan"),
               vlek=make_chain(kind="vlek", product="VTest"),
               turin=make_chain(product="TTest", tcb=TURIN_TCB))


def examine(kit: Kit, report: bytes, *, signer: x509.Certificate | None = None,
            given: tuple[x509.Certificate, ...] = (), req: SnpRequirements | None = None,
            now: dt.datetime = NOW, expected: bytes | None = DIGEST) -> SnpVerdict:
    return examine_report(parse_report(report), cert(signer or kit.fixed.vcek),
                          [cert(c) for c in given], req or kit.requirements(), now, expected)


Attack = Callable[[Kit], SnpVerdict]


def _other_signing_key(k: Kit) -> SnpVerdict:
    report = build_report(ec.generate_private_key(ec.SECP384R1()), report_data=DIGEST)
    return examine(k, report)


def _vcek_key_not_p384(k: Kit) -> SnpVerdict:
    key = ec.generate_private_key(ec.SECP256R1())
    return examine(k, k.made.report(DIGEST), signer=k.made.issue_leaf(key=key),
                   given=(k.made.ask, k.made.ark))


def _vcek_signed_pkcs1(k: Kit) -> SnpVerdict:
    leaf = k.made.issue_leaf(pkcs1=True)
    return examine(k, k.made.report(DIGEST), signer=leaf, given=(k.made.ask, k.made.ark),
                   req=k.requirements(roots=(root_of(k.made),)))


def _vcek_without_spl(k: Kit) -> SnpVerdict:
    exts = [e for e in vcek_extensions(k.made.tcb, k.made.chip_id)
            if not e.oid.dotted_string.endswith(".3.3")]
    return examine(k, k.made.report(DIGEST), signer=k.made.issue_leaf(exts),
                   given=(k.made.ask, k.made.ark), req=k.requirements(roots=(root_of(k.made),)))


def _vcek_without_hwid(k: Kit) -> SnpVerdict:
    return examine(k, k.made.report(DIGEST), signer=k.made.issue_leaf(
        vcek_extensions(k.made.tcb, None)), given=(k.made.ask, k.made.ark),
        req=k.requirements(roots=(root_of(k.made),)))


def _fmc_differs(k: Kit) -> SnpVerdict:
    tcb = dataclasses.replace(TURIN_TCB, fmc=3)
    report = k.turin.report(DIGEST, version=3, turin=True, reported_tcb=tcb)
    return examine(k, report, signer=k.turin.vcek, req=k.requirements(minimum_tcb=None))


# (name of the attack, how it is made, the reason it is refused for)
ATTACKS: list[tuple[str, Attack, str]] = [
    ("report_signed_by_another_key", _other_signing_key, "bad-signature"),
    ("signature_algorithm_field_changed",
     lambda k: examine(k, k.fixed.report(DIGEST, signature_algo=2)), "bad-signature"),
    ("vcek_holds_a_p256_key", _vcek_key_not_p384, "bad-signature"),
    ("report_version_unknown_but_signed",
     lambda k: examine(k, k.fixed.report(DIGEST, version=6)), "unsupported-version"),
    ("report_claims_vlek_under_a_vcek",
     lambda k: examine(k, k.fixed.report(DIGEST, signing_key=1)), "signing-key-mismatch"),
    ("report_claims_no_signing_key",
     lambda k: examine(k, k.fixed.report(DIGEST, signing_key=7)), "signing-key-mismatch"),
    ("vcek_from_another_root_with_its_chain",
     lambda k: examine(k, k.made.report(DIGEST), signer=k.made.vcek,
                       given=(k.made.ask, k.made.ark)), "unknown-root"),
    ("vcek_from_another_root_alone_under_a_known_name",
     lambda k: examine(k, k.made.report(DIGEST), signer=k.made.vcek), "broken-chain"),
    ("chain_forged_under_amd_milan_names",
     lambda k: examine(k, k.forged_milan.report(DIGEST), signer=k.forged_milan.vcek,
                       given=(k.forged_milan.ask, k.forged_milan.ark),
                       req=k.requirements(roots=snproots.amd_roots())), "unknown-root"),
    ("software_root_under_the_default_amd_roots",
     lambda k: examine(k, k.fixed.report(DIGEST), given=(k.fixed.ask, k.fixed.ark),
                       req=k.requirements(roots=snproots.amd_roots())), "unknown-root"),
    ("vcek_signed_with_pkcs1_not_pss", _vcek_signed_pkcs1, "broken-chain"),
    ("vcek_used_after_it_expired",
     lambda k: examine(k, k.fixed.report(DIGEST), now=dt.datetime(2051, 1, 1,
                                                                  tzinfo=dt.timezone.utc)),
     "certificate-expired"),
    ("vcek_used_before_it_was_valid",
     lambda k: examine(k, k.fixed.report(DIGEST), now=dt.datetime(2024, 1, 1,
                                                                  tzinfo=dt.timezone.utc)),
     "certificate-expired"),
    ("report_claims_a_newer_tcb_than_the_vcek_certifies",
     lambda k: examine(k, k.fixed.report(DIGEST, reported_tcb=dataclasses.replace(
         FIXED_TCB, snp=24))), "tcb-mismatch"),
    ("vcek_without_the_snp_spl_extension", _vcek_without_spl, "tcb-mismatch"),
    ("turin_fmc_differs_from_the_vcek", _fmc_differs, "tcb-mismatch"),
    ("vcek_of_another_chip",
     lambda k: examine(k, k.fixed.report(DIGEST, chip_id=hashlib.sha512(b"chip 2").digest())),
     "chip-mismatch"),
    ("vcek_without_hwid", _vcek_without_hwid, "chip-mismatch"),
    ("debug_guest",
     lambda k: examine(k, k.fixed.report(DIGEST, policy=POLICY_DEBUG)), "debug-policy"),
    ("report_bound_to_another_claim",
     lambda k: examine(k, k.fixed.report(OTHER_DIGEST)), "report-data-mismatch"),
    ("guest_image_not_accepted",
     lambda k: examine(k, k.fixed.report(DIGEST, measurement=hashlib.sha384(b"x").digest())),
     "measurement-not-accepted"),
    ("tcb_older_than_the_minimum",
     lambda k: examine(k, k.fixed.report(DIGEST), req=k.requirements(
         minimum_tcb=dataclasses.replace(FIXED_TCB, microcode=73))), "tcb-too-old"),
]


@pytest.mark.parametrize(("attack", "reason"), [(a, r) for _, a, r in ATTACKS],
                         ids=[n for n, _, _ in ATTACKS])
def test_attack_is_refused_for_its_reason(kit: Kit, attack: Attack, reason: str) -> None:
    verdict = attack(kit)
    assert verdict.refusal is not None, "verified"
    assert verdict.refusal.reason == reason, verdict.refusal.message
    assert "\n" not in verdict.refusal.message
    with pytest.raises(EvidenceRefused, match=f"evidence refused \\({reason}\\)") as info:
        verdict.raise_if_refused()
    assert info.value.exit_code == 1


def test_every_reason_has_an_attack() -> None:
    assert {r for _, _, r in ATTACKS} == set(REASONS)


def test_the_software_report_verifies_under_its_allowed_root(kit: Kit) -> None:
    verdict = examine(kit, kit.fixed.report(DIGEST)).raise_if_refused()
    assert verdict.product == "Test" and verdict.root is not None
    assert [c.common_name for c in verdict.chain] == ["SEV-VCEK", "SEV-Test", "ARK-Test"]
    assert dict(verdict.checks) == {"debug": "off", "report-data": "matched",
                                    "measurement": "accepted", "minimum-tcb": "met"}
    assert verdict.to_json()["verified"] is True


def test_a_vlek_report_verifies_without_a_chip_id(kit: Kit) -> None:
    report = kit.vlek.report(DIGEST, chip_id=bytes(64))
    verdict = examine(kit, report, signer=kit.vlek.vcek).raise_if_refused()
    assert verdict.signer_kind == "vlek" and verdict.product == "VTest"


def test_a_turin_report_uses_the_turin_tcb_layout(kit: Kit) -> None:
    report = kit.turin.report(DIGEST, version=3, turin=True)
    req = kit.requirements(minimum_tcb=TURIN_TCB)
    verdict = examine(kit, report, signer=kit.turin.vcek, req=req).raise_if_refused()
    assert verdict.report.reported_tcb == TURIN_TCB and verdict.report.turin_layout


@pytest.mark.parametrize("form", ["8-raw", "64-octet-string"])
def test_other_hwid_encodings_name_the_chip(kit: Kit, form: str) -> None:
    """A hwID of 8 bytes names the chip by CHIP_ID's first 8 (Turin); a DER OCTET STRING
    around the bytes is read too."""
    chip = kit.turin.chip_id
    hwid = chip[:8] if form == "8-raw" else bytes([0x04, 0x40]) + chip
    leaf = kit.turin.issue_leaf(vcek_extensions(TURIN_TCB, hwid))
    report = kit.turin.report(DIGEST, version=3, turin=True)
    req = kit.requirements(minimum_tcb=None)
    assert examine(kit, report, signer=leaf, req=req).verified
    other = kit.turin.report(DIGEST, version=3, turin=True,
                             chip_id=bytes(8) + chip[8:])
    refusal = examine(kit, other, signer=leaf, req=req).refusal
    assert refusal is not None and refusal.reason == "chip-mismatch"


def test_allowing_debug_accepts_and_warns_every_time(kit: Kit,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    report = kit.fixed.report(DIGEST, policy=POLICY_DEBUG)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            examine(kit, report, req=kit.requirements(allow_debug=True)).raise_if_refused()
    assert [r.message.startswith("UNSAFE") for r in caplog.records] == [True, True]


def test_unchecked_requirements_say_so(kit: Kit) -> None:
    verdict = examine(kit, kit.fixed.report(DIGEST), expected=None,
                      req=kit.requirements(measurements=None, minimum_tcb=None))
    assert verdict.verified
    assert dict(verdict.checks) == {"debug": "off", "report-data": "not checked",
                                    "measurement": "not checked",
                                    "minimum-tcb": "not checked"}


@pytest.mark.parametrize(("changes", "message"), [
    ({"roots": ()}, "at least one allowed root"),
    ({"measurements": frozenset()}, "empty list of accepted measurements"),
    ({"measurements": frozenset({bytes(32)})}, "48 bytes"),
])
def test_requirements_have_no_empty_forms(kit: Kit, changes: dict[str, object],
                                          message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kit.requirements(**changes)


def test_a_root_file_must_hold_one_self_signed_ark(kit: Kit) -> None:
    with pytest.raises(Exception, match="0 self-issued"):
        root_from_pem("x", kit.fixed.pem("ask"), "ask only")
    with pytest.raises(Exception, match="2 self-issued"):
        root_from_pem("x", kit.fixed.pem("ark") + kit.made.pem("ark"), "two arks")
    with pytest.raises(Exception, match="'SEV-Test' is not issued by the root"):
        root_from_pem("x", kit.made.pem("ark") + kit.fixed.pem("ask"), "mixed")
