"""Asking an evidence provider for hardware evidence: sign.toml's ``evidence-command``.

The contract is docs/FORMAT.md 9.4: the command (an argument list, no shell) runs once per
claim with the claim's binding digest (128 lowercase hex digits) as its last argument, stdin
empty, the caller's environment without ``NIX_CONFIG`` (it holds ``access-tokens``), and
prints one JSON object ``{"kind", "report", "vcek", "chain"}``. :func:`request_evidence`
runs it through the one subprocess wrapper (:func:`tracehook.stores.proc.run`) and returns
the ``evidence`` entry for the claim (:func:`tracehook.trace.evidence.parse_provider_output`:
its report must carry the digest asked for). The report's signature is not checked here;
verifiers check it against their own policy.

Errors: a command that is missing, fails or times out is a
:class:`~tracehook.errors.CommandFailed` (an environment fault, exit 3; its stderr tail in
the message); an answer that is not an entry for this claim is a
:class:`~tracehook.errors.ParseError`. Either way the claim has no evidence; the signer
decides whether that stops anything (it runs on Nix's build loop: keep ``timeout`` short).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from tracehook.errors import CommandFailed
from tracehook.stores import proc
from tracehook.trace.evidence import BoundClaim, EvidenceEntry, parse_provider_output

DEFAULT_TIMEOUT = 10.0
_STDERR_TAIL = 500


def provider_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment an evidence-command gets: ours (or ``base``) without NIX_CONFIG."""
    env = dict(os.environ if base is None else base)
    env.pop("NIX_CONFIG", None)
    return env


def request_evidence(command: Sequence[str], claim: BoundClaim,
                     timeout: float = DEFAULT_TIMEOUT,
                     env: Mapping[str, str] | None = None) -> EvidenceEntry:
    """Run ``command`` for ``claim``; the evidence entry it answered."""
    if not command:
        raise ValueError("an evidence-command needs a program")
    argv = [*command, claim.digest().hex()]
    result = proc.run(argv, env=provider_env(env), timeout=timeout, check=False)
    if result.returncode != 0:
        tail = result.stderr.strip()[-_STDERR_TAIL:]
        raise CommandFailed(f"evidence-command {command[0]} exited {result.returncode}: "
                            f"{tail or 'no message'}")
    stdout = result.stdout.encode("utf-8", errors="surrogateescape")
    return parse_provider_output(stdout, claim, f"evidence-command {command[0]} output")
