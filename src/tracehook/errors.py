"""The project's errors and its three kinds of "no": one home, one exit code each.

Exit codes (documented in the README and used by every executable):
  0  ok
  1  refused, or verification failed
  2  usage or configuration error (bad flag, bad policy, malformed input file)
  3  environment error (a store, a trace store or the network could not be read)

Every exception the package raises is a :class:`TracehookError` defined here; its
``diagnostics()`` is the one line a person reads and ``exit_code`` what a command exits
with (the CLI turns one into the other in one place, ``tracehook.cli.main``).

"Could not check" is kept apart from "no" everywhere: an :class:`EnvironmentFault` (exit 3,
HTTP 502) is never reported as a refusal or an absence and never becomes an allow. The three
values that say "no" are named once, here:

- :class:`Rejected`: one signature (a claim) that does not count, and why;
- :class:`Failure`: why no value of a build step's outputs is verified;
- :class:`Refusal`: the gate's answer "no" (404) for one request, with the step it names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3


class TracehookError(Exception):
    """Base error. ``diagnostics()`` is the one line a person reads."""

    exit_code: int = EXIT_REFUSED

    def diagnostics(self) -> str:
        return str(self)


# ------------------------------------------------------------------------- input (exit 2)


class ParseError(TracehookError):
    """Malformed input: a .drv, a trace, a narinfo, a key, a policy.

    ``what`` names the kind of input (and the file, where known); ``position`` is
    the 0-based character offset where parsing stopped, where it makes sense.
    """

    exit_code = EXIT_USAGE

    def __init__(self, what: str, message: str, position: int | None = None) -> None:
        self.what = what
        self.message = message
        self.position = position
        where = f" at position {position}" if position is not None else ""
        super().__init__(f"malformed {what}{where}: {message}")


class ConfigError(TracehookError):
    """A configuration or policy file, or a flag, says something that cannot be used."""

    exit_code = EXIT_USAGE


# ------------------------------------------------------------------ environment (exit 3)


class EnvironmentFault(TracehookError):
    """Something outside us could not be read or reached (store, trace store, network)."""

    exit_code = EXIT_ENVIRONMENT


class CommandFailed(EnvironmentFault):
    """A subprocess (usually Nix) failed; the message carries its stderr."""


class Unreachable(EnvironmentFault):
    """An HTTP endpoint did not answer in time, dropped the connection, or sent more than
    allowed. ``dropped``: the connection broke mid-request, so one more try may work."""

    def __init__(self, message: str, dropped: bool = False) -> None:
        super().__init__(message)
        self.dropped = dropped


class UpstreamFault(EnvironmentFault):
    """A binary cache could not be read: the gate answers 502, never 'absent', never 'yes'."""


class TraceStoreFault(EnvironmentFault):
    """A trace store could not be read or written."""


class CredentialsRejected(EnvironmentFault):
    """An object store refused the credentials themselves (a wrong secret, an unknown
    access key, an expired token). To whatever reads, a fault like any other (never
    'absent', never an allow: 502 in the gate, exit 3 from verify); a command that stops on
    it exits 2, since the fix is in the configuration."""

    exit_code = EXIT_USAGE


# ------------------------------------------------------------------------- "no" (exit 1)


class BadSignature(TracehookError):
    """A signature was checked and is wrong. Distinct from 'could not check'."""

    exit_code = EXIT_REFUSED


class MissingPin(TracehookError):
    """An input-addressed input output has no NAR hash to pin in a step's key."""

    def __init__(self, drv_path: str, output: str, path: str) -> None:
        super().__init__(
            f"input {drv_path}^{output} ({path}) is input-addressed and has no NAR hash to pin"
        )


class UnresolvedInput(TracehookError):
    """No output path was chosen for an input derivation's output."""

    def __init__(self, drv_path: str, output: str) -> None:
        self.drv_path = drv_path
        self.output = output
        super().__init__(f"no path chosen for output {output!r} of input {drv_path}")


class GraphError(TracehookError):
    """The derivation graph below a target cannot be walked (unreadable or malformed .drv,
    a cycle, deeper than allowed)."""

    def __init__(self, drv_path: str, message: str) -> None:
        self.drv_path = drv_path
        super().__init__(message)


RefusalCause = Literal["trust", "upstream", "absent"]


class Refusal(TracehookError):
    """The gate's "no" (answered 404) for one request: why, and the step it names.

    ``cause`` says what the answer rests on: ``trust`` (the traces and the policy: reused
    while they stay the same), ``upstream`` (what a binary cache serves contradicts what
    is attested) or ``absent`` (the path would be allowed, but no binary cache can serve
    it: logged as ``unavailable``). The last two depend on what the caches hold now and
    are never reused."""

    exit_code = EXIT_REFUSED

    def __init__(self, reason: str, step: str | None = None, name: str | None = None,
                 cause: RefusalCause = "trust") -> None:
        super().__init__(reason)
        self.reason = reason
        self.step = step
        self.name = name
        self.cause: RefusalCause = cause


EvidenceReason = Literal[
    "bad-signature", "unsupported-version", "signing-key-mismatch", "broken-chain",
    "unknown-root", "certificate-expired", "tcb-mismatch", "chip-mismatch", "debug-policy",
    "report-data-mismatch", "measurement-not-accepted", "tcb-too-old",
]


class EvidenceRefused(TracehookError):
    """Hardware evidence (an attestation report) was checked and refused: ``reason`` is one
    code (docs/FORMAT.md 9.3, in the order checked), ``message`` one line saying what was
    found and what was required. An evidence verdict carries it as its refusal."""

    exit_code = EXIT_REFUSED

    def __init__(self, reason: EvidenceReason, message: str) -> None:
        self.reason: EvidenceReason = reason
        self.message = message
        super().__init__(f"evidence refused ({reason}): {message}")


RejectKind = Literal[
    "malformed", "bad-signature", "unknown-key", "expired-key", "revoked-key",
    "other-step", "wrong-output",
    # hardware evidence (an entry of a trace file's evidence list, docs/FORMAT.md 9)
    "evidence-refused", "expired-evidence", "revoked-evidence",
]
FailureKind = Literal[
    "no-trace", "no-trusted-claim", "threshold", "disagree", "missing-output", "input",
    "impure", "too-many-resolutions", "graph", "resolution", "weak-hash", "unreadable",
]


@dataclass(frozen=True)
class Rejected:
    """A signature (or an evidence entry) that does not count, and why."""

    kind: RejectKind
    kid: str | None
    detail: str


@dataclass(frozen=True)
class Failure:
    """Why no value of a build step's outputs is verified."""

    kind: FailureKind
    message: str
    cause: str | None = None  # the input derivation that failed, for kind "input"
