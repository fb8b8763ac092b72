"""Nix's base-32: known answers (checked against Nix 2.8's `nix hash to-base32`), errors,
and properties."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tracehook.errors import ParseError
from tracehook.nix import nixbase32

KNOWN = [
    pytest.param(
        hashlib.sha256(b"").digest(),
        "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
        id="sha256-empty",
    ),
    pytest.param(
        hashlib.sha256(b"abc").digest(),
        "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
        id="sha256-abc",
    ),
    pytest.param(
        bytes.fromhex("0123456789abcdef0123456789abcdef"), "7grnmqjrs54c0yzkdbi5kla8q1", id="md5"
    ),
    pytest.param(b"\xff" * 20, "z" * 32, id="sha1-all-ones"),
    pytest.param(
        hashlib.sha512(b"abc").digest(),
        "2gs8k559z4rlahfx0y688s49m2vvszylcikrfinm30ly9rak69236nkam5ydvly1ai7xac99vxfc4ii84hawjbk8"
        "76blyk1jfhkbbyx",
        id="sha512-abc",
    ),
    pytest.param(b"", "", id="empty"),
    pytest.param(b"\x01", "01", id="one-byte-low-bit"),
    pytest.param(b"\xff", "7z", id="one-byte-all-ones"),
    pytest.param(b"\x01\x00", "0001", id="first-byte-is-least-significant"),
]


@pytest.mark.parametrize(("data", "text"), KNOWN)
def test_known_answers(data: bytes, text: str) -> None:
    assert nixbase32.encode(data) == text
    assert nixbase32.decode(text) == data


@pytest.mark.parametrize(
    ("nbytes", "nchars"), [(0, 0), (1, 2), (16, 26), (20, 32), (32, 52), (64, 103)]
)
def test_hash_len(nbytes: int, nchars: int) -> None:
    assert nixbase32.hash_len(nbytes) == nchars
    assert nixbase32.byte_len(nchars) == nbytes


BAD = [
    pytest.param("0e", 1, id="letter-e-not-in-alphabet"),
    pytest.param("o0", 0, id="letter-o-not-in-alphabet"),
    pytest.param("0u", 1, id="letter-u-not-in-alphabet"),
    pytest.param("t0", 0, id="letter-t-not-in-alphabet"),
    pytest.param("0A", 1, id="uppercase"),
    pytest.param("0 ", 1, id="space"),
    pytest.param("0\u00e9", 1, id="non-ascii"),
    pytest.param("000", 3, id="length-of-no-byte-string"),
    pytest.param("0", 1, id="single-char"),
    pytest.param("80", 0, id="nonzero-padding-bits"),
    pytest.param("4" + "0" * 102, 0, id="sha512-padding-bits"),
]


@pytest.mark.parametrize(("text", "position"), BAD)
def test_decode_errors(text: str, position: int) -> None:
    with pytest.raises(ParseError) as info:
        nixbase32.decode(text)
    assert info.value.position == position
    assert info.value.what == "nix-base32 string"
    assert not nixbase32.is_valid(text)


def test_is_valid_checks_length() -> None:
    assert nixbase32.is_valid("z" * 32, 20)
    assert not nixbase32.is_valid("z" * 32, 32)


@given(st.binary(max_size=100))
def test_round_trip(data: bytes) -> None:
    text = nixbase32.encode(data)
    assert len(text) == nixbase32.hash_len(len(data))
    assert set(text) <= set(nixbase32.ALPHABET)
    assert nixbase32.decode(text) == data


@given(st.text(max_size=60) | st.text(alphabet=nixbase32.ALPHABET + "eotu", max_size=60))
def test_decode_arbitrary_text_round_trips_or_raises_parse_error(text: str) -> None:
    try:
        data = nixbase32.decode(text)
    except ParseError as e:
        assert e.position is not None
        assert 0 <= e.position <= len(text)
        return
    assert nixbase32.encode(data) == text
