"""What the gate reads from its upstream binary caches, gathered for a decision.

Fetching only: every upstream's answer is kept as it came (a narinfo, nothing, a malformed
answer, a fault) for :mod:`tracehook.gate.decide` to judge. Nothing here decides.
"""

from __future__ import annotations

import contextlib
import hashlib
import marshal
from collections.abc import Sequence

from tracehook.errors import ParseError, UpstreamFault
from tracehook.gate import nowait
from tracehook.gate.decide import Fetched
from tracehook.nix import realisation
from tracehook.nix.refscan import Scanned, scan
from tracehook.nix.storepath import basename
from tracehook.stores.binarycache import Upstream, fetch_narinfo
from tracehook.stores.factcache import FactCache
from tracehook.stores.readlog import note_opaque


def fetch_narinfos(upstreams: Sequence[Upstream], path: str) -> list[Fetched]:
    """Every upstream's narinfo for ``path``, in the upstreams' order."""
    found: list[Fetched] = []
    for up in upstreams:
        try:
            found.append(Fetched(up.url, narinfo=fetch_narinfo(up, path)))
        except UpstreamFault as exc:
            found.append(Fetched(up.url, fault=exc.diagnostics()))
        except ParseError as exc:
            found.append(Fetched(up.url, problem=exc.diagnostics()))
    return found


def fetch_realisations(
    upstreams: Sequence[Upstream], drv_path: str, output: str, rid: str | None
) -> list[tuple[str, str | None, str | None]]:
    """Every upstream's realisation of the same output: (url, out path basename or None,
    what is malformed about it or None). UpstreamFault if one cannot be read."""
    rel = (f"realisations/{rid}.doi" if rid is not None
           else f"build-trace-v2/{basename(drv_path)}/{output}.doi")
    found: list[tuple[str, str | None, str | None]] = []
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
            found.append((up.url, None, exc.diagnostics()))
            continue
        found.append((up.url, theirs.out_path, None))
    return found


def scan_nar(upstream: Upstream, url: str, compression: str | None,
             candidates: frozenset[str], nar_hash: bytes, facts: FactCache | None
             ) -> Scanned | None:
    """The NAR at ``url`` scanned for ``candidates`` (remembered in the persistent cache by
    NAR hash and candidates: the same bytes name the same paths); None when the upstream
    does not have it. ParseError when it cannot be read as a NAR here."""
    fact = hashlib.sha256(nar_hash + "\n".join(sorted(candidates)).encode()).digest()
    if facts is not None:
        data = facts.get("refs", fact)
        if data is not None:
            with contextlib.suppress(ValueError, TypeError, EOFError):
                found, size = marshal.loads(data)
                return Scanned(frozenset(found), nar_hash, size)
    nowait.check()  # reading a whole NAR: not in the HTTP front's thread
    note_opaque(f"scanned {url}")  # a decision from a NAR's bytes: not kept for a restart
    body = upstream.open(url)
    if body is None:
        return None
    try:
        scanned = scan(body.chunks(), compression, candidates)
    finally:
        body.close()
    if facts is not None and scanned.nar_sha256 == nar_hash:
        facts.put("refs", fact, marshal.dumps((tuple(sorted(scanned.found)), scanned.nar_size)))
    return scanned
