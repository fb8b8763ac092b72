"""The gate's request heads: the one-match reading of a plain head (what Nix's curl sends)
gives exactly what the line-by-line reading gives, for every head, and the line-by-line
reading answers what is malformed or over a limit."""

from __future__ import annotations

import itertools
import random

import pytest

from tracehook.gate.front import (
    _PLAIN_HEAD,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    _parse_lines,
    _Request,
    parse_head,
)
from tracehook.gate.service import Answer

NIX = (b"GET /realisations/sha256:" + b"a" * 64 + b"!out.doi HTTP/1.1\r\n"
       b"Host: 127.0.0.1:34567\r\nUser-Agent: curl/8.9.1 Nix/2.26.3\r\nAccept: */*\r\n\r\n")


def test_a_plain_head_as_nix_sends_it() -> None:
    got = parse_head(bytearray(NIX + b"GET /next"))  # (the next request already behind it)
    assert got == (_Request("GET", "/realisations/sha256:" + "a" * 64 + "!out.doi", True,
                            False), len(NIX))


@pytest.mark.parametrize(("head", "expected"), [
    (b"GET /x HTTP/1.0\r\n\r\n", _Request("GET", "/x", False, False)),
    (b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", _Request("GET", "/x", True, False)),
    (b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n", _Request("GET", "/x", False, False)),
    (b"GET /x HTTP/1.1\r\nCONTENT-LENGTH: 3\r\n\r\n", _Request("GET", "/x", True, True)),
    (b"GET /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n", _Request("GET", "/x", True, False)),
    (b"GET /x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n", _Request("GET", "/x", True, True)),
    (b"HEAD /x HTTP/1.1\nHost: a\n\n", _Request("HEAD", "/x", True, False)),  # bare newlines
    (b"GET  /x  HTTP/1.1\r\n\r\n", _Request("GET", "/x", True, False)),  # more spaces
])
def test_what_a_head_says(head: bytes, expected: _Request) -> None:
    assert parse_head(bytearray(head)) == (expected, len(head))


@pytest.mark.parametrize(("head", "status"), [
    (b"GET /x\r\n\r\n", 400),
    (b"GET /x FTP/1.1\r\n\r\n", 400),
    (b"GET /x HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET /" + b"a" * MAX_REQUEST_LINE + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET /x HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADERS + 1))
     + b"\r\n", 431),
    (b"GET /x HTTP/1.1\r\nX-Long: " + b"v" * 9000 + b"\r\n\r\n", 431),
])
def test_a_malformed_head_is_answered(head: bytes, status: int) -> None:
    got = parse_head(bytearray(head))
    assert got is not None and isinstance(got[0], Answer) and got[0].status == status


def test_incomplete_heads_wait() -> None:
    for cut in range(len(NIX)):
        assert parse_head(bytearray(NIX[:cut])) is None, cut


def _heads(rng: random.Random) -> list[bytes]:
    methods = [b"GET", b"HEAD", b"POST", b"G\xe9T", b""]
    targets = [b"/x", b"/nix-cache-info", b"/\xff\x00", b"/a b", b""]
    versions = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1x", b"http/1.1"]
    fields = [b"Host: h", b"Accept: */*", b"Connection: close", b"connection:keep-alive",
              b"Content-Length: 0", b"Content-Length: 7", b"content-length:", b" X: y",
              b"Transfer-Encoding: chunked", b"X-Y: contains: colons", b":empty name",
              b"no colon", b"X-Z: \rvalue", b"User-Agent: connection-keeper", b"",
              b"X-Long: " + b"v" * 8200]
    ends = [b"\r\n", b"\n"]
    good = [b"Host: 127.0.0.1:1", b"Accept: */*", b"User-Agent: curl/8.9.1 Nix/2.26.3",
            b"X-Y: contains: colons", b"X-Empty:", b"Connection: close", b"Content-Length: 0"]
    heads = []
    for _ in range(1500):  # plain heads, or nearly
        count = rng.choice([0, 1, 3, 5, MAX_HEADERS - 1, MAX_HEADERS, MAX_HEADERS + 1])
        names = [rng.choice(good[:5]) if rng.random() < 0.97 else rng.choice(good)
                 for _ in range(count)]
        head = b"".join(x + b"\r\n" for x in [
            b" ".join([rng.choice(methods[:3]), rng.choice(targets[:3]),
                       rng.choice(versions[:2])]), *names]) + b"\r\n"
        heads.append(head + rng.choice([b"", b"GET /next HTTP/1.1\r\n"]))
    for _ in range(3000):
        sp = rng.choice([b" ", b"  ", b"\t"])
        line = sp.join([rng.choice(methods), rng.choice(targets), rng.choice(versions)])
        end = rng.choice(ends)
        lines = [line] + [rng.choice(fields) for _ in range(rng.choice([0, 1, 3, 63, 64, 65]))]
        head = b"".join(x + (end if rng.random() < 0.9 else rng.choice(ends)) for x in lines)
        head += rng.choice([b"\r\n", b"\n", b""]) + rng.choice([b"", b"GET /next HTTP/1.1\r\n"])
        heads.append(head)
    return heads


def test_the_one_match_reading_is_the_line_by_line_one() -> None:
    """Differential: for thousands of heads, well-formed or not, complete or cut short,
    both readings give the same request (or answer) and length, or both wait."""
    rng = random.Random(14)
    heads = _heads(rng)
    heads += [NIX[:cut] + tail for cut, tail in itertools.product(
        range(0, len(NIX) + 1, 7), [b"", b"\r\n", b"\n", b"X"])]
    for head in heads:
        assert parse_head(bytearray(head)) == _parse_lines(bytearray(head)), head[:120]
    plain = [h for h in heads if _PLAIN_HEAD.match(h, 0, MAX_REQUEST_LINE)]
    assert len(plain) > 1000  # (both readings were held against each other on many)
