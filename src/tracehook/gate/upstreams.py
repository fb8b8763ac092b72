"""What the gate reads from its upstream binary caches, gathered for a decision.

Fetching only: every upstream's answer is kept as it came (a narinfo, nothing, a malformed
answer, a fault) for :mod:`tracehook.gate.decide` to judge. Nothing here decides.
"""

from __future__ import annotations

from collections.abc import Sequence

from tracehook.errors import ParseError, UpstreamFault
from tracehook.gate.decide import Fetched
from tracehook.nix import realisation
from tracehook.nix.storepath import basename
from tracehook.stores.binarycache import Upstream, fetch_narinfo


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
