"""What the gate says about each answer: one event per decision, a line a person can act on.

Every event goes to the gate's :class:`~tracehook.stores.eventlog.EventLog` (a human line
on stderr, the journal; a JSON line in ``--log-file``), with these outcomes
(docs/OPERATIONS.md, "Reading the logs"):

- ``allowed``: what admitted the path (traces by which keys, hardware evidence, a cache
  signature alone, a fixed output);
- ``refused``: the step and why (trust: no trace, a bad signature, a key unknown, expired
  or revoked, a threshold not met, claims that disagree; or a binary cache that serves
  something other than what is attested);
- ``unavailable``: the path would be allowed, but no binary cache can serve it (no
  narinfo, or a narinfo whose NAR is missing): Nix builds it, or fails with --max-jobs 0;
- ``failed``: the gate could not decide (a binary cache, trace store or the local store
  could not be read): answered 502;
- ``tampered``: tamper evidence seen in a chain, even when the path is admitted otherwise.

A step's name is said once: a reason that starts with the step's name does not repeat it.
"""

from __future__ import annotations

from tracehook.errors import Refusal
from tracehook.gate.verdicts import Value, Verdict
from tracehook.nix.nar import format_nar_hash
from tracehook.nix.narinfo import NarInfo
from tracehook.nix.storepath import path_name
from tracehook.stores.eventlog import EventLog
from tracehook.text import printable

EVENT = "gate"


def step_name(step: str | None) -> str | None:
    return path_name(step).removesuffix(".drv") if step else None


def without_name(reason: str, name: str | None) -> str:
    """``reason`` without a leading ``NAME: `` (the line names the step already)."""
    if name and reason.startswith(f"{name}: "):
        return reason[len(name) + 2:]
    return reason


class GateLog:
    def __init__(self, events: EventLog) -> None:
        self.events = events

    def refused(self, kind: str, request: str, subject: str | None, exc: Refusal) -> None:
        """A refusal (outcome ``refused``), or ``unavailable`` when no cache has the path."""
        step = exc.step or subject
        name = exc.name or step_name(step)
        said = printable(without_name(exc.reason, name))
        shown = printable(name or "?")
        if exc.cause == "absent":
            outcome = "unavailable"
            line = (f"unavailable {kind} {request}: step {shown} would be allowed, but "
                    f"{said}")
        else:
            outcome = "refused"
            line = f"refused {kind} {request}: step {shown}: {said}"
        self.events.emit(EVENT, outcome, line, reason=exc.reason, request=kind, id=request,
                         drv=step, name=name, target=subject, cause=exc.cause)

    def refused_unknown(self, kind: str, request: str, reason: str) -> None:
        """A request for nothing the local store knows about (no step to name)."""
        self.events.emit(EVENT, "refused", f"refused {kind} {request}: {reason}",
                         reason=reason, request=kind, id=request, drv=None, name=None)

    def nar_unavailable(self, rel: str, upstreams: list[str]) -> None:
        reason = (f"no binary cache has {rel} ({', '.join(upstreams)}), although a narinfo "
                  "the gate served names it: a cache whose NAR is missing")
        self.events.emit(EVENT, "unavailable", f"unavailable nar {rel}: {printable(reason)}",
                         reason=reason, request="nar", id=rel, drv=None, name=None,
                         cause="absent")

    def failed(self, kind: str, request: str, subject: str | None, message: str) -> None:
        self.events.emit(
            EVENT, "failed",
            f"cannot decide {kind} {request}: {printable(message)} (answered 502)",
            reason=message, request=kind, id=request, drv=subject, name=step_name(subject))

    def tampered(self, kind: str, request: str, verdict: Verdict, refused: bool) -> None:
        for step, what in verdict.tampered:
            self.events.emit(
                EVENT, "tampered",
                f"tamper evidence at {printable(step)} (treat as an incident): "
                f"{printable(what)}" + (" (refused: --fail-on-tamper)" if refused else
                                        f"; {kind} {request} admitted another way"),
                reason=what, request=kind, id=request, drv=verdict.drv_path, name=step)

    def allowed_path(self, request: str, step: str, ni: NarInfo, verdict: Verdict,
                     source: str) -> None:
        if self.events.silent:  # (an answer's line: not even built for --quiet)
            return
        name = step_name(step)
        self.events.emit(
            EVENT, "allowed",
            f"allowed {ni.store_path} (output of {printable(name or '?')}): "
            f"{admitted(verdict)}",
            reason=None, request="narinfo", id=request, drv=step, name=name,
            path=ni.store_path, nar_hash=ni.nar_hash, trust=verdict.basis,
            signers=list(verdict.signers), cache_keys=list(verdict.cache_keys),
            cache_signed=list(verdict.relied), covered_without_traces=verdict.covered,
            upstream=source, evidence=[e.to_json() for e in verdict.evidence],
        )

    def allowed_realisation(self, request: str, drv_path: str, output: str, value: Value,
                            verdict: Verdict) -> None:
        if self.events.silent:  # (an answer's line: not even built for --quiet)
            return
        self.events.emit(
            EVENT, "allowed",
            f"allowed {printable(verdict.name)}^{output} -> {value.path}: "
            f"{admitted(verdict)}",
            reason=None, request="realisation", id=request, drv=drv_path, name=verdict.name,
            output=output, path=value.path,
            nar_hash=format_nar_hash(value.nar_hash) if value.nar_hash else None,  # (fixed)
            trust=verdict.basis, signers=list(verdict.signers),
            cache_keys=list(verdict.cache_keys), cache_signed=list(verdict.relied),
            covered_without_traces=verdict.covered,
            evidence=[e.to_json() for e in verdict.evidence],
        )


def admitted(verdict: Verdict) -> str:
    """What admitted a path, in words: never calls a cache signature 'verified'."""
    if verdict.basis == "cache":
        return (f"accepted on a cache signature alone by {', '.join(verdict.cache_keys)}; "
                f"{verdict.covered} build step(s) below it covered without traces")
    if verdict.basis == "fixed":
        return "fixed output, pinned by its derivation's hash"
    elements = {e.element for e in verdict.evidence}
    keys = [s for s in verdict.signers if s not in elements]
    parts = [f"traces signed by {', '.join(keys)}"] if keys else []
    parts += [f"hardware evidence {e.describe()}" for e in verdict.evidence]
    said = f"verified by {' and '.join(parts or ['traces'])}"
    if verdict.relied:
        said += (f"; relies on {len(verdict.relied)} path(s) below accepted on a cache "
                 f"signature alone ({', '.join(verdict.relied)}), {verdict.covered} build "
                 "step(s) below them covered without traces")
    return said
