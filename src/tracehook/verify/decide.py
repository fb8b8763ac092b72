"""The verifier's decisions about one build step: pure functions of data in, decision out.

No I/O, no clock, no logging. The engine (:mod:`tracehook.verify.engine`) gathers what a
decision needs (the step's derivation, the verified values of its inputs, what consumers
ask of it), calls one of these, and acts on the answer (fetch traces, record, ask caches).

- :func:`plan_step`: how a step can be verified: as a fixed-output anchor, by the traces
  of its candidate resolutions, or not at all (a :class:`~tracehook.errors.Failure`).
  Candidate resolutions are computed from the *verified* values of the input outputs the
  step references, never from what a signer says it used.
- :func:`cache_lookups`: which outputs of a recorded step to look up in the binary caches
  (policy ``narinfo-key``), and how.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from tracehook.errors import Failure, TracehookError
from tracehook.nix.derivation import Derivation
from tracehook.nix.storepath import basename
from tracehook.trace.stepkey import InputOutput, Resolution, step_key
from tracehook.verify.values import Candidate

WEAK_HASHES = frozenset({"md5", "sha1"})


#: What one verified value of an input fixes: ((input drv, output), its path and hash) each.
Entries = tuple[tuple[tuple[str, str], InputOutput], ...]


@dataclass(frozen=True)
class StepInput:
    """One input derivation of a step: the outputs the step references and their verified
    values (an empty ``values`` means the input did not verify)."""

    drv_path: str
    outputs: tuple[str, ...]
    content_addressed: bool  # its producer is fixed-output or floating-CA
    values: Sequence[Candidate]

    @functools.cached_property
    def entries(self) -> tuple[Entries, ...]:
        """Per verified value (in order), what choosing it fixes for a consumer: each
        output's path, and its NAR hash unless the producer is content-addressed. Computed
        once per object: a caller deciding many steps on one input can keep the object."""
        ca = self.content_addressed
        return tuple(
            tuple(((self.drv_path, name), InputOutput(oc.path, ca, None if ca else oc.nar_hash))
                  for name, oc in cand.value)
            for cand in self.values)


@dataclass(frozen=True)
class PlanLimits:
    max_resolutions: int = 256
    weak_fixed_output_hashes: bool = False  # md5/sha1-pinned fixed outputs as anchors


Plan = Literal["fixed"] | Failure | list[Resolution]
Resolve = Callable[[Derivation, Mapping[tuple[str, str], InputOutput]], Resolution]


def plan_step(
    drv: Derivation,
    inputs: Sequence[StepInput],
    traces_can_verify: bool,
    limits: PlanLimits,
    resolve: Resolve = step_key,
) -> Plan:
    """``"fixed"`` (a fixed-output anchor), a Failure, or the candidate resolutions (one
    per combination of the inputs' verified values, deduplicated by trace key)."""
    kind = drv.kind
    if kind == "fixed":
        algo = drv.outputs["out"].algo
        if algo in WEAK_HASHES and not limits.weak_fixed_output_hashes:
            return Failure("weak-hash", f"fixed-output derivation pinned by {algo}, a weak "
                           "hash: not a trust anchor (policy weak-fixed-output-hashes = "
                           "\"allow\" to accept it)")
        return "fixed"
    if kind == "impure":
        return Failure("impure", "impure derivations cannot be verified: their outputs are "
                       "not traced")
    if not traces_can_verify:
        return Failure("no-trace", "the policy trusts no trace, only cache signatures")
    total = 1
    for inp in inputs:
        if not inp.values:
            return Failure("input", f"input {basename(inp.drv_path)} "
                           f"({', '.join(inp.outputs)}) is not verified", cause=inp.drv_path)
        total *= len(inp.values)
    if total > limits.max_resolutions:
        spread = ", ".join(f"{basename(i.drv_path)}: {len(i.values)}" for i in inputs
                           if len(i.values) > 1)
        return Failure(
            "too-many-resolutions",
            f"{total} candidate resolutions (verified values per input: {spread}) exceed the "
            f"cap of {limits.max_resolutions}; builders disagree on inputs this step uses: "
            "fix the divergence or raise --max-resolutions")
    resolutions: dict[str, Resolution] = {}
    for combo in itertools.product(*(inp.entries for inp in inputs)):
        chosen = dict(itertools.chain.from_iterable(combo))
        try:
            res = resolve(drv, chosen)
        except TracehookError as exc:
            return Failure("resolution", f"cannot resolve: {exc.diagnostics()}")
        resolutions.setdefault(res.key.key, res)
    return list(resolutions.values())


CacheLookup = tuple[Literal["path", "realisation"], str]


def cache_lookups(
    drv: Derivation,
    requested: Iterable[frozenset[str]],
    verified: Callable[[frozenset[str]], bool],
    known_paths: Mapping[str, str],
    realisation_ids: Callable[[], Mapping[str, str]],
) -> dict[str, CacheLookup]:
    """The outputs of a recorded step that a consumer references and no trace verified,
    and how to look each up in the caches: by its path (``("path", p)``, when the
    derivation or its one resolution fixes it) or by the unresolved derivation's
    realisation id. Fixed-output and impure steps are never looked up."""
    if drv.kind in ("fixed", "impure"):
        return {}
    need: set[str] = set()
    for want in requested:
        if not verified(want):
            need |= want
    lookups: dict[str, CacheLookup] = {}
    ids: Mapping[str, str] | None = None
    for name in sorted(need):
        fixed = drv.outputs[name].path or known_paths.get(name)
        if fixed:
            lookups[name] = ("path", fixed)
            continue
        if ids is None:
            ids = realisation_ids()
        lookups[name] = ("realisation", ids[name])
    return lookups
