#!/usr/bin/env python3
"""A software SEV-SNP evidence provider: a STAND-IN FOR HARDWARE, for tests only.

It makes its own certificate chain in AMD's shape (an RSA ARK, self-signed, and an RSA ASK
it issued, both signing with RSASSA-PSS SHA-384; an ECDSA P-384 VCEK carrying AMD's TCB
extensions and hwID) and signs 1184-byte reports with the measurement, TCB, guest policy and
REPORT_DATA a test asks for. Its root is ``ARK-Test`` under the organisation "tracehook
software provider (not AMD)": no default policy accepts it (AMD's pinned roots do not
include it), a test must allow it explicitly. It calls ``cryptography`` directly: test code,
outside the package (the package's one caller is tracehook.trace.pki).

Library (tests): ``make_chain(...)`` gives a :class:`SoftwareChain`; ``chain.report(...)``
a signed report; ``fixed_chain()`` the committed chain (tests/data/sev-snp/
software-chain.pem, VCEK key derived from a fixed seed) whose reports are deterministic.

Script (usable as sign.toml's ``evidence-command``; contract in docs/FORMAT.md 9.4)::

    snp_provider.py init DIR [--fresh] [--measurement HEX] [--tcb SPEC] [--policy HEX]
    snp_provider.py evidence DIR DIGEST     # DIGEST: 128 hex digits; JSON on stdout
    snp_provider.py make-fixed              # rewrite the committed chain (changes vectors)
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import json
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tracehook.trace.sevsnp import REPORT_LEN, SIGNED_LEN, Tcb

HERE = Path(__file__).resolve().parent
FIXED_CHAIN = HERE / "data" / "sev-snp" / "software-chain.pem"
FIXED_SEED = b"tracehook software SEV-SNP provider: test-only VCEK key, never hardware"
FIXED_TCB = Tcb(bootloader=9, tee=0, snp=23, microcode=72)
FIXED_CHIP_ID = hashlib.sha512(b"tracehook software chip 1").digest()
DEFAULT_MEASUREMENT = hashlib.sha384(b"tracehook software guest image 1").digest()
POLICY_NO_DEBUG = 0x30000  # SMT allowed, bit 17 (reserved, must be one)
POLICY_DEBUG = 0xB0000  # ... and bit 19: debugging allowed
ORG = "tracehook software provider (not AMD)"
AMD = "1.3.6.1.4.1.3704.1"
SPL_OIDS = {"bootloader": "3.1", "tee": "3.2", "snp": "3.3", "microcode": "3.8", "fmc": "3.9"}
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def _name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def der_integer(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(body)]) + body


def _ext(oid: str, value: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value)


def _cert(subject: str, issuer: str, key: Any, signer: rsa.RSAPrivateKey,
          extensions: list[x509.UnrecognizedExtension], not_before: dt.datetime,
          not_after: dt.datetime) -> x509.Certificate:
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after))
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(signer, hashes.SHA384(), rsa_padding=PSS)


def vcek_extensions(tcb: Tcb, chip_id: bytes | None, product: str = "Test-A0"
                    ) -> list[x509.UnrecognizedExtension]:
    """AMD's VCEK extensions: struct version, product name, SPLs, hwID (None for a VLEK)."""
    exts = [_ext(f"{AMD}.1", der_integer(0)),
            _ext(f"{AMD}.2", bytes([0x16, len(product)]) + product.encode())]
    exts += [_ext(f"{AMD}.{SPL_OIDS[n]}", der_integer(v)) for n, v in tcb.items()]
    if chip_id is not None:
        exts.append(_ext(f"{AMD}.4", chip_id))  # raw bytes, as AMD writes it
    return exts


@dataclass
class SoftwareChain:
    """A test ARK -> ASK -> VCEK (or VLEK) chain and the VCEK's private key."""

    ark: x509.Certificate
    ask: x509.Certificate
    vcek: x509.Certificate
    vcek_key: ec.EllipticCurvePrivateKey
    tcb: Tcb
    chip_id: bytes
    kind: str = "vcek"
    keys: dict[str, rsa.RSAPrivateKey] = field(default_factory=dict)  # "ark", "ask" if made

    def der(self, which: str) -> bytes:
        cert: x509.Certificate = getattr(self, which)
        return cert.public_bytes(serialization.Encoding.DER)

    def pem(self, *which: str) -> bytes:
        return b"".join(getattr(self, w).public_bytes(serialization.Encoding.PEM) for w in which)

    def root_pem(self) -> bytes:
        """ASK then ARK, as AMD's cert_chain: what a test allows as a root."""
        return self.pem("ask", "ark")

    def issue_leaf(self, extensions: list[x509.UnrecognizedExtension] | None = None, *,
                   key: Any = None, cn: str = "SEV-VCEK", pkcs1: bool = False,
                   not_before: dt.datetime = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc),
                   not_after: dt.datetime = dt.datetime(2050, 1, 1, tzinfo=dt.timezone.utc),
                   ) -> x509.Certificate:
        """Another leaf certificate from this chain's ASK (a made chain only): for tests of
        certificates that lie (other extensions, key, signature scheme)."""
        key = key or self.vcek_key
        if extensions is None:
            extensions = vcek_extensions(self.tcb, self.chip_id)
        builder = (x509.CertificateBuilder().subject_name(_name(cn))
                   .issuer_name(self.ask.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(not_before).not_valid_after(not_after))
        for ext in extensions:
            builder = builder.add_extension(ext, critical=False)
        if pkcs1:
            return builder.sign(self.keys["ask"], hashes.SHA384())
        return builder.sign(self.keys["ask"], hashes.SHA384(), rsa_padding=PSS)

    def report(self, report_data: bytes = bytes(64), **fields: Any) -> bytes:
        fields.setdefault("reported_tcb", self.tcb)
        fields.setdefault("chip_id", self.chip_id)
        fields.setdefault("signing_key", 1 if self.kind == "vlek" else 0)
        return build_report(self.vcek_key, report_data=report_data, **fields)


def make_chain(*, tcb: Tcb = FIXED_TCB, chip_id: bytes = FIXED_CHIP_ID, kind: str = "vcek",
               product: str = "Test", rsa_bits: int = 2048,
               vcek_key: ec.EllipticCurvePrivateKey | None = None,
               ark_key: rsa.RSAPrivateKey | None = None,
               not_before: dt.datetime = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc),
               not_after: dt.datetime = dt.datetime(2050, 1, 1, tzinfo=dt.timezone.utc),
               ) -> SoftwareChain:
    """A fresh chain (new RSA keys; pass ``ark_key`` to reuse a root)."""
    ark_key = ark_key or rsa.generate_private_key(65537, rsa_bits)
    ask_key = rsa.generate_private_key(65537, rsa_bits)
    vcek_key = vcek_key or ec.generate_private_key(ec.SECP384R1())
    ark_cn, ask_cn = f"ARK-{product}", f"SEV-{product}" if kind == "vcek" else f"SEV-VLEK-{product}"
    ark = _cert(ark_cn, ark_cn, ark_key, ark_key, [], not_before, not_after)
    ask = _cert(ask_cn, ark_cn, ask_key, ark_key, [], not_before, not_after)
    leaf_cn = "SEV-VCEK" if kind == "vcek" else "SEV-VLEK"
    exts = vcek_extensions(tcb, chip_id if kind == "vcek" else None, f"{product}-A0")
    vcek = _cert(leaf_cn, ask_cn, vcek_key, ask_key, exts, not_before, not_after)
    return SoftwareChain(ark, ask, vcek, vcek_key, tcb, chip_id, kind,
                         {"ark": ark_key, "ask": ask_key})


def fixed_vcek_key() -> ec.EllipticCurvePrivateKey:
    order = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973  # noqa: E501
    scalar = int.from_bytes(hashlib.sha384(FIXED_SEED).digest(), "big") % order
    return ec.derive_private_key(scalar, ec.SECP384R1())


def fixed_chain() -> SoftwareChain:
    """The committed chain (VCEK, ASK, ARK); its VCEK key is derived from FIXED_SEED."""
    vcek, ask, ark = x509.load_pem_x509_certificates(FIXED_CHAIN.read_bytes())
    return SoftwareChain(ark, ask, vcek, fixed_vcek_key(), FIXED_TCB, FIXED_CHIP_ID)


def build_report(vcek_key: ec.EllipticCurvePrivateKey, *, report_data: bytes,
                 measurement: bytes = DEFAULT_MEASUREMENT, reported_tcb: Tcb = FIXED_TCB,
                 chip_id: bytes = FIXED_CHIP_ID, policy: int = POLICY_NO_DEBUG,
                 version: int = 2, signing_key: int = 0, vmpl: int = 0,
                 current_tcb: Tcb | None = None, turin: bool = False,
                 signature_algo: int = 1) -> bytes:
    """A signed report (deterministic ECDSA, RFC 6979: same inputs, same bytes)."""
    assert len(report_data) == 64 and len(measurement) == 48 and len(chip_id) == 64
    raw = bytearray(REPORT_LEN)
    tcb = reported_tcb.to_raw(turin)
    struct.pack_into("<IIQ", raw, 0x00, version, 0, policy)
    struct.pack_into("<IIQQI", raw, 0x30, vmpl, signature_algo,
                     (current_tcb or reported_tcb).to_raw(turin), 0, signing_key << 2)
    raw[0x50:0x90] = report_data
    raw[0x90:0xC0] = measurement
    struct.pack_into("<Q", raw, 0x180, tcb)
    if version >= 3:
        raw[0x188:0x18B] = bytes((0x1A, 0x02, 0x01) if turin else (0x19, 0x01, 0x01))
    raw[0x1A0:0x1E0] = chip_id
    struct.pack_into("<Q", raw, 0x1E0, tcb)
    struct.pack_into("<Q", raw, 0x1F0, tcb)
    der = vcek_key.sign(bytes(raw[:SIGNED_LEN]),
                        ec.ECDSA(hashes.SHA384(), deterministic_signing=True))
    r, s = decode_dss_signature(der)
    raw[SIGNED_LEN : SIGNED_LEN + 72] = r.to_bytes(72, "little")
    raw[SIGNED_LEN + 72 : SIGNED_LEN + 144] = s.to_bytes(72, "little")
    return bytes(raw)


def evidence_json(chain: SoftwareChain, report: bytes) -> dict[str, Any]:
    """What an evidence-command prints: kind, report, the signer's certificate, its chain."""
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")
    return {"kind": "sev-snp", "report": b64(report), "vcek": b64(chain.der("vcek")),
            "chain": [b64(chain.der("ask")), b64(chain.der("ark"))]}


# --- the script -----------------------------------------------------------------------------


def _init(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.tcb and not args.fresh:
        print("snp_provider: --tcb needs --fresh (the committed VCEK certifies "
              f"{FIXED_TCB})", file=sys.stderr)
        return 2
    tcb = Tcb.from_mapping(json.loads(args.tcb), "--tcb") if args.tcb else FIXED_TCB
    chain = make_chain(tcb=tcb) if args.fresh else fixed_chain()
    (out / "chain.pem").write_bytes(chain.pem("vcek", "ask", "ark"))
    (out / "root.pem").write_bytes(chain.root_pem())
    key = chain.vcek_key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
    (out / "vcek-key.pem").write_bytes(key)
    settings = {"measurement": args.measurement or DEFAULT_MEASUREMENT.hex(),
                "policy": int(args.policy, 16), "tcb": chain.tcb.to_json(),
                "chip_id": chain.chip_id.hex()}
    (out / "provider.json").write_text(json.dumps(settings, indent=2) + "\n")
    print(f"software SEV-SNP provider (NOT hardware) in {out}; allow its root with "
          f"--root {out / 'root.pem'}", file=sys.stderr)
    return 0


def _evidence(args: argparse.Namespace) -> int:
    base = Path(args.dir)
    try:
        digest = bytes.fromhex(args.digest)
    except ValueError:
        digest = b""
    if len(digest) != 64:
        print("snp_provider: the digest must be 128 hex digits", file=sys.stderr)
        return 2
    settings = json.loads((base / "provider.json").read_text())
    vcek, ask, ark = x509.load_pem_x509_certificates((base / "chain.pem").read_bytes())
    key = serialization.load_pem_private_key((base / "vcek-key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    tcb = Tcb.from_mapping(settings["tcb"], "provider.json tcb")
    chain = SoftwareChain(ark, ask, vcek, key, tcb, bytes.fromhex(settings["chip_id"]))
    report = chain.report(digest, measurement=bytes.fromhex(settings["measurement"]),
                          policy=settings["policy"])
    print(json.dumps(evidence_json(chain, report)))
    return 0


def _make_fixed(_: argparse.Namespace) -> int:
    chain = make_chain(vcek_key=fixed_vcek_key(), rsa_bits=3072)
    FIXED_CHAIN.write_bytes(chain.pem("vcek", "ask", "ark"))
    print(f"wrote {FIXED_CHAIN}: regenerate the vectors (tests/vectors/evidence.py)",
          file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="snp_provider.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("init", help="set up DIR with a test chain and report settings")
    i.add_argument("dir")
    i.add_argument("--fresh", action="store_true", help="a new chain, not the committed one")
    i.add_argument("--measurement", help="96 hex digits")
    i.add_argument("--tcb", help='JSON, e.g. {"bootloader": 9, "tee": 0, "snp": 23, '
                   '"microcode": 72} (with --fresh)')
    i.add_argument("--policy", default=f"{POLICY_NO_DEBUG:x}", help="guest policy, hex")
    i.set_defaults(func=_init)
    e = sub.add_parser("evidence", help="print evidence for DIGEST (128 hex digits)")
    e.add_argument("dir")
    e.add_argument("digest")
    e.set_defaults(func=_evidence)
    sub.add_parser("make-fixed", help="rewrite the committed chain").set_defaults(
        func=_make_fixed)
    args = p.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
