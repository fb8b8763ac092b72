"""X.509 certificates, RSA-PSS and ECDSA: the one module that calls ``cryptography``.

Ed25519 (trace signatures) stays in :mod:`tracehook.trace.crypto` (PyNaCl); this module
serves hardware evidence (AMD SEV-SNP: a P-384 VCEK or VLEK certificate, issued by an RSA
ASK or ASVK, issued by AMD's self-signed RSA ARK, every certificate signed with RSASSA-PSS
SHA-384). ``cryptography`` is imported inside the functions: importing this module costs
nothing, so the post-build hook and the CLI start as fast as before, and the library's
import (about 70 ms here) is paid only by a run that reads a certificate.

Every failure of the library becomes the project's error: a certificate that cannot be read
is a :class:`ParseError`; a signature that was checked and is wrong is a
:class:`BadSignature` (:func:`verify_ecdsa_p384`) or a problem text (:func:`issue_problem`,
for the chain walk, which tries candidates). Values are plain (bytes, str, datetime): no
``cryptography`` type leaves this module.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tracehook.errors import BadSignature, ParseError

if TYPE_CHECKING:  # types only: the library itself is imported inside the functions
    from cryptography import x509

P384_SCALAR_LEN = 48
_PSS_SALT_LEN = 48  # AMD's certificates: RSASSA-PSS, SHA-384, MGF1-SHA-384, salt 48 bytes


@dataclass(frozen=True)
class Certificate:
    """An X.509 certificate as read: its DER bytes and the fields the checks use.

    ``extensions`` holds the extensions ``cryptography`` does not interpret (AMD's, for
    instance) as ``(dotted OID, extnValue bytes)``, in certificate order."""

    der: bytes
    subject: str  # RFC 4514
    issuer: str
    common_name: str
    issuer_common_name: str
    not_before: dt.datetime
    not_after: dt.datetime
    key_type: str  # "rsa-4096", "ec-secp384r1", ...
    signature_algorithm: str  # "rsassa-pss-sha384", "ecdsa-sha384", ... (else the OID)
    extensions: tuple[tuple[str, bytes], ...]
    handle: x509.Certificate = field(repr=False, compare=False)  # the library's, for checks

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.der).hexdigest()

    @property
    def self_issued(self) -> bool:
        return self.subject == self.issuer

    def extension(self, oid: str) -> bytes | None:
        for dotted, value in self.extensions:
            if dotted == oid:
                return value
        return None

    def valid_at(self, when: dt.datetime) -> bool:
        return self.not_before <= when <= self.not_after


def _common_name(name: x509.Name) -> str:
    from cryptography.x509.oid import NameOID

    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else ""


def _key_type(cert: x509.Certificate) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return f"rsa-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ec-{key.curve.name}"
    return type(key).__name__


# Signature algorithms by OID, for messages and for the check that AMD's PSS is used.
_SIGNATURE_NAMES = {
    "1.2.840.113549.1.1.10": "rsassa-pss",
    "1.2.840.113549.1.1.11": "rsa-pkcs1v15-sha256",
    "1.2.840.113549.1.1.12": "rsa-pkcs1v15-sha384",
    "1.2.840.113549.1.1.13": "rsa-pkcs1v15-sha512",
    "1.2.840.10045.4.3.2": "ecdsa-sha256",
    "1.2.840.10045.4.3.3": "ecdsa-sha384",
    "1.3.101.112": "ed25519",
}


def _signature_algorithm(cert: x509.Certificate) -> str:
    from cryptography.exceptions import UnsupportedAlgorithm

    dotted = cert.signature_algorithm_oid.dotted_string
    name = _SIGNATURE_NAMES.get(dotted, dotted)
    if name == "rsassa-pss":
        try:
            digest = cert.signature_hash_algorithm
        except UnsupportedAlgorithm:
            digest = None
        name += f"-{digest.name}" if digest is not None else "-unknown-hash"
    return name


def _wrap(cert: x509.Certificate) -> Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    extensions = tuple(
        (ext.oid.dotted_string, bytes(ext.value.value))
        for ext in cert.extensions
        if isinstance(ext.value, x509.UnrecognizedExtension)
    )
    return Certificate(
        der=cert.public_bytes(Encoding.DER),
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        common_name=_common_name(cert.subject),
        issuer_common_name=_common_name(cert.issuer),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        key_type=_key_type(cert),
        signature_algorithm=_signature_algorithm(cert),
        extensions=extensions,
        handle=cert,
    )


def load_certificates(data: bytes, what: str) -> tuple[Certificate, ...]:
    """Every certificate in ``data``: PEM (one or more blocks) or one DER certificate."""
    from cryptography import x509
    from cryptography.utils import CryptographyDeprecationWarning

    with warnings.catch_warnings():
        # AMD's VCEKs have serial number 0, which RFC 5280 disallows and the library warns
        # about on every load; the chain and the TCB bind a VCEK, not its serial.
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        try:
            if b"-----BEGIN" in data:
                certs = x509.load_pem_x509_certificates(data)
            else:
                certs = [x509.load_der_x509_certificate(data)]
            wrapped = tuple(_wrap(c) for c in certs)
        except ValueError as exc:
            raise ParseError(what, f"not a readable X.509 certificate (PEM or DER): {exc}"
                             ) from None
    if not wrapped:
        raise ParseError(what, "holds no certificate")
    return wrapped


def load_certificate(data: bytes, what: str) -> Certificate:
    """Exactly one certificate (PEM or DER)."""
    certs = load_certificates(data, what)
    if len(certs) != 1:
        raise ParseError(what, f"holds {len(certs)} certificates, expected one")
    return certs[0]


def issue_problem(child: Certificate, issuer: Certificate) -> str | None:
    """What stops ``issuer`` from being the issuer of ``child``, or None if it is.

    Requires the names to link and ``child``'s signature to be RSASSA-PSS with SHA-384
    (MGF1 SHA-384, salt 48 bytes, as AMD signs) by ``issuer``'s RSA key."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    if child.issuer != issuer.subject:
        return f"issuer name {child.issuer!r} is not {issuer.subject!r}"
    cert = child.handle
    if child.signature_algorithm != "rsassa-pss-sha384":
        return f"signed with {child.signature_algorithm}, not RSASSA-PSS with SHA-384"
    key = issuer.handle.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        return f"the issuer's key is {issuer.key_type}, not RSA"
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=_PSS_SALT_LEN)
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, pss, hashes.SHA384())
    except InvalidSignature:
        return f"its signature does not verify under {issuer.common_name}'s key"
    return None


def verify_ecdsa_p384(cert: Certificate, message: bytes, r: int, s: int,
                      what: str = "signature") -> None:
    """Return if (r, s) is an ECDSA P-384 / SHA-384 signature of ``message`` by ``cert``'s
    key; raise BadSignature otherwise (including a key that is not P-384). ``what`` names
    the signature in the message."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    key = cert.handle.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise BadSignature(f"{cert.common_name} holds an {cert.key_type} key, not ECDSA "
                           f"P-384: it cannot have made the {what}")
    limit = 1 << (8 * P384_SCALAR_LEN)
    if not (0 < r < limit and 0 < s < limit):
        raise BadSignature(f"{what} values are out of range for P-384")
    try:
        key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise BadSignature(f"{what} does not verify under {cert.common_name}'s key "
                           f"(sha256 {cert.sha256[:16]})") from None


# --- DER values inside extensions (pure) ----------------------------------------------------


def _der_tlv(value: bytes, tag: int) -> bytes | None:
    """The contents of one DER element of ``tag`` spanning all of ``value``, else None."""
    if len(value) < 2 or value[0] != tag:
        return None
    length, start = value[1], 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 2 or len(value) < 2 + n:
            return None
        length, start = int.from_bytes(value[2 : 2 + n], "big"), 2 + n
    if start + length != len(value):
        return None
    return value[start:]


def der_integer(value: bytes) -> int | None:
    """A DER INTEGER (non-negative) as an int, else None."""
    body = _der_tlv(value, 0x02)
    if not body or body[0] & 0x80:
        return None
    return int.from_bytes(body, "big")


def der_ia5_string(value: bytes) -> str | None:
    body = _der_tlv(value, 0x16)
    if body is None:
        return None
    try:
        return body.decode("ascii")
    except UnicodeDecodeError:
        return None


def der_octet_string(value: bytes) -> bytes | None:
    return _der_tlv(value, 0x04)
