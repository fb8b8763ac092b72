"""A step's plan from its inputs' verified values (verify/decide.py), directly: a pure
function, so every case is data in, plan out."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import pytest

from tracehook.errors import Failure
from tracehook.nix.derivation import Derivation, DerivationOutput
from tracehook.trace.claim import OutputClaim, TraceKey
from tracehook.trace.stepkey import InputOutput, Resolution
from tracehook.verify.decide import PlanLimits, Resolve, StepInput, plan_step
from tracehook.verify.values import Candidate

CA_IN = "/nix/store/" + "1" * 32 + "-lib.drv"
IA_IN = "/nix/store/" + "2" * 32 + "-tool.drv"


def _path(c: str, name: str) -> str:
    return "/nix/store/" + c * 32 + "-" + name


def _candidate(**outputs: str) -> Candidate:
    value = tuple((name, OutputClaim(path, hashlib.sha256(path.encode()).digest()))
                  for name, path in sorted(outputs.items()))
    return Candidate(value, frozenset({"builderA"}), None)


def _drv() -> Derivation:
    return Derivation({"out": DerivationOutput("", "r:sha256", "")},
                      {CA_IN: ("dev", "out"), IA_IN: ("out",)}, (), "x86_64-linux", "/bin/sh",
                      (), {"name": "step"})


def _inputs(lib_values: list[Candidate], tool_values: list[Candidate]) -> list[StepInput]:
    return [StepInput(CA_IN, ("dev", "out"), True, lib_values),
            StepInput(IA_IN, ("out",), False, tool_values)]


def _recording(seen: list[dict[tuple[str, str], InputOutput]]) -> Resolve:
    def resolve(drv: Derivation, chosen: Mapping[tuple[str, str], InputOutput]) -> Resolution:
        seen.append(dict(chosen))
        key = hashlib.sha256(repr(sorted(chosen.items())).encode()).hexdigest()[:32]
        rdrv = f"/nix/store/{key}-step.drv"
        return Resolution(rdrv, TraceKey("ca", key, rdrv), lambda: drv)
    return resolve


LIB_A = _candidate(dev=_path("a", "lib-dev"), out=_path("a", "lib"))
LIB_B = _candidate(dev=_path("b", "lib-dev"), out=_path("b", "lib"))
TOOL = _candidate(out=_path("c", "tool"))


@pytest.mark.parametrize("precomputed", [False, True])
def test_one_resolution_per_combination_of_verified_input_values(precomputed: bool) -> None:
    """Two verified values of one input (builders diverged, the policy accepts both): two
    candidate resolutions, each fixing every referenced output of every input, with the
    NAR hash only where the producer is input-addressed; the same whether the entries were
    computed before (a caller keeping the input for many steps) or by the plan."""
    inputs = _inputs([LIB_A, LIB_B], [TOOL])
    if precomputed:
        for i in inputs:
            assert len(i.entries) == len(i.values)  # computed now, kept by the object
    seen: list[dict[tuple[str, str], InputOutput]] = []
    plan = plan_step(_drv(), inputs, True, PlanLimits(), _recording(seen))
    assert isinstance(plan, list) and len(plan) == 2
    tool = InputOutput(_path("c", "tool"), False, hashlib.sha256(
        _path("c", "tool").encode()).digest())
    assert seen == [
        {(CA_IN, "dev"): InputOutput(_path(c, "lib-dev"), True, None),
         (CA_IN, "out"): InputOutput(_path(c, "lib"), True, None),
         (IA_IN, "out"): tool}
        for c in ("a", "b")]


def test_an_input_without_a_verified_value_fails_the_step() -> None:
    plan = plan_step(_drv(), _inputs([LIB_A], []), True, PlanLimits(), _recording([]))
    assert isinstance(plan, Failure) and plan.kind == "input" and plan.cause == IA_IN


def test_too_many_combinations_are_refused_before_any_is_resolved() -> None:
    seen: list[dict[tuple[str, str], InputOutput]] = []
    plan = plan_step(_drv(), _inputs([LIB_A, LIB_B], [TOOL, TOOL]), True,
                     PlanLimits(max_resolutions=3), _recording(seen))
    assert isinstance(plan, Failure) and plan.kind == "too-many-resolutions"
    assert "lib.drv: 2" in plan.message and seen == []
