"""Ed25519 keys and signatures: the one module that calls PyNaCl.

(Hardware evidence needs X.509, ECDSA P-384 and RSA-PSS: :mod:`tracehook.trace.pki` is the
one module that calls ``cryptography`` for those, and imports it lazily.)

The library is libsodium, through PyNaCl: the implementation Nix itself verifies narinfo
and realisation signatures with (so we accept exactly what Nix accepts), about twice as
fast as OpenSSL's Ed25519 here, and it releases the GIL while it verifies, so signature
checks in worker threads run beside the verifier's graph work.

Key files use Nix's format (interchangeable with ``nix key generate-secret`` and
``nix-store --generate-binary-cache-key``):

* secret: ``<name>:<base64 of 64 bytes = 32-byte seed || 32-byte public key>``
* public: ``<name>:<base64 of the 32-byte public key>``

Nix-style detached signatures (narinfo ``Sig:``, realisations) are ``<name>:<base64>``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nacl.bindings
import nacl.exceptions

from tracehook.errors import BadSignature, ConfigError, EnvironmentFault, ParseError

log = logging.getLogger(__name__)

SEED_LEN = 32
PUBLIC_LEN = 32
SIGNATURE_LEN = 64

# DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the key bytes follow.
SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")


def _check_name(name: str) -> str | None:
    """Return what is wrong with a key name, or None if it is usable."""
    if not name:
        return "the key name before ':' is empty"
    if ":" in name:
        return "the key name must not contain ':'"
    return None


@dataclass(frozen=True)
class PublicKey:
    """A named Ed25519 public key (32 bytes)."""

    name: str
    key: bytes

    def __post_init__(self) -> None:
        problem = _check_name(self.name)
        if problem:
            raise ValueError(problem)
        if len(self.key) != PUBLIC_LEN:
            raise ValueError(f"an Ed25519 public key is {PUBLIC_LEN} bytes, not {len(self.key)}")


@dataclass(frozen=True)
class SecretKey:
    """A named Ed25519 secret key, kept as its 32-byte seed (never shown in repr)."""

    name: str
    seed: bytes = field(repr=False)

    def __post_init__(self) -> None:
        problem = _check_name(self.name)
        if problem:
            raise ValueError(problem)
        if len(self.seed) != SEED_LEN:
            raise ValueError(f"an Ed25519 seed is {SEED_LEN} bytes, not {len(self.seed)}")

    @property
    def public(self) -> PublicKey:
        return PublicKey(self.name, _public_bytes(self.seed))


@functools.lru_cache(maxsize=16)
def _keypair(seed: bytes) -> tuple[bytes, bytes]:
    """(32-byte public key, libsodium's 64-byte secret key = seed || public). Remembered
    for the few keys a process signs with: deriving the public key is a scalar
    multiplication, as costly as the signature itself (the gate signs every answer)."""
    public, secret = nacl.bindings.crypto_sign_seed_keypair(seed)
    return public, secret


def _public_bytes(seed: bytes) -> bytes:
    return _keypair(seed)[0]


# --- key file text ----------------------------------------------------------------------


def _split_key_text(text: str, what: str) -> tuple[str, bytes]:
    stripped = text.strip()
    if not stripped:
        raise ParseError(what, "the key file is empty; expected '<name>:<base64>'")
    name, sep, b64 = stripped.partition(":")
    if not sep:
        raise ParseError(what, "no ':' found; expected '<name>:<base64>'")
    problem = _check_name(name)
    if problem:
        raise ParseError(what, f"{problem}; expected '<name>:<base64>'", 0)
    try:
        raw = base64.b64decode(b64.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ParseError(
            what, "the part after ':' is not valid base64 (standard alphabet, '=' padding)",
            len(name) + 1,
        ) from None
    return name, raw


def parse_secret_key(text: str, what: str = "secret key") -> SecretKey:
    """Parse ``name:base64(seed || public)``; the public half must match the seed."""
    name, raw = _split_key_text(text, what)
    if len(raw) != SEED_LEN + PUBLIC_LEN:
        hint = " (this looks like a public key file)" if len(raw) == PUBLIC_LEN else ""
        raise ParseError(
            what,
            f"a Nix secret key holds {SEED_LEN + PUBLIC_LEN} bytes (seed and public key), "
            f"this one holds {len(raw)}{hint}; regenerate the pair (e.g. with "
            "'nix key generate-secret')",
        )
    seed, public = raw[:SEED_LEN], raw[SEED_LEN:]
    if _public_bytes(seed) != public:
        raise ParseError(
            what,
            "the public half does not match the seed (the file is corrupt or was pieced "
            "together from two keys); regenerate the key pair",
        )
    return SecretKey(name, seed)


def parse_public_key(text: str, what: str = "public key") -> PublicKey:
    """Parse ``name:base64(public key)``."""
    name, raw = _split_key_text(text, what)
    if len(raw) != PUBLIC_LEN:
        hint = " (this looks like a secret key file)" if len(raw) == SEED_LEN + PUBLIC_LEN else ""
        raise ParseError(
            what,
            f"a Nix public key holds {PUBLIC_LEN} bytes, this one holds {len(raw)}{hint}; "
            "use the '.public' file written next to the secret key",
        )
    return PublicKey(name, raw)


def format_secret_key(sk: SecretKey) -> str:
    """``name:base64(seed || public)`` without a newline, as Nix writes it."""
    raw = sk.seed + sk.public.key
    return f"{sk.name}:{base64.b64encode(raw).decode('ascii')}"


def format_public_key(pk: PublicKey) -> str:
    """``name:base64(public)`` without a newline, as Nix writes it."""
    return f"{pk.name}:{base64.b64encode(pk.key).decode('ascii')}"


def generate_secret_key(name: str) -> SecretKey:
    """A fresh key from the operating system's randomness."""
    return SecretKey(name, os.urandom(SEED_LEN))


# --- raw signatures ---------------------------------------------------------------------


def sign(sk: SecretKey, data: bytes) -> bytes:
    """The 64-byte Ed25519 signature of ``data`` (deterministic)."""
    signed: bytes = nacl.bindings.crypto_sign(data, _keypair(sk.seed)[1])
    return signed[:SIGNATURE_LEN]


def verify(pk: PublicKey, data: bytes, sig: bytes) -> None:
    """Return if ``sig`` is ``pk``'s signature over ``data``; else raise BadSignature."""
    if len(sig) != SIGNATURE_LEN:
        raise BadSignature(
            f"signature by key '{pk.name}' is {len(sig)} bytes, an Ed25519 signature is "
            f"{SIGNATURE_LEN}"
        )
    try:
        nacl.bindings.crypto_sign_open(sig + data, pk.key)
    except nacl.exceptions.BadSignatureError:
        # libsodium also lands here for a 32-byte string that is not a usable point
        # (small order, non-canonical): such a key verifies nothing.
        raise BadSignature(f"signature does not verify under key '{pk.name}'") from None


# --- Nix-style detached signatures ("name:base64") --------------------------------------


def nix_sign(sk: SecretKey, fingerprint: str) -> str:
    """``name:base64(sig)`` over the UTF-8 fingerprint, as Nix's ``signDetached``."""
    sig = sign(sk, fingerprint.encode("utf-8"))
    return f"{sk.name}:{base64.b64encode(sig).decode('ascii')}"


def split_nix_signature(sig_line: str, what: str = "signature") -> tuple[str, str]:
    """Split ``name:base64`` into its parts; ParseError if there is no usable name."""
    name, sep, b64 = sig_line.partition(":")
    if not sep:
        raise ParseError(what, "no ':' found; expected '<key name>:<base64>'")
    problem = _check_name(name)
    if problem:
        raise ParseError(what, f"{problem}; expected '<key name>:<base64>'", 0)
    return name, b64


def nix_verify(keys: Mapping[str, PublicKey], fingerprint: str, sig_line: str) -> PublicKey | None:
    """Check one ``name:base64`` signature against the trusted ``keys`` (by name).

    Returns the key that made it, or None when no key of that name is trusted (the
    signature could not be checked). Raises BadSignature when a trusted key of that name
    did not make it (including undecodable base64 or a wrong length), and ParseError when
    the line has no key name.
    """
    name, b64 = split_nix_signature(sig_line)
    pk = keys.get(name)
    if pk is None:
        return None
    try:
        sig = base64.b64decode(b64.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise BadSignature(f"signature by key '{name}' is not valid base64") from None
    verify(pk, fingerprint.encode("utf-8"), sig)
    return pk


# --- key identity ------------------------------------------------------------------------


def spki_der(pk: PublicKey) -> bytes:
    """DER SubjectPublicKeyInfo of the key (RFC 8410), 44 bytes."""
    return SPKI_PREFIX + pk.key


def thumbprint16(pk: PublicKey) -> str:
    """First 16 hex digits of sha256(SPKI DER): the suffix of a laut ``kid``."""
    return hashlib.sha256(spki_der(pk)).hexdigest()[:16]


# --- key files ----------------------------------------------------------------------------


def _read_key_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        raise ConfigError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ParseError(str(path), "not UTF-8 text; expected '<name>:<base64>'") from None
    except OSError as exc:
        raise EnvironmentFault(f"cannot read key file {path}: {exc.strerror or exc}") from None


def read_secret_key_file(path: str | os.PathLike[str]) -> SecretKey:
    p = Path(path)
    return parse_secret_key(_read_key_text(p), what=f"secret key file {p}")


def read_public_key_file(path: str | os.PathLike[str]) -> PublicKey:
    p = Path(path)
    return parse_public_key(_read_key_text(p), what=f"public key file {p}")


def _write_new_file(path: Path, text: str, mode: int) -> None:
    """Write ``text`` to ``path`` atomically, failing if ``path`` exists.

    The data goes to a temporary file in the same directory (created with ``mode``),
    is flushed to disk, and is then hard-linked to ``path``: linking never replaces
    an existing file, so a concurrent writer cannot be overwritten either.
    """
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    finally:
        os.unlink(tmp)


def write_key_files(
    sk: SecretKey,
    secret_path: str | os.PathLike[str],
    public_path: str | os.PathLike[str],
) -> None:
    """Write the secret key (mode 0600) and its public key (0644); never overwrite.

    Raises ConfigError if either file exists, EnvironmentFault if writing fails.
    """
    sp, pp = Path(secret_path), Path(public_path)
    if sp.resolve() == pp.resolve():
        raise ConfigError(f"secret and public key file are the same path: {sp}")
    for p in (sp, pp):
        if p.exists() or p.is_symlink():
            raise ConfigError(f"refusing to overwrite existing key file {p}")
    try:
        _write_new_file(sp, format_secret_key(sk) + "\n", 0o600)
    except FileExistsError:
        raise ConfigError(f"refusing to overwrite existing key file {sp}") from None
    except OSError as exc:
        raise EnvironmentFault(f"cannot write key file {sp}: {exc.strerror or exc}") from None
    try:
        _write_new_file(pp, format_public_key(sk.public) + "\n", 0o644)
    except OSError as exc:
        # Leave no secret key behind without its public half: the pair is one unit.
        sp.unlink(missing_ok=True)
        if isinstance(exc, FileExistsError):
            raise ConfigError(f"refusing to overwrite existing key file {pp}") from None
        raise EnvironmentFault(f"cannot write key file {pp}: {exc.strerror or exc}") from None
    log.info("wrote secret key %s and public key %s for key '%s'", sp, pp, sk.name)
