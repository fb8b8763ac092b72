"""The gate end to end with real Nix: a builder signs and publishes, a consumer substitutes
through the gate, which lets the whole chain in when the policy trusts the builder and
refuses (Nix fails with --max-jobs 0) when any link of the chain is not trusted.

Scenarios are a table: the mutation of the trust state (trace store, policy, upstream
cache), and for each chain whether Nix substitutes it, and which step the gate names.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from gatekit import (
    RunningGate,
    Signed,
    copy_to_cache,
    key,
    running_gate,
    sign_closure,
    step_keys,
    tamper_trace,
    use_hook,
    write_gate_key,
    write_policy,
)
from gateproc import gate_argv, gate_process, get, wait_for
from nixharness import NixEnv, NixTier
from tracehook import cli
from tracehook.nix import realisation

pytestmark = pytest.mark.nix

SALT = "gate-e2e"
CHAINS = ("caC", "iaC")
ALL = ("caA", "caB", "caC", "iaA", "iaB", "iaC")
MORE = ("fodFlat", "fodRec", "caOnFod", "iaOnCa", "useMulti")


@dataclass
class Built:
    """A builder's published state, reused (copied) by every scenario."""

    base: Path
    cache: Path
    traces: Path  # signed by builderA
    traces_b: Path  # the same steps signed by builderB (a second, independent builder)
    signed: Signed
    drvs: dict[str, str]  # attr -> drv path
    outs: dict[str, str]  # attr -> output path


def _build(env: NixEnv, attrs: tuple[str, ...]) -> tuple[dict[str, str], dict[str, str]]:
    drvs = {a: env.instantiate(a, salt=SALT) for a in attrs}
    outs = {a: env.build(a, salt=SALT).out_paths[0] for a in attrs}
    return drvs, outs


@pytest.fixture(scope="module")
def built(nix226: NixTier, tmp_path_factory: pytest.TempPathFactory) -> Built:
    base = tmp_path_factory.mktemp("gate-builder")
    # builderA signs with the real post-build hook, then publishes its spool.
    env_a = NixEnv(nix226, base / "builderA")
    config = use_hook(env_a, key("builderA"), base / "traces", base / "signerA")
    drvs, outs = _build(env_a, ALL + MORE)
    assert cli.main(["publish", "--config", str(config)]) == 0
    cache = base / "cache"
    copy_to_cache(env_a, cache, list(drvs.values()), list(outs.values()))
    signed = step_keys(env_a, list(drvs.values()))
    published = {f.name for f in (base / "traces" / "traces").iterdir()
                 if not f.name.startswith(".")}
    assert {k for _, k in signed.steps.values()} == published
    # builderB: an independent store that builds the same expressions; signed with the
    # signer's library (the code the hook runs), one call per step.
    env_b = NixEnv(nix226, base / "builderB")
    drvs_b, outs_b = _build(env_b, ALL + MORE)
    assert outs_b == outs, "the test derivations are deterministic"
    sign_closure(env_b, list(drvs_b.values()), key("builderB"), base / "traces_b")
    return Built(base, cache, base / "traces", base / "traces_b", signed, drvs, outs)


@dataclass
class Scenario:
    traces: Path
    cache: Path
    policy: Path
    gate_key: Path
    gate_pub: str
    tmp: Path


@pytest.fixture
def scenario(built: Built, tmp_path: Path) -> Scenario:
    traces = tmp_path / "traces"
    shutil.copytree(built.traces, traces)
    cache = tmp_path / "cache"
    shutil.copytree(built.cache, cache)
    policy = write_policy(tmp_path / "policy.toml", traces, '"builderA"', ["builderA"])
    gate_key, gate_pub = write_gate_key(tmp_path)
    return Scenario(traces, cache, policy, gate_key, gate_pub, tmp_path)


@dataclass
class Outcome:
    substituted: dict[str, bool]  # attr -> Nix got the output with --max-jobs 0
    paths: dict[str, tuple[str, ...]]
    stderr: dict[str, str]
    gate: RunningGate
    consumer: NixEnv


def consume(tier: NixTier, scen: Scenario, attrs: tuple[str, ...] = CHAINS,
            upstreams: list[str] | None = None, local_builds: bool = False) -> Outcome:
    """A fresh consumer store that can only substitute through the gate (--max-jobs 0)."""
    consumer = NixEnv(tier, scen.tmp / "consumer")
    for attr in attrs:
        consumer.instantiate(attr, salt=SALT)
    ups = upstreams or [f"file://{scen.cache}"]
    with running_gate(scen.policy, ups, str(consumer.root), scen.tmp / "gate.log",
                      signing_key=scen.gate_key) as gate:
        consumer.configure(substituters=gate.url, trusted_public_keys=scen.gate_pub)
        done: dict[str, bool] = {}
        paths: dict[str, tuple[str, ...]] = {}
        errs: dict[str, str] = {}
        jobs = ("--max-jobs", "1" if local_builds else "0")
        for attr in attrs:
            res = consumer.build(attr, *jobs, salt=SALT, check=False)
            done[attr] = bool(res.out_paths) and all(
                consumer.real(p).exists() for p in res.out_paths)
            paths[attr] = res.out_paths
            errs[attr] = res.stderr
    return Outcome(done, paths, errs, gate, consumer)


def refused_steps(gate: RunningGate) -> dict[str, str]:
    """step name -> reason, from the gate's JSON log."""
    return {str(e.get("name")): str(e.get("reason")) for e in gate.refusals()}


def test_trusted_builder_chain_is_substituted(nix226: NixTier, built: Built,
                                             scenario: Scenario) -> None:
    out = consume(nix226, scenario, CHAINS + MORE)
    assert out.substituted == dict.fromkeys(CHAINS + MORE, True), out.stderr
    # The whole closure came from the gate, the same paths the builder made.
    for attr in CHAINS:
        assert out.consumer.real(built.outs[attr]).exists()
    assert out.gate.refusals() == []
    allowed = [e for e in out.gate.events() if e["outcome"] == "allowed"]
    assert allowed



# ------------------------------------------------------------------------ refusals


def _drop_trace(*steps: str) -> Callable[[Built, Scenario], None]:
    def mutate(b: Built, s: Scenario) -> None:
        for step in steps:
            (s.traces / "traces" / b.signed.key_of(step)).unlink()
    return mutate


def _tamper(*steps: str) -> Callable[[Built, Scenario], None]:
    def mutate(b: Built, s: Scenario) -> None:
        for step in steps:
            tamper_trace(s.traces, b.signed.key_of(step))
    return mutate


def _policy(require: str, keys: dict[str, str]) -> Callable[[Built, Scenario], None]:
    def mutate(b: Built, s: Scenario) -> None:
        write_policy(s.policy, s.traces, require, keys)
    return mutate


def _only_builder_b(b: Built, s: Scenario) -> None:
    shutil.rmtree(s.traces)
    shutil.copytree(b.traces_b, s.traces)


def _both_builders(b: Built, s: Scenario) -> None:
    from tracehook.stores.tracestore import FileTraceStore

    store = FileTraceStore(f"file://{s.traces}", s.traces)
    theirs = FileTraceStore(f"file://{b.traces_b}", b.traces_b)
    for f in (b.traces_b / "traces").iterdir():
        if not f.name.startswith("."):
            store.append(f.name, theirs.get(f.name))
    write_policy(s.policy, s.traces, '{ threshold = 2, of = ["builderA", "builderB"] }',
                 ["builderA", "builderB"])


def _realisation_elsewhere(b: Built, s: Scenario) -> None:
    """The cache's realisation of ca-c points at ca-b's output (which it also serves)."""
    for f in (s.cache / "realisations").iterdir():
        r = realisation.parse_doi_v1(f.read_bytes())
        if "/" + r.out_path == b.outs["caC"][len("/nix/store"):]:
            forged = realisation.Realisation(r.id, b.outs["caB"].rsplit("/", 1)[1])
            f.write_text(realisation.render_doi_v1(forged))
            return
    raise AssertionError("no realisation of ca-c in the cache")


@dataclass(frozen=True)
class Case:
    name: str
    mutate: Callable[[Built, Scenario], None]
    substituted: dict[str, bool]
    named: dict[str, str]  # step the gate's log names -> part of its reason


CASES = [
    Case("tampered-deep-trace", _tamper("ca-a", "ia-a"), {"caC": False, "iaC": False},
         {"ca-a": "bad signature", "ia-a": "bad signature"}),
    Case("missing-middle-trace", _drop_trace("ca-b", "ia-b"), {"caC": False, "iaC": False},
         {"ca-b": "no trace", "ia-b": "no trace"}),
    Case("unknown-key-only", _only_builder_b, {"caC": False, "iaC": False},
         {"ca-a": "unknown key", "ia-a": "unknown key"}),
    Case("expired-key", _policy('"builderA"', {"builderA": "not-after = 2020-01-01T00:00:00Z"}),
         {"caC": False, "iaC": False}, {"ca-a": "expired", "ia-a": "expired"}),
    Case("revoked-key", _policy('"builderA"', {"builderA": "revoked = true"}),
         {"caC": False, "iaC": False}, {"ca-a": "revoked", "ia-a": "revoked"}),
    # The forged realisation (for ca-c's unresolved id) is refused; Nix then substitutes
    # ca-a and ca-b, resolves ca-c locally and asks for the resolved id, which the gate
    # answers with the path the traces attest: the forged path never becomes ca-c's output.
    Case("upstream-realisation-elsewhere", _realisation_elsewhere,
         {"caC": True, "iaC": True}, {"ca-c": "points at"}),
    Case("two-of-two-one-signed", _policy('{ threshold = 2, of = ["builderA", "builderB"] }',
                                          {"builderA": "", "builderB": ""}),
         {"caC": False, "iaC": False}, {"ca-a": "threshold", "ia-a": "threshold"}),
    Case("two-of-two-both-signed", _both_builders, {"caC": True, "iaC": True}, {}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_gate_refuses_untrusted_chains(nix226: NixTier, built: Built, scenario: Scenario,
                                       case: Case) -> None:
    case.mutate(built, scenario)
    out = consume(nix226, scenario)
    assert out.substituted == case.substituted, out.stderr
    named = refused_steps(out.gate)
    for step, why in case.named.items():
        assert step in named, (step, named)
        assert why in named[step], (step, named[step])
    for attr, ok in case.substituted.items():
        if ok:  # exactly the path the trusted builder made
            assert out.paths[attr] == (built.outs[attr],)
        else:  # Nix did not get it, and nothing untrusted entered the store
            assert not out.consumer.real(built.outs[attr]).exists()
    assert all(e["outcome"] != "failed" for e in out.gate.events())


def test_refused_step_is_built_locally_on_trusted_inputs(
    nix226: NixTier, built: Built, scenario: Scenario
) -> None:
    """Only the top step lacks a trace: Nix substitutes its inputs through the gate, then
    builds that step itself (and gets the same path, the derivations being deterministic)."""
    _drop_trace("ca-c", "ia-c")(built, scenario)
    out = consume(nix226, scenario, local_builds=True)
    assert out.substituted == {"caC": True, "iaC": True}
    for attr, step in (("caC", "ca-b"), ("iaC", "ia-b")):
        err = out.stderr[attr]
        assert "copying path" in err and step in err, err
        assert "building '/nix/store/" in err, err
    assert set(refused_steps(out.gate)) == {"ca-c", "ia-c"}


@pytest.mark.parametrize("case", [CASES[0], CASES[-1]], ids=[CASES[0].name, CASES[-1].name])
def test_old_nix_consumer(nix28: NixTier, built: Built, scenario: Scenario, case: Case) -> None:
    """The essentials on Nix 2.8 as the consumer (the cache and traces come from 2.26)."""
    case.mutate(built, scenario)
    out = consume(nix28, scenario)
    assert out.substituted == case.substituted, out.stderr
    for step, why in case.named.items():
        assert why in refused_steps(out.gate).get(step, ""), out.gate.refusals()


def test_revocation_reaches_a_running_gate_between_two_consumers(
    nix226: NixTier, built: Built, scenario: Scenario
) -> None:
    """A real ``tracehook gate`` process: a consumer substitutes the chains; the policy
    file then revokes the builder's key (SIGHUP, as ``systemctl reload`` sends); a second
    consumer, asking the same gate, is refused and Nix fails (--max-jobs 0)."""
    first = NixEnv(nix226, scenario.tmp / "first")
    second = NixEnv(nix226, scenario.tmp / "second")
    for consumer in (first, second):  # the same expressions: the same .drv paths
        for attr in CHAINS:
            consumer.instantiate(attr, salt=SALT)
    argv = gate_argv(scenario.policy, [f"file://{scenario.cache}"], first.root,
                     scenario.tmp / "gate.log", "--signing-key", str(scenario.gate_key))
    with gate_process(argv) as gate:
        for consumer in (first, second):
            consumer.configure(substituters=gate.url, trusted_public_keys=scenario.gate_pub)
        for attr in CHAINS:
            res = first.build(attr, "--max-jobs", "0", salt=SALT)
            assert res.out_paths == (built.outs[attr],), res.stderr
        write_policy(scenario.policy, scenario.traces, '"builderA"',
                     {"builderA": "revoked = true"})
        gate.proc.send_signal(signal.SIGHUP)
        top = built.outs["iaC"].split("/")[-1].split("-")[0]
        wait_for(lambda: get(f"{gate.url}/{top}.narinfo")[0] == 404, timeout=5.0)
        for attr in CHAINS:
            res = second.build(attr, "--max-jobs", "0", salt=SALT, check=False)
            assert not res.out_paths and not second.real(built.outs[attr]).exists(), \
                res.stderr
    assert [r["outcome"] for r in gate.events("policy-reload")] == ["ok"]
    refused = gate.events("gate", "refused")
    assert refused and all("revoked" in str(r["reason"]) for r in refused)
    assert {"ca-a", "ia-a"} <= {str(r["name"]) for r in refused}
