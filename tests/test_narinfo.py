"""narinfo parsing, rendering and fingerprints, against narinfos written by Nix 2.8."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from testkeys import KEYS
from tracehook.errors import BadSignature, ParseError
from tracehook.nix import narinfo
from tracehook.trace import crypto

# Written by `nix copy --to file://...` (Nix 2.8.0), signed with the conformance key
# builderA: a file added with `nix-store --add` (content-addressed, no references) ...
SIG_HELLO = (
    "builderA:KroDmK5fFy24FclF8QCGfNA412bSgYs73LqWOfuLPml9Q7s7JpmQP9kgDMu40iHKGMeT50USDQQaa"
    "++vQyX6Dw=="
)
SIG_WITHREF = (
    "builderA:fTy6pDDkpH5tqyXO8UNYeZbGLnYH0qPfcUo7EzCZgSCNnbRmKPB3IhjL2N0/7HALhsfynk/2rTyVs"
    "11mRDglCA=="
)
NIX_HELLO = f"""\
StorePath: /nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt
URL: nar/04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw.nar
Compression: none
FileHash: sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw
FileSize: 120
NarHash: sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw
NarSize: 120
References: 
Sig: {SIG_HELLO}
CA: fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw
"""  # noqa: W291 (Nix writes "References: " with a trailing space)

# ... and a built output that refers to two text files and to itself.
NIX_WITHREF = f"""\
StorePath: /nix/store/6m2c908sf5xw7h2pnabbpw3861j10bxq-withref
URL: nar/17kvbfkifwdzys5785x3bf8d3l5cl6p26kh7wn4whjmawvnd73lb.nar
Compression: none
FileHash: sha256:17kvbfkifwdzys5785x3bf8d3l5cl6p26kh7wn4whjmawvnd73lb
FileSize: 272
NarHash: sha256:17kvbfkifwdzys5785x3bf8d3l5cl6p26kh7wn4whjmawvnd73lb
NarSize: 272
References: 35709yg676wj0h2n0nn19xr309m8jcxv-b.txt 6m2c908sf5xw7h2pnabbpw3861j10bxq-withref \
acp7lchnb8dmmb0bnbgzwk62plkn280l-zz-a.txt
Deriver: l74v2248h9aaz29cpc2dm106gf93glij-withref.drv
Sig: {SIG_WITHREF}
"""

WITHREF_FINGERPRINT = (
    "1;/nix/store/6m2c908sf5xw7h2pnabbpw3861j10bxq-withref;"
    "sha256:17kvbfkifwdzys5785x3bf8d3l5cl6p26kh7wn4whjmawvnd73lb;272;"
    "/nix/store/35709yg676wj0h2n0nn19xr309m8jcxv-b.txt,"
    "/nix/store/6m2c908sf5xw7h2pnabbpw3861j10bxq-withref,"
    "/nix/store/acp7lchnb8dmmb0bnbgzwk62plkn280l-zz-a.txt"
)


def named(*rows: tuple[object, ...]) -> list[Any]:
    """Table rows whose first element is the case name, used as the test id."""
    return [pytest.param(*row, id=str(row[0])) for row in rows]


def trusted() -> dict[str, crypto.PublicKey]:
    pk = crypto.read_public_key_file(KEYS / "builderA_key.public")
    return {pk.name: pk}


def test_parse_fields() -> None:
    ni = narinfo.parse(NIX_WITHREF)
    assert ni.store_path == "/nix/store/6m2c908sf5xw7h2pnabbpw3861j10bxq-withref"
    assert ni.url == "nar/17kvbfkifwdzys5785x3bf8d3l5cl6p26kh7wn4whjmawvnd73lb.nar"
    assert ni.compression == "none"
    assert ni.file_size == 272 and ni.nar_size == 272
    assert ni.nar_hash == "sha256:17kvbfkifwdzys5785x3bf8d3l5cl6p26kh7wn4whjmawvnd73lb"
    assert len(ni.references) == 3 and ni.references[0].endswith("-b.txt")
    assert ni.deriver == "l74v2248h9aaz29cpc2dm106gf93glij-withref.drv"
    assert len(ni.sigs) == 1 and ni.ca is None and ni.unknown == ()
    hello = narinfo.parse(NIX_HELLO)
    assert hello.references == () and hello.deriver is None
    assert hello.ca == "fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"


@pytest.mark.parametrize("text", [NIX_HELLO, NIX_WITHREF], ids=["hello", "withref"])
def test_render_reproduces_nix(text: str) -> None:
    assert narinfo.render(narinfo.parse(text)) == text


@pytest.mark.parametrize("text", [NIX_HELLO, NIX_WITHREF], ids=["hello", "withref"])
def test_render_with_another_url_and_sigs_is_the_copy_rendered(text: str) -> None:
    """The gate's answer renders the upstream narinfo with its own URL and Sig lines: the
    same text as a copy of the narinfo with them."""
    ni = narinfo.parse(text)
    for url, sigs in (("file:///c/nar/x.nar", None), (None, ("k:c2ln",)),
                      ("file:///c/nar/x.nar", ("k:c2ln", "j:c2ln")), (None, None)):
        copy = dataclasses.replace(ni, url=ni.url if url is None else url,
                                   sigs=ni.sigs if sigs is None else sigs)
        assert narinfo.render(ni, url=url, sigs=sigs) == narinfo.render(copy)


@pytest.mark.parametrize("text", [NIX_HELLO, NIX_WITHREF], ids=["hello", "withref"])
def test_nix_signatures_verify_over_our_fingerprint(text: str) -> None:
    ni = narinfo.parse(text)
    for sig in ni.sigs:
        assert crypto.nix_verify(trusted(), narinfo.fingerprint(ni), sig) is not None


def test_fingerprint_known_answer() -> None:
    assert narinfo.fingerprint(narinfo.parse(NIX_WITHREF)) == WITHREF_FINGERPRINT


def test_fingerprint_sorts_references_and_normalises_hash() -> None:
    ni = narinfo.parse(NIX_WITHREF)
    shuffled = dataclasses.replace(
        ni,
        references=tuple(reversed(ni.references)),
        nar_hash="sha256:" + "7fd7bc9c1bc3b2ea10d3a4ed4a8fd8a0c77ebd2e57d6b1e3ab4c25d1e5eb0d0e",
    )
    fp = narinfo.fingerprint(shuffled)
    assert fp.split(";")[4] == WITHREF_FINGERPRINT.split(";")[4]
    assert fp.split(";")[2].startswith("sha256:") and len(fp.split(";")[2]) == 59


def test_tampered_narinfo_fails() -> None:
    ni = narinfo.parse(NIX_WITHREF)
    forged = dataclasses.replace(ni, references=ni.references[:2])
    with pytest.raises(BadSignature):
        crypto.nix_verify(trusted(), narinfo.fingerprint(forged), ni.sigs[0])


def test_with_signature() -> None:
    ni = narinfo.parse(NIX_HELLO)
    sk = crypto.generate_secret_key("mine")
    sig = crypto.nix_sign(sk, narinfo.fingerprint(ni))
    signed = narinfo.with_signature(ni, sig)
    assert signed.sigs == (*ni.sigs, sig)
    assert narinfo.with_signature(signed, sig) is signed
    rendered = narinfo.render(signed)
    assert rendered.index("Sig: mine:") < rendered.index("CA: ")
    assert crypto.nix_verify({"mine": sk.public}, narinfo.fingerprint(signed), sig) == sk.public


def test_unknown_fields_are_kept_in_order() -> None:
    text = NIX_HELLO + "X-Zeta: 1\nAlpha: two words\nX-Zeta: 3\n"
    ni = narinfo.parse(text)
    assert ni.unknown == (("X-Zeta", "1"), ("Alpha", "two words"), ("X-Zeta", "3"))
    assert narinfo.render(ni) == text


def test_system_and_multiple_sigs() -> None:
    text = NIX_WITHREF + "Sig: other:AAAA\n"
    text = text.replace("Sig: builderA", "System: x86_64-linux\nSig: builderA")
    ni = narinfo.parse(text)
    assert ni.system == "x86_64-linux" and len(ni.sigs) == 2
    assert narinfo.render(ni) == text


def _without(field: str) -> str:
    return "".join(line + "\n" for line in NIX_HELLO.splitlines() if not line.startswith(field))


@pytest.mark.parametrize(("case", "text", "needle"), named(
    ("empty", "", "missing StorePath"),
    ("missing_store_path", _without("StorePath"), "missing StorePath"),
    ("missing_nar_hash", _without("NarHash"), "missing NarHash"),
    ("missing_nar_size", _without("NarSize"), "missing NarSize"),
    ("nar_size_not_int", NIX_HELLO.replace("NarSize: 120", "NarSize: 12a"), "NarSize"),
    ("nar_size_negative", NIX_HELLO.replace("NarSize: 120", "NarSize: -1"), "NarSize"),
    ("nar_size_unicode_digit", NIX_HELLO.replace("NarSize: 120", "NarSize: \u0661"), "NarSize"),
    ("file_size_not_int", NIX_HELLO.replace("FileSize: 120", "FileSize: x"), "FileSize"),
    ("duplicate_nar_hash", NIX_HELLO + "NarHash: sha256:" + "0" * 52 + "\n", "duplicate"),
    ("duplicate_store_path", NIX_HELLO + "StorePath: /nix/store/x\n", "duplicate"),
    ("duplicate_references", NIX_HELLO + "References: \n", "duplicate"),
    ("no_colon", NIX_HELLO + "garbage\n", "Key: value"),
    ("md5_nar_hash", NIX_HELLO.replace("NarHash: sha256:", "NarHash: md5:"), "NarHash"),
    ("short_nar_hash", NIX_HELLO.replace("0dqw\nNarSize", "0dq\nNarSize"), "NarHash"),
))
def test_parse_errors(case: str, text: str, needle: str) -> None:
    with pytest.raises(ParseError) as err:
        narinfo.parse(text, what="test.narinfo")
    assert needle in err.value.message
    assert "test.narinfo" in str(err.value)


@pytest.mark.parametrize(("case", "change"), named(
    ("other_store_dir", {"store_path": "/gnu/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt"}),
    ("zero_nar_size", {"nar_size": 0}),
    ("bad_reference", {"references": ("../../etc/passwd",)}),
))
def test_fingerprint_refuses(case: str, change: dict[str, Any]) -> None:
    ni = dataclasses.replace(narinfo.parse(NIX_HELLO), **change)
    with pytest.raises(ParseError):
        narinfo.fingerprint(ni)


def test_fingerprint_other_store_dir() -> None:
    ni = dataclasses.replace(
        narinfo.parse(NIX_WITHREF),
        store_path="/gnu/store/6m2c908sf5xw7h2pnabbpw3861j10bxq-withref",
    )
    assert "/gnu/store/35709yg676wj0h2n0nn19xr309m8jcxv-b.txt," in narinfo.fingerprint(
        ni, store_dir="/gnu/store"
    )
