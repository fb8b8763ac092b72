"""The gate's decision, directly: what the path must be and what upstreams said in, the
narinfo to serve (or why not) out. One row per attack an upstream can make."""

from __future__ import annotations

import hashlib

import pytest

from tracehook.errors import Refusal
from tracehook.gate.decide import (
    Expected,
    Fault,
    Fetched,
    Serve,
    check_realisations,
    choose_narinfo,
    relative_nar_url,
)
from tracehook.nix import nixbase32
from tracehook.nix.derivation import Derivation, DerivationOutput
from tracehook.nix.nar import format_nar_hash
from tracehook.nix.narinfo import NarInfo

STEP = "/nix/store/" + "s" * 32 + "-app.drv"
PATH = "/nix/store/" + "p" * 32 + "-app"
DEP = "/nix/store/" + "d" * 32 + "-dep"
EXTRA = "/nix/store/" + "x" * 32 + "-evil"
NAR = hashlib.sha256(b"nar").digest()
UP = ["http://mirror.test", "http://cache.test"]


def ni(path: str = PATH, nar: bytes = NAR, refs: tuple[str, ...] = (DEP,),
       url: str | None = "nar/" + "1" * 52 + ".nar.xz", ca: str | None = None) -> NarInfo:
    return NarInfo(store_path=path, url=url, compression="xz", nar_hash=format_nar_hash(nar),
                   nar_size=100, references=tuple(r.rsplit("/", 1)[1] for r in refs), ca=ca)


VERIFIED = Expected("verified", STEP, PATH, NAR, frozenset({DEP}))
UNATTESTED = Expected("verified", STEP, PATH, NAR, None)
CACHED = Expected("cache", STEP, PATH, NAR, frozenset({DEP}), source=UP[1])


def fetched(*answers: NarInfo | str | None) -> list[Fetched]:
    out = []
    for url, a in zip(UP, answers, strict=False):
        if isinstance(a, NarInfo) or a is None:
            out.append(Fetched(url, narinfo=a))
        elif a.startswith("fault"):
            out.append(Fetched(url, fault=a))
        else:
            out.append(Fetched(url, problem=a))
    return out


@pytest.mark.parametrize(("attack", "expected", "answers", "serves", "says"), [
    ("honest", VERIFIED, (ni(),), 0, None),
    ("second-upstream-when-first-lacks-it", VERIFIED, (None, ni()), 1, None),
    ("wrong-nar-hash", VERIFIED, (ni(nar=b"\0" * 32),), None, "serves NarHash"),
    ("dropped-reference", VERIFIED, (ni(refs=()),), None, "drops " + DEP),
    ("added-reference", VERIFIED, (ni(refs=(DEP, EXTRA)),), None, "adds " + EXTRA),
    ("references-unattested-pass", UNATTESTED, (ni(refs=()),), 0, None),
    ("mirror-cut-references-then-honest", VERIFIED, (ni(refs=()), ni()), 1, None),
    ("narinfo-of-another-path", VERIFIED, (ni(path=DEP),), None, "narinfo of " + DEP),
    ("absolute-url-to-another-host", VERIFIED,
     (ni(url="http://elsewhere.test/nar/" + "1" * 52 + ".nar.xz"),), None, "points away"),
    ("file-url", VERIFIED, (ni(url="file:///etc/shadow"),), None, "points away"),
    ("url-outside-nar", VERIFIED, (ni(url="../../etc/shadow"),), None, "not a NAR"),
    ("no-url", VERIFIED, (ni(url=None),), None, "names no URL"),
    ("absolute-url-on-same-upstream-made-relative", VERIFIED,
     (ni(url=UP[0] + "/nar/" + "1" * 52 + ".nar.xz"),), 0, None),
    ("malformed-answer", VERIFIED, ("malformed narinfo: no StorePath",), None, "malformed"),
    ("fault-only", VERIFIED, ("fault: refused",), "fault", "fault: refused"),
    ("fault-then-honest", VERIFIED, ("fault: refused", ni()), 1, None),
    ("wrong-answer-beats-fault", VERIFIED, ("fault: refused", ni(nar=b"\0" * 32)), None,
     "serves NarHash"),
    ("absent-everywhere", VERIFIED, (None, None), None, "not available upstream"),
    ("cache-signed-served-from-another-upstream", CACHED, (ni(), ni()), 1, None),
    ("cache-signed-only-elsewhere", CACHED, (ni(), None), None, "whose signature was checked"),
])
def test_choose_narinfo(attack: str, expected: Expected,
                        answers: tuple[NarInfo | str | None, ...],
                        serves: int | str | None, says: str | None) -> None:
    decision = choose_narinfo(expected, fetched(*answers), UP)
    if serves == "fault":
        assert isinstance(decision, Fault) and says is not None and says in decision.message
    elif serves is None:
        assert isinstance(decision, Refusal), decision
        assert says is not None and says in decision.reason
        assert decision.step == STEP
    else:
        assert isinstance(decision, Serve), decision
        assert decision.upstream == serves
        served = answers[serves]
        assert isinstance(served, NarInfo)
        # exactly the narinfo checked, with a relative NAR URL the gate serves
        assert decision.narinfo.references == served.references
        assert decision.narinfo.nar_hash == served.nar_hash
        assert decision.narinfo.url == "nar/" + "1" * 52 + ".nar.xz"


def _fod(method: str, algo: str, digest: bytes) -> Derivation:
    prefix = {"nar": "r:", "flat": ""}[method]
    out = DerivationOutput(PATH, f"{prefix}{algo}", digest.hex())
    return Derivation({"out": out}, {}, (), "x86_64-linux", "builtin:fetchurl", (),
                      {"name": "src"})


@pytest.mark.parametrize(("attack", "drv", "answer", "ok"), [
    ("fixed-flat-honest", _fod("flat", "sha256", NAR),
     ni(ca="fixed:sha256:" + nixbase32.encode(NAR)), True),
    ("fixed-flat-other-content", _fod("flat", "sha256", NAR),
     ni(ca="fixed:sha256:" + nixbase32.encode(b"\1" * 32)), False),
    ("fixed-recursive-honest", _fod("nar", "sha256", NAR),
     ni(ca="fixed:r:sha256:" + nixbase32.encode(NAR)), True),
    ("fixed-recursive-lying-nar-hash", _fod("nar", "sha256", NAR),
     ni(nar=b"\2" * 32, ca="fixed:r:sha256:" + nixbase32.encode(NAR)), False),
    ("fixed-no-ca-field", _fod("flat", "sha256", NAR), ni(), False),
])
def test_fixed_outputs_serve_only_their_pin(attack: str, drv: Derivation, answer: NarInfo,
                                            ok: bool) -> None:
    decision = choose_narinfo(Expected("fixed", STEP, PATH, fixed=drv), fetched(answer), UP)
    assert isinstance(decision, Serve if ok else Refusal), decision


@pytest.mark.parametrize(("url", "shown"), [
    ("nar/abc.nar", "nar/abc.nar"),
    ("nar/abc.nar.zst", "nar/abc.nar.zst"),
    ("http://mirror.test/nar/abc.nar", "nar/abc.nar"),
    ("http://mirror.test.evil/nar/abc.nar", None),
    ("HTTP://elsewhere/nar/abc.nar", None),
    ("nar/../abc.nar", None),
    ("/nar/abc.nar", None),
])
def test_relative_nar_url(url: str, shown: str | None) -> None:
    got = relative_nar_url(url, "http://mirror.test")
    assert (got if isinstance(got, str) else None) == shown


@pytest.mark.parametrize(("attack", "theirs", "refused"), [
    ("none-upstream", [], None),
    ("agrees", [("u", PATH.rsplit("/", 1)[1], None)], None),
    ("points-elsewhere", [("u", EXTRA.rsplit("/", 1)[1], None)], "points at " + EXTRA),
    ("malformed", [("u", None, "not JSON")], "malformed realisation"),
])
def test_upstream_realisations_must_agree(attack: str,
                                         theirs: list[tuple[str, str | None, str | None]],
                                         refused: str | None) -> None:
    got = check_realisations(PATH, "out", theirs, STEP)
    if refused is None:
        assert got is None
    else:
        assert got is not None and refused in got.reason and got.step == STEP
