"""Realisations (build-trace entries): Nix 2.8's v1 files and Nix 2.35's v2 layout."""

from __future__ import annotations

import json
from typing import Any

import pytest

from testkeys import secret
from tracehook.errors import BadSignature, ParseError
from tracehook.nix import realisation
from tracehook.nix.realisation import Realisation
from tracehook.trace import crypto

DEP_ID = "sha256:b1b2cac92c405f91195d4cfc04f73e1199a83beb26b5f129e593681c3bd8b28a!out"
TOP_ID = "sha256:177f3ed33ca7403b8f092c9fa8c304037b60a13dd3eed158acc32d6452ff6d55!out"

# realisations/<id>.doi as Nix 2.8.0 wrote them (`nix copy --to file://...` of two floating
# CA derivations, the second depending on the first, built with secret-key-files = builderA).
NIX_DEP = (
    '{"dependentRealisations":{},"id":"' + DEP_ID + '",'
    '"outPath":"x2zkyj0ghj688lbvj6kgnhxccjzfjdp9-cadep2","signatures":["builderA:5RafAS2dWaH2'
    '/oIDSBiMnaEqr+IORR7gIGrgiqY5e3FkN1lHWWE0CsxztPYwFmP54MzQSNStHW9bN+BJlHhOAQ=="]}'
)
NIX_TOP = (
    '{"dependentRealisations":{"' + DEP_ID + '":"x2zkyj0ghj688lbvj6kgnhxccjzfjdp9-cadep2"},'
    '"id":"' + TOP_ID + '","outPath":"m5jrdg7liwsx2hy49q0nz2lxhsqdfx24-catop2",'
    '"signatures":["builderA:RB/ZVD++gJgdNA5i0mX2CNNmgqfZb7EAHre0b6sefZVwXjebNH0X/OxjjQdq9LuMN'
    'ywR7+5BJuB82l0uiQWpBg=="]}'
)

DRV = "p86qf74wpff7bk4h4d9rm35nhrra923f-catop2.drv"
OUT = "m5jrdg7liwsx2hy49q0nz2lxhsqdfx24-catop2"


def named(*rows: tuple[object, ...]) -> list[Any]:
    """Table rows whose first element is the case name, used as the test id."""
    return [pytest.param(*row, id=str(row[0])) for row in rows]


def secret_a() -> crypto.SecretKey:
    return secret("builderA")


def trusted() -> dict[str, crypto.PublicKey]:
    return {"builderA": secret_a().public}


# --- v1, against Nix 2.8 ------------------------------------------------------------------


def test_parse_v1() -> None:
    r = realisation.parse_doi_v1(NIX_TOP)
    assert r.id == TOP_ID
    assert r.out_path == "m5jrdg7liwsx2hy49q0nz2lxhsqdfx24-catop2"
    assert r.dependent_realisations == {DEP_ID: "x2zkyj0ghj688lbvj6kgnhxccjzfjdp9-cadep2"}
    assert len(r.signatures) == 1 and r.signatures[0].startswith("builderA:")


@pytest.mark.parametrize("text", [NIX_DEP, NIX_TOP], ids=["dep", "top"])
def test_render_v1_reproduces_nix(text: str) -> None:
    assert realisation.render_doi_v1(realisation.parse_doi_v1(text.encode())) == text


@pytest.mark.parametrize("text", [NIX_DEP, NIX_TOP], ids=["dep", "top"])
def test_v1_signature_is_nix_signature(text: str) -> None:
    r = realisation.parse_doi_v1(text)
    fp = realisation.fingerprint_v1(r)
    assert '"signatures"' not in fp
    assert crypto.nix_verify(trusted(), fp, r.signatures[0]) is not None
    # Ed25519 is deterministic: signing Nix's fingerprint ourselves gives Nix's bytes.
    assert crypto.nix_sign(secret_a(), fp) == r.signatures[0]


def test_v1_fingerprint_known_answer() -> None:
    r = realisation.parse_doi_v1(NIX_DEP)
    assert realisation.fingerprint_v1(r) == (
        '{"dependentRealisations":{},"id":"' + DEP_ID + '",'
        '"outPath":"x2zkyj0ghj688lbvj6kgnhxccjzfjdp9-cadep2"}'
    )


@pytest.mark.parametrize(("case", "change"), named(
    ("other_out_path", {"out_path": "00000000000000000000000000000000-catop2"}),
    ("other_id", {"id": DEP_ID}),
    ("dropped_dependency", {"dependent_realisations": {}}),
))
def test_v1_tampering_is_bad_signature(case: str, change: dict[str, Any]) -> None:
    r = realisation.parse_doi_v1(NIX_TOP)
    forged = Realisation(**{**r.__dict__, **change})
    with pytest.raises(BadSignature):
        crypto.nix_verify(trusted(), realisation.fingerprint_v1(forged), r.signatures[0])


@pytest.mark.parametrize(("case", "data", "needle"), named(
    ("not_json", "{", "JSON"),
    ("not_utf8", b'{"id":"\xff"}', "UTF-8"),
    ("list", "[]", "object"),
    ("missing_id", NIX_DEP.replace('"id"', '"ID"'), "'id'"),
    ("bad_id", NIX_DEP.replace("sha256:b1b2", "sha256:B1B2"), "sha256:"),
    ("missing_out_path", NIX_DEP.replace('"outPath"', '"out"'), "outPath"),
    ("full_out_path", NIX_DEP.replace('"x2zk', '"/nix/store/x2zk'), "base name"),
    ("out_path_bad_hash", NIX_DEP.replace('"x2zk', '"e2zk'), "base name"),
    ("signatures_not_list", NIX_DEP.replace('["builderA', '"builderA').replace('=="]', '=="'),
     "not a list"),
    ("signature_without_name", NIX_DEP.replace('"builderA:', '"'), "key name"),
    ("signature_number", NIX_DEP.replace('"signatures":[', '"signatures":[1,'), "neither"),
    ("deps_not_object", NIX_DEP.replace('"dependentRealisations":{}', '"dependentRealisations":[]'),
     "dependentRealisations"),
    ("dep_value_not_string", NIX_TOP.replace('"x2zkyj0ghj688lbvj6kgnhxccjzfjdp9-cadep2"}', "1}"),
     "not a string"),
    ("dep_bad_id", NIX_TOP.replace(DEP_ID + '"', DEP_ID + '/.."'), "dependentRealisations"),
    ("duplicate_key", NIX_DEP[:-1] + ',"outPath":"x"}', "duplicate"),
))
def test_parse_v1_errors(case: str, data: str | bytes, needle: str) -> None:
    with pytest.raises(ParseError) as err:
        realisation.parse_doi_v1(data)
    assert needle in str(err.value)


# --- ids and keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "text", "expected"), named(
    ("out", DEP_ID, (DEP_ID[7:71], "out")),
    ("dev", DEP_ID[:-3] + "dev", (DEP_ID[7:71], "dev")),
    ("odd_but_valid", DEP_ID[:-3] + "a+b-c_d.e?f=g", (DEP_ID[7:71], "a+b-c_d.e?f=g")),
))
def test_parse_realisation_id(case: str, text: str, expected: tuple[str, str]) -> None:
    assert realisation.parse_realisation_id(text) == expected


HEX = DEP_ID[7:71]


@pytest.mark.parametrize(("case", "text"), named(
    ("empty", ""),
    ("no_output", "sha256:" + HEX),
    ("empty_output", "sha256:" + HEX + "!"),
    ("uppercase_hex", "sha256:" + HEX.upper() + "!out"),
    ("short_hex", "sha256:" + HEX[:-1] + "!out"),
    ("long_hex", "sha256:" + HEX + "0!out"),
    ("nix32_hash", "sha256:1xipzx7lgpc0vjv810yzxs61601f9bl4ah8fzqis7fykvhlnblx7!out"),
    ("sha512", "sha512:" + HEX + "!out"),
    ("no_algorithm", HEX + "!out"),
    ("leading_space", " sha256:" + HEX + "!out"),
    ("trailing_newline", "sha256:" + HEX + "!out\n"),
    ("slash_in_output", "sha256:" + HEX + "!out/../../etc"),
    ("dotdot_output", "sha256:" + HEX + "!.."),
    ("dot_output", "sha256:" + HEX + "!."),
    ("second_bang", "sha256:" + HEX + "!out!dev"),
    ("percent", "sha256:" + HEX + "!out%2f"),
    ("nul", "sha256:" + HEX + "!out\0"),
    ("non_ascii_digit", "sha256:" + HEX[:-1] + "\u0661!out"),
    ("too_long_output", "sha256:" + HEX + "!" + "o" * 212),
))
def test_parse_realisation_id_rejects(case: str, text: str) -> None:
    with pytest.raises(ParseError):
        realisation.parse_realisation_id(text)


def test_parse_build_trace_key() -> None:
    assert realisation.parse_build_trace_key(DRV, "out") == (DRV, "out")


@pytest.mark.parametrize(("case", "drv", "output"), named(
    ("not_drv", OUT, "out"),
    ("full_path", "/nix/store/" + DRV, "out"),
    ("bad_hash_char", "e" + DRV[1:], "out"),
    ("short_hash", DRV[1:], "out"),
    ("traversal_drv", "../" + DRV, "out"),
    ("dotdot_output", DRV, ".."),
    ("slash_output", DRV, "a/b"),
    ("empty_output", DRV, ""),
    ("empty_drv", "", "out"),
))
def test_parse_build_trace_key_rejects(case: str, drv: str, output: str) -> None:
    with pytest.raises(ParseError):
        realisation.parse_build_trace_key(drv, output)


# --- v2 (Nix 2.35 layout) ----------------------------------------------------------------------


def test_v2_round_trip_and_signature_shapes() -> None:
    data = json.dumps({
        "outPath": OUT,
        "signatures": [
            {"keyName": "cache-1", "sig": "AAAA"},
            "legacy:BBBB",
            {"keyName": "cache-1", "sig": "AAAA"},
        ],
    })
    r = realisation.parse_doi_v2(data, DRV, "out")
    assert r.id == f"{DRV}^out"
    assert r.out_path == OUT
    assert r.signatures == ("cache-1:AAAA", "legacy:BBBB")
    assert r.dependent_realisations == {}
    assert realisation.render_doi_v2(r) == (
        '{"outPath":"' + OUT + '","signatures":[{"keyName":"cache-1","sig":"AAAA"},'
        '{"keyName":"legacy","sig":"BBBB"}]}'
    )
    assert realisation.parse_doi_v2(realisation.render_doi_v2(r), DRV, "out") == r


def test_v2_accepts_full_drv_path_and_ignores_unknown_fields() -> None:
    data = '{"outPath":"' + OUT + '","signatures":[],"dependentRealisations":{"x":"y"}}'
    r = realisation.parse_doi_v2(data.encode(), "/nix/store/" + DRV, "out")
    assert r.id == f"{DRV}^out" and r.signatures == ()


def test_v2_fingerprint_shape_and_signing() -> None:
    fp = realisation.fingerprint_v2(DRV, "out", OUT)
    assert fp == (
        '{"key":{"drvPath":"' + DRV + '","outputName":"out"},"value":{"outPath":"' + OUT + '"}}'
    )
    sig = crypto.nix_sign(secret_a(), fp)
    r = realisation.parse_doi_v2(
        realisation.render_doi_v2(Realisation(f"{DRV}^out", OUT, (sig,))), DRV, "out"
    )
    assert crypto.nix_verify(trusted(), fp, r.signatures[0]) is not None
    with pytest.raises(BadSignature):
        crypto.nix_verify(trusted(), realisation.fingerprint_v2(DRV, "dev", OUT), sig)


@pytest.mark.parametrize(("case", "data", "drv", "output"), named(
    ("bad_key", '{"outPath":"' + OUT + '"}', OUT, "out"),
    ("not_json", "nope", DRV, "out"),
    ("missing_out_path", '{"signatures":[]}', DRV, "out"),
    ("sig_object_without_key_name", '{"outPath":"' + OUT + '","signatures":[{"sig":"A"}]}',
     DRV, "out"),
    ("sig_object_number", '{"outPath":"' + OUT + '","signatures":[{"keyName":1,"sig":"A"}]}',
     DRV, "out"),
    ("empty_key_name", '{"outPath":"' + OUT + '","signatures":[{"keyName":"","sig":"A"}]}',
     DRV, "out"),
))
def test_parse_v2_errors(case: str, data: str, drv: str, output: str) -> None:
    with pytest.raises(ParseError):
        realisation.parse_doi_v2(data, drv, output)
