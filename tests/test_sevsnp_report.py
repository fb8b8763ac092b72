"""The SEV-SNP report model: fields at their offsets, TCB layouts, guest policy. Pure."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tracehook.trace.sevsnp import REPORT_LEN, Tcb, parse_report

REAL = (Path(__file__).resolve().parent / "data" / "sev-snp" / "attestation.bin").read_bytes()


def synthetic() -> bytearray:
    """Every field a distinct value, to catch a wrong offset."""
    raw = bytearray(REPORT_LEN)
    struct.pack_into("<IIQ", raw, 0, 3, 7, 0x1B0000 | 0x0102)
    raw[0x10:0x20] = b"F" * 16
    raw[0x20:0x30] = b"I" * 16
    struct.pack_into("<IIQQI", raw, 0x30, 2, 1, 0x11, 0x22, (1 << 2) | 0x2)
    raw[0x50:0x90] = bytes(range(64))
    raw[0x90:0xC0] = bytes(range(100, 148))
    raw[0xC0:0xE0] = b"H" * 32
    struct.pack_into("<Q", raw, 0x180, 0x33)
    raw[0x188:0x18B] = bytes((0x1A, 0x02, 0x01))
    raw[0x1A0:0x1E0] = bytes(range(150, 214))
    struct.pack_into("<Q", raw, 0x1E0, 0x44)
    struct.pack_into("<Q", raw, 0x1F0, 0x55)
    raw[0x2A0:0x2A0 + 72] = (5).to_bytes(72, "little")
    raw[0x2A0 + 72:0x2A0 + 144] = (6).to_bytes(72, "little")
    return raw


def test_fields_are_read_at_their_offsets() -> None:
    r = parse_report(bytes(synthetic()))
    assert (r.version, r.guest_svn, r.vmpl, r.signature_algo) == (3, 7, 2, 1)
    assert r.policy == 0x1B0102 and r.debug_allowed
    assert r.family_id == b"F" * 16 and r.image_id == b"I" * 16 and r.host_data == b"H" * 32
    assert r.report_data == bytes(range(64)) and r.measurement == bytes(range(100, 148))
    assert r.chip_id == bytes(range(150, 214))
    assert (r.current_tcb_raw, r.platform_info, r.reported_tcb_raw) == (0x11, 0x22, 0x33)
    assert (r.committed_tcb_raw, r.launch_tcb_raw) == (0x44, 0x55)
    assert r.signing_key == "vlek" and r.chip_id_masked
    assert r.cpuid == (0x1A, 0x02, 0x01) and r.turin_layout
    assert r.signature_rs == (5, 6)
    assert r.signed_bytes == bytes(synthetic()[:0x2A0])


def test_the_real_report_reads_as_go_sev_guest_describes_it() -> None:
    r = parse_report(REAL)
    assert (r.version, r.vmpl, r.signature_algo, r.signing_key) == (2, 0, 1, "vcek")
    assert r.policy == 0xB0000 and r.debug_allowed and not r.turin_layout
    assert r.report_data == bytes.fromhex("0102030405") + bytes(59)
    assert r.reported_tcb == Tcb(bootloader=2, tee=0, snp=5, microcode=68)
    assert r.current_tcb == r.committed_tcb == r.launch_tcb == r.reported_tcb
    assert r.policy_text() == "0xb0000 (debug allowed, SMT allowed, ABI 0.0)"
    assert r.to_json()["reported_tcb"] == {"bootloader": 2, "tee": 0, "snp": 5,
                                           "microcode": 68}


def test_cpuid_is_only_read_from_version_3() -> None:
    raw = synthetic()
    struct.pack_into("<I", raw, 0, 2)
    r = parse_report(bytes(raw))
    assert r.cpuid == (0, 0, 0) and not r.turin_layout


@pytest.mark.parametrize("turin", [False, True], ids=["milan-genoa", "turin"])
def test_tcb_layouts_round_trip(turin: bool) -> None:
    tcb = Tcb(bootloader=3, tee=1, snp=22, microcode=213, fmc=4 if turin else None)
    assert Tcb.from_raw(tcb.to_raw(turin), turin) == tcb


def test_tcb_layout_bytes() -> None:
    assert Tcb.from_raw(0x4405000000000002, turin=False) == Tcb(2, 0, 5, 68)
    assert Tcb(2, 0, 5, 68).to_raw(False).to_bytes(8, "little").hex() == "0200000000000544"
    assert Tcb(2, 0, 5, 68, fmc=1).to_raw(True).to_bytes(8, "little").hex() == (
        "0102000500000044")


def test_tcb_below_names_each_short_field() -> None:
    tcb = Tcb(2, 0, 5, 68)
    assert tcb.below(Tcb(2, 0, 5, 68)) == []
    assert tcb.below(Tcb(3, 0, 6, 1)) == ["bootloader 2 < 3", "snp 5 < 6"]
    assert tcb.below(Tcb(0, 0, 0, 0, fmc=1)) == ["fmc (none) < 1"]


@pytest.mark.parametrize(("spec", "message"), [
    ({"bootloader": 1, "tee": 0, "snp": 1}, "'microcode' must be an integer"),
    ({"bootloader": 1, "tee": 0, "snp": 1, "microcode": 256}, "from 0 to 255"),
    ({"bootloader": -1, "tee": 0, "snp": 1, "microcode": 2}, "from 0 to 255"),
    ({"bootloader": True, "tee": 0, "snp": 1, "microcode": 2}, "'bootloader' must be"),
    ({"bootloader": 1, "tee": 0, "snp": 1, "microcode": 2, "ucode": 3}, "unknown TCB field"),
])
def test_tcb_from_mapping_refuses_bad_specs(spec: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Tcb.from_mapping(spec, "minimum-tcb")


def test_tcb_from_mapping() -> None:
    spec = {"bootloader": 2, "tee": 0, "snp": 5, "microcode": 68}
    assert Tcb.from_mapping(spec, "x") == Tcb(2, 0, 5, 68)
    assert Tcb.from_mapping({**spec, "fmc": 1}, "x").fmc == 1
