"""NAR (Nix ARchive) serialization of a filesystem path, streamed, and NAR hashes.

The format, as Nix writes it: every token is a *string*, i.e. its length as an 8-byte
little-endian integer, the bytes, and zero bytes up to a multiple of 8.

    nar       = "nix-archive-1" node
    node      = "(" "type" ( regular | symlink | directory ) ")"
    regular   = "regular" [ "executable" "" ] "contents" <file bytes>
    symlink   = "symlink" "target" <link target>
    directory = "directory" { "entry" "(" "name" <name> "node" node ")" }

Directory entries are sorted by their name bytes. A file is executable when its owner
execute bit is set. Nothing else (owner, times, other mode bits) is recorded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from collections.abc import Iterator

from tracehook.errors import EnvironmentFault, ParseError
from tracehook.nix import nixbase32

CHUNK_SIZE = 64 * 1024
NAR_MAGIC = b"nix-archive-1"
SHA256_LEN = 32


def _str(data: bytes) -> bytes:
    """One NAR string: length, bytes, padding."""
    return len(data).to_bytes(8, "little") + data + b"\0" * (-len(data) % 8)


def _strs(*tokens: bytes) -> bytes:
    return b"".join(_str(t) for t in tokens)


def dump(path: str | os.PathLike[str]) -> Iterator[bytes]:
    """Yield the NAR serialization of ``path`` in chunks (files in 64 KiB pieces).

    ``path`` itself is not followed if it is a symlink (as ``nix-store --dump``).
    Raises EnvironmentFault for unreadable paths, special files, or a file whose size
    changes while it is read.
    """
    root = os.fsencode(path)
    yield _str(NAR_MAGIC)
    yield from _node(root)


def _node(path: bytes) -> Iterator[bytes]:
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise EnvironmentFault(f"cannot stat {os.fsdecode(path)}: {exc.strerror}") from None
    if stat.S_ISREG(st.st_mode):
        yield from _regular(path)
    elif stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(path)
        except OSError as exc:
            raise EnvironmentFault(
                f"cannot read symlink {os.fsdecode(path)}: {exc.strerror}"
            ) from None
        yield _strs(b"(", b"type", b"symlink", b"target", target, b")")
    elif stat.S_ISDIR(st.st_mode):
        yield from _directory(path)
    else:
        raise EnvironmentFault(
            f"cannot put {os.fsdecode(path)} in a NAR: not a regular file, symlink or directory"
        )


def _regular(path: bytes) -> Iterator[bytes]:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise EnvironmentFault(f"cannot open {os.fsdecode(path)}: {exc.strerror}") from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())  # the file we actually opened
        if not stat.S_ISREG(st.st_mode):
            raise EnvironmentFault(f"{os.fsdecode(path)} changed type while it was being read")
        size = st.st_size
        head = [b"(", b"type", b"regular"]
        if st.st_mode & stat.S_IXUSR:
            head += [b"executable", b""]
        head.append(b"contents")
        yield _strs(*head) + size.to_bytes(8, "little")
        remaining = size
        while remaining > 0:
            try:
                chunk = f.read(min(CHUNK_SIZE, remaining))
            except OSError as exc:
                raise EnvironmentFault(f"cannot read {os.fsdecode(path)}: {exc.strerror}") from None
            if not chunk:
                raise EnvironmentFault(f"{os.fsdecode(path)} shrank while it was being read")
            remaining -= len(chunk)
            yield chunk
        if f.read(1):
            raise EnvironmentFault(f"{os.fsdecode(path)} grew while it was being read")
    yield b"\0" * (-size % 8) + _str(b")")


def _directory(path: bytes) -> Iterator[bytes]:
    try:
        names = sorted(os.listdir(path))
    except OSError as exc:
        raise EnvironmentFault(f"cannot list {os.fsdecode(path)}: {exc.strerror}") from None
    yield _strs(b"(", b"type", b"directory")
    for name in names:
        yield _strs(b"entry", b"(", b"name", name, b"node")
        yield from _node(os.path.join(path, name))
        yield _str(b")")
    yield _str(b")")


def nar_hash(path: str | os.PathLike[str]) -> tuple[bytes, int]:
    """(sha256 digest of the NAR, NAR size in bytes), streaming."""
    h = hashlib.sha256()
    size = 0
    for chunk in dump(path):
        h.update(chunk)
        size += len(chunk)
    return h.digest(), size


def format_nar_hash(digest: bytes) -> str:
    """``sha256:<nix32>``, as narinfos and laut traces write it."""
    if len(digest) != SHA256_LEN:
        raise ValueError(f"a sha256 digest is {SHA256_LEN} bytes, not {len(digest)}")
    return "sha256:" + nixbase32.encode(digest)


def parse_nar_hash(s: str, what: str = "NAR hash") -> bytes:
    """The digest of ``sha256:<nix32>``, ``sha256:<hex>``, ``sha256:<base64>`` or SRI
    ``sha256-<base64>``; ParseError otherwise."""
    if s.startswith("sha256:"):
        body, sri = s[len("sha256:"):], False
    elif s.startswith("sha256-"):
        body, sri = s[len("sha256-"):], True
    else:
        raise ParseError(what, "expected 'sha256:<nix32 or hex>' or 'sha256-<base64>'")
    pos = len("sha256:")
    if not sri and len(body) == nixbase32.hash_len(SHA256_LEN):
        try:
            return nixbase32.decode(body)
        except ParseError as exc:
            raise ParseError(what, f"bad nix32: {exc.message}", pos + (exc.position or 0)) from None
    if not sri and len(body) == 2 * SHA256_LEN:
        if all(c in "0123456789abcdef" for c in body.lower()):
            return bytes.fromhex(body)
        raise ParseError(what, "64 characters but not hexadecimal", pos)
    if len(body) == 44:  # base64 of 32 bytes, with one '=' of padding
        try:
            digest = base64.b64decode(body.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise ParseError(what, "bad base64", pos) from None
        if len(digest) == SHA256_LEN and base64.b64encode(digest).decode("ascii") == body:
            return digest
        raise ParseError(what, "base64 that is not a sha256 digest", pos)
    raise ParseError(
        what,
        f"{len(body)} characters after the algorithm; a sha256 is 52 (nix32), 64 (hex) "
        "or 44 (base64)",
        pos,
    )
