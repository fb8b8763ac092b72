"""Steps an engine verified, kept as plain values and taken back by another engine
(Engine.keep / Engine.take_back, what a gate keeps across a restart): the walk stops at a
kept step, a kept claim is admitted again only under a current key, and nothing is kept
from an engine that saw tamper evidence."""

from __future__ import annotations

import datetime as dt
import marshal
from pathlib import Path

import pytest

from attackkit import tamper_claimed_hash
from test_verify_synthetic import Graph, ca_path
from tracehook.verify.engine import Engine
from tracehook.verify.limits import Limits
from tracehook.verify.policy import parse_policy
from tracehook.verify.trustedset import KeptStep
from tracehook.verify.walk import Target
from verifyhelp import public_text

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)
OUT = frozenset({"out"})


def _policy(revoked: str | None = None) -> str:
    text = "[keys]\n"
    for who in ("builderA", "builderB"):
        if who == revoked:
            text += f'{who} = {{ key = "{public_text(who)}", revoked = true }}\n'
        else:
            text += f'{who} = "{public_text(who)}"\n'
    return text + '[trust]\nrequire = { threshold = 1, of = ["builderA", "builderB"] }\n'


def _chain(g: Graph, length: int) -> list[str]:
    """src (FOD) -> s0 -> s1 -> ...: each step signed by both builders."""
    src = g.fod("src")
    prev, used = src, g.drvs[src].outputs["out"].path
    steps = []
    for i in range(length):
        step = g.ca(f"s{i}", {prev: ("out",)})
        out = ca_path(f"s{i}", "a")
        g.sign(step, {(prev, "out"): used}, {"out": out}, "builderA", "builderB")
        steps.append(step)
        prev, used = step, out
    return steps


def _on_top(g: Graph, below: str, name: str) -> str:
    step = g.ca(name, {below: ("out",)})
    below_out = ca_path(g.drvs[below].env["name"], "a")
    g.sign(step, {(below, "out"): below_out}, {"out": ca_path(name, "a")}, "builderA")
    return step


def _engine(g: Graph, policy: str) -> Engine:
    engine = Engine(parse_policy(policy), [g.store], g.load, NOW, Limits(processes=0))
    engine.start()
    return engine


def _decide(engine: Engine, step: str) -> None:
    engine.submit(Target(step, step, OUT)).result(timeout=30)


def _kept(g: Graph, top: str) -> dict[str, tuple[int, KeptStep]]:
    first = _engine(g, _policy())
    try:
        _decide(first, top)
        kept = first.keep().result(timeout=30)
    finally:
        first.close()
    got: dict[str, tuple[int, KeptStep]] = marshal.loads(marshal.dumps(kept))  # as recorded
    return got


def test_a_step_above_kept_steps_is_decided_without_walking_below_them(tmp_path: Path) -> None:
    g = Graph(tmp_path)
    steps = _chain(g, 30)
    kept = _kept(g, steps[-1])
    assert set(kept) == {*steps, next(p for p in g.drvs if "-src" in p)}
    new = _on_top(g, steps[-1], "changed")
    second = _engine(g, _policy())
    try:
        second.take_back(kept)
        _decide(second, new)
        # one step planned (the new one), one taken back (the kept step it builds on);
        # nothing below that was read
        assert (second.planned, second.taken_back) == (1, 1)
        assert set(second.graph.drvs) == {new, steps[-1]}
        assert [c.paths() for c in second.trusted.values(new, OUT)] == [
            {"out": ca_path("changed", "a")}]
        assert second.trusted.values(steps[-1], OUT)[0].signers == {"builderA", "builderB"}
        # a kept step below that was not walked to is kept again, with the new ones
        again = second.keep().result(timeout=30)
        assert set(again) == {*kept, new}
        assert again[steps[0]] == kept[steps[0]]
    finally:
        second.close()
    cold = _engine(g, _policy())  # the same answer as an engine that keeps nothing
    try:
        _decide(cold, new)
        assert cold.planned == 32
        assert ([c.value for c in cold.trusted.values(new, OUT)]
                == [c.value for c in second.trusted.values(new, OUT)])
    finally:
        cold.close()


def test_a_kept_step_asked_for_takes_back_the_kept_steps_below_it(tmp_path: Path) -> None:
    """Asked for itself (the whole closure asked again), a kept step is taken back with
    every kept step below it in one walk: the requests for those find them decided; the
    kept steps above it are not touched, and nothing is planned."""
    g = Graph(tmp_path)
    steps = _chain(g, 30)
    kept = _kept(g, steps[-1])
    engine = _engine(g, _policy())
    try:
        engine.take_back(kept)
        _decide(engine, steps[20])
        # steps 0 to 20 and the source below them
        assert (engine.planned, engine.taken_back) == (0, 22)
        assert engine.decided(Target(steps[0], steps[0], OUT))
        assert not engine.decided(Target(steps[21], steps[21], OUT))
        assert engine.trusted.values(steps[0], OUT)[0].signers == {"builderA", "builderB"}
        assert set(engine.keep().result(timeout=30)) == set(kept)  # all kept again
    finally:
        engine.close()


def test_a_kept_claim_of_a_key_no_longer_trusted_is_a_fault_not_an_allow(
        tmp_path: Path) -> None:
    """(A gate never gives back steps under another policy: its record is named by the
    policy's digest. This is the check behind it: readmit refuses such a claim.)"""
    g = Graph(tmp_path)
    steps = _chain(g, 3)
    kept = _kept(g, steps[-1])
    # only builderA's claim is kept for the top step: the other signer's is dropped
    fixed, keys, accepted, rejected, seen, evidence_seen = kept[steps[-1]][1]
    only_a = [a for a in accepted if a[0] == "builderA"]
    kept[steps[-1]] = (kept[steps[-1]][0],
                       (fixed, keys, tuple(only_a), rejected, seen, evidence_seen))
    new = _on_top(g, steps[-1], "changed")
    engine = _engine(g, _policy(revoked="builderA"))
    try:
        engine.take_back(kept)
        _decide(engine, new)
        assert engine.is_tainted(steps[-1]) and engine.is_tainted(new)
        assert not engine.trusted.values(steps[-1], OUT)
        assert any("could not be taken back" in f.message for f in engine.faults)
        assert engine.keep().result(timeout=30) == {}  # and nothing is kept from it
    finally:
        engine.close()


@pytest.mark.parametrize("damage", ["no-such-key", "not-a-tuple"])
def test_a_kept_step_that_is_not_what_keep_wrote_is_a_fault(tmp_path: Path,
                                                             damage: str) -> None:
    g = Graph(tmp_path)
    steps = _chain(g, 2)
    kept = _kept(g, steps[-1])
    height, step = kept[steps[-1]]
    if damage == "no-such-key":
        fixed, _, accepted, rejected, seen, evidence_seen = step
        step = (fixed, (), accepted, rejected, seen, evidence_seen)
    else:
        step = (False, 7, (), (), 0, 0)  # type: ignore[assignment]
    kept[steps[-1]] = (height, step)
    new = _on_top(g, steps[-1], "changed")
    engine = _engine(g, _policy())
    try:
        engine.take_back(kept)
        _decide(engine, new)
        assert engine.is_tainted(new) and not engine.trusted.values(new, OUT)
    finally:
        engine.close()


def test_nothing_is_kept_from_an_engine_that_saw_tamper_evidence(tmp_path: Path) -> None:
    g = Graph(tmp_path)
    steps = _chain(g, 3)
    tamper_claimed_hash(next(p for p in (tmp_path / "traces").iterdir()
                             if not p.name.startswith(".")))
    engine = _engine(g, _policy())
    try:
        _decide(engine, steps[-1])
        assert engine.tampered
        assert engine.keep().result(timeout=30) == {}
    finally:
        engine.close()


def test_a_closed_engine_keeps_nothing_and_does_not_wait(tmp_path: Path) -> None:
    g = Graph(tmp_path)
    steps = _chain(g, 2)
    engine = _engine(g, _policy())
    _decide(engine, steps[-1])
    engine.close()
    assert engine.keep().result(timeout=1) == {}
