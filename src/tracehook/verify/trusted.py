"""The verifier's core: verified state only, no I/O (python-tuf's trusted set, for traces).

The one place that mints trust: an :class:`Accepted` claim (and a :class:`Checked` result)
is made only here, by :meth:`KeyRing.check`, which verifies the signature itself, or by
:func:`readmit`, the one way back in for what a checker process computed with the same code.
:class:`KeyRing` says why every other signature does not count. :class:`TrustedSet`
records, per build step, the claims admitted for the resolutions computed from verified
inputs, and answers which output values satisfy the trust model (docs/POLICY.md):

* evidence is aggregated per build step, over all of its resolutions (divergent input
  histories that converge on the same outputs add up);
* a consumer takes the outputs it references from a single claim: claims are grouped by
  their values for exactly those outputs, and each group's distinct signers are counted
  once each against the trust model;
* fixed-output derivations anchor the chain: their path is in the ATerm, no claim needed;
* a step whose outputs no trusted claim verifies may be accepted on a cache signature
  (:mod:`tracehook.verify.cachesigs`): that ends the chain obligation below it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import marshal
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from tracehook.errors import BadSignature, Failure, ParseError, Rejected
from tracehook.nix.derivation import Derivation
from tracehook.nix.storepath import output_path_name, path_name
from tracehook.trace import crypto, jws
from tracehook.trace.claim import (
    Claim,
    OutputClaim,
    PlainClaim,
    TraceKey,
    claim_from_plain,
    claim_to_plain,
    parse_claim,
)
from tracehook.trace.stepkey import Resolution
from tracehook.verify.cachekeys import CacheOutput, Refused
from tracehook.verify.policy import Policy, PolicyKey, TrustModel, TrustResult, evaluate

Basis = Literal["fixed", "traces", "cache"]


_MINT = object()  # held by this module only: what makes an Accepted or a Checked


def _minted(token: object, what: str) -> None:
    if token is not _MINT:
        raise TypeError(f"{what} is minted only by tracehook.verify.trusted (KeyRing.check, "
                        "readmit)")


@dataclass(frozen=True)
class Accepted:
    """A claim whose signature verified under a trusted policy key (``signer``)."""

    signer: str
    claim: Claim
    mint: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        _minted(self.mint, "an Accepted claim")


@dataclass(frozen=True)
class Checked:
    """What the trace of one resolved step holds: the claims accepted, the signatures
    rejected (and why), and how many distinct signatures were looked at."""

    accepted: tuple[Accepted, ...]
    rejected: tuple[Rejected, ...]
    seen: int  # distinct signatures looked at
    mint: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        _minted(self.mint, "a Checked result")

    def with_rejected(self, extra: Sequence[Rejected]) -> Checked:
        """The same result with more rejections (e.g. a trace file that did not parse)."""
        if not extra:
            return self
        return Checked(self.accepted, self.rejected + tuple(extra), self.seen, _MINT)


#: A Checked result as plain values, for a pipe: the accepted claims' fields, the
#: rejections, the number of signatures seen.
Plain = tuple[tuple[tuple[str, str, PlainClaim], ...], tuple[Rejected, ...], int]


def to_plain(checked: Checked) -> Plain:
    claims = tuple((a.signer, a.claim.compact, claim_to_plain(a.claim))
                   for a in checked.accepted)
    return claims, checked.rejected, checked.seen


def readmit(plain: Plain, key: TraceKey, ring: KeyRing) -> Checked:
    """A result a checker process computed with :meth:`KeyRing.check` for ``key``, back as
    a Checked. The signatures were verified there; what can be checked cheaply is checked
    again here: the signer is a current key of this policy and the claim is for ``key``."""
    claims, rejected, seen = plain
    accepted = []
    for signer, compact, fields in claims:
        claim = claim_from_plain(fields, compact)
        entry = ring.by_kid.get(claim.kid)
        if entry is None or entry.name != signer or entry.status(ring.now) != "trusted":
            raise ValueError(f"checker answered a claim by {signer!r} ({claim.kid}), which "
                             "is not a current key of the policy")
        if (claim.kind, claim.key) != (key.kind, key.key):
            raise ValueError(f"checker answered a claim for {claim.kind}:{claim.key} under "
                             f"{key.kind}:{key.key}")
        accepted.append(Accepted(signer, claim, _MINT))
    return Checked(tuple(accepted), tuple(rejected), seen, _MINT)


class Facts(Protocol):
    """The persistent verification cache, as the key ring uses it
    (:class:`tracehook.stores.factcache.FactCache`)."""

    def get(self, ns: str, key: bytes) -> bytes | None: ...

    def put(self, ns: str, key: bytes, value: bytes) -> None: ...


def _bad_signature(entry: PolicyKey) -> Rejected:
    return Rejected("bad-signature", entry.kid, f"bad signature: claimed by '{entry.name}' "
                    "but the signature does not verify (tampered or forged)")


class KeyRing:
    """The policy's keys at one reference time, by ``kid``. Pure; safe to share between
    threads (its memo only ever gains identical entries)."""

    def __init__(self, policy: Policy, now: dt.datetime, memo: bool = True,
                 facts: Facts | None = None) -> None:
        """``memo``: remember each (token, key) result (a long-lived gate sees the same
        traces again); a checker process, which sees each key once, does without.
        ``facts``: the persistent verification cache: "this public key signed these exact
        bytes, and they say this claim" is remembered across runs; the key's standing
        (trusted, revoked, expired) is decided afresh every time."""
        self.now = now
        self.memo = memo
        self.facts = facts
        self.by_kid: dict[str, PolicyKey] = {k.kid: k for k in policy.keys}
        self.by_key_name: dict[str, PolicyKey] = {k.public.name: k for k in policy.keys}
        self._memo: dict[tuple[str, str], Accepted | Rejected] = {}

    def check(self, tokens: Iterable[str], key: TraceKey) -> Checked:
        accepted: list[Accepted] = []
        rejected: list[Rejected] = []
        unique = list(dict.fromkeys(tokens))
        for token in unique:
            memo_key = (token, key.key)
            result = self._memo.get(memo_key)
            if result is None:
                result = self._check_one(token, key)
                if self.memo:
                    self._memo[memo_key] = result
            (accepted if isinstance(result, Accepted) else rejected).append(result)  # type: ignore[arg-type]
        return Checked(tuple(accepted), tuple(rejected), len(unique), _MINT)

    def _lookup(self, kid: str) -> PolicyKey | Rejected:
        entry = self.by_kid.get(kid)
        if entry is not None:
            return entry
        name = kid.rpartition(":")[0]
        same_name = self.by_key_name.get(name)
        hint = (
            f" (policy key '{same_name.name}' has that name but thumbprint "
            f"{same_name.thumbprint})" if same_name else ""
        )
        return Rejected("unknown-key", kid, f"signed by unknown key {kid}{hint}")

    def _check_one(self, token: str, key: TraceKey) -> Accepted | Rejected:
        known = self._known(token) if self.facts is not None else None
        if known is not None:
            if known[1] is None:
                return _bad_signature(known[0])
            return self._admit(known[0], known[1], key)
        try:
            parsed = jws.parse_compact(token, "trace")
        except ParseError as exc:
            return self._unparseable(token, exc)
        kid = jws.kid_of(parsed)
        if kid is None:
            return Rejected("malformed", None, "a signature has no 'kid' in its header")
        entry = self._lookup(kid)
        if isinstance(entry, Rejected):
            return entry
        try:
            jws.verify(parsed, entry.public)
        except BadSignature:
            self._remember(token, entry, None)
            return _bad_signature(entry)
        try:
            claim = parse_claim(parsed)
        except ParseError as exc:
            return Rejected("malformed", kid, f"'{entry.name}' signed a malformed claim: {exc}")
        self._remember(token, entry, claim)
        return self._admit(entry, claim, key)

    def _fact_key(self, token: str, entry: PolicyKey) -> bytes:
        return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest() + \
            entry.public.key

    def _known(self, token: str) -> tuple[PolicyKey, Claim | None] | None:
        """A check remembered in the persistent cache: (key, claim), (key, None) for a bad
        signature, or None when it must be checked."""
        assert self.facts is not None
        kid = jws.peek_kid(token)
        entry = self.by_kid.get(kid) if kid is not None else None
        if entry is None:
            return None
        data = self.facts.get("sig", self._fact_key(token, entry))
        if data is None:
            return None
        try:
            plain = marshal.loads(data)
            claim = None if plain is None else claim_from_plain(plain, token)
        except (ValueError, TypeError, EOFError):
            return None
        return (entry, claim) if claim is None or claim.kid == kid else None

    def _remember(self, token: str, entry: PolicyKey, claim: Claim | None) -> None:
        if self.facts is None:
            return
        plain = None if claim is None else claim_to_plain(claim)
        self.facts.put("sig", self._fact_key(token, entry), marshal.dumps(plain))

    def _admit(self, entry: PolicyKey, claim: Claim, key: TraceKey) -> Accepted | Rejected:
        kid = claim.kid
        status = entry.status(self.now)
        if status == "revoked":
            return Rejected("revoked-key", kid, f"key '{entry.name}' is revoked")
        if status == "expired":
            assert entry.not_after is not None
            return Rejected("expired-key", kid, f"key '{entry.name}' expired "
                            f"{entry.not_after.isoformat()}")
        if (claim.kind, claim.key) != (key.kind, key.key):
            return Rejected("other-step", kid, f"'{entry.name}' signed a claim for step "
                            f"{claim.kind}:{claim.key}, filed under {key.kind}:{key.key}")
        return Accepted(entry.name, claim, _MINT)

    def _unparseable(self, token: str, exc: ParseError) -> Rejected:
        """A JWS that does not parse: a trusted key's failed signature over it is what
        happened (a changed byte usually breaks the JSON too); else it is malformed."""
        parts = token.split(".") if isinstance(token, str) else []
        if len(parts) == 3:
            try:
                header = jws.loads_object(jws.b64url_decode(parts[0], "header"), "header")
                kid = header.get("kid")
                sig = jws.b64url_decode(parts[2], "signature")
            except ParseError:
                kid, sig = None, b""
            if isinstance(kid, str):
                entry = self._lookup(kid)
                if isinstance(entry, Rejected):
                    return entry
                try:
                    crypto.verify(entry.public, f"{parts[0]}.{parts[1]}".encode("ascii"), sig)
                except (BadSignature, UnicodeEncodeError):
                    return _bad_signature(entry)
                return Rejected("malformed", kid, f"'{entry.name}' signed a malformed trace: "
                                f"{exc.diagnostics()}")
        return Rejected("malformed", None, f"malformed trace: {exc.diagnostics()}")


# ------------------------------------------------------------------------- trusted set

Value = tuple[tuple[str, OutputClaim], ...]  # (output name, claim), sorted by name


@dataclass(frozen=True)
class Candidate:
    """One way the referenced outputs of a step can be, with the evidence for it."""

    value: Value
    signers: frozenset[str]  # policy keys; for a cache signature, the cache keys
    trust: TrustResult | None  # None: a fixed-output anchor or a cache signature
    basis: Basis = "traces"

    def paths(self) -> dict[str, str]:
        return {name: oc.path for name, oc in self.value}


@dataclass
class _Step:
    drv: Derivation
    fixed: bool = False
    keys: list[TraceKey] = field(default_factory=list)
    accepted: list[Accepted] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    seen: int = 0
    failure: Failure | None = None
    cache: dict[str, CacheOutput | Refused] = field(default_factory=dict)


def _show(value: Value) -> str:
    return ", ".join(f"{name}={oc.path}" for name, oc in value)


class TrustedSet:
    """Verified evidence per build step. Holds no I/O and trusts nothing it did not check."""

    def __init__(self, model: TrustModel) -> None:
        self.model = model
        self._steps: dict[str, _Step] = {}
        self._values: dict[tuple[str, frozenset[str]], list[Candidate]] = {}
        self._trust: dict[frozenset[str], TrustResult] = {}  # the same few signer sets

    def __contains__(self, drv_path: str) -> bool:
        return drv_path in self._steps

    def add_fixed(self, drv_path: str, drv: Derivation) -> None:
        self._steps[drv_path] = _Step(drv, fixed=True)

    def add_cache(
        self, drv_path: str, drv: Derivation, results: Mapping[str, CacheOutput | Refused]
    ) -> None:
        """What the caches signed for outputs of this step (checked by cache_sigs)."""
        step = self._steps.get(drv_path)
        if step is None:
            step = self._steps[drv_path] = _Step(drv)
        step.cache.update(results)

    def refuse(self, drv_path: str, drv: Derivation, failure: Failure) -> None:
        self._steps[drv_path] = _Step(drv, failure=failure)

    def add_step(
        self, drv_path: str, drv: Derivation, evidence: Sequence[tuple[Resolution, Checked]]
    ) -> None:
        step = _Step(drv)
        for res, checked in evidence:
            step.keys.append(res.key)
            step.seen += checked.seen
            step.rejected.extend(checked.rejected)
            for acc in checked.accepted:
                problem = _output_problem(drv, res, acc.claim)
                if problem is None:
                    step.accepted.append(acc)
                else:
                    step.rejected.append(Rejected("wrong-output", acc.claim.kid,
                                                  f"'{acc.signer}' {problem}"))
        self._steps[drv_path] = step

    # queries -----------------------------------------------------------------------

    def is_fixed(self, drv_path: str) -> bool:
        return self._steps[drv_path].fixed

    def keys(self, drv_path: str) -> list[TraceKey]:
        return list(self._steps[drv_path].keys)

    def rejected(self, drv_path: str) -> list[Rejected]:
        return list(self._steps[drv_path].rejected)

    def failure_of(self, drv_path: str) -> Failure | None:
        """The step's own planning failure (it was refused before any evidence), if any."""
        step = self._steps.get(drv_path)
        return None if step is None else step.failure

    def values(self, drv_path: str, outputs: frozenset[str]) -> list[Candidate]:
        """The values of ``outputs`` that satisfy the trust model, most signers first; when
        none does, the value a cache signed for them, if any."""
        memo = self._values.get((drv_path, outputs))
        if memo is None:
            memo = [c for c in self._candidates(drv_path, outputs) if c.trust is None or c.trust]
            self._values[(drv_path, outputs)] = memo
        return memo or self._cache_value(drv_path, outputs)

    def _cache_value(self, drv_path: str, outputs: frozenset[str]) -> list[Candidate]:
        cache = self._steps[drv_path].cache
        got = [cache.get(name) for name in sorted(outputs)]
        if not outputs or not all(isinstance(g, CacheOutput) for g in got):
            return []
        accepted = [g for g in got if isinstance(g, CacheOutput)]
        value = tuple((name, OutputClaim(g.path, g.nar_hash))
                      for name, g in zip(sorted(outputs), accepted, strict=True))
        keys = frozenset().union(*(g.keys for g in accepted))
        return [Candidate(value, keys, None, "cache")]

    def values_for_resolution(self, drv_path: str, outputs: frozenset[str],
                              rdrv_path: str) -> list[Candidate]:
        """The verified values of ``outputs`` that some accepted claim attests for the
        resolved derivation ``rdrv_path`` (a realisation asked for by resolved id is
        answered only with a value attested for that resolution)."""
        step = self._steps.get(drv_path)
        if step is None:
            return []
        keys = {k.key for k in step.keys if k.rdrv_path == rdrv_path}
        attested = {tuple(sorted((n, acc.claim.outputs[n]) for n in outputs))
                    for acc in step.accepted
                    if acc.claim.key in keys and outputs <= acc.claim.outputs.keys()}
        return [c for c in self.values(drv_path, outputs) if c.value in attested]

    def attested_references(self, drv_path: str, output: str, value: OutputClaim
                            ) -> tuple[tuple[str, ...] | None, bool]:
        """The references the accepted claims of this value of ``output`` attest, and
        whether two of them disagree: (None, False) when none attests any."""
        found: set[tuple[str, ...]] = set()
        for acc in self._steps[drv_path].accepted:
            oc = acc.claim.outputs.get(output)
            if oc is not None and oc == value and oc.references is not None:
                found.add(oc.references)
        if not found:
            return None, False
        return sorted(found)[0], len(found) > 1

    def claimed_outputs(self, drv_path: str) -> set[tuple[str, str]]:
        """(output name, path) of every output an accepted claim of the step names."""
        step = self._steps.get(drv_path)
        if step is None:
            return set()
        return {(n, oc.path) for acc in step.accepted for n, oc in acc.claim.outputs.items()}

    def cache_results(self, drv_path: str) -> Mapping[str, CacheOutput | Refused]:
        return dict(self._steps[drv_path].cache)

    def _candidates(self, drv_path: str, outputs: frozenset[str]) -> list[Candidate]:
        step = self._steps[drv_path]
        if step.fixed:
            value = tuple(
                (name, OutputClaim(o.path, b"")) for name, o in sorted(step.drv.outputs.items())
                if name in outputs
            )
            return [Candidate(value, frozenset(), None)]
        groups: dict[Value, set[str]] = {}
        for acc in step.accepted:
            if not outputs <= acc.claim.outputs.keys():
                continue
            value = tuple(sorted((n, acc.claim.outputs[n]) for n in outputs))
            groups.setdefault(value, set()).add(acc.signer)
        found = [
            Candidate(v, signers, self._evaluate(signers))
            for v, signers in ((v, frozenset(s)) for v, s in groups.items())
        ]
        found.sort(key=lambda c: (-len(c.signers), _show(c.value)))
        return found

    def _evaluate(self, signers: frozenset[str]) -> TrustResult:
        result = self._trust.get(signers)
        if result is None:
            result = self._trust[signers] = evaluate(self.model, signers)
        return result

    def explain(self, drv_path: str, outputs: frozenset[str]) -> Failure:
        """Why no value of ``outputs`` of this step is verified."""
        failure = self._explain_traces(drv_path, outputs)
        cache = self._steps[drv_path].cache
        refused = [r.reason for n in sorted(outputs)
                   if isinstance(r := cache.get(n), Refused)]
        if not refused:
            return failure
        return Failure(failure.kind, f"{failure.message}; not accepted on a cache signature: "
                       f"{'; '.join(dict.fromkeys(refused))}", failure.cause)

    def _explain_traces(self, drv_path: str, outputs: frozenset[str]) -> Failure:
        step = self._steps[drv_path]
        if step.failure is not None:
            return step.failure
        rejected = "; ".join(sorted({r.detail for r in step.rejected}))
        if not step.accepted:
            keys = ", ".join(f"{k.kind}:{k.key}" for k in step.keys) or "none"
            if step.seen == 0:
                return Failure("no-trace", f"no trace for resolved step {keys}")
            return Failure("no-trusted-claim", f"no trusted claim for {keys}: {rejected}")
        candidates = self._candidates(drv_path, outputs)
        if not candidates:
            names = ", ".join(sorted(outputs))
            return Failure("missing-output", f"no trusted claim names output(s) {names}")
        extra = f"; rejected: {rejected}" if rejected else ""
        if len(candidates) > 1:
            said = "; ".join(
                f"{', '.join(sorted(c.signers))} say {_show(c.value)}" for c in candidates
            )
            need = candidates[0].trust.requirement if candidates[0].trust else ""
            return Failure("disagree", f"claims disagree: {said}; none meets {need}{extra}")
        trust = candidates[0].trust
        assert trust is not None
        return Failure("threshold", f"threshold not met: {trust.explain()}{extra}")



def _output_problem(drv: Derivation, res: Resolution, claim: Claim) -> str | None:
    """Why a claim's outputs cannot be this step's, or None."""
    extra = sorted(set(claim.outputs) - set(drv.outputs))
    if extra:
        return f"claims output '{extra[0]}', which the derivation does not have"
    for name, oc in claim.outputs.items():
        if drv.kind in ("input-addressed", "deferred"):
            expected = res.rdrv.outputs[name].path
            if oc.path != expected:
                return (f"claims {name}={oc.path}, but the derivation determines {expected}")
        elif path_name(oc.path) != output_path_name(drv.name, name):
            return f"claims {name}={oc.path}, which is not named after this derivation"
    return None
