"""laut v2 traces (JWS compact, Ed25519) and trace-store files, against laut's own data."""

from __future__ import annotations

import base64
import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from testkeys import CONFORMANCE, secret
from tracehook.errors import BadSignature, ParseError
from tracehook.trace import crypto, jws

TRACE_FILES = sorted((CONFORMANCE / "traces").iterdir())


def named(*rows: tuple[object, ...]) -> list[Any]:
    """Table rows whose first element is the case name, used as the test id."""
    return [pytest.param(*row, id=str(row[0])) for row in rows]


@cache
def public_by_kid() -> dict[str, crypto.PublicKey]:
    keys = {}
    for name in ("builderA", "builderB"):
        pk = crypto.read_public_key_file(CONFORMANCE / "keys" / f"{name}_key.public")
        keys[jws.laut_kid(pk.name, pk)] = pk
    return keys


def all_traces() -> list[tuple[str, str]]:
    return [
        (f.name, s) for f in TRACE_FILES for s in jws.parse_trace_file(f.read_bytes(), f.name)
    ]


def b64(obj: Any) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return jws.b64url_encode(raw)


GOOD_HEADER = {"alg": "EdDSA", "kid": "k:0"}
GOOD = f"{b64(GOOD_HEADER)}.{b64({'in': {}})}.{b64(bytes(64))}"


# --- laut's conformance traces -----------------------------------------------------------


def test_conformance_data_is_there() -> None:
    assert len(TRACE_FILES) == 97  # the stage1 links 0cc015dv... and f9cjc7lm... included
    assert len(all_traces()) == 194


def test_kids_are_the_two_builders() -> None:
    assert sorted(public_by_kid()) == [
        "builderA:bcda8d54470fea3b",
        "builderB:d9780179d7239d51",
    ]


@pytest.mark.parametrize("trace_file", TRACE_FILES, ids=[f.name for f in TRACE_FILES])
def test_every_trace_verifies_and_detects_a_changed_payload_byte(trace_file: Path) -> None:
    for compact in jws.parse_trace_file(trace_file.read_bytes()):
        parsed = jws.parse_compact(compact)
        kid = jws.kid_of(parsed)
        assert kid is not None
        pk = public_by_kid()[kid]
        jws.verify(parsed, pk)
        assert parsed.payload["in"]["rdrv_aterm_ca"] == trace_file.name

        # One byte of the payload changed (a digit of the output hash), re-encoded.
        raw = parsed.payload_bytes
        i = raw.index(b'"hash":"sha256:') + len(b'"hash":"sha256:')
        changed = raw[:i] + (b"1" if raw[i:i + 1] != b"1" else b"0") + raw[i + 1:]
        h64, _, s64 = compact.split(".")
        forged = jws.parse_compact(f"{h64}.{jws.b64url_encode(changed)}.{s64}")
        with pytest.raises(BadSignature):
            jws.verify(forged, pk)


def test_trace_signed_by_the_other_key_fails() -> None:
    _, compact = all_traces()[0]
    parsed = jws.parse_compact(compact)
    others = [pk for kid, pk in public_by_kid().items() if kid != jws.kid_of(parsed)]
    with pytest.raises(BadSignature):
        jws.verify(parsed, others[0])


def test_sign_compact_reproduces_laut_byte_for_byte() -> None:
    """laut (PyJWT) writes the header with sorted keys plus "typ":"JWT", and the payload
    as compact JSON in insertion order with non-ASCII escaped: we reproduce every trace."""
    for name, compact in all_traces():
        parsed = jws.parse_compact(compact)
        sk = secret("builderA" if jws.kid_of(parsed) == "builderA:bcda8d54470fea3b" else "builderB")
        header = jws.laut_header(sk.name, sk.public, typ_jwt=True)
        assert list(header.items()) == list(parsed.header.items()), name
        assert jws.sign_compact(sk, header, parsed.payload) == compact, name


def test_laut_header_shape() -> None:
    sk = secret("builderA")
    assert jws.laut_header(sk.name, sk.public) == {
        "alg": "EdDSA",
        "crv": "Ed25519",
        "detachHash": "nix-ca-path",
        "kid": "builderA:bcda8d54470fea3b",
        "type": "laut",
        "v": "2",
    }
    assert list(jws.laut_header(sk.name, sk.public)) == sorted(jws.laut_header("x", sk.public))


@pytest.mark.parametrize(
    ("builder", "flavor", "out_keys"),
    [
        ("builderA", "nix", ["hashAlgo", "method", "path", "hash"]),
        ("builderB", "lix", ["hashAlgo", "path", "hash"]),
    ],
)
def test_payload_shapes(builder: str, flavor: str, out_keys: list[str]) -> None:
    for _, compact in all_traces():
        parsed = jws.parse_compact(compact)
        if not (jws.kid_of(parsed) or "").startswith(builder + ":"):
            continue
        p = parsed.payload
        assert list(p) == ["in", "out", "builder"]
        assert list(p["in"]) == ["rdrv_json", "rdrv_aterm_ca", "debug"]
        assert list(p["out"]) == ["castore-entry", "nix"]
        assert list(p["builder"]) == ["rebuild_id", "store_root", "nix_flavor", "nix_version"]
        assert p["builder"]["nix_flavor"] == flavor
        for output in p["out"]["nix"].values():
            assert list(output) == out_keys
            assert output["hash"].startswith("sha256:") and len(output["hash"]) == 59


def test_sign_and_verify_our_own() -> None:
    sk = crypto.generate_secret_key("ours")
    payload = {"in": {"rdrv_aterm_ca": "x"}, "unicode": "won\u2019t"}
    compact = jws.sign_compact(sk, jws.laut_header(sk.name, sk.public), payload)
    parsed = jws.parse_compact(compact)
    assert parsed.payload == payload
    assert b"\\u2019" in parsed.payload_bytes
    assert parsed.compact == compact
    jws.verify(parsed, sk.public)
    with pytest.raises(BadSignature):
        jws.verify(parsed, secret("builderA").public)


def test_sign_compact_refuses_other_algorithms() -> None:
    with pytest.raises(ValueError):
        jws.sign_compact(secret("builderA"), {"alg": "none"}, {})


def test_verify_uses_transmitted_bytes_not_reserialization() -> None:
    """A signer with another JSON style (spaces, other key order) still verifies."""
    sk = secret("builderA")
    h = jws.b64url_encode(b'{ "v": "2", "alg": "EdDSA" }')
    p = jws.b64url_encode(b'{"b": 1,  "a": [1, 2]}')
    sig = crypto.sign(sk, f"{h}.{p}".encode())
    jws.verify(jws.parse_compact(f"{h}.{p}.{jws.b64url_encode(sig)}"), sk.public)


def test_bad_signature_length_is_bad_signature() -> None:
    with pytest.raises(BadSignature):
        jws.verify(jws.parse_compact(GOOD[:-4]), secret("builderA").public)


# --- malformed JWS --------------------------------------------------------------------------


H, P, S = GOOD.split(".")


@pytest.mark.parametrize(
    ("case", "compact", "needle"),
    named(
        ("two_parts", f"{H}.{P}", "3"),
        ("four_parts", f"{H}.{P}.{S}.{S}", "3"),
        ("empty_string", "", "3"),
        ("empty_header", f".{P}.{S}", "empty"),
        ("empty_payload", f"{H}..{S}", "empty"),
        ("padding", f"{H}.{P}.{S}==", "base64url"),
        ("std_alphabet", f"{H}.{P}.{S[:-2]}+/", "base64url"),
        ("bad_length", f"{H}.{P}.{S}AAA", "base64url"),
        ("non_canonical_bits", f"{H}.{P}.{S[:-1]}B", "non-canonical"),
        ("non_ascii", f"{H}.{P}.{S}\u00e9", "ASCII"),
        ("header_not_json", ".".join([b64(b"not json"), P, S]), "JSON"),
        ("header_array", f"{b64(['alg'])}.{P}.{S}", "object"),
        ("header_not_utf8", ".".join([b64(b'{"alg": "\xff"}'), P, S]), "UTF-8"),
        ("payload_not_json", ".".join([H, b64(b"{"), S]), "JSON"),
        ("payload_string", f"{H}.{b64('x')}.{S}", "object"),
        ("payload_nan", ".".join([H, b64(b'{"a": NaN}'), S]), "JSON"),
        ("duplicate_payload_key", ".".join([H, b64(b'{"a":1,"a":2}'), S]), "duplicate"),
        ("duplicate_alg", ".".join([b64(b'{"alg":"none","alg":"EdDSA"}'), P, S]), "duplicate"),
        ("missing_alg", f"{b64({'kid': 'k:0'})}.{P}.{S}", "alg"),
        ("alg_none", f"{b64({'alg': 'none'})}.{P}.{S}", "none"),
        ("alg_hs256", f"{b64({'alg': 'HS256'})}.{P}.{S}", "HS256"),
        ("alg_not_string", f"{b64({'alg': 1})}.{P}.{S}", "alg"),
        ("crv_ed448", f"{b64({'alg': 'EdDSA', 'crv': 'Ed448'})}.{P}.{S}", "Ed448"),
    ),
)
def test_parse_compact_errors(case: str, compact: str, needle: str) -> None:
    with pytest.raises(ParseError) as err:
        jws.parse_compact(compact)
    assert needle in str(err.value)


def test_typ_jwt_is_accepted_and_unknown_fields_kept() -> None:
    header = {"alg": "EdDSA", "typ": "JWT", "x-new": [1]}
    parsed = jws.parse_compact(f"{b64(header)}.{b64({'future': True})}.{S}")
    assert parsed.header == header
    assert parsed.payload == {"future": True}


@pytest.mark.parametrize(
    ("case", "kid", "expected"),
    named(
        ("plain", "builderA:bcda8d54470fea3b", ("builderA", "bcda8d54470fea3b")),
        ("colon_in_name", "a:b:0123", ("a:b", "0123")),
    ),
)
def test_split_kid(case: str, kid: str, expected: tuple[str, str]) -> None:
    assert jws.split_kid(kid) == expected


@pytest.mark.parametrize("kid", ["nocolon", ":0123", "name:"])
def test_split_kid_errors(kid: str) -> None:
    with pytest.raises(ParseError):
        jws.split_kid(kid)


def test_kid_of_missing_or_not_string() -> None:
    assert jws.kid_of(jws.parse_compact(f"{b64({'alg': 'EdDSA'})}.{P}.{S}")) is None
    assert jws.kid_of(jws.parse_compact(f"{b64({'alg': 'EdDSA', 'kid': 3})}.{P}.{S}")) is None


# --- trace-store files ----------------------------------------------------------------------


@pytest.mark.parametrize("trace_file", TRACE_FILES[:5], ids=[f.name for f in TRACE_FILES[:5]])
def test_render_trace_file_matches_laut(trace_file: Path) -> None:
    data = trace_file.read_bytes()
    assert jws.render_trace_file(jws.parse_trace_file(data)) == data


@pytest.mark.parametrize(
    ("case", "data", "needle"),
    named(
        ("not_json", b"{", "JSON"),
        ("not_utf8", b'{"signatures": ["\xff"]}', "UTF-8"),
        ("list", b"[]", "object"),
        ("no_signatures", b'{"sigs": []}', "signatures"),
        ("signatures_string", b'{"signatures": "a.b.c"}', "not a list"),
        ("no_list_among_duplicates", b'{"signatures": 1, "signatures": "x"}', "not a list"),
        ("nan", b'{"signatures": ["a", NaN]}', "JSON"),
        ("bom_then_garbage", b"\xef\xbb\xbf\x00", "JSON"),
    ),
)
def test_parse_trace_file_errors(case: str, data: bytes, needle: str) -> None:
    with pytest.raises(ParseError) as err:
        jws.parse_trace_file(data)
    assert needle in str(err.value)


def test_parse_trace_file_keeps_malformed_entries_for_the_caller() -> None:
    assert jws.parse_trace_file(b'{"signatures": ["junk", "a.b.c"], "x": 1}') == ["junk", "a.b.c"]


@pytest.mark.parametrize(
    ("case", "data", "signatures", "skipped"),
    named(
        # Each row once hid the valid entry beside the malformed one (issue 13.5).
        ("non_string_entry_beside_valid", b'{"signatures": [1, "a.b.c", {"x": 2}]}',
         ["a.b.c"], 2),
        ("utf8_bom", b'\xef\xbb\xbf{"signatures": ["a.b.c"]}', ["a.b.c"], 0),
        ("duplicate_signatures_key", b'{"signatures": ["a.b.c"], "signatures": ["d.e.f"]}',
         ["a.b.c", "d.e.f"], 0),
        ("duplicate_key_one_not_a_list", b'{"signatures": 7, "signatures": ["a.b.c"]}',
         ["a.b.c"], 1),
        ("duplicate_other_key", b'{"x": 1, "x": 2, "signatures": ["a.b.c"]}', ["a.b.c"], 0),
        ("nested_entry", b'{"signatures": [["a.b.c"], "d.e.f"]}', ["d.e.f"], 1),
    ),
)
def test_trace_file_entries_are_read_one_by_one(
    case: str, data: bytes, signatures: list[str], skipped: int
) -> None:
    read = jws.read_trace_file(data, "trace file x")
    assert (list(read.signatures), read.skipped) == (signatures, skipped)
    assert jws.parse_trace_file(data) == signatures


@pytest.mark.parametrize(
    ("case", "existing", "new", "merged"),
    named(
        ("append", ["a"], ["b"], ["a", "b"]),
        ("duplicate_new", ["a", "b"], ["b"], ["a", "b"]),
        ("keep_existing_order", ["c", "a"], ["b", "a"], ["c", "a", "b"]),
        ("empty_existing", [], ["a", "a"], ["a"]),
        ("nothing_new", ["a"], [], ["a"]),
        ("duplicates_within_existing", ["a", "a"], [], ["a"]),
    ),
)
def test_merge_signatures(
    case: str, existing: list[str], new: list[str], merged: list[str]
) -> None:
    assert jws.merge_signatures(existing, new) == merged


def test_b64url_round_trip() -> None:
    for n in range(0, 10):
        data = bytes(range(250, 250 - n, -1))
        enc = jws.b64url_encode(data)
        assert "=" not in enc
        assert enc == base64.urlsafe_b64encode(data).decode().rstrip("=")
        assert jws.b64url_decode(enc, "x") == data
