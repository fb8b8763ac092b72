"""Store paths. Known answers computed by Nix 2.8.0 (nix-instantiate, builtins.toFile,
builtins.path, fixed-output derivations) in a throwaway store."""

from __future__ import annotations

import hashlib

import pytest

from tracehook.errors import ParseError
from tracehook.nix.storepath import (
    basename,
    check_name,
    compress_hash,
    hash_part,
    hash_placeholder,
    is_store_path,
    make_fixed_output_path,
    make_output_path,
    make_store_path,
    make_text_path,
    output_path_name,
    parse_store_path,
    path_name,
    upstream_placeholder,
)

A_TXT = "/nix/store/wzflyq5q9kjg4p27yck2nnispnblxsnh-a.txt"
BB = "/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb"


def test_compress_hash_folds_by_xor() -> None:
    digest = bytes(range(32))
    expected = bytes([i ^ (i + 20) for i in range(12)] + list(range(12, 20)))
    assert compress_hash(digest, 20) == expected
    assert compress_hash(b"\x01\x02", 1) == b"\x03"
    assert compress_hash(b"", 4) == b"\x00" * 4


@pytest.mark.parametrize(
    ("name", "content", "refs", "store_dir", "expected"),
    [
        pytest.param("a.txt", b"hello", [], "/nix/store", A_TXT, id="toFile"),
        pytest.param(
            "b.txt",
            f"refers to {A_TXT} and {BB}".encode(),
            [A_TXT, BB],
            "/nix/store",
            "/nix/store/vl06nywll5fqbphnpxmxdvy6xdsiplf1-b.txt",
            id="toFile-with-references",
        ),
        pytest.param(
            "b.txt",
            f"refers to {A_TXT} and {BB}".encode(),
            [BB, A_TXT, BB],
            "/nix/store",
            "/nix/store/vl06nywll5fqbphnpxmxdvy6xdsiplf1-b.txt",
            id="reference-order-and-duplicates-do-not-matter",
        ),
        pytest.param(
            "a.txt",
            b"hello",
            [],
            "/foo/store",
            "/foo/store/hjbj0f09bblx1nqd6crnm5llx3hx1sa9-a.txt",
            id="other-store-dir",
        ),
    ],
)
def test_make_text_path(
    name: str, content: bytes, refs: list[str], store_dir: str, expected: str
) -> None:
    assert make_text_path(name, content, refs, store_dir) == expected


HELLO = b"hello"


@pytest.mark.parametrize(
    ("method", "algo", "digest_hex", "name", "expected"),
    [
        pytest.param(
            "nar",
            "sha256",
            "f423dbc7e23e836f1a7c931276aa73ca771692d5ba68174b34c72b9f216ac821",
            "bb",
            BB,
            id="builtins.path-nar-sha256-is-source",
        ),
        pytest.param(
            "nar",
            "sha256",
            "0a430879c266f8b57f4092a0f935cf3facd48bbccde5760d4748ca405171e969",
            "fod-rec",
            "/nix/store/gzij78s1grbg6pjv95hvgzd92ksl52wn-fod-rec",
            id="fod-recursive-sha256",
        ),
        pytest.param(
            "flat",
            "sha256",
            hashlib.sha256(HELLO).hexdigest(),
            "fod-flat",
            "/nix/store/6dlq85ipg078m6vw6pc6w1pfylqpyp4s-fod-flat",
            id="fod-flat-sha256",
        ),
        pytest.param(
            "flat",
            "sha1",
            hashlib.sha1(HELLO).hexdigest(),
            "fod-sha1",
            "/nix/store/0wdkj79yj2s0cvzvnqvwzsdxc5hdxn0b-fod-sha1",
            id="fod-flat-sha1",
        ),
        pytest.param(
            "flat",
            "md5",
            hashlib.md5(HELLO).hexdigest(),
            "fod-md5",
            "/nix/store/hfxg6vxxpgfm0hrcbs50f5vr2j63y9ir-fod-md5",
            id="fod-flat-md5",
        ),
        pytest.param(
            "nar",
            "sha512",
            hashlib.sha512(HELLO).hexdigest(),
            "fod-sha512r",
            "/nix/store/yk6vnn0bflkqk1x5cr1lqm7wjhn2r4kx-fod-sha512r",
            id="fod-recursive-sha512-is-output-out",
        ),
        pytest.param(
            "nar",
            "sha1",
            hashlib.sha1(HELLO).hexdigest(),
            "fod-sha1r",
            "/nix/store/hgl3cj6z0hv2rw6kb2phgcr5w6xp326q-fod-sha1r",
            id="fod-recursive-sha1",
        ),
    ],
)
def test_make_fixed_output_path(
    method: str, algo: str, digest_hex: str, name: str, expected: str
) -> None:
    assert make_fixed_output_path(method, algo, bytes.fromhex(digest_hex), name) == expected


def test_make_fixed_output_path_text_is_a_text_path() -> None:
    digest = hashlib.sha256(b"hello").digest()
    assert make_fixed_output_path("text", "sha256", digest, "a.txt") == A_TXT


def test_make_fixed_output_path_rejects_impossible_combinations() -> None:
    digest = hashlib.sha256(b"").digest()
    with pytest.raises(ValueError):
        make_fixed_output_path("flat", "sha256", digest, "x", references=[A_TXT])
    with pytest.raises(ValueError):
        make_fixed_output_path("text", "sha1", digest[:20], "x")
    with pytest.raises(ValueError):
        make_fixed_output_path("zip", "sha256", digest, "x")


def test_make_store_path_checks_the_name() -> None:
    with pytest.raises(ParseError):
        make_store_path("text", b"\x00" * 32, "bad name")


def test_output_paths_and_names() -> None:
    assert output_path_name("hello", "out") == "hello"
    assert output_path_name("hello", "dev") == "hello-dev"
    path = make_output_path("dev", b"\x00" * 32, "hello")
    assert path.endswith("-hello-dev")
    assert is_store_path(path)


@pytest.mark.parametrize(
    ("output", "placeholder"),
    [
        ("out", "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"),
        ("lib", "/0sra2y18lr3h6j58qjm0w46yv36h1wjmilb09n8aimdpivdymscx"),
    ],
)
def test_hash_placeholder(output: str, placeholder: str) -> None:
    assert hash_placeholder(output) == placeholder


def test_upstream_placeholder_known_answer() -> None:
    drv = "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo.drv"
    expected = "/0c6rn30q4frawknapgwq386zq358m8r6msvywcvc89n6m5p2dgbz"
    assert upstream_placeholder(drv, "out") == expected
    assert upstream_placeholder(drv, "dev") != upstream_placeholder(drv, "out")


def test_upstream_placeholder_rejects_non_drv() -> None:
    with pytest.raises(ParseError):
        upstream_placeholder("/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo", "out")


def test_parse_store_path() -> None:
    assert parse_store_path(A_TXT) == ("wzflyq5q9kjg4p27yck2nnispnblxsnh", "a.txt")
    assert (
        parse_store_path("/foo/store/hjbj0f09bblx1nqd6crnm5llx3hx1sa9-a.txt", "/foo/store")[1]
        == "a.txt"
    )
    assert hash_part(A_TXT) == "wzflyq5q9kjg4p27yck2nnispnblxsnh"
    assert path_name(A_TXT) == "a.txt"
    assert basename(A_TXT) == "wzflyq5q9kjg4p27yck2nnispnblxsnh-a.txt"


H = "wzflyq5q9kjg4p27yck2nnispnblxsnh"
BAD_PATHS = [
    ("other-dir", f"/gnu/store/{H}-a", 0),
    ("relative", f"nix/store/{H}-a", 0),
    ("subpath", f"/nix/store/{H}-a/bin", 45),
    ("short-hash", "/nix/store/abc-a", 11),
    ("no-dash", f"/nix/store/{H}xa", 11),
    ("empty-name", f"/nix/store/{H}-", 11),
    ("hash-has-e", f"/nix/store/e{H[1:]}-a", 11),
    ("hash-uppercase", f"/nix/store/{H[:5]}A{H[6:]}-a", 16),
    ("name-has-space", f"/nix/store/{H}-a b", 45),
    ("name-has-slash-like-char", f"/nix/store/{H}-a:b", 45),
    ("name-is-dot", f"/nix/store/{H}-.", 44),
    ("name-is-dotdot-component", f"/nix/store/{H}-..-x", 44),
    ("name-too-long", f"/nix/store/{H}-" + "a" * 212, 44 + 211),
]


@pytest.mark.parametrize(("path", "position"), [pytest.param(*c[1:], id=c[0]) for c in BAD_PATHS])
def test_parse_store_path_rejects(path: str, position: int) -> None:
    with pytest.raises(ParseError) as info:
        parse_store_path(path)
    assert info.value.position == position
    assert not is_store_path(path)


@pytest.mark.parametrize("name", ["a", ".a", "..a", "a.", "A-Z_0+9?=", "x" * 211])
def test_check_name_accepts(name: str) -> None:
    check_name(name)
