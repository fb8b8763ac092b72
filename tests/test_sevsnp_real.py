"""The real AMD SEV-SNP sample (a Milan report and its VCEK, from google/go-sev-guest under
Apache-2.0: tests/data/sev-snp/PROVENANCE.md) against the pinned AMD roots shipped in the
package. The sample comes from a guest whose policy allows debugging (0xb0000, bit 19): it
verifies only when debugging is allowed, and is refused for that reason otherwise."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from pathlib import Path

import pytest

from tracehook.errors import EnvironmentFault, ParseError
from tracehook.trace import pki, snproots
from tracehook.trace.sevsnp import SIGNED_LEN, Tcb, parse_report
from tracehook.trace.snpverify import SnpRequirements, SnpVerdict, examine_report

DATA = Path(__file__).resolve().parent / "data" / "sev-snp"
ROOTS = Path(snproots.__file__).resolve().parent / "amd_roots"
REPORT = (DATA / "attestation.bin").read_bytes()
VCEK = pki.load_certificate((DATA / "vcek.testcer").read_bytes(), "sample VCEK")
AT = dt.datetime(2025, 6, 1, tzinfo=dt.timezone.utc)
MEASUREMENT = ("b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b"
               "6bdf8a9ece31a5a608eb0cf2e4872b01")
CHIP_ID = ("3ac3fe21e13fb0990eb28a802e3fb6a29483a6b0753590c951bdd3b8e53786184ca39e359669a2b7"
           "6a1936776b564ea464cdce40c05f63c9b610c5068b006b5d")
ALLOW_DEBUG = SnpRequirements(snproots.amd_roots(), allow_debug=True)


def examine(report: bytes = REPORT, req: SnpRequirements = ALLOW_DEBUG,
            vcek: pki.Certificate = VCEK, given: tuple[pki.Certificate, ...] = (),
            at: dt.datetime = AT, report_data: bytes | None = None) -> SnpVerdict:
    return examine_report(parse_report(report), vcek, given, req, at, report_data)


def test_the_sample_files_are_the_vendored_bytes() -> None:
    assert hashlib.sha256(REPORT).hexdigest() == (
        "377e6241d3b373ab1df80c0f96978594e7e21f4797dd6ea95e2957e1c1e26060")
    assert VCEK.sha256 == "0d057f9b6e29a69eda9c0154b259567d291c1c08d73a11e9d31ace07c435b6d8"


def test_real_milan_report_verifies_against_the_pinned_milan_root() -> None:
    verdict = examine(report_data=bytes.fromhex("0102030405") + bytes(59),
                      req=dataclasses.replace(ALLOW_DEBUG, measurements=frozenset(
                          {bytes.fromhex(MEASUREMENT)}), minimum_tcb=Tcb(2, 0, 5, 68)))
    assert verdict.refusal is None and verdict.verified
    assert verdict.product == "Milan" and verdict.root is not None
    assert verdict.root.name == "amd-milan"
    assert [c.common_name for c in verdict.chain] == ["SEV-VCEK", "SEV-Milan", "ARK-Milan"]
    assert verdict.chain[2].sha256 == (
        "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd")
    assert verdict.signer_kind == "vcek"
    r = verdict.report
    assert r.measurement.hex() == MEASUREMENT and r.chip_id.hex() == CHIP_ID
    assert str(r.reported_tcb) == "bootloader=2 tee=0 snp=5 microcode=68"
    assert dict(verdict.checks) == {"debug": "allowed (unsafe)", "report-data": "matched",
                                    "measurement": "accepted", "minimum-tcb": "met"}
    assert "Milan vcek chip 3ac3fe21e13fb099 measurement b07af9620f3b839b" in verdict.summary()


def test_real_milan_report_is_a_debug_guest_refused_by_default() -> None:
    verdict = examine(req=SnpRequirements(snproots.amd_roots()))
    assert verdict.refusal is not None
    assert verdict.refusal.reason == "debug-policy"
    assert "0xb0000 allows debugging" in verdict.refusal.message
    assert verdict.product == "Milan"  # the chain held: only the policy refused it


@pytest.mark.parametrize("flip", [0x01, 0x80, 0xFF], ids=["low-bit", "high-bit", "all-bits"])
def test_every_changed_byte_of_the_signed_area_refuses(flip: int) -> None:
    refused = []
    for offset in range(SIGNED_LEN):
        forged = bytearray(REPORT)
        forged[offset] ^= flip
        verdict = examine(bytes(forged))
        assert verdict.refusal is not None, f"byte {offset:#x} changed and still verified"
        refused.append(verdict.refusal.reason)
    assert set(refused) == {"bad-signature"}


@pytest.mark.parametrize("offset", [SIGNED_LEN, SIGNED_LEN + 47, SIGNED_LEN + 72,
                                    SIGNED_LEN + 72 + 47], ids=["r-low", "r-high", "s-low",
                                                                "s-high"])
def test_a_changed_signature_byte_refuses(offset: int) -> None:
    forged = bytearray(REPORT)
    forged[offset] ^= 0x01
    verdict = examine(bytes(forged))
    assert verdict.refusal is not None and verdict.refusal.reason == "bad-signature"


@pytest.mark.parametrize("length", [0, 1, 0x2A0, 1183, 1185])
def test_a_report_of_another_length_is_malformed(length: int) -> None:
    data = (REPORT + bytes(8))[:length]
    with pytest.raises(ParseError, match=f"{length} bytes.*1184 bytes"):
        parse_report(data)


def test_only_the_milan_root_accepts_it() -> None:
    others = tuple(r for r in snproots.amd_roots() if r.product != "Milan")
    verdict = examine(req=SnpRequirements(others, allow_debug=True))
    assert verdict.refusal is not None and verdict.refusal.reason == "unknown-root"
    assert "'SEV-Milan' is neither given nor under an allowed root" in verdict.refusal.message


def test_its_own_chain_given_does_not_make_a_root_allowed() -> None:
    chain = pki.load_certificates((ROOTS / "ask_ark_milan.pem").read_bytes(), "milan chain")
    genoa = SnpRequirements((snproots.amd_root("genoa"),), allow_debug=True)
    verdict = examine(req=genoa, given=chain)
    assert verdict.refusal is not None and verdict.refusal.reason == "unknown-root"
    assert "ends at ARK-Milan" in verdict.refusal.message


def test_the_vcek_outside_its_validity_refuses() -> None:
    after = examine(at=dt.datetime(2029, 9, 25, tzinfo=dt.timezone.utc))
    before = examine(at=dt.datetime(2022, 9, 23, tzinfo=dt.timezone.utc))
    for verdict in (after, before):
        assert verdict.refusal is not None and verdict.refusal.reason == "certificate-expired"
        assert "SEV-VCEK is valid from 2022-09-24 to 2029-09-24" in verdict.refusal.message


def test_a_vcek_with_a_changed_extension_breaks_the_chain() -> None:
    der = VCEK.der.replace(b"Milan-B0", b"Milan-B1")
    assert der != VCEK.der
    verdict = examine(vcek=pki.load_certificate(der, "edited VCEK"))
    assert verdict.refusal is not None and verdict.refusal.reason == "broken-chain"
    assert "SEV-VCEK is not issued by SEV-Milan" in verdict.refusal.message


def test_the_vcek_of_another_chip_does_not_sign_it() -> None:
    forged = bytearray(REPORT)
    forged[0x1A0] ^= 0x01  # another chip id: signed, so a bad signature first
    verdict = examine(bytes(forged))
    assert verdict.refusal is not None and verdict.refusal.reason == "bad-signature"


def test_pinned_roots_are_amd_milan_genoa_turin() -> None:
    roots = snproots.amd_roots()
    assert [(r.name, r.product, r.ark.common_name) for r in roots] == [
        ("amd-milan", "Milan", "ARK-Milan"), ("amd-genoa", "Genoa", "ARK-Genoa"),
        ("amd-turin", "Turin", "ARK-Turin")]
    for root in roots:
        assert root.amd and root.ark.self_issued and root.ark.key_type == "rsa-4096"
        assert pki.issue_problem(root.ark, root.ark) is None
        names = sorted(c.common_name for c in root.intermediates)
        assert names == [f"SEV-{root.product}", f"SEV-VLEK-{root.product}"]
        assert all(pki.issue_problem(c, root.ark) is None for c in root.intermediates)
    assert snproots.amd_root("Genoa") is roots[1] and snproots.amd_root("amd-turin") is roots[2]
    with pytest.raises(ValueError, match="no pinned AMD root 'naples'"):
        snproots.amd_root("naples")


def test_an_altered_pinned_root_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    files, _ = snproots._AMD["Milan"]
    monkeypatch.setitem(snproots._AMD, "Milan", (files, "00" * 32))
    snproots.amd_roots.cache_clear()
    try:
        with pytest.raises(EnvironmentFault, match=r"Milan ARK .* is not the pinned one"):
            snproots.amd_roots()
    finally:
        monkeypatch.undo()
        snproots.amd_roots.cache_clear()
    assert len(snproots.amd_roots()) == 3


def test_a_root_file_of_amd_reads_as_an_allowed_root() -> None:
    root = snproots.root_from_pem("milan", (ROOTS / "ask_ark_milan.pem").read_bytes(), "x")
    assert root.amd and root.product == "Milan"
    verdict = examine(req=SnpRequirements((root,), allow_debug=True))
    assert verdict.verified and verdict.root is root
