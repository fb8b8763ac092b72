"""Nix's base-32 ("nix32") encoding of hashes.

Nix's alphabet omits ``e``, ``o``, ``u`` and ``t``, and its digit order is its own: the
string is the big-endian base-32 numeral of the bytes read as one *little-endian* integer,
so the last character holds the low five bits of the first byte (Nix's ``printHash32``).
Bits beyond ``8 * len(data)`` are padding and must be zero.
"""

from __future__ import annotations

import re

from tracehook.errors import ParseError

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_DIGITS = {c: i for i, c in enumerate(ALPHABET)}
_PAIRS = [a + b for a in ALPHABET for b in ALPHABET]  # 10-bit value -> two digits
_WHAT = "nix-base32 string"
# The same digits in the order ``int(s, 32)`` reads, so decoding runs in C.
_TO_INT32 = str.maketrans(ALPHABET, "0123456789abcdefghijklmnopqrstuv")
_VALID = re.compile(f"[{ALPHABET}]*")


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
    # The numeral of the little-endian integer is the RFC base-32 of its big-endian bytes,
    # left-padded with zero bytes to a multiple of 5 (no '=' then); its last digits are ours.
    nchars = hash_len(len(data))
    if nchars == 0:
        return ""
    # The integer's base-32 numeral, most significant digit first, zero-padded: two
    # digits (ten bits) at a time, then the odd one.
    value = int.from_bytes(data, "little")
    pairs, odd = divmod(nchars, 2)
    head = ALPHABET[value >> (10 * pairs)] if odd else ""
    return head + "".join([_PAIRS[(value >> shift) & 1023]
                           for shift in range(10 * (pairs - 1), -1, -10)])


def decode(s: str) -> bytes:
    """Decode a nix32 string; raise ParseError on a bad character, length or padding."""
    nbytes = byte_len(len(s))
    if nbytes is None:
        raise ParseError(_WHAT, f"length {len(s)} is not the length of any byte string", len(s))
    if not _VALID.fullmatch(s):
        for pos, c in enumerate(s):
            if c not in _DIGITS:
                raise ParseError(_WHAT, f"invalid character {c!r}", pos)
    value = int(s.translate(_TO_INT32), 32) if s else 0
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
