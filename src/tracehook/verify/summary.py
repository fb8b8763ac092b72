"""What a verification relied on: cache signatures it accepted, and the closure's summary.

A step accepted on a cache signature ends the chain obligation below it. Walking down from
the target through every step that is not cache-signed finds the cache-signed steps the
target *relies on* (the loud part of a report: their paths were accepted on a cache
signature alone); the build steps strictly below those, that the walk never needed and
that did not verify by traces, were *covered* without traces. The summary counts the
closure's steps by how they were decided, so a user sees how far it is from fully traced.
No I/O.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tracehook.verify.report import StepReport


@dataclass(frozen=True)
class Reliance:
    steps: tuple[StepReport, ...]  # every step, covered ones marked "covered"
    cache_signed: tuple[StepReport, ...]  # the cache-signed steps the target relies on
    covered: tuple[StepReport, ...]  # steps below them, not verified by traces


def relied_upon(
    root: str, steps: Sequence[StepReport], inputs: Mapping[str, Sequence[str]]
) -> Reliance:
    by_drv = {s.drv: s for s in steps}
    boundary: list[str] = []
    relied: set[str] = set()
    todo = [root]
    while todo:
        path = todo.pop()
        if path in relied:
            continue
        relied.add(path)
        step = by_drv.get(path)
        if step is not None and step.outcome == "cache-signed":
            boundary.append(path)
            continue
        todo.extend(inputs.get(path, ()))
    below: set[str] = set()
    todo = [c for b in boundary for c in inputs.get(b, ())]
    while todo:
        path = todo.pop()
        if path not in below:
            below.add(path)
            todo.extend(inputs.get(path, ()))
    covered = {p for p in below - relied
               if p in by_drv and by_drv[p].outcome not in ("verified", "fixed-output")}
    marked = tuple(replace(s, outcome="covered") if s.drv in covered else s for s in steps)
    return Reliance(
        marked,
        tuple(by_drv[p] for p in sorted(boundary) if p in by_drv),
        tuple(s for s in marked if s.drv in covered),
    )


def cache_keys(step: StepReport) -> list[str]:
    return sorted(set().union(*(c.keys for _, c in step.cache)))


def summary(reliance: Reliance) -> dict[str, Any]:
    """The JSON ``trust_summary`` of one target's closure."""
    steps = reliance.steps
    traced = [s for s in steps if s.outcome == "verified"]
    refused = [s for s in steps if s.outcome == "refused"]
    return {
        "verified_by_traces": [{"drv": s.drv, "name": s.name, "signers": list(s.signers)}
                               for s in traced],
        "traces_by_key": dict(sorted(Counter(k for s in traced for k in s.signers).items())),
        "accepted_on_cache_signature": [
            {"drv": s.drv, "name": s.name, "keys": cache_keys(s),
             "outputs": {n: c.path for n, c in s.cache}} for s in reliance.cache_signed],
        "cache_by_key": dict(sorted(Counter(
            k for s in reliance.cache_signed for k in cache_keys(s)).items())),
        "covered_without_traces": len(reliance.covered),
        "covered_steps": [{"drv": s.drv, "name": s.name} for s in reliance.covered],
        "refused": [{"drv": s.drv, "name": s.name, "reason": s.reason} for s in refused],
        "fixed_output": sum(1 for s in steps if s.outcome == "fixed-output"),
    }


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k}: {n}" for k, n in counts.items())


def render_summary(reliance: Reliance) -> str:
    """One line: ``trust: N step(s) verified by traces (A: n); ...``."""
    s = summary(reliance)
    traced = f"{len(s['verified_by_traces'])} step(s) verified by traces"
    if s["traces_by_key"]:
        traced += f" ({_counts(s['traces_by_key'])})"
    cached = f"{len(s['accepted_on_cache_signature'])} step(s) accepted on a cache signature"
    if s["cache_by_key"]:
        cached += f" ({_counts(s['cache_by_key'])})"
    return (f"  trust: {traced}; {cached}; {s['covered_without_traces']} step(s) covered "
            f"below them without traces; {len(s['refused'])} step(s) refused; "
            f"{s['fixed_output']} fixed-output")
