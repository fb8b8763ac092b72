"""What the gate checks upstream: narinfos against attested NAR hashes or fixed-output
pins, and upstream realisations against the verified output. No decisions of its own: each
function returns what it found or raises :class:`Refusal` (the answer is 404, with the
reason) or :class:`~tracehook.stores.binarycache.UpstreamFault` (502).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tracehook.errors import ParseError, Refusal, UpstreamFault
from tracehook.nix import nixbase32, realisation
from tracehook.nix.derivation import Derivation
from tracehook.nix.nar import format_nar_hash, parse_nar_hash
from tracehook.nix.narinfo import NarInfo
from tracehook.nix.storepath import STORE_DIR, basename
from tracehook.stores.binarycache import Upstream, fetch_narinfo

NarinfoCheck = Callable[[Upstream, NarInfo], str | None]


def _first_acceptable(
    upstreams: Sequence[Upstream], path: str, what: str, check: NarinfoCheck
) -> tuple[int, NarInfo]:
    """The first upstream narinfo for ``path`` that ``check`` finds nothing wrong with.

    Refusal naming every wrong answer if some upstream answered wrongly; the last
    UpstreamFault if none answered and one failed; Refusal "none has it" otherwise.
    """
    wrong: list[str] = []
    fault: UpstreamFault | None = None
    for i, up in enumerate(upstreams):
        try:
            ni = upstream_narinfo(up, path)
        except UpstreamFault as exc:
            fault = exc
            continue
        except Refusal as exc:
            wrong.append(exc.reason)
            continue
        if ni is None:
            continue
        try:
            problem = check(up, ni)
        except ParseError as exc:
            problem = f"{up.url}: {exc.diagnostics()}"
        if problem is None:
            return i, ni
        wrong.append(problem)
    if wrong:
        raise Refusal(f"{what}{path}: " + "; ".join(wrong))
    if fault is not None:
        raise fault
    raise Refusal(f"no upstream has a narinfo for {path}")


def find_narinfo(
    upstreams: Sequence[Upstream], path: str, nar_hash: bytes
) -> tuple[int, NarInfo]:
    """The first upstream narinfo for ``path`` whose NarHash is ``nar_hash``."""

    def check(up: Upstream, ni: NarInfo) -> str | None:
        got = parse_nar_hash(ni.nar_hash)
        if got == nar_hash:
            return None
        return (f"{up.url} serves NarHash {format_nar_hash(got)}, the trusted traces attest "
                f"{format_nar_hash(nar_hash)}")

    return _first_acceptable(upstreams, path, "", check)


def find_fixed(
    upstreams: Sequence[Upstream], path: str, drv: Derivation
) -> tuple[int, NarInfo]:
    """The first upstream narinfo for a fixed output whose ``CA`` (and, for a recursive
    sha256 pin, NarHash) is the one the fixed-output derivation pins."""
    out = drv.outputs["out"]
    prefix = {"nar": "r:", "git": "git:", "text": "text:"}.get(out.method, "")
    digest = bytes.fromhex(out.hash)
    ca = f"fixed:{prefix}{out.algo}:{nixbase32.encode(digest)}"

    def check(up: Upstream, ni: NarInfo) -> str | None:
        if ni.ca != ca:
            return f"{up.url} serves CA {ni.ca!r}, the fixed-output derivation pins {ca!r}"
        pinned_nar = out.method == "nar" and out.algo == "sha256"
        if pinned_nar and parse_nar_hash(ni.nar_hash) != digest:
            return (f"{up.url} serves NarHash {ni.nar_hash}, the derivation pins "
                    f"{format_nar_hash(digest)}")
        return None

    return _first_acceptable(upstreams, path, "fixed output ", check)


def upstream_narinfo(up: Upstream, path: str) -> NarInfo | None:
    """:func:`~tracehook.stores.binarycache.fetch_narinfo`, a malformed answer being a Refusal."""
    try:
        return fetch_narinfo(up, path)
    except ParseError as exc:
        raise Refusal(exc.diagnostics()) from None


def check_upstream_realisation(
    upstreams: Sequence[Upstream], drv_path: str, output: str, rid: str | None, path: str,
    step_drv: str, store_dir: str = STORE_DIR,
) -> None:
    """Refusal if an upstream's realisation for the same id points at another path (or is
    malformed): a cache that disagrees with the trusted traces is not used for this step."""
    rel = (f"realisations/{rid}.doi" if rid is not None
           else f"build-trace-v2/{basename(drv_path)}/{output}.doi")
    for up in upstreams:
        data = up.get(rel)
        if data is None:
            continue
        try:
            if rid is not None:
                theirs = realisation.parse_doi_v1(data, f"realisation from {up.url}")
            else:
                theirs = realisation.parse_doi_v2(data, drv_path, output)
        except ParseError as exc:
            raise Refusal(f"upstream {up.url} serves a malformed realisation for "
                           f"{output}: {exc.diagnostics()}", step_drv) from None
        if theirs.out_path != basename(path):
            raise Refusal(
                f"upstream {up.url}'s realisation of {output} points at "
                f"{store_dir}/{theirs.out_path}, but the trusted traces attest {path}",
                step_drv)

