"""Finding an output's references the way Nix does: scanning its NAR for hash parts. Pure.

Nix records as a path's references the store paths whose 32-character hash part occurs
anywhere in its NAR, among the paths it could refer to (its build's inputs and its own
outputs). :func:`scan` does the same over a NAR given in chunks (compressed as a binary
cache serves it: none, xz or bzip2), and also hashes what it scanned, so the caller can
check that it scanned exactly the NAR the traces attest.
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Protocol

from tracehook.errors import ParseError
from tracehook.nix.storepath import hash_part

_OVERLAP = 31  # a hash part split across two chunks is still found


class _Decompressor(Protocol):
    def decompress(self, data: bytes) -> bytes: ...


class _Identity:
    def decompress(self, data: bytes) -> bytes:
        return data


def decompressor(compression: str | None) -> _Decompressor:
    """ParseError for a compression that cannot be read here."""
    if compression in (None, "", "none"):
        return _Identity()
    if compression == "xz":
        return lzma.LZMADecompressor()
    if compression == "bzip2":
        return bz2.BZ2Decompressor()
    raise ParseError("NAR", f"cannot scan a {compression}-compressed NAR for references "
                     "(none, xz and bzip2 can be read)")


@dataclass(frozen=True)
class Scanned:
    found: frozenset[str]  # the candidate paths whose hash part occurs in the NAR
    nar_sha256: bytes  # of the uncompressed NAR that was scanned
    nar_size: int


def scan(chunks: Iterable[bytes], compression: str | None,
         candidates: Collection[str]) -> Scanned:
    """The candidates the NAR refers to. ParseError for a compression that cannot be read
    or data that does not decompress."""
    by_hash = {hash_part(p).encode(): p for p in candidates}
    pattern = re.compile(b"|".join(re.escape(h) for h in sorted(by_hash))) if by_hash else None
    inflate = decompressor(compression)
    digest = hashlib.sha256()
    size = 0
    found: set[str] = set()
    tail = b""
    for chunk in chunks:
        try:
            data = inflate.decompress(chunk)
        except (lzma.LZMAError, OSError, EOFError, ValueError) as exc:
            raise ParseError("NAR", f"does not decompress as {compression}: {exc}") from None
        if not data:
            continue
        digest.update(data)
        size += len(data)
        if pattern is not None:
            window = tail + data
            found.update(by_hash[m.group(0)] for m in pattern.finditer(window))
            tail = window[-_OVERLAP:]
    return Scanned(frozenset(found), digest.digest(), size)
