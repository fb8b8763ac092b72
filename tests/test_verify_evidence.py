"""``tracehook verify`` with hardware evidence, on real Nix 2.26 builds.

The chains caC and iaC of tests/nix/derivations.nix are built once in an isolated store;
every build step is signed by builderA (the signer's library, what the post-build hook
runs) and carries evidence from the software provider (tests/snp_provider.py, a stand-in for
hardware: a test-only ARK/ASK/VCEK chain whose root the policies allow through
``root-files``), bound to the step's claim with the references the store records. Each
scenario changes a copy of the trace store as an attacker or a broken builder would, picks a
policy, and states the outcome and the step and reason the report names. Negative cases are
named after the attack.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from evidencekit import (
    OTHER_MEASUREMENT,
    Provider,
    bound,
    drop_signatures,
    element,
    make_provider,
    set_evidence,
    write_policy,
)
from nixharness import NixEnv, get_tier
from snp_provider import POLICY_DEBUG
from tracehook.signer import examine
from tracehook.stores.nixdb import StoreDatabase
from tracehook.stores.nixstore import StoreReader
from tracehook.stores.tracestore import FileTraceStore
from tracehook.trace.claim import OutputClaim
from tracehook.trace.evidence import BoundClaim
from verifyhelp import BUILDER, public_text, run_verify, secret

pytestmark = pytest.mark.nix
ATTRS = ("caC", "iaC")


@dataclass(frozen=True)
class Built:
    env: NixEnv
    drvs: dict[str, str]  # attr -> .drv path
    outs: dict[str, str]  # attr -> output path
    good: Path  # every step signed by builderA and carrying evidence
    keys: dict[str, str]  # drv name -> trace key
    claims: dict[str, BoundClaim]  # drv name -> the claim its evidence binds
    provider: Provider


def _steps(env: NixEnv, drvs: list[str]) -> list[examine.BuildStep]:
    store = examine.LocalStore(str(env.root))
    reader = StoreReader(str(env.root))
    found: dict[str, examine.BuildStep] = {}
    for top in drvs:
        for path, drv in reader.load_closure(top).items():
            if path not in found and drv.kind != "fixed":
                step = examine.examine(store, path)
                assert isinstance(step, examine.BuildStep), step
                found[path] = step
    store.close()
    return list(found.values())


def _with_references(env: NixEnv, outputs: dict[str, OutputClaim]) -> dict[str, OutputClaim]:
    refs: dict[str, tuple[str, ...]] = {}
    with StoreDatabase(str(env.root)) as db:
        for name, out in outputs.items():
            info = db.path_info(out.path)
            assert info is not None, out.path
            refs[name] = info.references
    return {n: OutputClaim(o.path, o.nar_hash, refs[n]) for n, o in outputs.items()}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    env = NixEnv(get_tier("2.26"), tmp_path_factory.mktemp("nix"))
    drvs = {a: env.instantiate(a, salt="evidence") for a in ATTRS}
    outs = {a: env.build(a, salt="evidence").out_paths[0] for a in ATTRS}
    provider = make_provider(tmp_path_factory.mktemp("provider"))
    good = tmp_path_factory.mktemp("traces")
    store = FileTraceStore(f"file://{good}", good)
    keys, claims = {}, {}
    for step in _steps(env, list(drvs.values())):
        key = step.resolution.key
        claim = bound(key.kind, key.key, _with_references(env, step.outputs))
        keys[step.drv.name], claims[step.drv.name] = key.key, claim
        store.append(key.key, [examine.sign(step, secret("builderA"), BUILDER)],
                     [provider.entry(claim)])
    return Built(env, drvs, outs, good, keys, claims, provider)


# --- ways to change the trace store ----------------------------------------------------

Edit = Callable[[Built, Path], None]


def evidence_of(name: str, make: Callable[[Built], dict[str, object]]) -> Edit:
    """Replace the evidence of step ``name`` by ``make(built)``."""
    def edit(b: Built, store: Path) -> None:
        set_evidence(store, b.keys[name], [make(b)])
    return edit


def remove_evidence(name: str) -> Edit:
    def edit(b: Built, store: Path) -> None:
        set_evidence(store, b.keys[name], [])
    return edit


def remove_signatures(name: str) -> Edit:
    def edit(b: Built, store: Path) -> None:
        drop_signatures(store, b.keys[name])
    return edit


def _forged(b: Built, name: str) -> BoundClaim:
    """The step's claim with another NAR hash for 'out' (a report can bind anything)."""
    claim = b.claims[name]
    outputs = {n: OutputClaim(o.path, bytes(32) if n == "out" else o.nar_hash, o.references)
               for n, o in claim.outputs}
    return bound(claim.kind, claim.key, outputs)


SNP = '"snp"'
BOTH = '{ all-of = ["builderA", "snp"] }'
EITHER = '{ any-of = ["builderA", "snp"] }'

# name, target, require, extra element line, edit, rc, step named, text in the report
SCENARIOS: list[tuple[str, str, str, str, Edit | None, int, str, str]] = [
    ("evidence-only-ca-chain", "caC", SNP, "", None, 0, "",
     "hardware evidence: snp (sev-snp Test vcek, measurement "),
    ("evidence-only-ia-chain", "iaC", SNP, "", None, 0, "",
     "hardware evidence counted at 3 of 3 build step(s) (snp)"),
    ("unaccepted-guest-image", "caC", SNP, "",
     evidence_of("ca-b", lambda b: b.provider.entry(b.claims["ca-b"],
                                                    measurement=OTHER_MEASUREMENT)),
     1, "ca-b", f"measurement-not-accepted: measurement {OTHER_MEASUREMENT.hex()}"),
    ("stale-firmware", "iaC", SNP, "",
     evidence_of("ia-b", lambda b: b.provider.entry(b.claims["ia-b"], chain=b.provider.old)),
     1, "ia-b", "tcb-too-old: reported TCB bootloader=9 tee=0 snp=8 microcode=72 is below"),
    ("report-bound-to-another-claim", "caC", SNP, "",
     evidence_of("ca-a", lambda b: b.provider.entry(b.claims["ca-a"],
                                                    report_for=b.claims["ca-b"])),
     1, "ca-a", "report-data-mismatch"),
    ("vcek-from-another-root", "iaC", SNP, "",
     evidence_of("ia-c", lambda b: b.provider.entry(b.claims["ia-c"],
                                                    chain=b.provider.foreign)),
     1, "ia-c", "unknown-root"),
    ("debuggable-guest", "caC", SNP, "",
     evidence_of("ca-c", lambda b: b.provider.entry(b.claims["ca-c"], policy=POLICY_DEBUG)),
     1, "ca-c", "debug-policy"),
    ("evidence-removed-from-one-step", "caC", SNP, "", remove_evidence("ca-a"), 1, "ca-a",
     "no hardware evidence for it"),
    ("expired-element", "caC", SNP, "not-after = 2020-01-01T00:00:00Z", None, 1, "ca-a",
     "evidence element 'snp' expired 2020-01-01"),
    ("revoked-element", "iaC", SNP, "revoked = true", None, 1, "ia-a",
     "evidence element 'snp' is revoked"),
    ("2-of-2-evidence-and-key", "caC", BOTH, "", None, 0, "", "signed by builderA, snp"),
    ("2-of-2-evidence-removed", "iaC", BOTH, "", remove_evidence("ia-b"), 1, "ia-b",
     "missing snp; no hardware evidence for it"),
    ("2-of-2-signature-removed", "caC", BOTH, "", remove_signatures("ca-b"), 1, "ca-b",
     "missing builderA"),
    ("2-of-2-evidence-for-a-forged-output", "caC", BOTH, "",
     evidence_of("ca-c", lambda b: b.provider.entry(_forged(b, "ca-c"))), 1, "ca-c",
     "(sha256:0000000000000000000000000000000000000000000000000000); none meets all of "
     "(builderA, snp)"),
    ("any-of-survives-a-missing-report", "caC", EITHER, "", remove_evidence("ca-b"), 0, "",
     "hardware evidence counted at 2 of 3 build step(s)"),
]


@pytest.mark.parametrize(("name", "attr", "require", "extra", "edit", "rc", "step", "text"),
                         SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_scenario(name: str, attr: str, require: str, extra: str, edit: Edit | None, rc: int,
                  step: str, text: str, built: Built, tmp_path: Path,
                  capsys: pytest.CaptureFixture[str]) -> None:
    store = built.good
    if edit is not None:
        store = tmp_path / "traces"
        shutil.copytree(built.good, store)
        edit(built, store)
    policy = write_policy(tmp_path / "policy.toml", require,
                          [element("snp", built.provider, extra=extra)],
                          {"builderA": public_text("builderA")})
    args = [built.drvs[attr], "--policy", str(policy), "--store", str(built.env.root),
            "--traces", f"file://{store}"]
    res = run_verify(capsys, *args)
    assert res.rc == rc, res.out + res.err
    assert text in res.out, res.out
    report = run_verify(capsys, *args, "--json").json()
    assert report["verified"] is (rc == 0)
    if rc == 0:
        assert report["outputs"] == {"out": built.outs[attr]}
        if "snp" in report["signers"]:
            [info] = report["evidence"]
            assert info["element"] == "snp" and info["product"] == "Test"
            assert info["chip_id"] == built.provider.chain.chip_id.hex()
    else:
        failed = report["failed_step"]
        assert failed["name"] == step, failed
        assert text in failed["reason"] + " ".join(r["detail"] for r in failed["rejected"])
        assert text in res.out


def test_every_step_names_its_evidence_in_json(built: Built, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    policy = write_policy(tmp_path / "policy.toml", BOTH, [element("snp", built.provider)],
                          {"builderA": public_text("builderA")})
    report = run_verify(capsys, built.drvs["iaC"], "--policy", str(policy), "--store",
                        str(built.env.root), "--traces", f"file://{built.good}", "--json",
                        "--explain-trust").json()
    steps = {s["name"]: s for s in report["steps"]}
    for name in ("ia-a", "ia-b", "ia-c"):
        assert steps[name]["outcome"] == "verified"
        assert steps[name]["signers"] == ["builderA", "snp"]
        [info] = steps[name]["evidence"]
        assert info["tcb"] == "bootloader=9 tee=0 snp=23 microcode=72"
    assert report["trust_summary"]["traces_by_key"] == {"builderA": 3, "snp": 3}
