"""The project's errors: one base class, one user-facing line, one exit code each.

Exit codes (documented in the README and used by every executable):
  0  ok
  1  refused, or verification failed
  2  usage or configuration error (bad flag, bad policy, malformed input file)
  3  environment error (a store, a trace store or the network could not be read)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3


class TracehookError(Exception):
    """Base error. ``diagnostics()`` is the one line a person reads."""

    exit_code: int = EXIT_REFUSED

    def diagnostics(self) -> str:
        return str(self)


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


class EnvironmentFault(TracehookError):
    """Something outside us could not be read or reached (store, trace store, network)."""

    exit_code = EXIT_ENVIRONMENT


class BadSignature(TracehookError):
    """A signature was checked and is wrong. Distinct from 'could not check'."""

    exit_code = EXIT_REFUSED


class CommandFailed(EnvironmentFault):
    """A subprocess (usually Nix) failed; the message carries its stderr."""


class EvidenceRefused(TracehookError):
    """Hardware evidence (an attestation report) was checked and refused.

    ``reason`` is one short code from :data:`tracehook.trace.snpverify.REASONS`
    (``bad-signature``, ``unknown-root``, ``measurement-not-accepted``, ...); the message
    says what was found and what was required, in one line."""

    exit_code = EXIT_REFUSED

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"evidence refused ({reason}): {message}")
