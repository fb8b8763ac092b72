"""NAR serialization and NAR hashes: hand-built framing and Nix's own answers."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nixharness import NixTier
from tracehook.errors import EnvironmentFault, ParseError
from tracehook.nix import nar


def named(*rows: tuple[object, ...]) -> list[Any]:
    """Table rows whose first element is the case name, used as the test id."""
    return [pytest.param(*row, id=str(row[0])) for row in rows]


def s(data: bytes) -> bytes:
    """A NAR string, written out by hand: u64 LE length, bytes, zero padding to 8."""
    return len(data).to_bytes(8, "little") + data + bytes((8 - len(data) % 8) % 8)


def nar_bytes(path: Path) -> bytes:
    return b"".join(nar.dump(path))


# --- trees, and the NAR hashes Nix 2.8 gave for them (nix-store --dump | sha256sum) ---------


def hello(root: Path) -> Path:
    (root / "hello").write_bytes(b"hello\n")
    return root / "hello"


def empty_file(root: Path) -> Path:
    (root / "empty").write_bytes(b"")
    return root / "empty"


def symlink(root: Path) -> Path:
    (root / "link").symlink_to("../f")
    return root / "link"


def mixed_dir(root: Path) -> Path:
    d = root / "d"
    (d / "sub").mkdir(parents=True)
    (d / "empty").write_bytes(b"")
    (d / "x").write_bytes(b"#!/bin/sh\n")
    (d / "x").chmod(0o755)
    (d / "link").symlink_to("../f")
    (d / "sub" / "B").write_bytes(b"a\n")  # "B" sorts before "a": byte order
    (d / "sub" / "a").write_bytes(b"b\n")
    return d


def nix_copied_tree(root: Path) -> Path:
    # Added with nix-store --add and copied to a file:// cache by Nix 2.8; its narinfo said
    # NarHash: sha256:0v3n3dpls2wny4fhaf5m4d7q27ax2rqarmbspx7y1x11akgq5x8w, NarSize: 648.
    t = root / "tree"
    (t / "sub").mkdir(parents=True)
    (t / "sub" / "y").write_bytes(b"x")
    (t / "l").symlink_to("sub/y")
    return t


def executable_and_odd_names(root: Path) -> Path:
    d = root / "odd"
    (d / "dir with space").mkdir(parents=True)
    (d / "run").write_bytes(b"#!/bin/sh\nexit 0\n")
    (d / "run").chmod(0o755)
    (d / "dir with space" / "ünïcode").write_bytes(bytes(range(256)) * 300)
    (d / "dangling").symlink_to("/nonexistent/target")
    (d / "Z").write_bytes(b"")
    return d


Tree = Callable[[Path], Path]

KNOWN: list[tuple[str, Tree, str, int | None]] = [
    ("hello", hello, "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw", 120),
    ("empty_file", empty_file, "0ip26j2h11n1kgkz36rl4akv694yz65hr72q4kv4b3lxcbi65b3p", None),
    ("symlink", symlink, "0czpv0igfj405jp7mkc2a9k5sfis2cd9hzvz6fb47l3hn7ia4mck", None),
    ("mixed_dir", mixed_dir, "1dbbbmabafxvwh0w2risi8nppqg4jfz0fi9qrpc63zlhg5x6lgxv", None),
    ("nix_copied_tree", nix_copied_tree,
     "0v3n3dpls2wny4fhaf5m4d7q27ax2rqarmbspx7y1x11akgq5x8w", 648),
]


@pytest.mark.parametrize(("case", "tree", "nix32", "size"), named(*KNOWN))
def test_known_nar_hashes(
    tmp_path: Path, case: str, tree: Tree, nix32: str, size: int | None
) -> None:
    path = tree(tmp_path)
    digest, nar_size = nar.nar_hash(path)
    assert nar.format_nar_hash(digest) == "sha256:" + nix32
    data = nar_bytes(path)
    assert nar_size == len(data) and len(data) % 8 == 0
    assert hashlib.sha256(data).digest() == digest
    if size is not None:
        assert nar_size == size


def test_hello_framing_by_hand(tmp_path: Path) -> None:
    expected = b"".join(
        [
            s(b"nix-archive-1"),
            s(b"("), s(b"type"), s(b"regular"), s(b"contents"), s(b"hello\n"), s(b")"),
        ]
    )
    assert len(expected) == 120
    assert nar_bytes(hello(tmp_path)) == expected
    assert hashlib.sha256(expected).hexdigest() == (
        "1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13"
    )


def test_executable_framing_by_hand(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(b"12345678")  # exactly 8 bytes: no padding
    p.chmod(0o700)
    expected = b"".join(
        s(t) for t in [b"nix-archive-1", b"(", b"type", b"regular", b"executable", b"",
                       b"contents", b"12345678", b")"]
    )
    assert nar_bytes(p) == expected


def test_directory_and_symlink_framing_by_hand(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "b").symlink_to("target")
    (d / "a").write_bytes(b"")
    expected = b"".join(
        s(t) for t in [
            b"nix-archive-1", b"(", b"type", b"directory",
            b"entry", b"(", b"name", b"a", b"node",
            b"(", b"type", b"regular", b"contents", b"", b")", b")",
            b"entry", b"(", b"name", b"b", b"node",
            b"(", b"type", b"symlink", b"target", b"target", b")", b")",
            b")",
        ]
    )
    assert nar_bytes(d) == expected


def test_empty_directory(tmp_path: Path) -> None:
    d = tmp_path / "e"
    d.mkdir()
    assert nar_bytes(d) == b"".join(
        s(t) for t in [b"nix-archive-1", b"(", b"type", b"directory", b")"]
    )


@pytest.mark.parametrize(("case", "mode", "executable"), named(
    ("owner_exec", 0o700, True),
    ("all_exec", 0o755, True),
    ("group_exec_only", 0o650, False),
    ("other_exec_only", 0o641, False),
    ("read_only", 0o444, False),
))
def test_executable_means_owner_execute_bit(
    tmp_path: Path, case: str, mode: int, executable: bool
) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x")
    p.chmod(mode)
    assert (s(b"executable") in nar_bytes(p)) is executable


def test_entries_sorted_by_name_bytes(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    names = [b"a", b"B", b"\xff", b"_", b"aa", b"0", b"\xc3\xa9"]
    for n in names:
        with open(os.path.join(os.fsencode(d), n), "wb") as f:
            f.write(n)
    data = nar_bytes(d)
    positions = [data.index(s(b"name") + s(n)) for n in sorted(names)]
    assert positions == sorted(positions)


def test_root_symlink_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"data")
    (tmp_path / "ln").symlink_to("real")
    assert s(b"symlink") in nar_bytes(tmp_path / "ln")


def test_large_file_streams_in_chunks(tmp_path: Path) -> None:
    p = tmp_path / "big"
    content = os.urandom(3 * nar.CHUNK_SIZE + 5)
    p.write_bytes(content)
    chunks = list(nar.dump(p))
    assert max(len(c) for c in chunks) <= nar.CHUNK_SIZE + 512
    assert len(chunks) >= 4
    data = b"".join(chunks)
    assert data[-19:] == bytes(3) + s(b")")  # 5 content bytes padded to 8
    assert content in data
    assert nar.nar_hash(p) == (hashlib.sha256(data).digest(), len(data))


@pytest.mark.parametrize("kind", ["missing", "fifo"])
def test_unusable_paths(tmp_path: Path, kind: str) -> None:
    p = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(p)
    with pytest.raises(EnvironmentFault):
        nar.nar_hash(p)


def test_unreadable_file_inside_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "secret").write_bytes(b"x")
    real_open = os.open

    def deny(path: Any, flags: int, *args: Any) -> int:
        if os.fsencode(path).endswith(b"/secret"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(EnvironmentFault, match="secret"):
        nar.nar_hash(d)


# --- NAR hash strings ------------------------------------------------------------------------

HELLO = bytes.fromhex("1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13")
HELLO_B64 = base64.b64encode(HELLO).decode()


@pytest.mark.parametrize(("case", "text"), named(
    ("nix32", "sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"),
    ("hex", "sha256:" + HELLO.hex()),
    ("hex_upper", "sha256:" + HELLO.hex().upper()),
    ("sri", "sha256-" + HELLO_B64),
    ("base64_after_colon", "sha256:" + HELLO_B64),
))
def test_parse_nar_hash_forms(case: str, text: str) -> None:
    assert nar.parse_nar_hash(text) == HELLO


@pytest.mark.parametrize(("case", "text"), named(
    ("no_algorithm", "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"),
    ("md5", "md5:" + HELLO.hex()[:32]),
    ("sha512", "sha512-" + HELLO_B64),
    ("empty", ""),
    ("empty_body", "sha256:"),
    ("nix32_bad_char", "sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqe"),
    ("nix32_short", "sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dq"),
    ("hex_bad_char", "sha256:" + HELLO.hex()[:-1] + "g"),
    ("sri_hex", "sha256-" + HELLO.hex()),
    ("sri_nix32", "sha256-04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"),
    ("sri_truncated", "sha256-" + HELLO_B64[:-4]),
    ("sri_bad_base64", "sha256-" + "!" * 44),
    ("sri_no_padding", "sha256-" + HELLO_B64.rstrip("=")),
))
def test_parse_nar_hash_errors(case: str, text: str) -> None:
    with pytest.raises(ParseError):
        nar.parse_nar_hash(text)


def test_format_nar_hash_needs_32_bytes() -> None:
    with pytest.raises(ValueError):
        nar.format_nar_hash(bytes(20))


# --- against the real nix-store on this machine ------------------------------------------


@pytest.mark.nix
@pytest.mark.parametrize(("case", "tree"), named(
    *((case, tree) for case, tree, _, _ in KNOWN),
    ("executable_and_odd_names", executable_and_odd_names),
))
def test_dump_equals_nix_store_dump(
    tmp_path: Path, case: str, tree: Tree, nix_tier: NixTier
) -> None:
    path = tree(tmp_path)
    nix = subprocess.run(
        [str(nix_tier.bindir / "nix-store"), "--dump", str(path)],
        capture_output=True, check=True, timeout=60,
    ).stdout
    assert nar_bytes(path) == nix
