"""The gate's answers as pure functions: a verdict and what the upstreams said in, a
decision out. No I/O, no clock, no logging: :mod:`tracehook.gate.service` fetches, calls
these, then signs, logs and answers.

A narinfo is served only when one upstream's narinfo for the path passes every check for
what the path must be (:class:`Expected`), and then exactly that narinfo is served (every
field the gate signs comes from it):

- its ``StorePath`` is the path, and it parses;
- for a path verified by traces: ``NarHash`` is the attested NAR hash, and ``References``
  are the attested references when the claims attest them;
- for a fixed output: ``CA`` is what the fixed-output derivation pins (and ``NarHash`` too,
  for a recursive sha256 pin);
- for a path accepted on a cache signature: it is the narinfo whose signature was checked
  (same upstream, same NarHash and References);
- ``URL`` is relative and names a NAR the gate serves itself (``nar/<file>``), or names a
  NAR on the same upstream (then it is made relative): Nix never fetches around the gate.

An upstream that could not be read is a fault only when no upstream passed and none
answered wrongly; a wrong answer is a refusal naming it (``cause="upstream"``), and a path
no upstream has is ``cause="absent"``: both depend on what the caches hold now, so the gate
never reuses them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from tracehook.errors import ParseError, Refusal
from tracehook.nix import nixbase32
from tracehook.nix.derivation import Derivation
from tracehook.nix.nar import format_nar_hash, parse_nar_hash
from tracehook.nix.narinfo import NarInfo
from tracehook.nix.refscan import Scanned
from tracehook.nix.storepath import STORE_DIR

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
NAR_URL = re.compile(r"nar/[0-9a-z]{1,128}\.nar(\.(xz|bz2|zst|zstd|lz4|lzip|br|gz))?")


@dataclass(frozen=True)
class Fetched:
    """What one upstream answered for a narinfo: the narinfo, or nothing (absent), or
    what was wrong with it (malformed), or a fault (could not read)."""

    url: str
    narinfo: NarInfo | None = None
    problem: str | None = None
    fault: str | None = None


@dataclass(frozen=True)
class Expected:
    """What the path must be, as the verdicts say."""

    kind: Literal["verified", "fixed", "cache"]
    step: str  # the build step (drv path) that produces it
    path: str
    nar_hash: bytes | None = None  # verified, cache
    references: frozenset[str] | None = None  # attested references (None: not attested)
    fixed: Derivation | None = None  # the fixed-output derivation, for kind "fixed"
    source: str | None = None  # for kind "cache": the upstream whose signature was checked


@dataclass(frozen=True)
class Serve:
    """Serve this upstream's narinfo (with ``narinfo.url`` made relative)."""

    upstream: int
    narinfo: NarInfo


@dataclass(frozen=True)
class Fault:
    message: str


Decision = Serve | Refusal | Fault


def choose_narinfo(expected: Expected, fetched: Sequence[Fetched],
                   upstream_urls: Sequence[str], store_dir: str = STORE_DIR) -> Decision:
    """The first upstream narinfo that passes every check, or why none does."""
    wrong: list[str] = []
    fault: str | None = None
    for index, got in enumerate(fetched):
        if got.fault is not None:
            fault = got.fault
            continue
        if got.problem is not None:
            wrong.append(got.problem)
            continue
        if got.narinfo is None:
            continue
        problem = narinfo_problem(expected, got, store_dir)
        if problem is None:
            url = relative_nar_url(got.narinfo.url, upstream_urls[index])
            if isinstance(url, str):  # (a relative URL, as most caches write it, as is)
                ni = got.narinfo if url == got.narinfo.url else replace(got.narinfo, url=url)
                return Serve(index, ni)
            problem = f"{got.url}: {url[0]}"
        wrong.append(problem)
    what = "fixed output " if expected.kind == "fixed" else ""
    if wrong:
        return Refusal(f"{what}{expected.path}: " + "; ".join(wrong), expected.step,
                       cause="upstream")
    if fault is not None:
        return Fault(fault)
    return Refusal(f"{what}{expected.path} is not available upstream (no binary cache has a "
                   "narinfo for it)", expected.step, cause="absent")


def narinfo_problem(expected: Expected, got: Fetched, store_dir: str = STORE_DIR) -> str | None:
    """What is wrong with one upstream's narinfo for the expected path, or None."""
    ni = got.narinfo
    assert ni is not None
    if ni.store_path != expected.path:
        return f"{got.url} serves the narinfo of {ni.store_path}"
    try:
        served = parse_nar_hash(ni.nar_hash)
    except ParseError as exc:
        return f"{got.url}: {exc.diagnostics()}"
    if expected.kind == "fixed":
        return _fixed_problem(expected, got.url, ni, served)
    assert expected.nar_hash is not None
    if expected.kind == "cache" and got.url != expected.source:
        return (f"{got.url} is not the cache whose signature was checked "
                f"({expected.source})")
    if served != expected.nar_hash:
        said = "the cache signed" if expected.kind == "cache" else "the trusted traces attest"
        return (f"{got.url} serves NarHash {format_nar_hash(served)}, {said} "
                f"{format_nar_hash(expected.nar_hash)}")
    if expected.references is not None:
        refs = frozenset(f"{store_dir}/{r}" for r in ni.references)
        if refs != expected.references:
            missing = sorted(expected.references - refs)
            extra = sorted(refs - expected.references)
            parts = ([f"drops {', '.join(missing)}"] if missing else []) + (
                [f"adds {', '.join(extra)}"] if extra else [])
            return f"{got.url} serves References that {' and '.join(parts)} (attested: " \
                   f"{len(expected.references)} reference(s))"
    return None


def _fixed_problem(expected: Expected, url: str, ni: NarInfo, served: bytes) -> str | None:
    drv = expected.fixed
    assert drv is not None
    out = drv.outputs["out"]
    prefix = {"nar": "r:", "git": "git:", "text": "text:"}.get(out.method, "")
    digest = bytes.fromhex(out.hash)
    ca = f"fixed:{prefix}{out.algo}:{nixbase32.encode(digest)}"
    if ni.ca != ca:
        return f"{url} serves CA {ni.ca!r}, the fixed-output derivation pins {ca!r}"
    if out.method == "nar" and out.algo == "sha256" and served != digest:
        return (f"{url} serves NarHash {ni.nar_hash}, the derivation pins "
                f"{format_nar_hash(digest)}")
    return None


def relative_nar_url(url: str | None, upstream_url: str) -> str | tuple[str]:
    """The NAR URL the gate serves for a narinfo's ``URL:``: it must be a relative
    ``nar/<file>``, or an absolute URL under the upstream it came from (made relative).
    Anything else (another host, a file: URL, a path outside ``nar/``) is refused, as a
    one-element tuple with the reason."""
    if url is None:
        return ("its narinfo names no URL",)
    rel = url
    if _SCHEME.match(url):
        base = upstream_url.rstrip("/") + "/"
        if not url.startswith(base):
            return (f"its narinfo's URL {url!r} points away from the gate; only relative "
                    "NAR URLs (or ones on the same upstream) are served",)
        rel = url[len(base):]
    if not NAR_URL.fullmatch(rel):
        return (f"its narinfo's URL {url!r} is not a NAR the gate serves "
                "(nar/<nix-base32>.nar[.<compression>])",)
    return rel


def check_realisations(path: str, output: str, theirs: Sequence[tuple[str, str | None, str | None]],
                       step: str, store_dir: str = STORE_DIR) -> Refusal | None:
    """Refusal if an upstream's realisation for the same id points at another path or is
    malformed (``theirs``: (upstream url, its out path basename, problem)): a cache that
    disagrees with the trusted traces is not used for this step."""
    for url, out_path, problem in theirs:
        if problem is not None:
            return Refusal(f"binary cache {url} serves a malformed realisation for {output}: "
                           f"{problem}", step, cause="upstream")
        if out_path is not None and f"{store_dir}/{out_path}" != path:
            return Refusal(f"binary cache {url}'s realisation of {output} points at "
                           f"{store_dir}/{out_path}, but the trusted traces attest {path}",
                           step, cause="upstream")
    return None


def scanned_problem(url: str, listed: frozenset[str], scanned: Scanned, nar_hash: bytes,
                    direct: frozenset[str]) -> str | None:
    """For a path whose claims attest no references (laut's traces): what is wrong with a
    narinfo's ``References`` against what its NAR names. Every listed reference must occur
    in the NAR (nothing added), and every direct input or own output that occurs in it must
    be listed (nothing dropped); the NAR scanned must be the attested one."""
    if scanned.nar_sha256 != nar_hash:
        return (f"{url} serves a NAR whose hash is {format_nar_hash(scanned.nar_sha256)}, "
                f"the trusted traces attest {format_nar_hash(nar_hash)}")
    added = sorted(listed - scanned.found)
    dropped = sorted((scanned.found & direct) - listed)
    parts = ([f"adds {', '.join(added)}, which its content does not name"] if added else []) \
        + ([f"drops {', '.join(dropped)}, which its content names"] if dropped else [])
    return f"{url} serves References that {' and '.join(parts)}" if parts else None
