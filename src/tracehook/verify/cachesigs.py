"""Cache signatures: a build step accepted on a binary cache's narinfo signature (POLICY.md).

The policy's ``narinfo-key`` elements trust what a cache signed, as an alternative to the
whole trace requirement. A step's output is accepted on a cache signature when:

- for an output whose path the derivation fixes (input-addressed), the cache's narinfo for
  that path carries a ``Sig:`` by a cache key of the policy over ``narinfo.fingerprint``;
- for an output whose path is not fixed (floating content-addressed, deferred), the cache's
  realisation ``realisations/<id>.doi`` for the *unresolved* derivation's realisation id
  is signed by such a key (what Nix's own ``secret-key-files`` signs; checked over
  ``realisation.fingerprint_v1``), names a path called after the derivation, and that
  path's narinfo is signed too.

The accepted value is the path with the narinfo's ``NarHash``. :class:`CacheKeys` checks
signatures (no I/O); :class:`CacheSigs` fetches narinfos and realisations through
:mod:`tracehook.stores.binarycache` (the same client the gate uses) and remembers each answer for
the run. Build-trace-v2 entries (Nix 2.35) are not read: their fingerprint is unverified.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

from tracehook.errors import ParseError, UpstreamFault
from tracehook.nix import realisation
from tracehook.nix.storepath import STORE_DIR, path_name
from tracehook.stores.binarycache import Upstream, fetch_narinfo
from tracehook.verify.cachekeys import CacheKeys, CacheOutput, Refused


class CacheSigs:
    """Fetches and checks cache signatures from binary caches, in order; remembers answers.
    Thread-safe (its memo only ever gains identical entries)."""

    def __init__(self, keys: CacheKeys, sources: Sequence[Upstream],
                 store_dir: str = STORE_DIR) -> None:
        self.keys = keys
        self.sources = list(sources)
        self.store_dir = store_dir
        self._memo: dict[tuple[str, str], CacheOutput | Refused] = {}
        self._lock = threading.Lock()

    def _remember(self, key: tuple[str, str], result: CacheOutput | Refused
                  ) -> CacheOutput | Refused:
        if not (isinstance(result, Refused) and result.fault):
            with self._lock:
                self._memo[key] = result
        return result

    def by_path(self, path: str) -> CacheOutput | Refused:
        """The output at ``path`` (its path fixed by the derivation), if a cache signed it."""
        memo = self._memo.get(("path", path))
        if memo is not None:
            return memo
        problems: list[str] = []
        faults: list[str] = []
        for up in self.sources:
            try:
                ni = fetch_narinfo(up, path)
            except UpstreamFault as exc:
                faults.append(exc.diagnostics())
                continue
            except ParseError as exc:
                problems.append(exc.diagnostics())
                continue
            if ni is None:
                continue
            got = self.keys.narinfo(ni, up.url, self.store_dir)
            if isinstance(got, CacheOutput):
                return self._remember(("path", path), got)
            problems.append(got.reason)
        return self._remember(("path", path), _refusal(f"no cache-signed narinfo for {path}",
                                                       problems, faults))

    def by_realisation(self, rid: str, drv_name: str, output: str) -> CacheOutput | Refused:
        """The output of realisation ``rid``, if a cache signed the realisation and the
        narinfo of the path it names (called ``drv_name``'s ``output``)."""
        memo = self._memo.get(("rid", rid))
        if memo is not None:
            return memo
        want_name = drv_name if output == "out" else f"{drv_name}-{output}"
        problems: list[str] = []
        faults: list[str] = []
        for up in self.sources:
            try:
                data = up.get(f"realisations/{rid}.doi")
            except UpstreamFault as exc:
                faults.append(exc.diagnostics())
                continue
            if data is None:
                continue
            try:
                r = realisation.parse_doi_v1(data, f"realisation from {up.url}")
            except ParseError as exc:
                problems.append(exc.diagnostics())
                continue
            signed = self.keys.realisation(r, rid, up.url)
            if isinstance(signed, Refused):
                problems.append(signed.reason)
                continue
            path = f"{self.store_dir}/{r.out_path}"
            if path_name(path) != want_name:
                problems.append(f"{up.url}: the realisation of {output} names {path}, which is "
                                f"not named after the derivation ({want_name})")
                continue
            got = self.by_path(path)
            if isinstance(got, Refused):
                problems.append(got.reason)
                faults += [got.reason] if got.fault else []
                continue
            result = CacheOutput(got.path, got.nar_hash, signed | got.keys, up.url,
                                 "realisation", got.references)
            return self._remember(("rid", rid), result)
        return self._remember(("rid", rid), _refusal(
            f"no cache-signed realisation {rid} of {want_name}", problems, faults))

    def outputs(self, wanted: Mapping[str, tuple[str, str]], drv_name: str
                ) -> dict[str, CacheOutput | Refused]:
        """``wanted``: output -> ("path", store path) or ("realisation", id)."""
        found: dict[str, CacheOutput | Refused] = {}
        for output, (how, what) in sorted(wanted.items()):
            found[output] = (self.by_path(what) if how == "path"
                             else self.by_realisation(what, drv_name, output))
        return found


def _refusal(missing: str, problems: list[str], faults: list[str]) -> Refused:
    if faults:
        return Refused(f"{missing}: cache unreadable: {'; '.join(dict.fromkeys(faults))}",
                       fault=True)
    if problems:
        return Refused("; ".join(dict.fromkeys(problems)))
    return Refused(f"{missing} (no cache has it)")
