"""``tracehook evidence verify``, in-process: one case per attack or input fault, with its
exit code (0 verified, 1 refused, 2 malformed) and what it prints; and the software
provider used as an evidence-command (its I/O contract, docs/FORMAT.md 9.4)."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from snp_provider import DEFAULT_MEASUREMENT, POLICY_DEBUG, fixed_chain
from tracehook.cli import main
from tracehook.trace import snproots
from tracehook.trace.evidence import BoundClaim, BoundOutput, parse_provider_output

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "sev-snp"
ROOTS = Path(snproots.__file__).resolve().parent / "amd_roots"
AT = ["--at", "2025-06-01T00:00:00Z"]
SAMPLE_DATA = "0102030405" + "00" * 59
SAMPLE_MEASUREMENT = ("b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b"
                      "6bdf8a9ece31a5a608eb0cf2e4872b01")
DIGEST = hashlib.sha512(b"a claim").digest()


def _edited(offset: int) -> bytes:
    data = bytearray((DATA / "attestation.bin").read_bytes())
    data[offset] ^= 0x01
    return bytes(data)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("evidence")
    chain = fixed_chain()
    contents: dict[str, bytes] = {
        "report": (DATA / "attestation.bin").read_bytes(),
        "vcek": (DATA / "vcek.testcer").read_bytes(),
        "truncated": (DATA / "attestation.bin").read_bytes()[:1000],
        "junk": b"this is not a certificate\n",
        "sw-report": chain.report(DIGEST),
        "sw-debug": chain.report(DIGEST, policy=POLICY_DEBUG),
        "sw-vcek": chain.pem("vcek"),
        "sw-root": chain.root_pem(),
        "sw-chain": chain.pem("ask", "ark"),
    }
    contents |= {f"edited-{o:#x}": _edited(o) for o in (0x0, 0x50, 0x90, 0x1A0, 0x29F, 0x2A0)}
    paths = {name: d / name for name in contents}
    for name, data in contents.items():
        paths[name].write_bytes(data)
    paths["genoa"] = ROOTS / "ask_ark_genoa.pem"
    paths["milan-chain"] = ROOTS / "ask_ark_milan.pem"
    paths["missing"] = d / "no-such-file"
    return paths


Args = Callable[[dict[str, Path]], list[str]]


def real(*extra: str, report: str = "report") -> Args:
    return lambda f: [str(f[report]), "--vcek", str(f["vcek"]), *AT, *extra]


def software(*extra: str, report: str = "sw-report") -> Args:
    return lambda f: [str(f[report]), "--vcek", str(f["sw-vcek"]), *AT,
                      *(f[x[1:]].as_posix() if x.startswith("@") else x for x in extra)]


# (name, arguments after `evidence verify`, exit code, text expected in the output)
CASES: list[tuple[str, Args, int, str]] = [
    ("real_milan_sample_verifies_with_debug_allowed", real("--allow-debug"), 0,
     "verified: SEV-SNP report signed by a Milan VCEK\n  product       Milan (root amd-milan"),
    ("real_milan_sample_prints_its_measurement", real("--allow-debug"), 0,
     f"measurement   {SAMPLE_MEASUREMENT}"),
    ("real_milan_sample_with_every_check", real(
        "--allow-debug", "--report-data", SAMPLE_DATA, "--measurement", SAMPLE_MEASUREMENT,
        "--min-tcb", "bootloader=2,tee=0,snp=5,microcode=68"), 0,
     "report-data: matched; measurement: accepted; minimum-tcb: met"),
    ("real_milan_sample_is_a_debug_guest", real(), 1, "refused (debug-policy)"),
    *[(f"real_milan_byte_{o:#x}_changed", real("--allow-debug", report=f"edited-{o:#x}"), 1,
       "refused (bad-signature)") for o in (0x0, 0x50, 0x90, 0x1A0, 0x29F, 0x2A0)],
    ("real_milan_truncated", real(report="truncated"), 2, "1000 bytes (truncated)"),
    ("real_milan_under_the_genoa_root_only", lambda f: real("--allow-debug", "--root", str(
        f["genoa"]))(f), 1, "refused (unknown-root)"),
    ("real_milan_for_another_claim", real("--allow-debug", "--report-data", "ab" * 64), 1,
     "refused (report-data-mismatch)"),
    ("real_milan_image_not_accepted", real("--allow-debug", "--measurement", "00" * 48), 1,
     "refused (measurement-not-accepted)"),
    ("real_milan_tcb_too_old", real("--allow-debug", "--min-tcb",
                                    "bootloader=2,tee=0,snp=6,microcode=68"), 1,
     "refused (tcb-too-old)"),
    ("real_milan_after_the_vcek_expired", lambda f: [
        str(f["report"]), "--vcek", str(f["vcek"]), "--allow-debug", "--at",
        "2030-01-01T00:00:00Z"], 1, "refused (certificate-expired)"),
    ("real_milan_with_its_chain_given", lambda f: real("--allow-debug", "--ask-ark", str(
        f["milan-chain"]))(f), 0, "verified"),
    ("software_report_under_the_pinned_amd_roots", software("--ask-ark", "@sw-chain"), 1,
     "refused (unknown-root): the chain ends at ARK-Test"),
    ("software_report_under_its_test_root", software("--root", "@sw-root", "--report-data",
                                                     DIGEST.hex()), 0, "product       Test"),
    ("software_debug_guest", software("--root", "@sw-root", report="sw-debug"), 1,
     "refused (debug-policy)"),
    ("vcek_unreadable", lambda f: [str(f["report"]), "--vcek", str(f["junk"])], 2,
     "not a readable X.509 certificate"),
    ("vcek_missing", lambda f: [str(f["report"]), "--vcek", str(f["missing"])], 2,
     "cannot read certificate"),
    ("report_missing", lambda f: [str(f["missing"]), "--vcek", str(f["vcek"])], 2,
     "cannot read report"),
    ("root_not_a_root", lambda f: real("--root", str(f["vcek"]))(f), 2, "0 self-issued"),
    ("report_data_too_short", real("--report-data", "0102"), 2, "give 128 hex digits"),
    ("measurement_not_hex", real("--measurement", "zz" * 48), 2, "give 96 hex digits"),
    ("min_tcb_unknown_field", real("--min-tcb", "ucode=1"), 2, "unknown TCB field(s) ucode"),
    ("min_tcb_not_a_number", real("--min-tcb", "snp=x"), 2, "expected name=number"),
    ("min_tcb_incomplete", real("--min-tcb", "snp=1"), 2, "'bootloader' must be an integer"),
    ("at_without_time_zone", real("--at", "2025-01-01T00:00:00"), 2, "needs a time zone"),
]


@pytest.mark.parametrize(("args", "code", "text"), [(a, c, t) for _, a, c, t in CASES],
                         ids=[n for n, _, _, _ in CASES])
def test_evidence_verify(files: dict[str, Path], capsys: pytest.CaptureFixture[str],
                         args: Args, code: int, text: str) -> None:
    assert main(["evidence", "verify", *args(files)]) == code
    out, err = capsys.readouterr()
    assert text in out + err


def test_json_output(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evidence", "verify", *real("--allow-debug", "--json")(files)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["verified"], doc["product"], doc["root"], doc["signer"]) == (
        True, "Milan", "amd-milan", "vcek")
    assert [c["subject"] for c in doc["chain"]] == ["SEV-VCEK", "SEV-Milan", "ARK-Milan"]
    assert doc["report"]["measurement"] == SAMPLE_MEASUREMENT
    assert doc["report"]["report_data"] == SAMPLE_DATA
    assert doc["report"]["chip_id"].startswith("3ac3fe21e13fb099")
    assert doc["report"]["reported_tcb"] == {"bootloader": 2, "tee": 0, "snp": 5,
                                             "microcode": 68}


def test_json_output_of_a_refusal(files: dict[str, Path],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evidence", "verify", *real("--json", report="edited-0x90")(files)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert (doc["verified"], doc["reason"], doc["product"]) == (False, "bad-signature", None)
    assert doc["message"].startswith("the report's signature does not verify")


def test_the_software_provider_as_an_evidence_command(tmp_path: Path) -> None:
    """The contract: run with the claim digest (128 hex digits) as the last argument, print
    one JSON object (kind, report, vcek, chain), exit 0."""
    provider = [sys.executable, str(HERE / "snp_provider.py")]
    subprocess.run([*provider, "init", str(tmp_path / "p")], check=True, capture_output=True)
    out = BoundOutput("/nix/store/aa8ikhiac1834kaka8vnw5xbxs09472r-ia-c", bytes(32), ())
    claim = BoundClaim.of("ia", "gv7x6l1mkxil2443mwcjiz47hfng57l1", {"out": out})
    run = subprocess.run([*provider, "evidence", str(tmp_path / "p"), claim.digest().hex()],
                         check=True, capture_output=True, stdin=subprocess.DEVNULL)
    entry = parse_provider_output(run.stdout, claim)
    assert entry.report.measurement == DEFAULT_MEASUREMENT
    (tmp_path / "r.bin").write_bytes(entry.report.raw)
    (tmp_path / "v.der").write_bytes(entry.vcek)
    assert main(["evidence", "verify", str(tmp_path / "r.bin"), "--vcek", str(tmp_path / "v.der"),
                 "--root", str(tmp_path / "p" / "root.pem"), "--report-data",
                 claim.digest().hex(), "--at", "2026-01-01T00:00:00Z"]) == 0
    bad = subprocess.run([*provider, "evidence", str(tmp_path / "p"), "abcd"],
                         capture_output=True)
    assert bad.returncode == 2 and b"128 hex digits" in bad.stderr
    assert base64.b64decode(json.loads(run.stdout)["chain"][1]) == fixed_chain().der("ark")


def test_start_up_does_not_load_cryptography() -> None:
    """The CLI (every subcommand registered) and the evidence modules import without the
    library: only checking evidence pays for it (tracehook.trace.pki imports it lazily)."""
    code = ("import sys, tracehook.cli, tracehook.cli.evidence, tracehook.trace.evidence, "
            "tracehook.signer.agent_client; "
            "[tracehook.cli.build_parser([c]) for c in tracehook.cli._SUBCOMMANDS]; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography'))")
    run = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True)
    assert run.stdout.strip() == "[]"
