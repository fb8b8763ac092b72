"""Hardware evidence end to end with real Nix: the builder's post-build hook gets evidence
for every step it signs from the software provider, run as sign.toml's ``evidence-command``
(tests/snp_provider.py, a stand-in for hardware; docs/FORMAT.md 9.4), ``tracehook publish``
delivers it with the signed traces, and a consumer substitutes through a gate whose policy
requires the evidence. The consumer gets the chain only when every step's evidence
verifies; otherwise Nix fails (--max-jobs 0) and the gate's log names the step and the
reason. The evidence binds each output's references as the builder's store records them,
which the gate then serves.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from evidencekit import OTHER_MEASUREMENT, read_file, set_evidence, write_policy
from gatekit import Signed, copy_to_cache, step_keys, use_hook, write_gate_key
from nixharness import NixEnv, NixTier
from snp_provider import DEFAULT_MEASUREMENT, HERE
from test_gate_e2e import CHAINS, SALT, Scenario, consume, refused_steps
from testkeys import public_text, secret
from tracehook import cli
from tracehook.stores.spool import Spool

pytestmark = pytest.mark.nix
PROVIDER = [sys.executable, str(HERE / "snp_provider.py")]

# An evidence-command that notes each call (the digest asked for, and whether NIX_CONFIG
# reached it), then runs the software provider.
RECORDING = """\
import json, os, sys
with open({calls!r}, "a") as f:
    f.write(json.dumps({{"digest": sys.argv[-1], "nix_config": "NIX_CONFIG" in os.environ}})
            + "\\n")
os.execv(sys.executable, [sys.executable, {provider!r}, "evidence", {dir!r}, sys.argv[-1]])
"""


@dataclass
class Built:
    cache: Path
    traces: Path  # signed by builderA, every step with evidence
    root_pem: Path  # the software provider's root (allowed by the policies)
    signed: Signed
    outs: dict[str, str]
    calls: list[dict[str, object]]  # the evidence-command's calls
    spool: Path


@pytest.fixture(scope="module")
def built(nix226: NixTier, tmp_path_factory: pytest.TempPathFactory) -> Built:
    base = tmp_path_factory.mktemp("evidence-builder")
    provider = base / "provider"
    subprocess.run([*PROVIDER, "init", str(provider)], check=True, capture_output=True)
    wrapper = base / "evidence-command.py"
    wrapper.write_text(RECORDING.format(calls=str(base / "calls.jsonl"),
                                        provider=str(HERE / "snp_provider.py"),
                                        dir=str(provider)))
    env = NixEnv(nix226, base / "builder")
    config = use_hook(env, secret("builderA"), base / "traces", base / "signer")
    config.write_text(config.read_text() + "evidence-command = "
                      + json.dumps([sys.executable, str(wrapper)]) + "\n")
    drvs = [env.instantiate(a, salt=SALT) for a in CHAINS]
    outs = {a: env.build(a, salt=SALT).out_paths[0] for a in CHAINS}
    assert cli.main(["publish", "--config", str(config)]) == 0
    copy_to_cache(env, base / "cache", drvs, list(outs.values()))
    calls = [json.loads(line) for line in (base / "calls.jsonl").read_text().splitlines()]
    return Built(base / "cache", base / "traces", provider / "root.pem", step_keys(env, drvs),
                 outs, calls, base / "signer" / "spool")


def test_the_hook_asks_once_per_claim_and_publishes_the_evidence(built: Built) -> None:
    """Nix runs the hook twice for a resolved step: the provider is asked once per claim,
    without NIX_CONFIG; each trace file carries the signature and that one entry."""
    keys = {k for _, k in built.signed.steps.values()}
    assert len(built.calls) == len(keys) == 6
    assert len({c["digest"] for c in built.calls}) == 6
    assert not any(c["nix_config"] for c in built.calls)
    for key in keys:
        doc = read_file(built.traces, key)
        assert len(doc["signatures"]) == 1 and len(doc["evidence"]) == 1
        assert doc["evidence"][0]["claim"]["key"] == key
    spool = Spool(built.spool)
    assert spool.pending() == []  # all delivered, each with its evidence
    sent = [json.loads(p.read_text()) for p in spool.sent()]
    assert len(sent) == 6 and all(len(e["evidence"]) == 1 for e in sent)


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


@pytest.mark.parametrize("strict", [False, True], ids=["lenient", "strict"])
def test_a_provider_that_fails_loses_no_signature(nix226: NixTier, tmp_path: Path,
                                                  strict: bool) -> None:
    """No evidence (the provider fails): logged once, the signed claim is spooled without
    it; only strict mode fails the build."""
    env = NixEnv(nix226, tmp_path / "builder")
    config = use_hook(env, secret("builderA"), tmp_path / "traces", tmp_path / "signer")
    failing = [sys.executable, "-c",
               "import sys; print('no /dev/sev-guest', file=sys.stderr); sys.exit(1)"]
    config.write_text(config.read_text().replace("strict = true", f"strict = {str(strict).lower()}")
                      + f"evidence-command = {json.dumps(failing)}\n")
    res = env.build("caA", salt=SALT, check=False)
    assert bool(res.out_paths) != strict, res.stderr
    said = [line for line in res.stderr.splitlines() if "no hardware evidence" in line]
    assert len(said) == 1 and "no /dev/sev-guest" in said[0], res.stderr
    assert ("failing the build (strict mode)" if strict else "build continues") in said[0]
    pending = Spool(tmp_path / "signer" / "spool").pending()
    assert len(pending) == 1 and pending[0].entry.evidence == ()
    events = [json.loads(line) for line in (tmp_path / "signer" / "sign.log").read_text()
              .splitlines()]
    assert [(e["event"], e["outcome"]) for e in events][:2] == [("sign", "ok"),
                                                                ("evidence", "failed")]
