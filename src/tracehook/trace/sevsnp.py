"""AMD SEV-SNP attestation reports: the 1184-byte structure, read field by field. Pure.

Layout (AMD SEV-SNP firmware ABI, ``ATTESTATION_REPORT``; all integers little-endian):

====== ====== ========================================================================
offset bytes  field
====== ====== ========================================================================
0x000  4      VERSION (2 to 5 verified here; the fields below are at these offsets in each)
0x004  4      GUEST_SVN
0x008  8      POLICY: guest policy (bits 0-7 ABI minor, 8-15 ABI major, 16 SMT allowed,
              18 migration agent, 19 DEBUG allowed, 20 single socket)
0x010  16     FAMILY_ID;  0x020 16 IMAGE_ID
0x030  4      VMPL
0x034  4      SIGNATURE_ALGO (1 = ECDSA P-384 with SHA-384)
0x038  8      CURRENT_TCB
0x040  8      PLATFORM_INFO
0x048  4      bit 0 AUTHOR_KEY_EN, bit 1 MASK_CHIP_ID, bits 2-4 SIGNING_KEY (0 VCEK, 1 VLEK,
              7 none)
0x050  64     REPORT_DATA (chosen by the guest: tracehook puts the claim's digest here)
0x090  48     MEASUREMENT (of the launched guest image)
0x0C0  32     HOST_DATA;  0x0E0 48 ID_KEY_DIGEST;  0x110 48 AUTHOR_KEY_DIGEST
0x140  32     REPORT_ID;  0x160 32 REPORT_ID_MA
0x180  8      REPORTED_TCB (the TCB the signing key was derived for)
0x188  3      CPUID family, model, stepping (version 3 and later; zero before)
0x1A0  64     CHIP_ID
0x1E0  8      COMMITTED_TCB;  0x1E8 3+1 CURRENT build/minor/major;  0x1EC 3+1 COMMITTED
0x1F0  8      LAUNCH_TCB
0x2A0  512    SIGNATURE: R (72 bytes), S (72 bytes), little-endian, then zeros; it signs
              bytes 0x000 to 0x29F
====== ====== ========================================================================

A TCB version is 8 bytes of security patch levels (SPLs). Milan and Genoa: byte 0 boot
loader, 1 TEE, 6 SNP, 7 microcode. Turin (CPUID family 0x1A): byte 0 FMC, 1 boot loader,
2 TEE, 3 SNP, 7 microcode.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from tracehook.errors import ParseError

REPORT_LEN = 0x4A0  # 1184
SIGNED_LEN = 0x2A0
REPORT_DATA_LEN = 64
MEASUREMENT_LEN = 48
CHIP_ID_LEN = 64
SIGNATURE_COMPONENT_LEN = 72
SUPPORTED_VERSIONS = range(2, 6)
SIG_ALGO_ECDSA_P384_SHA384 = 1
TURIN_FAMILY = 0x1A

POLICY_SMT = 1 << 16
POLICY_MIGRATE_MA = 1 << 18
POLICY_DEBUG = 1 << 19
POLICY_SINGLE_SOCKET = 1 << 20

SIGNING_KEYS = {0: "vcek", 1: "vlek", 7: "none"}

# The names used in messages, JSON and policy files, in the order printed.
TCB_FIELDS = ("bootloader", "tee", "snp", "microcode", "fmc")


@dataclass(frozen=True)
class Tcb:
    """Security patch levels of one TCB version. ``fmc`` exists on Turin only (else None)."""

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    @classmethod
    def from_raw(cls, raw: int, turin: bool) -> Tcb:
        b = raw.to_bytes(8, "little")
        if turin:
            return cls(bootloader=b[1], tee=b[2], snp=b[3], microcode=b[7], fmc=b[0])
        return cls(bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7])

    def to_raw(self, turin: bool) -> int:
        """The 8-byte TCB version (as a little-endian integer) in the product's layout."""
        b = bytearray(8)
        if turin:
            b[0], b[1], b[2], b[3] = self.fmc or 0, self.bootloader, self.tee, self.snp
        else:
            b[0], b[1], b[6] = self.bootloader, self.tee, self.snp
        b[7] = self.microcode
        return int.from_bytes(b, "little")

    @classmethod
    def from_mapping(cls, spec: Mapping[str, object], what: str) -> Tcb:
        """From ``{"bootloader": 2, "tee": 0, "snp": 5, "microcode": 68}`` (``fmc``
        optional), as a policy file or ``--min-tcb`` gives it. ValueError names the fault."""
        unknown = sorted(set(spec) - set(TCB_FIELDS))
        if unknown:
            raise ValueError(f"{what}: unknown TCB field(s) {', '.join(unknown)} "
                             f"(known: {', '.join(TCB_FIELDS)})")
        values: dict[str, int] = {}
        for name in TCB_FIELDS:
            value = spec.get(name)
            if value is None and name == "fmc":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
                raise ValueError(f"{what}: '{name}' must be an integer from 0 to 255")
            values[name] = value
        return cls(values["bootloader"], values["tee"], values["snp"], values["microcode"],
                   values.get("fmc"))

    def items(self) -> list[tuple[str, int]]:
        return [(n, v) for n in TCB_FIELDS if (v := getattr(self, n)) is not None]

    def below(self, minimum: Tcb) -> list[str]:
        """The fields lower than ``minimum``'s ("snp 3 < 5"), empty if this TCB meets it."""
        mine = dict(self.items())
        return [f"{name} {mine.get(name, '(none)')} < {least}"
                for name, least in minimum.items() if mine.get(name, -1) < least]

    def __str__(self) -> str:
        return " ".join(f"{n}={v}" for n, v in self.items())

    def to_json(self) -> dict[str, int]:
        return dict(self.items())


@dataclass(frozen=True)
class Report:
    """One report, its exact bytes kept (the signature covers ``raw[:0x2A0]``). Unverified."""

    raw: bytes
    version: int
    guest_svn: int
    policy: int
    vmpl: int
    signature_algo: int
    current_tcb_raw: int
    platform_info: int
    key_info: int
    reported_tcb_raw: int
    cpuid: tuple[int, int, int]  # family, model, stepping (zeros before version 3)
    committed_tcb_raw: int
    launch_tcb_raw: int

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:SIGNED_LEN]

    @property
    def report_data(self) -> bytes:
        return self.raw[0x50:0x90]

    @property
    def measurement(self) -> bytes:
        return self.raw[0x90:0xC0]

    @property
    def host_data(self) -> bytes:
        return self.raw[0xC0:0xE0]

    @property
    def family_id(self) -> bytes:
        return self.raw[0x10:0x20]

    @property
    def image_id(self) -> bytes:
        return self.raw[0x20:0x30]

    @property
    def chip_id(self) -> bytes:
        return self.raw[0x1A0:0x1E0]

    @property
    def signature_rs(self) -> tuple[int, int]:
        half = SIGNATURE_COMPONENT_LEN
        r = self.raw[SIGNED_LEN : SIGNED_LEN + half]
        s = self.raw[SIGNED_LEN + half : SIGNED_LEN + 2 * half]
        return int.from_bytes(r, "little"), int.from_bytes(s, "little")

    @property
    def debug_allowed(self) -> bool:
        return bool(self.policy & POLICY_DEBUG)

    @property
    def signing_key(self) -> str:
        """``vcek``, ``vlek``, ``none``, or ``reserved-N``."""
        code = (self.key_info >> 2) & 0x7
        return SIGNING_KEYS.get(code, f"reserved-{code}")

    @property
    def chip_id_masked(self) -> bool:
        return bool(self.key_info & 0x2)

    @property
    def turin_layout(self) -> bool:
        """Whether TCB versions use Turin's layout (known from the CPUID family, v3+)."""
        return self.version >= 3 and self.cpuid[0] == TURIN_FAMILY

    def _tcb(self, raw: int) -> Tcb:
        return Tcb.from_raw(raw, self.turin_layout)

    @property
    def reported_tcb(self) -> Tcb:
        return self._tcb(self.reported_tcb_raw)

    @property
    def current_tcb(self) -> Tcb:
        return self._tcb(self.current_tcb_raw)

    @property
    def committed_tcb(self) -> Tcb:
        return self._tcb(self.committed_tcb_raw)

    @property
    def launch_tcb(self) -> Tcb:
        return self._tcb(self.launch_tcb_raw)

    def policy_text(self) -> str:
        flags = [
            "debug allowed" if self.debug_allowed else "debug off",
            "SMT allowed" if self.policy & POLICY_SMT else "SMT off",
        ]
        if self.policy & POLICY_MIGRATE_MA:
            flags.append("migration agent")
        if self.policy & POLICY_SINGLE_SOCKET:
            flags.append("single socket")
        abi = f"ABI {(self.policy >> 8) & 0xFF}.{self.policy & 0xFF}"
        return f"{self.policy:#x} ({', '.join(flags)}, {abi})"

    def to_json(self) -> dict[str, object]:
        return {
            "version": self.version,
            "guest_svn": self.guest_svn,
            "vmpl": self.vmpl,
            "policy": f"{self.policy:#x}",
            "debug": self.debug_allowed,
            "signing_key": self.signing_key,
            "measurement": self.measurement.hex(),
            "report_data": self.report_data.hex(),
            "host_data": self.host_data.hex(),
            "family_id": self.family_id.hex(),
            "image_id": self.image_id.hex(),
            "chip_id": self.chip_id.hex(),
            "cpuid": list(self.cpuid),
            "reported_tcb": self.reported_tcb.to_json(),
            "current_tcb": self.current_tcb.to_json(),
            "committed_tcb": self.committed_tcb.to_json(),
            "launch_tcb": self.launch_tcb.to_json(),
        }


def parse_report(data: bytes, what: str = "SEV-SNP report") -> Report:
    """Read a report's fields; ParseError if it is not 1184 bytes long.

    Nothing is verified here, not even the version (a signed field: the verifier checks it
    once the signature holds, so a changed byte is a bad signature, never "malformed"); see
    :mod:`tracehook.trace.snpverify`."""
    if len(data) != REPORT_LEN:
        hint = " (truncated)" if len(data) < REPORT_LEN else ""
        raise ParseError(what, f"{len(data)} bytes{hint}; an SEV-SNP attestation report is "
                         f"{REPORT_LEN} bytes")
    version, guest_svn, policy = struct.unpack_from("<IIQ", data, 0x00)
    vmpl, sig_algo, current_tcb = struct.unpack_from("<IIQ", data, 0x30)
    platform_info, key_info = struct.unpack_from("<QI", data, 0x40)
    (reported_tcb,) = struct.unpack_from("<Q", data, 0x180)
    cpuid = (data[0x188], data[0x189], data[0x18A]) if version >= 3 else (0, 0, 0)
    (committed_tcb,) = struct.unpack_from("<Q", data, 0x1E0)
    (launch_tcb,) = struct.unpack_from("<Q", data, 0x1F0)
    return Report(
        raw=bytes(data),
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        vmpl=vmpl,
        signature_algo=sig_algo,
        current_tcb_raw=current_tcb,
        platform_info=platform_info,
        key_info=key_info,
        reported_tcb_raw=reported_tcb,
        cpuid=cpuid,
        committed_tcb_raw=committed_tcb,
        launch_tcb_raw=launch_tcb,
    )
