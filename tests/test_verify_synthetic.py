"""Verifier scenarios on synthetic derivation graphs: what real Nix cannot produce on demand.

Divergent builders (non-reproducible steps signed with different outputs), the same signer
twice, cycles and over-deep graphs need claims or graphs that a real, deterministic build of
tests/nix/derivations.nix never yields; here the derivations are built as ATerm objects and
signed with the laut test keys, and the engine (resolver + core) runs on them in-process.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from tracehook.nix.derivation import Derivation, DerivationOutput
from tracehook.nix.storepath import derivation_path, make_fixed_output_path, make_store_path
from tracehook.stores.tracestore import FileTraceStore, open_store
from tracehook.trace.claim import OutputClaim, sign_trace
from tracehook.trace.stepkey import InputOutput, step_key
from tracehook.verify.limits import Limits
from tracehook.verify.policy import parse_policy
from tracehook.verify.report import TargetReport, render_human
from tracehook.verify.resolver import Resolver
from tracehook.verify.walk import Target
from verifyhelp import BUILDER, DyingStore, SlowStore, public_text, secret

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def ca_path(name: str, tag: str) -> str:
    return make_store_path("output:out", hashlib.sha256(tag.encode()).digest(), name)


class Graph:
    def __init__(self, tmp: Path, processes: int = 0) -> None:
        """``processes``: check traces in that many checker processes (from the first step)
        instead of threads; every scenario runs both ways."""
        self.drvs: dict[str, Derivation] = {}
        self.processes = processes
        self.tmp = tmp
        self.store = FileTraceStore(f"file://{tmp}", tmp)
        self.rebuild = 0

    def fod(self, name: str) -> str:
        digest = hashlib.sha256(name.encode()).digest()
        path = make_fixed_output_path("flat", "sha256", digest, name)
        drv = Derivation({"out": DerivationOutput(path, "sha256", digest.hex())}, {}, (),
                         "x86_64-linux", "/bin/sh", (), {"name": name, "out": path})
        return self._add(drv)

    def ca(self, name: str, inputs: Mapping[str, tuple[str, ...]],
           outputs: Sequence[str] = ("out",)) -> str:
        outs = {o: DerivationOutput("", "r:sha256", "") for o in outputs}
        env = {"name": name, **{o: "" for o in outputs}}
        drv = Derivation(outs, dict(sorted(inputs.items())), (), "x86_64-linux", "/bin/sh",
                         (), dict(sorted(env.items())))
        return self._add(drv)

    def _add(self, drv: Derivation) -> str:
        path = derivation_path(drv)
        self.drvs[path] = drv
        return path

    def sign(self, drv_path: str, used: dict[tuple[str, str], str], outputs: dict[str, str],
             *signers: str) -> str:
        """Sign ``drv_path`` resolved with ``used`` ((input, output) -> path) -> outputs."""
        drv = self.drvs[drv_path]
        inputs = {k: InputOutput(p, True) for k, p in used.items()}
        res = step_key(drv, inputs)
        claims = {n: OutputClaim(p, hashlib.sha256(p.encode()).digest())
                  for n, p in outputs.items()}
        for who in signers:
            self.rebuild += 1
            token = sign_trace(secret(who), res.key, claims, BUILDER, drv.name)
            self.store.append(res.key.key, [token])
        return res.key.key

    def verify(self, target: str, require: str, keys: Sequence[str] = ("builderA", "builderB"),
               limits: Limits | None = None, stores: int = 1) -> TargetReport:
        text = "[keys]\n" + "".join(f'{k} = "{public_text(k)}"\n' for k in keys)
        text += f"[trust]\nrequire = {require}\n"
        policy = parse_policy(text)
        opened = [open_store(f"file://{self.tmp}") for _ in range(stores)]
        limits = dataclasses.replace(limits or Limits(), processes=self.processes,
                                     process_from=0)
        resolver = Resolver(policy, opened, self.load, NOW, limits)
        [report] = resolver.verify([Target(target, target)])
        return report

    def load(self, path: str) -> Derivation:
        return self.drvs[path]


@pytest.fixture(params=[0, 2], ids=["threads", "processes"])
def g(tmp_path: Path, request: pytest.FixtureRequest) -> Graph:
    return Graph(tmp_path, request.param)


BOTH = '{ all-of = ["builderA", "builderB"] }'
EITHER = '{ threshold = 1, of = ["builderA", "builderB"] }'


def diamond(g: Graph, y_diverges: bool, x_converges: bool) -> str:
    """src (FOD) -> y -> x; builders A and B each build y and x."""
    src = g.fod("src")
    y = g.ca("y", {src: ("out",)})
    x = g.ca("x", {y: ("out",)})
    src_out = g.drvs[src].outputs["out"].path
    y_a, y_b = ca_path("y", "a"), ca_path("y", "b" if y_diverges else "a")
    g.sign(y, {(src, "out"): src_out}, {"out": y_a}, "builderA")
    g.sign(y, {(src, "out"): src_out}, {"out": y_b}, "builderB")
    x_a, x_b = ca_path("x", "a"), ca_path("x", "a" if x_converges else "b")
    g.sign(x, {(y, "out"): y_a}, {"out": x_a}, "builderA")
    g.sign(x, {(y, "out"): y_b}, {"out": x_b}, "builderB")
    return x


# name, y diverges, x converges, require, verified, text in the reason or alternatives
DIVERGENCE = [
    ("reproducible-2-of-2", False, True, BOTH, True, ""),
    ("divergent-then-converging-1-of-2", True, True, EITHER, True, ""),
    ("divergent-input-2-of-2-refused", True, True, BOTH, False, "claims disagree"),
    ("final-disagreement-2-of-2-refused", False, False, BOTH, False, "claims disagree"),
    ("final-disagreement-1-of-2-both-verified", False, False, EITHER, True, "alternative"),
]


@pytest.mark.parametrize(("name", "diverge", "converge", "require", "ok", "text"), DIVERGENCE,
                         ids=[d[0] for d in DIVERGENCE])
def test_divergence(g: Graph, name: str, diverge: bool, converge: bool, require: str, ok: bool,
                    text: str) -> None:
    x = diamond(g, diverge, converge)
    report = g.verify(x, require)
    assert report.verified is ok, report.reason
    if not ok:
        assert text in (report.reason or "")
        assert ca_path("x" if not diverge else "y", "a") in (report.reason or "")
        assert ca_path("x" if not diverge else "y", "b") in (report.reason or "")
    if name == "divergent-then-converging-1-of-2":
        # x's two resolutions (one per history of y) converge: both signers count for x.
        step = next(s for s in report.steps if s.name == "x")
        assert len(step.keys) == 2
        assert report.signers == ("builderA", "builderB")
    if text == "alternative":
        assert len(report.alternatives) == 1


def test_signer_counted_once_per_step(g: Graph) -> None:
    """builderA signs the same claim twice (two rebuilds), served by two stores: 2 of (A, B)
    still needs builderB."""
    src = g.fod("src")
    y = g.ca("y", {src: ("out",)})
    used = {(src, "out"): g.drvs[src].outputs["out"].path}
    g.sign(y, used, {"out": ca_path("y", "a")}, "builderA", "builderA")
    report = g.verify(y, '{ threshold = 2, of = ["builderA", "builderB"] }', stores=2)
    assert not report.verified
    assert "signed by builderA; missing builderB" in (report.reason or "")
    g.sign(y, used, {"out": ca_path("y", "a")}, "builderB")
    assert g.verify(y, '{ threshold = 2, of = ["builderA", "builderB"] }').verified


def test_outputs_of_one_step_come_from_one_claim(g: Graph) -> None:
    """m has out and lib; A and B disagree on both. A consumer of both outputs resolves with
    (A's out, A's lib) or (B's out, B's lib), never a mix: 2 resolutions, not 4."""
    src = g.fod("src")
    m = g.ca("m", {src: ("out",)}, outputs=("lib", "out"))
    c = g.ca("c", {m: ("lib", "out")})
    used = {(src, "out"): g.drvs[src].outputs["out"].path}
    for who, tag in (("builderA", "a"), ("builderB", "b")):
        g.sign(m, used, {"out": ca_path("m", tag), "lib": ca_path("m-lib", tag)}, who)
        g.sign(c, {(m, "out"): ca_path("m", tag), (m, "lib"): ca_path("m-lib", tag)},
               {"out": ca_path("c", "same")}, who)
    report = g.verify(c, EITHER)
    assert report.verified
    step = next(s for s in report.steps if s.name == "c")
    assert len(step.keys) == 2
    assert step.signers == ("builderA", "builderB")


def test_resolution_cap(g: Graph) -> None:
    src = g.fod("src")
    used = {(src, "out"): g.drvs[src].outputs["out"].path}
    inputs = {}
    for i in range(3):
        y = g.ca(f"y{i}", {src: ("out",)})
        g.sign(y, used, {"out": ca_path(f"y{i}", "a")}, "builderA")
        g.sign(y, used, {"out": ca_path(f"y{i}", "b")}, "builderB")
        inputs[y] = ("out",)
    top = g.ca("top", inputs)
    report = g.verify(top, EITHER, limits=Limits(max_resolutions=4))
    assert not report.verified
    assert "8 candidate resolutions" in (report.reason or "")
    assert "--max-resolutions" in (report.reason or "")


def test_cycle_is_refused_by_name(g: Graph) -> None:
    a = g.ca("a", {})
    b = g.ca("b", {a: ("out",)})
    # Rewire a to depend on b: such files cannot hash to their own paths, so the loader here
    # is a plain mapping (StoreReader would refuse them earlier, as malformed).
    old = g.drvs[a]
    g.drvs[a] = Derivation(old.outputs, {b: ("out",)}, (), old.platform, old.builder, (),
                           old.env)
    report = g.verify(b, EITHER)
    assert not report.verified
    assert "cycle" in (report.reason or "")
    assert "-a.drv -> " in (report.reason or "") and "-b.drv" in (report.reason or "")


def test_max_depth(g: Graph) -> None:
    prev = g.fod("src")
    for i in range(6):
        prev = g.ca(f"s{i}", {prev: ("out",)})
    report = g.verify(prev, EITHER, limits=Limits(max_depth=4))
    assert not report.verified
    assert "deeper than 4" in (report.reason or "")


@pytest.mark.parametrize("how", ["cannot-start", "dies"])
def test_checker_processes_that_fail_hand_over_to_threads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """Checker processes that cannot be started (a store that cannot be handed to them:
    here one defined inside a function cannot be pickled) or that die in the middle of a
    run: the verifier logs it and checks in threads instead, with the same answer."""

    class Local(FileTraceStore):
        pass

    store_type = Local if how == "cannot-start" else DyingStore
    g = Graph(tmp_path, processes=2)
    src = g.fod("src")
    y = g.ca("y", {src: ("out",)})
    x = g.ca("x", {y: ("out",)})
    g.sign(y, {(src, "out"): g.drvs[src].outputs["out"].path}, {"out": ca_path("y", "a")},
           "builderA", "builderB")
    g.sign(x, {(y, "out"): ca_path("y", "a")}, {"out": ca_path("x", "a")},
           "builderA", "builderB")
    text = "[keys]\n" + "".join(f'{k} = "{public_text(k)}"\n' for k in ("builderA", "builderB"))
    policy = parse_policy(text + f"[trust]\nrequire = {BOTH}\n")
    limits = Limits(processes=2, process_from=0)
    resolver = Resolver(policy, [store_type(f"file://{tmp_path}", tmp_path)], g.load, NOW,
                        limits)
    with caplog.at_level("WARNING"):
        [report] = resolver.verify([Target(x, x)])
    assert report.verified, report.reason
    assert report.outputs == {"out": ca_path("x", "a")}
    assert any("checker processes failed" in r.getMessage() for r in caplog.records)


def test_check_batch_gives_what_the_key_ring_gives(g: Graph) -> None:
    """What a checker process sends back, unpacked, equals checking in this process."""
    from tracehook.verify import _checkpool
    from tracehook.verify.trusted import KeyRing

    src = g.fod("src")
    y = g.ca("y", {src: ("out",)})
    key = g.sign(y, {(src, "out"): g.drvs[src].outputs["out"].path},
                 {"out": ca_path("y", "a")}, "builderA", "builderB")
    g.store.append(key, ["not.a.jws"])
    text = "[keys]\n" + f'builderA = "{public_text("builderA")}"\n'
    policy = parse_policy(text + '[trust]\nrequire = "builderA"\n')
    trace_key = step_key(g.drvs[y], {(src, "out"): InputOutput(
        g.drvs[src].outputs["out"].path, True)}).key
    _checkpool._init_worker(policy, NOW, [g.store])
    try:
        [packed] = _checkpool._check_batch([trace_key])
    finally:
        _checkpool._worker = None
    ring = KeyRing(policy, NOW)
    checked, faults = _checkpool.unpack(packed, trace_key, ring)
    direct = ring.check(g.store.get(key), trace_key)
    assert checked == direct and faults == ()
    assert [a.signer for a in checked.accepted] == ["builderA"]
    assert {r.kind for r in checked.rejected} == {"unknown-key", "malformed"}
    assert checked.accepted[0].claim.token.header["kid"].startswith("builderA:")


def _wide_graph(g: Graph, steps: int) -> str:
    """``steps`` steps on one source, each signed by builderA, under one unsigned top."""
    src = g.fod("src")
    used = {(src, "out"): g.drvs[src].outputs["out"].path}
    paths = [g.ca(f"s{i}", {src: ("out",)}) for i in range(steps)]
    (g.tmp / "traces").mkdir(exist_ok=True)
    for i, step in enumerate(paths):
        res = step_key(g.drvs[step], {k: InputOutput(p, True) for k, p in used.items()})
        claim = {"out": OutputClaim(ca_path(f"s{i}", "a"), hashlib.sha256(b"x").digest())}
        token = sign_trace(secret("builderA"), res.key, claim, BUILDER, f"s{i}")
        (g.tmp / "traces" / res.key.key).write_text(json.dumps({"signatures": [token]}))
    return g.ca("top", {s: ("out",) for s in paths})


@pytest.mark.parametrize(("store_type", "warned"), [(SlowStore, False), (DyingStore, True)],
                         ids=["falls-behind", "dies-with-keys-planned"])
def test_one_checker_and_900_steps_planned_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, store_type: type[FileTraceStore],
    warned: bool,
) -> None:
    """900 steps planned at once for one checker process. A slow one: more batches than
    its pipe holds queue up (the resolver blocks sending, the worker keeps answering). One
    that dies: the batches it had, and the keys planned but not yet sent, go to threads.
    Either way the run does not stall and every step is checked."""
    g = Graph(tmp_path, processes=1)
    top = _wide_graph(g, 900)
    text = f'[keys]\nbuilderA = "{public_text("builderA")}"\n[trust]\nrequire = "builderA"\n'
    resolver = Resolver(parse_policy(text), [store_type(f"file://{tmp_path}", tmp_path)],
                        g.load, NOW, Limits(processes=1))
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the run stalled"))
    signal.alarm(120)
    try:
        with caplog.at_level("WARNING"):
            [report] = resolver.verify([Target(top, top)])
    finally:
        signal.alarm(0)
    assert not report.verified  # top itself is not signed; every input is
    assert report.reason is not None and "no trace for resolved step" in report.reason
    assert sum(1 for s in report.steps if s.outcome == "verified") == 900
    assert any("checker processes failed" in r.getMessage() for r in caplog.records) == warned


def test_steps_below_a_fixed_output_are_not_needed(g: Graph) -> None:
    """A fetcher built from an unsigned step: the fixed output is pinned by its hash, so the
    unsigned step below it is reported as not needed, never as refused."""
    tool = g.ca("curl", {})  # no trace: would be refused if it mattered
    digest = hashlib.sha256(b"src").digest()
    path = make_fixed_output_path("flat", "sha256", digest, "src")
    fetch = g._add(Derivation({"out": DerivationOutput(path, "sha256", digest.hex())},
                              {tool: ("out",)}, (), "x86_64-linux", "/bin/sh", (),
                              {"name": "src", "out": path}))
    top = g.ca("app", {fetch: ("out",)})
    g.sign(top, {(fetch, "out"): path}, {"out": ca_path("app", "a")}, "builderA")
    report = g.verify(top, '"builderA"')
    assert report.verified, report.reason
    outcomes = {s.name: s.outcome for s in report.steps}
    assert outcomes == {"curl": "not-needed", "src": "fixed-output", "app": "verified"}
    [below] = [s for s in report.steps if s.name == "curl"]
    assert below.reason is not None and "below a fixed-output step" in below.reason
    assert report.trust_summary["refused"] == []
    assert "1 not-needed" in render_human(report)


@pytest.mark.parametrize("shape", ["chain", "wide"])
def test_checker_processes_start_for_a_backlog_not_for_a_chain(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape: str) -> None:
    """Below ``process_wait_from`` derivations, checker processes start only once
    ``process_backlog`` checks wait at once: a long chain of steps (one check at a time)
    is verified in threads, without the cores that starting interpreters would take."""
    from tracehook.verify import engine as engine_mod

    started: list[int] = []
    monkeypatch.setattr(engine_mod, "start_pool",
                        lambda *a, **k: started.append(1))  # threads check meanwhile
    g = Graph(tmp_path)
    if shape == "wide":
        top = _wide_graph(g, 40)
    else:
        src = g.fod("src")
        prev, prev_out = src, g.drvs[src].outputs["out"].path
        for i in range(40):
            step = g.ca(f"c{i}", {prev: ("out",)})
            out = ca_path(f"c{i}", "a")
            g.sign(step, {(prev, "out"): prev_out}, {"out": out}, "builderA")
            prev, prev_out = step, out
        top = prev
    text = f'[keys]\nbuilderA = "{public_text("builderA")}"\n[trust]\nrequire = "builderA"\n'
    limits = Limits(process_from=10, process_backlog=8, process_wait_from=10_000)
    engine = engine_mod.Engine(parse_policy(text), [g.store], g.load, NOW, limits)
    engine.verify([Target(top, top)])
    engine.close()
    assert started == ([] if shape == "chain" else [1])
    steps = [s for s in g.drvs if s != top]
    assert all(engine.trusted.values(s, frozenset({"out"})) for s in steps)


def test_service_collections_keeps_the_collector_running_with_a_larger_young_generation(
) -> None:
    """The gate's collector policy: fewer young (and so full) collections over a heap that
    is mostly long-lived, never a paused collector (a service must still free cycles)."""
    import gc

    from tracehook.verify.walk import SERVICE_YOUNG_THRESHOLD, service_collections

    before = gc.get_threshold()
    try:
        service_collections()
        assert gc.get_threshold() == (SERVICE_YOUNG_THRESHOLD, *before[1:])
        assert gc.isenabled()
        service_collections()  # twice changes nothing more
        assert gc.get_threshold() == (SERVICE_YOUNG_THRESHOLD, *before[1:])
    finally:
        gc.set_threshold(*before)
