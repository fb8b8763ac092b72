"""What ``tracehook verify`` reports: per-step and per-target results, as text and JSON.

A refusal names the deepest step that failed for a reason of its own (not merely because an
input failed), with that reason: no trace; bad signature; key unknown, expired or revoked;
threshold not met (the keys that signed, the ones missing); claims that disagree (each
value and who said it). Paths accepted on a cache signature alone are listed loudly, with
the number of build steps below them that were covered without traces
(:mod:`tracehook.verify.summary` computes both). Hardware evidence that was counted is named
with what its report showed (element, measurement, chip, TCB): per step in the JSON, for
the target and as a count over its closure in the text.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tracehook.errors import Failure, GraphError, Rejected
from tracehook.nix.derivation import Derivation
from tracehook.nix.nar import format_nar_hash
from tracehook.nix.storepath import basename
from tracehook.text import printable
from tracehook.verify.cachekeys import CacheOutput
from tracehook.verify.evidencecheck import EvidenceInfo
from tracehook.verify.policy import Policy
from tracehook.verify.values import Candidate


@dataclass(frozen=True)
class StepReport:
    drv: str
    name: str
    kind: str  # the derivation's kind: fixed, floating-ca, input-addressed, deferred, ...
    keys: tuple[str, ...]  # resolved trace keys looked up ("ca:<hash>" / "ia:<hash>")
    signers: tuple[str, ...]  # policy keys counted for a verified value
    outcome: str  # fixed-output, verified (by traces), cache-signed, covered, refused, ...
    failure: str | None  # the failure kind, for a refusal
    reason: str | None
    rejected: tuple[Rejected, ...]
    height: int  # 1 = no inputs; 0 = could not be placed in the graph
    cache: tuple[tuple[str, CacheOutput], ...] = ()  # outputs accepted on a cache signature
    evidence: tuple[EvidenceInfo, ...] = ()  # hardware evidence counted for its values

    def to_json(self) -> dict[str, Any]:
        return {
            "drv": self.drv,
            "name": self.name,
            "kind": self.kind,
            "resolved_keys": list(self.keys),
            "signers": list(self.signers),
            "outcome": self.outcome,
            "failure": self.failure,
            "reason": self.reason,
            "rejected": [{"kind": r.kind, "kid": r.kid, "detail": r.detail}
                         for r in self.rejected],
            "cache": {n: {"path": c.path, "nar_hash": format_nar_hash(c.nar_hash),
                          "keys": sorted(c.keys), "via": c.via, "source": c.source}
                      for n, c in self.cache},
            "evidence": [e.to_json() for e in self.evidence],
        }


@dataclass(frozen=True)
class TargetReport:
    target: str
    drv: str
    verified: bool
    outputs: dict[str, str]
    signers: tuple[str, ...]
    alternatives: tuple[dict[str, str], ...]  # other verified output values (divergence)
    reason: str | None  # for a refusal: why, in one line
    failed_step: StepReport | None  # the deepest step that failed for its own reason
    steps: tuple[StepReport, ...]
    requirement: str
    reference_time: str
    faults: tuple[str, ...]  # trace stores and binary caches that could not be read
    cache_signed: tuple[StepReport, ...] = ()  # relied on: accepted on a cache signature
    covered: int = 0  # build steps below them covered without traces
    trust_summary: dict[str, Any] = field(default_factory=dict)
    trust_line: str = ""
    evidence: tuple[EvidenceInfo, ...] = ()  # hardware evidence counted for the outputs
    basis: str = "traces"  # what admitted the chosen value: traces, cache, fixed
    tampered: tuple[tuple[str, str], ...] = ()  # (step name, what): tamper evidence seen

    @property
    def cache_signed_paths(self) -> list[str]:
        return sorted(c.path for s in self.cache_signed for _, c in s.cache)

    def to_json(self) -> dict[str, Any]:
        return {
            "verified": self.verified,
            "target": self.target,
            "drv": self.drv,
            "outputs": self.outputs,
            "signers": list(self.signers),
            "alternatives": list(self.alternatives),
            "reason": self.reason,
            "failed_step": self.failed_step.to_json() if self.failed_step else None,
            "requirement": self.requirement,
            "reference_time": self.reference_time,
            "store_faults": list(self.faults),
            "steps": [s.to_json() for s in self.steps],
            "cache_signed_paths": self.cache_signed_paths,
            "covered_without_traces": self.covered,
            "trust_summary": self.trust_summary,
            "evidence": [e.to_json() for e in self.evidence],
            "trust": self.basis if self.verified else None,
            "tampered": [{"step": s, "seen": what} for s, what in self.tampered],
        }


Outcome = str  # fixed-output, verified (by traces), cache-signed, covered, refused, ...


def step_outcome(
    found: Sequence[tuple[frozenset[str], Sequence[Candidate]]],
    explain: Callable[[frozenset[str]], Failure],
) -> tuple[Outcome, tuple[str, ...], Failure | None]:
    """A recorded step's outcome from the values found for each set of outputs its
    consumers reference: "refused" (with the first failure) if one set has none, else
    "cache-signed" if a value rests on a cache signature, else "verified"; and the trace
    signers of the values found."""
    signers: set[str] = set()
    failure: Failure | None = None
    cached = False
    for want, values in found:
        if values:
            for v in values:
                cached |= v.basis == "cache"
                signers |= v.signers if v.basis == "traces" else set()
        elif failure is None:
            failure = explain(want)
    outcome = "refused" if failure else "cache-signed" if cached else "verified"
    return outcome, tuple(sorted(signers)), failure


def graph_step(error: GraphError, drv: Derivation | None) -> StepReport:
    """The report row of a step the walk could not place in the graph."""
    return StepReport(error.drv_path, drv.name if drv else basename(error.drv_path),
                      "unknown" if drv is None else drv.kind, (), (), "refused", "graph",
                      error.diagnostics(), (), 0)


def chosen_value(candidates: Sequence[Candidate], want_path: str | None) -> Candidate | None:
    """The candidate a report names: one holding ``want_path`` if given, else the first."""
    for c in candidates:
        if want_path is None or want_path in c.paths().values():
            return c
    return None


def build_target_report(
    spec: str,
    drv_path: str,
    want_path: str | None,
    candidates: Sequence[Candidate],
    failure: Failure | None,
    steps: Sequence[StepReport],
    policy: Policy,
    now: dt.datetime,
    faults: tuple[str, ...],
    cache_signed: tuple[StepReport, ...] = (),
    covered: int = 0,
    trust: tuple[dict[str, Any], str] = ({}, ""),
    admitted_by: Callable[[Candidate], tuple[EvidenceInfo, ...]] = lambda c: (),
    tampered: tuple[tuple[str, str], ...] = (),
    fail_on_tamper: bool = False,
) -> TargetReport:
    """``tampered``: tamper evidence seen in the closure (reported even when the target
    verifies another way); ``fail_on_tamper``: any such sighting refuses the target."""
    chosen = chosen_value(candidates, want_path)
    reason = None
    failed: StepReport | None = None
    if chosen is not None and tampered and fail_on_tamper:
        reason = (f"tamper evidence seen (--fail-on-tamper): {tampered[0][0]}: "
                  f"{tampered[0][1]}")
        candidates, chosen = [], None
    elif chosen is None:
        own = [s for s in steps if s.outcome == "refused" and s.failure != "input"]
        failed = min(own, key=lambda s: s.height) if own else None
        if candidates and want_path is not None:
            found = "; ".join(", ".join(c.paths().values()) for c in candidates)
            reason = f"{want_path} is not a verified output of {drv_path} (verified: {found})"
        elif failed is not None:
            reason = f"{failed.name}: {failed.reason}"
        elif failure is not None:
            reason = failure.message
        else:
            reason = "not verified"
    alternatives = tuple(c.paths() for c in candidates if c is not chosen)
    return TargetReport(
        target=spec,
        drv=drv_path,
        verified=chosen is not None,
        outputs=chosen.paths() if chosen else {},
        signers=tuple(sorted(chosen.signers)) if chosen else (),
        alternatives=alternatives if chosen else (),
        reason=reason,
        failed_step=failed,
        steps=tuple(steps),
        requirement=policy.describe(),
        reference_time=now.isoformat(),
        faults=faults,
        cache_signed=cache_signed,
        covered=covered,
        trust_summary=trust[0],
        trust_line=trust[1],
        evidence=admitted_by(chosen) if chosen else (),
        basis=chosen.basis if chosen else "traces",
        tampered=tampered,
    )


def _render_cache(report: TargetReport) -> list[str]:
    if not report.cache_signed:
        return []
    lines = [f"  WARNING: {len(report.cache_signed_paths)} path(s) accepted on a cache "
             "signature alone (no traces checked below them):"]
    for step in report.cache_signed:
        for _, c in step.cache:
            lines.append(f"    {c.path} ({step.name}; signed by {', '.join(sorted(c.keys))}, "
                         f"{c.via} from {c.source})")
    lines.append(f"  {report.covered} build step(s) below them covered without traces")
    return lines


def _render_evidence(report: TargetReport) -> list[str]:
    lines = [f"  hardware evidence: {e.describe()}" for e in report.evidence]
    attested = [s for s in report.steps if s.evidence]
    if attested:
        elements = sorted({e.element for s in attested for e in s.evidence})
        built = sum(1 for s in report.steps if s.outcome not in ("fixed-output", "not-reached"))
        lines.append(f"  hardware evidence counted at {len(attested)} of {built} build "
                     f"step(s) ({', '.join(elements)})")
    return lines


def render_human(report: TargetReport, explain_trust: bool = False) -> str:
    lines: list[str] = []
    counts: dict[str, int] = {}
    for s in report.steps:
        counts[s.outcome] = counts.get(s.outcome, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    if report.verified:
        if report.basis == "cache":
            lines.append(f"accepted on a cache signature alone (not verified by traces): "
                         f"{report.target}")
        else:
            lines.append(f"verified: {report.target}")
        for name, path in sorted(report.outputs.items()):
            lines.append(f"  {name}: {path}")
        who = "cache key(s)" if report.basis == "cache" else "signed by"
        lines.append(f"  {who} {', '.join(report.signers) or '-'}; "
                     f"policy needs {report.requirement}")
        lines += _render_evidence(report)
        lines += _render_cache(report)
        for alt in report.alternatives:
            shown = ", ".join(f"{n}={p}" for n, p in sorted(alt.items()))
            lines.append(f"  also verified (builders disagree, each meets the policy): {shown}")
    else:
        lines.append(f"NOT verified: {report.target}")
        lines.append(f"  why: {report.reason}")
        step = report.failed_step
        if step is not None:
            lines.append(f"  failing step: {step.name} ({step.drv})")
            if step.keys:
                lines.append(f"  resolved key(s): {', '.join(step.keys)}")
            for r in step.rejected:
                lines.append(f"  rejected: {r.detail}")
            above = [s.name for s in report.steps
                     if s.outcome == "refused" and s.failure == "input"]
            if above:
                lines.append(f"  not verified because of it: {', '.join(above)}")
        lines.append(f"  policy needs {report.requirement}")
    for name, what in report.tampered:
        lines.append(f"  TAMPER EVIDENCE at {name} (treat as an incident): {what}")
    lines.append(f"  steps: {summary or 'none'}; reference time {report.reference_time}")
    if explain_trust and report.trust_line:
        lines.append(report.trust_line)
    for fault in report.faults:  # each names its store: trace store or binary cache
        lines.append(f"  could not read: {fault}")
    # Reasons quote what signers and stores wrote (a kid, a path, an error): one line each.
    return "\n".join(printable(line) for line in lines)
