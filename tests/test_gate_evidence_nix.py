"""Hardware evidence end to end with real Nix: a builder gets evidence for every step from
the software provider run as an ``evidence-command`` (tests/snp_provider.py, a stand-in for
hardware; docs/FORMAT.md 9.4), publishes it with its signed traces, and a consumer
substitutes through a gate whose policy requires the evidence. The consumer gets the chain
only when every step's evidence verifies; otherwise Nix fails (--max-jobs 0) and the gate's
log names the step and the reason.

The builder signs with the signer's library and asks the provider with
:func:`tracehook.stores.provider.request_evidence` (what the post-build hook is to call
once sign.toml has ``evidence-command``); the evidence binds each output's references as
the builder's store records them, which the gate then serves.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from evidencekit import OTHER_MEASUREMENT, bound, set_evidence, write_policy
from gatekit import Signed, built_steps, copy_to_cache, write_gate_key
from nixharness import NixEnv, NixTier
from snp_provider import DEFAULT_MEASUREMENT, HERE
from test_gate_e2e import CHAINS, SALT, Scenario, consume, refused_steps
from testkeys import public_text, secret
from tracehook.signer import examine
from tracehook.stores.nixdb import StoreDatabase
from tracehook.stores.provider import request_evidence
from tracehook.stores.tracestore import FileTraceStore
from tracehook.trace.claim import OutputClaim

pytestmark = pytest.mark.nix
PROVIDER = [sys.executable, str(HERE / "snp_provider.py")]


@dataclass
class Built:
    cache: Path
    traces: Path  # signed by builderA, every step with evidence
    root_pem: Path  # the software provider's root (allowed by the policies)
    signed: Signed
    outs: dict[str, str]


@pytest.fixture(scope="module")
def built(nix226: NixTier, tmp_path_factory: pytest.TempPathFactory) -> Built:
    base = tmp_path_factory.mktemp("evidence-builder")
    provider = base / "provider"
    subprocess.run([*PROVIDER, "init", str(provider)], check=True, capture_output=True)
    env = NixEnv(nix226, base / "builder")
    drvs = [env.instantiate(a, salt=SALT) for a in CHAINS]
    outs = {a: env.build(a, salt=SALT).out_paths[0] for a in CHAINS}
    store = FileTraceStore(f"file://{base / 'traces'}", base / "traces")
    steps = built_steps(env, drvs)
    with StoreDatabase(str(env.root)) as db:
        for step in steps:
            refs = {n: db.path_info(o.path) for n, o in step.outputs.items()}
            outputs = {n: OutputClaim(o.path, o.nar_hash, info.references if info else ())
                       for (n, o), info in zip(step.outputs.items(), refs.values(),
                                               strict=True)}
            k = step.resolution.key
            entry = request_evidence([*PROVIDER, "evidence", str(provider)],
                                     bound(k.kind, k.key, outputs))
            store.append(k.key, [examine.sign(step, secret("builderA"), examine.builder_info(
                "nix", "2.26.3"))], [entry.to_json()])
    copy_to_cache(env, base / "cache", drvs, list(outs.values()))
    signed = Signed({s.drv_path: (s.drv.name, s.resolution.key.key) for s in steps})
    return Built(base / "cache", base / "traces", provider / "root.pem", signed, outs)


def _element(root: Path, measurement: bytes = DEFAULT_MEASUREMENT) -> str:
    return (f'[evidence.snp]\nkind = "sev-snp"\nmeasurements = ["{measurement.hex()}"]\n'
            f'root-files = ["{root}"]\n')


Mutate = Callable[[Built, Path], None]


def _remove_evidence(*steps: str) -> Mutate:
    def mutate(b: Built, traces: Path) -> None:
        for step in steps:
            set_evidence(traces, b.signed.key_of(step), [])
    return mutate


@dataclass(frozen=True)
class Case:
    name: str
    require: str
    measurement: bytes
    mutate: Mutate | None
    substituted: bool
    named: dict[str, str]  # step the gate's log names -> part of its reason


CASES = [
    Case("evidence-only", '"snp"', DEFAULT_MEASUREMENT, None, True, {}),
    Case("2-of-2-evidence-and-key", '{ all-of = ["builderA", "snp"] }', DEFAULT_MEASUREMENT,
         None, True, {}),
    Case("evidence-removed-from-the-middle", '"snp"', DEFAULT_MEASUREMENT,
         _remove_evidence("ca-b", "ia-b"), False,
         {"ca-b": "no hardware evidence for it", "ia-b": "no hardware evidence for it"}),
    Case("unaccepted-guest-image", '"snp"', OTHER_MEASUREMENT, None, False,
         {"ca-a": "measurement-not-accepted", "ia-a": "measurement-not-accepted"}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_gate_requires_hardware_evidence(nix226: NixTier, built: Built, tmp_path: Path,
                                             case: Case) -> None:
    traces = tmp_path / "traces"
    shutil.copytree(built.traces, traces)
    cache = tmp_path / "cache"
    shutil.copytree(built.cache, cache)
    if case.mutate is not None:
        case.mutate(built, traces)
    policy = write_policy(tmp_path / "policy.toml", case.require,
                          [_element(built.root_pem, case.measurement)],
                          {"builderA": public_text("builderA")}, [f"file://{traces}"])
    gate_key, gate_pub = write_gate_key(tmp_path)
    out = consume(nix226, Scenario(traces, cache, policy, gate_key, gate_pub, tmp_path))
    assert out.substituted == dict.fromkeys(CHAINS, case.substituted), out.stderr
    named = refused_steps(out.gate)
    for step, why in case.named.items():
        assert why in named.get(step, ""), (step, named)
    allowed = [e for e in out.gate.events() if e["outcome"] == "allowed"]
    if case.substituted:
        assert out.gate.refusals() == []
        for attr in CHAINS:
            assert out.paths[attr] == (built.outs[attr],)
        assert allowed and all(e["evidence"] and "snp" in e["signers"]  # type: ignore[operator]
                               for e in allowed)
    else:
        for attr in CHAINS:
            assert not out.consumer.real(built.outs[attr]).exists()
