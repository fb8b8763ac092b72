"""The verifier's core: the one place that mints trust (python-tuf's trusted set, for traces).

An :class:`Accepted` claim (and a :class:`Checked` result) is made only here, by
:meth:`KeyRing.check`, which verifies the signature itself, or by :func:`readmit`, the one way
back in for what a checker process computed with the same code (and for what the last gate
run accepted, kept with the files it was decided from). :class:`KeyRing` says why every
other signature does not count. No I/O.

Hardware evidence too: an ``evidence`` entry that satisfies an evidence element (checked by
:class:`~tracehook.verify.evidencecheck.EvidenceRing`) for the step being checked becomes an
:class:`Accepted` claim whose signer is the element's name. It counts as a key does, apart
from any key that signed the same claim, for the same value only when path and NAR hash agree.

What was accepted is aggregated per build step by
:class:`~tracehook.verify.trustedset.TrustedSet`, which reads these values and makes none.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import marshal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tracehook.errors import BadSignature, ParseError, Rejected
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
from tracehook.verify.evidencecheck import Admissible, EvidenceInfo, EvidenceRing, unique_entries
from tracehook.verify.policy import Policy, PolicyKey

_MINT = object()  # held by this module only: what makes an Accepted or a Checked


def _minted(token: object, what: str) -> None:
    if token is not _MINT:
        raise TypeError(f"{what} is minted only by tracehook.verify.trusted (KeyRing.check, "
                        "readmit)")


@dataclass(frozen=True)
class Accepted:
    """A claim whose signature verified under a trusted policy key (``signer``), or that
    hardware evidence satisfying the evidence element ``signer`` binds (``evidence``)."""

    signer: str
    claim: Claim
    mint: object = field(default=None, repr=False, compare=False)
    evidence: EvidenceInfo | None = None  # what the report showed, for evidence

    def __post_init__(self) -> None:
        _minted(self.mint, "an Accepted claim")


@dataclass(frozen=True)
class Checked:
    """What the trace of one resolved step holds: the claims accepted, the signatures
    rejected (and why), and how many distinct signatures were looked at."""

    accepted: tuple[Accepted, ...]
    rejected: tuple[Rejected, ...]
    seen: int  # distinct signatures (and evidence entries) looked at
    mint: object = field(default=None, repr=False, compare=False)
    evidence_seen: int = 0  # distinct evidence entries looked at (counted in seen)

    def __post_init__(self) -> None:
        _minted(self.mint, "a Checked result")

    def with_rejected(self, extra: Sequence[Rejected]) -> Checked:
        """The same result with more rejections (e.g. a trace file that did not parse)."""
        if not extra:
            return self
        return Checked(self.accepted, self.rejected + tuple(extra), self.seen, _MINT,
                       self.evidence_seen)


#: A Checked result as plain values, for a pipe: per accepted claim its signer, JWS and
#: fields (and, for evidence, what the report showed), the rejections, the signatures and
#: evidence entries seen.
PlainAccepted = tuple[str, str, PlainClaim, tuple[str, ...] | None]
Plain = tuple[tuple[PlainAccepted, ...], tuple[Rejected, ...], int, int]


def accepted_to_plain(accepted: Accepted) -> PlainAccepted:
    return (accepted.signer, accepted.claim.compact, claim_to_plain(accepted.claim),
            accepted.evidence.to_plain() if accepted.evidence is not None else None)


def to_plain(checked: Checked) -> Plain:
    claims = tuple(accepted_to_plain(a) for a in checked.accepted)
    return claims, checked.rejected, checked.seen, checked.evidence_seen


def readmit(plain: Plain, key: TraceKey, ring: KeyRing) -> Checked:
    """A result a checker process computed with :meth:`KeyRing.check` for ``key``, back as
    a Checked (or a claim the last gate run accepted, kept with every file it was decided
    from, which are unchanged: :mod:`tracehook.gate.warmstart`). The signatures were
    verified there; what can be checked cheaply is checked again here: the signer is a
    current key (or evidence element) of this policy and the claim is for ``key``."""
    claims, rejected, seen, evidence_seen = plain
    accepted = []
    for signer, compact, fields, evidence in claims:
        claim = claim_from_plain(fields, compact)
        if evidence is None:
            entry = ring.by_kid.get(claim.kid)
            current = (entry is not None and entry.name == signer
                       and entry.status(ring.now) == "trusted")
        else:
            element = ring.elements.get(signer)
            current = (element is not None and element.status(ring.now) == "trusted"
                       and evidence[0] == signer)
        if not current:
            raise ValueError(f"checker answered a claim by {signer!r} ({claim.kid}), which "
                             "is not a current key or evidence element of the policy")
        if (claim.kind, claim.key) != (key.kind, key.key):
            raise ValueError(f"checker answered a claim for {claim.kind}:{claim.key} under "
                             f"{key.kind}:{key.key}")
        info = EvidenceInfo.from_plain(evidence) if evidence is not None else None
        accepted.append(Accepted(signer, claim, _MINT, info))
    return Checked(tuple(accepted), tuple(rejected), seen, _MINT, evidence_seen)


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
        self.elements = {e.name: e for e in policy.evidence}
        # Evidence entries are read only for a policy that has evidence elements.
        self._evidence = EvidenceRing(policy.evidence, now, memo) if policy.evidence else None

    @property
    def wants_evidence(self) -> bool:
        return self._evidence is not None

    def check(self, tokens: Iterable[str], key: TraceKey,
              evidence: Iterable[Any] = ()) -> Checked:
        """The claims of the signatures ``tokens`` and of the hardware ``evidence`` entries
        (raw JSON values from the trace files) for the resolved step ``key``."""
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
        entries = unique_entries(evidence) if self._evidence is not None else []
        for ident, raw in entries:
            assert self._evidence is not None
            admitted, refused = self._evidence.examine(ident, raw, key)
            accepted += [self._evidence_claim(a) for a in admitted]
            rejected += refused
        return Checked(tuple(accepted), tuple(rejected), len(unique) + len(entries), _MINT,
                       len(entries))

    def _evidence_claim(self, admitted: Admissible) -> Accepted:
        """The claim an entry binds, accepted as the evidence element's."""
        bound = admitted.claim
        outputs = {n: OutputClaim(o.path, o.nar_hash, o.references) for n, o in bound.outputs}
        claim = Claim(bound.kind, bound.key, outputs, admitted.ident, "")
        return Accepted(admitted.element, claim, _MINT, admitted.info)

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
