"""Cache signatures checked against the policy's cache keys: no I/O (docs/POLICY.md).

The policy's ``narinfo-key`` elements trust what a binary cache signed, as an alternative to
the whole trace requirement. :class:`CacheKeys` checks a narinfo's or a realisation's
signatures against those keys at one reference time and answers :class:`CacheOutput` (an
output accepted on a cache signature) or :class:`Refused` (why not). Fetching narinfos and
realisations is :mod:`tracehook.verify.cachesigs`'s job.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from tracehook.errors import BadSignature, ParseError
from tracehook.nix import narinfo, realisation
from tracehook.nix.nar import parse_nar_hash
from tracehook.nix.narinfo import NarInfo
from tracehook.nix.storepath import STORE_DIR
from tracehook.trace import crypto
from tracehook.verify.policy import PolicyKey


@dataclass(frozen=True)
class CacheOutput:
    """One output accepted on a cache signature."""

    path: str
    nar_hash: bytes
    keys: frozenset[str]  # cache keys whose signatures made it acceptable
    source: str  # the cache it came from
    via: str  # "narinfo" or "realisation"
    references: tuple[str, ...] = ()  # full store paths, from the signed narinfo


@dataclass(frozen=True)
class Refused:
    """Why an output was not accepted on a cache signature; ``fault``: a cache could not be
    read, so the answer may be wrong (never taken for 'absent')."""

    reason: str
    fault: bool = False


class CacheKeys:
    """The policy's cache keys at one reference time. Pure."""

    def __init__(self, keys: Sequence[PolicyKey], now: dt.datetime) -> None:
        self.now = now
        self.by_name = {k.public.name: k for k in keys}
        self._public = {k.public.name: k.public for k in keys}

    def signers(self, fingerprint: str, sigs: Sequence[str], what: str) -> frozenset[str] | str:
        """The trusted, current cache keys among ``sigs`` over ``fingerprint``, or why none."""
        good: set[str] = set()
        problems: list[str] = []
        for line in sigs:
            try:
                pk = crypto.nix_verify(self._public, fingerprint, line)
            except BadSignature:
                problems.append(f"{what}: bad signature by '{line.partition(':')[0]}' "
                                "(tampered or forged)")
                continue
            except ParseError as exc:
                problems.append(f"{what}: malformed signature: {exc.diagnostics()}")
                continue
            if pk is None:
                problems.append(f"{what}: signed by '{line.partition(':')[0]}', which is not "
                                "a cache key of the policy")
                continue
            entry = self.by_name[pk.name]
            status = entry.status(self.now)
            if status == "trusted":
                good.add(entry.name)
            elif status == "revoked":
                problems.append(f"{what}: cache key '{entry.name}' is revoked")
            else:
                assert entry.not_after is not None
                problems.append(f"{what}: cache key '{entry.name}' expired "
                                f"{entry.not_after.isoformat()}")
        if good:
            return frozenset(good)
        if not sigs:
            return f"{what} is not signed"
        return "; ".join(problems)

    def narinfo(self, ni: NarInfo, source: str, store_dir: str = STORE_DIR
                ) -> CacheOutput | Refused:
        what = f"narinfo of {ni.store_path} from {source}"
        try:
            fingerprint = narinfo.fingerprint(ni, store_dir)
            digest = parse_nar_hash(ni.nar_hash)
        except ParseError as exc:
            return Refused(f"{what}: {exc.diagnostics()}")
        got = self.signers(fingerprint, ni.sigs, what)
        if isinstance(got, str):
            return Refused(got)
        refs = tuple(f"{store_dir}/{r}" for r in ni.references)
        return CacheOutput(ni.store_path, digest, got, source, "narinfo", refs)

    def realisation(self, r: realisation.Realisation, rid: str, source: str
                    ) -> frozenset[str] | Refused:
        what = f"realisation {rid} from {source}"
        if r.id != rid:
            return Refused(f"{what} is for {r.id}")
        got = self.signers(realisation.fingerprint_v1(r), r.signatures, what)
        return Refused(got) if isinstance(got, str) else got
