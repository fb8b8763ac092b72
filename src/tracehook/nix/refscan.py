"""Finding an output's references the way Nix does: scanning its NAR for hash parts. Pure.

Nix records as a path's references the store paths whose 32-character hash part occurs
anywhere in its NAR, among the paths it could refer to (its build's inputs and its own
outputs). :func:`scan` does the same over a NAR given in chunks (compressed as a binary
cache serves it: none, xz or bzip2), and also hashes what it scanned, so the caller can
check that it scanned exactly the NAR the traces attest.

The search: for up to :data:`FIND_EACH_MAX` hash parts still missing, each is looked for on
its own (a C substring search, stopped once found); for more, every run of 32 or more
nix-base32 characters is looked up, window by window, in the set (Nix's own method, whose
cost does not grow with the number of candidates). A hash part split across two chunks is
found either way. bench/refscan.py measures both against a plain sha256.
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
FIND_EACH_MAX = 100  # up to this many missing hash parts, each is searched for on its own
_RUN = re.compile(rb"[0-9a-df-np-sv-z]{32,}")  # 32 or more nix-base32 characters


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
    missing = set(by_hash)
    inflate = decompressor(compression)
    digest = hashlib.sha256()
    size = 0
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
        if missing:
            window = tail + data
            missing -= occurring(window, missing)
            tail = window[-_OVERLAP:]
    found = frozenset(p for h, p in by_hash.items() if h not in missing)
    return Scanned(found, digest.digest(), size)


def occurring(data: bytes, hash_parts: Collection[bytes]) -> set[bytes]:
    """The ``hash_parts`` (32 nix-base32 characters each) that occur in ``data``."""
    if len(hash_parts) <= FIND_EACH_MAX:
        return {h for h in hash_parts if h in data}
    wanted = hash_parts if isinstance(hash_parts, (set, frozenset)) else set(hash_parts)
    hits: set[bytes] = set()
    for m in _RUN.finditer(data):
        run = m.group(0)
        for i in range(len(run) - 31):
            if run[i:i + 32] in wanted:
                hits.add(run[i:i + 32])
    return hits
