"""The verified set: accepted claims per build step, and which values meet the trust model.

:class:`TrustedSet` records, per build step (unresolved derivation), the claims
:mod:`tracehook.verify.trusted` accepted for the resolutions computed from verified inputs,
and answers which output values satisfy the trust model (docs/POLICY.md). It holds no I/O and
makes no :class:`~tracehook.verify.trusted.Accepted` claim of its own:

* evidence is aggregated per build step, over all of its resolutions (divergent input
  histories that converge on the same outputs add up);
* a consumer takes the outputs it references from a single claim: claims are grouped by
  their values for exactly those outputs, and each group's distinct signers (keys and
  evidence elements) are counted once each against the trust model;
* fixed-output derivations anchor the chain: their path is in the ATerm, no claim needed;
* a step whose outputs no trusted claim verifies may be accepted on a cache signature
  (:mod:`tracehook.verify.cachesigs`): that ends the chain obligation below it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tracehook.errors import Failure, Rejected
from tracehook.nix.derivation import Derivation
from tracehook.nix.storepath import output_path_name, path_name
from tracehook.trace.claim import Claim, OutputClaim, TraceKey
from tracehook.trace.stepkey import Resolution
from tracehook.verify.cachekeys import CacheOutput, Refused
from tracehook.verify.evidencecheck import EvidenceInfo
from tracehook.verify.policy import TrustModel, TrustResult, evaluate
from tracehook.verify.trusted import (
    Accepted,
    Checked,
    KeyRing,
    PlainAccepted,
    accepted_to_plain,
    readmit,
)
from tracehook.verify.values import Candidate, Value, show_value

#: Rejections that mean someone forged or altered something (not merely "not trusted").
TAMPER_KINDS = frozenset({"bad-signature", "wrong-output"})


#: A verified step as plain values (what :mod:`marshal` writes), kept by a gate for its next
#: start (:mod:`tracehook.gate.warmstart`): whether it is a fixed output, its trace keys
#: (kind, key, resolved derivation, pins), the claims accepted for it, the signatures that did
#: not count (kind, kid, detail), and how many signatures and evidence entries were seen.
#: A claim taken back has no JWS text (``compact`` is empty, as for a claim of evidence).
PlainKey = tuple[str, str, str, tuple[tuple[str, bytes], ...]]
KeptStep = tuple[bool, tuple[PlainKey, ...], tuple[PlainAccepted, ...],
                 tuple[tuple[str, str | None, str], ...], int, int]


@dataclass
class _Step:
    drv: Derivation
    fixed: bool = False
    keys: list[TraceKey] = field(default_factory=list)
    accepted: list[Accepted] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    seen: int = 0
    evidence_seen: int = 0
    failure: Failure | None = None
    cache: dict[str, CacheOutput | Refused] = field(default_factory=dict)


class TrustedSet:
    """Verified evidence per build step. Holds no I/O and trusts nothing it did not check."""

    def __init__(self, model: TrustModel, evidence_names: frozenset[str] = frozenset()) -> None:
        """``evidence_names``: the policy's evidence elements (for "no evidence" in refusals)."""
        self.model = model
        self.evidence_names = evidence_names
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
            step.evidence_seen += checked.evidence_seen
            step.rejected.extend(checked.rejected)
            for acc in checked.accepted:
                problem = _output_problem(drv, res, acc.claim)
                if problem is None:
                    step.accepted.append(acc)
                else:
                    step.rejected.append(Rejected("wrong-output", acc.claim.kid,
                                                  f"'{acc.signer}' {problem}"))
        self._steps[drv_path] = step

    def keep(self, drv_path: str) -> KeptStep | None:
        """The step as plain values (the caller chooses which: those verified for what
        their consumers use, :func:`tracehook.verify.reliance.traced`); None for a step
        refused before any evidence, one that rests on a cache signature, or one with
        hardware evidence."""
        step = self._steps.get(drv_path)
        if step is None or step.failure is not None or step.cache:
            return None
        if any(a.evidence is not None for a in step.accepted):
            return None  # (hardware evidence has dates of its own: never kept)
        # (without each claim's JWS text: nothing reads it again, and it is most of the size)
        return (step.fixed, tuple((k.kind, k.key, k.rdrv_path, k.pins) for k in step.keys),
                tuple((signer, "", fields, evidence) for signer, _, fields, evidence
                      in map(accepted_to_plain, step.accepted)),
                tuple((r.kind, r.kid, r.detail) for r in step.rejected),
                step.seen, step.evidence_seen)

    def take_back(self, drv_path: str, drv: Derivation, kept: KeptStep, ring: KeyRing) -> None:
        """A step :meth:`keep` gave, recorded as it was, its claims admitted again through
        :func:`~tracehook.verify.trusted.readmit` (each signer still a current key of the
        policy, each claim for one of the step's keys). ValueError (or TypeError) if the
        values are not what :meth:`keep` gives; then nothing is recorded."""
        fixed, keys, accepted, rejected, seen, evidence_seen = kept
        if fixed:
            self._steps[drv_path] = _Step(drv, fixed=True)
            return
        trace_keys = [TraceKey(kind, key, rdrv, tuple((p, h) for p, h in pins))  # type: ignore[arg-type]
                      for kind, key, rdrv, pins in keys]
        by_key = {(k.kind, k.key): k for k in trace_keys}
        step = _Step(drv, keys=trace_keys, seen=int(seen), evidence_seen=int(evidence_seen),
                     rejected=[Rejected(kind, kid, detail)  # type: ignore[arg-type]
                               for kind, kid, detail in rejected])
        for plain in accepted:
            fields = plain[2]
            key = by_key.get((fields[0], fields[1]))
            if key is None:
                raise ValueError(f"a kept claim of {drv_path} is for none of its trace keys")
            step.accepted.extend(readmit(((plain,), (), 1, 0), key, ring).accepted)
        self._steps[drv_path] = step

    # queries -----------------------------------------------------------------------

    def is_fixed(self, drv_path: str) -> bool:
        return self._steps[drv_path].fixed

    def keys(self, drv_path: str) -> list[TraceKey]:
        return list(self._steps[drv_path].keys)

    def rejected(self, drv_path: str) -> list[Rejected]:
        return list(self._steps[drv_path].rejected)

    def sightings(self, drv_path: str) -> tuple[str, ...]:
        """Tamper evidence seen at this step, whether or not it verified another way: a
        signature by a policy key that does not verify, a claim whose outputs cannot be the
        step's, one signer claiming two different values for one resolved step, and a
        cache signature that does not verify (a forged narinfo or realisation)."""
        step = self._steps.get(drv_path)
        if step is None:
            return ()
        seen = [r.detail for r in step.rejected if r.kind in TAMPER_KINDS]
        accepted = step.accepted
        if len({acc.signer for acc in accepted}) < len(accepted):  # one signer, two claims?
            by_signer: dict[tuple[str, str], set[tuple[tuple[str, str, bytes], ...]]] = {}
            for acc in accepted:
                value = tuple(sorted((n, o.path, o.nar_hash)
                                     for n, o in acc.claim.outputs.items()))
                by_signer.setdefault((acc.signer, acc.claim.key), set()).add(value)
            seen += [f"'{signer}' signed {len(values)} different claims for step {key}"
                     for (signer, key), values in sorted(by_signer.items()) if len(values) > 1]
        if step.cache:
            seen += [r.reason for r in step.cache.values()
                     if isinstance(r, Refused) and "bad signature" in r.reason]
        if not seen:
            return ()
        return tuple(dict.fromkeys(seen))

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
        path, nar_hash = value.path, value.nar_hash
        for acc in self._steps[drv_path].accepted:
            oc = acc.claim.outputs.get(output)
            # (the same value as OutputClaim's equality says, without its tuples: the gate
            # asks this for every verdict it gives)
            if (oc is not None and oc.references is not None and oc.path == path
                    and oc.nar_hash == nar_hash):
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

    def admitted_by(self, drv_path: str, candidate: Candidate) -> tuple[EvidenceInfo, ...]:
        """The hardware evidence counted for ``candidate`` (what each report showed)."""
        step = self._steps.get(drv_path)
        if step is None or candidate.basis != "traces":
            return ()
        return tuple(dict.fromkeys(
            acc.evidence for acc in step.accepted
            if acc.evidence is not None and acc.signer in candidate.signers
            and all(acc.claim.outputs.get(n) == oc for n, oc in candidate.value)))

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
        if len(found) > 1:  # (one value, as almost always: nothing to order)
            found.sort(key=lambda c: (-len(c.signers), show_value(c.value)))
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
        # A policy with evidence elements says when the step carried no evidence at all.
        no_evidence = ("; no hardware evidence for it"
                       if self.evidence_names and step.evidence_seen == 0 else "")
        if not step.accepted:
            keys = ", ".join(f"{k.kind}:{k.key}" for k in step.keys) or "none"
            if step.seen == 0 and not step.rejected:  # a malformed file is not "no trace"
                return Failure("no-trace", f"no trace for resolved step {keys}{no_evidence}")
            return Failure("no-trusted-claim",
                           f"no trusted claim for {keys}: {rejected}{no_evidence}")
        candidates = self._candidates(drv_path, outputs)
        if not candidates:
            names = ", ".join(sorted(outputs))
            return Failure("missing-output", f"no trusted claim names output(s) {names}")
        extra = f"; rejected: {rejected}" if rejected else ""
        if len(candidates) > 1:
            # the same paths with other NAR hashes (content-addressed): show the hashes
            hashes = len({tuple(c.paths().items()) for c in candidates}) < len(candidates)
            said = "; ".join(f"{', '.join(sorted(c.signers))} say {show_value(c.value, hashes)}"
                             for c in candidates)
            trust = candidates[0].trust
            need = trust.requirement if trust is not None else ""
            return Failure("disagree", f"claims disagree: {said}; none meets {need}{extra}")
        trust = candidates[0].trust
        assert trust is not None
        return Failure("threshold", f"threshold not met: {trust.explain()}{extra}{no_evidence}")



def _output_problem(drv: Derivation, res: Resolution, claim: Claim) -> str | None:
    """Why a claim's outputs cannot be this step's, or None."""
    extra = claim.outputs.keys() - drv.outputs.keys()
    if extra:
        return f"claims output '{min(extra)}', which the derivation does not have"
    for name, oc in claim.outputs.items():
        if drv.kind in ("input-addressed", "deferred"):
            expected = res.rdrv.outputs[name].path
            if oc.path != expected:
                return (f"claims {name}={oc.path}, but the derivation determines {expected}")
        elif path_name(oc.path) != output_path_name(drv.name, name):
            return f"claims {name}={oc.path}, which is not named after this derivation"
    return None
