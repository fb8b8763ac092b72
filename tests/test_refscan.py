"""Reference scanning (nix/refscan.py): which candidate store paths a NAR names, found the
way Nix finds them (a hash part anywhere in the bytes), by both search strategies."""

from __future__ import annotations

import bz2
import hashlib
import lzma
import random

import pytest

from tracehook.errors import ParseError
from tracehook.nix import nixbase32, refscan

RNG = random.Random(7)
PATHS = [f"/nix/store/{nixbase32.encode(RNG.randbytes(20))}-p{i}" for i in range(6)]
A, B, C, D, E, F = PATHS


def hp(path: str) -> bytes:
    return path[11:43].encode()


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.fixture(params=["each", "runs"])
def strategy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """"each": every hash part searched for on its own; "runs": base32 runs looked up."""
    if request.param == "runs":
        monkeypatch.setattr(refscan, "FIND_EACH_MAX", 0)
    return str(request.param)


def test_finds_hash_parts_wherever_they_are(strategy: str) -> None:
    data = (b"\x00ELF" + A.encode() + b"/lib\x00"  # a full path
            + b"zzzz" + hp(B) + b"aaaa"  # inside a longer run of base32 characters
            + hp(C)[:20] + b"-" + hp(C)[20:]  # broken: not a reference
            + RNG.randbytes(5000) + hp(D))  # bare, at the very end
    for size in (1, 7, 31, 32, 33, 4096, len(data)):  # split at every kind of boundary
        got = refscan.scan(pieces(data, size), "none", PATHS)
        assert got.found == {A, B, D}, size
        assert got.nar_sha256 == hashlib.sha256(data).digest() and got.nar_size == len(data)


@pytest.mark.parametrize(("compression", "pack"), [
    ("xz", lzma.compress), ("bzip2", bz2.compress), ("none", bytes), (None, bytes)])
def test_compressed_nars(strategy: str, compression: str | None, pack: object) -> None:
    data = RNG.randbytes(300_000) + E.encode() + RNG.randbytes(300_000)
    assert callable(pack)
    got = refscan.scan(pieces(pack(data), 65536), compression, PATHS)
    assert got.found == {E} and got.nar_sha256 == hashlib.sha256(data).digest()


def test_no_candidates_still_hashes() -> None:
    got = refscan.scan([b"abc", b"def"], "none", [])
    assert got.found == frozenset() and got.nar_sha256 == hashlib.sha256(b"abcdef").digest()


def test_the_strategies_agree_on_many_candidates() -> None:
    paths = [f"/nix/store/{nixbase32.encode(RNG.randbytes(20))}-q{i}" for i in range(300)]
    named = RNG.sample(paths, 120)
    data = b"".join(RNG.randbytes(RNG.randrange(0, 3000)) + p.encode() for p in named)
    assert len(paths) > refscan.FIND_EACH_MAX
    assert refscan.scan(pieces(data, 1000), "none", paths).found == frozenset(named)
    assert refscan.occurring(data, [hp(p) for p in paths[:50]]) == \
        {hp(p) for p in named if p in paths[:50]}


@pytest.mark.parametrize(("compression", "data", "said"), [
    ("zstd", b"x", "cannot scan a zstd-compressed NAR"),
    ("xz", b"not xz at all", "does not decompress as xz"),
    ("bzip2", b"not bzip2", "does not decompress as bzip2"),
])
def test_unreadable_nars_are_parse_errors(compression: str, data: bytes, said: str) -> None:
    with pytest.raises(ParseError, match=said):
        refscan.scan([data], compression, PATHS)
