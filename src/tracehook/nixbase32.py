"""Nix's base-32 ("nix32") encoding of hashes.

Nix's alphabet omits ``e``, ``o``, ``u`` and ``t``, and its digit order is its own: the
string is the big-endian base-32 numeral of the bytes read as one *little-endian* integer,
so the last character holds the low five bits of the first byte (Nix's ``printHash32``).
Bits beyond ``8 * len(data)`` are padding and must be zero.
"""

from __future__ import annotations

from tracehook.errors import ParseError

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_DIGITS = {c: i for i, c in enumerate(ALPHABET)}
_WHAT = "nix-base32 string"


def hash_len(nbytes: int) -> int:
    """Number of nix32 characters that encode ``nbytes`` bytes (Nix's ``base32Len``)."""
    if nbytes < 0:
        raise ValueError("negative length")
    return (nbytes * 8 + 4) // 5


def byte_len(nchars: int) -> int | None:
    """Number of bytes a nix32 string of ``nchars`` characters encodes, or None if no length
    of bytes encodes to exactly that many characters."""
    nbytes = nchars * 5 // 8
    return nbytes if hash_len(nbytes) == nchars else None


def encode(data: bytes) -> str:
    """Encode bytes in Nix's base-32 digit order."""
    value = int.from_bytes(data, "little")
    chars = []
    for _ in range(hash_len(len(data))):
        chars.append(ALPHABET[value & 0x1F])
        value >>= 5
    return "".join(reversed(chars))


def decode(s: str) -> bytes:
    """Decode a nix32 string; raise ParseError on a bad character, length or padding."""
    nbytes = byte_len(len(s))
    if nbytes is None:
        raise ParseError(_WHAT, f"length {len(s)} is not the length of any byte string", len(s))
    value = 0
    for pos, c in enumerate(s):
        digit = _DIGITS.get(c)
        if digit is None:
            raise ParseError(_WHAT, f"invalid character {c!r}", pos)
        value = (value << 5) | digit
    if value >> (8 * nbytes):
        raise ParseError(_WHAT, "nonzero padding bits in the first character", 0)
    return value.to_bytes(nbytes, "little")


def is_valid(s: str, nbytes: int | None = None) -> bool:
    """True when ``s`` decodes (to ``nbytes`` bytes, when given)."""
    try:
        decoded = decode(s)
    except ParseError:
        return False
    return nbytes is None or len(decoded) == nbytes
