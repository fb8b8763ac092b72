"""The values a verified set answers with: one way a step's referenced outputs can be. Pure.

A *value* is the (output name, claim) pairs of the outputs a consumer references, sorted by
name; claims name the same value when path and NAR hash agree
(:class:`~tracehook.trace.claim.OutputClaim` equality). A :class:`Candidate` is a value with
what supports it: the trust model's result over its distinct signers (keys and evidence
elements), a cache signature, or a fixed-output anchor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tracehook.nix.nar import format_nar_hash
from tracehook.trace.claim import OutputClaim
from tracehook.verify.policy import TrustResult

Basis = Literal["fixed", "traces", "cache"]
Value = tuple[tuple[str, OutputClaim], ...]  # (output name, claim), sorted by name


@dataclass(frozen=True)
class Candidate:
    """One way the referenced outputs of a step can be, with the evidence for it."""

    value: Value
    signers: frozenset[str]  # policy keys and evidence elements; for a cache signature,
    # the cache keys
    trust: TrustResult | None  # None: a fixed-output anchor or a cache signature
    basis: Basis = "traces"

    def paths(self) -> dict[str, str]:
        return {name: oc.path for name, oc in self.value}


def show_value(value: Value, hashes: bool = False) -> str:
    """``out=/nix/store/...``; with ``hashes``, each NAR hash too (values that differ only
    there)."""
    return ", ".join(f"{name}={oc.path}" + (f" ({format_nar_hash(oc.nar_hash)})" if hashes
                                             else "") for name, oc in value)
