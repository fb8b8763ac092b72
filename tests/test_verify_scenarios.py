"""Verifier scenarios from real Nix 2.26 builds, signed with the laut test keys.

Every derivation of tests/nix/derivations.nix is built once in an isolated store and each
build step is signed by builderA and builderB with the project's signer library
(``examine.examine`` + ``examine.sign``, what the post-build hook runs). Each scenario then
picks a trace store (the good one, or a copy it changes in the way an attacker would), a
policy and a target, and states the outcome. Negative cases are named after the attack.
Situations real Nix cannot produce (divergent builders, cycles) are in
test_verify_synthetic.py.
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from nixharness import NixEnv, get_tier
from tracehook.signer import examine
from tracehook.stores.nixstore import StoreReader
from tracehook.stores.tracestore import FileTraceStore
from tracehook.trace.claim import OutputClaim
from verifyhelp import BUILDER, run_verify, secret, write_policy

ATTRS = ("caC", "iaC", "caOnFod", "useMulti", "iaOnCa", "weirdEnv")


@dataclass(frozen=True)
class Built:
    env: NixEnv
    drvs: dict[str, str]  # attr -> .drv path
    outs: dict[str, str]  # attr -> first output path
    good: Path  # trace store with every step signed by builderA and builderB
    keys: dict[str, str]  # drv name -> trace key


def _steps(env: NixEnv, drv_paths: list[str]) -> list[examine.BuildStep]:
    store = examine.LocalStore(str(env.root))
    reader = StoreReader(str(env.root))
    steps = []
    seen: set[str] = set()
    for top in drv_paths:
        for path, drv in reader.load_closure(top).items():
            if path in seen or drv.kind == "fixed":
                continue
            seen.add(path)
            step = examine.examine(store, path)
            assert isinstance(step, examine.BuildStep), step
            steps.append(step)
    store.close()
    return steps


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    env = NixEnv(get_tier("2.26"), tmp_path_factory.mktemp("nix"))
    drvs = {a: env.instantiate(a, salt="verify") for a in ATTRS}
    outs = {a: env.build(a, salt="verify").out_paths[0] for a in ATTRS}
    good = tmp_path_factory.mktemp("traces")
    store = FileTraceStore(f"file://{good}", good)
    keys = {}
    for step in _steps(env, list(drvs.values())):
        keys[step.drv.name] = step.resolution.key.key
        for name in ("builderA", "builderB"):
            store.append(step.resolution.key.key, [examine.sign(step, secret(name), BUILDER)])
    return Built(env, drvs, outs, good, keys)


# --- ways to change a trace store --------------------------------------------------------

Edit = Callable[[Built, Path], None]


def _tokens(store: Path, key: str) -> list[str]:
    return list(json.loads((store / "traces" / key).read_bytes())["signatures"])


def _write(store: Path, key: str, tokens: list[str]) -> None:
    (store / "traces" / key).write_text(json.dumps({"signatures": tokens}, indent=2) + "\n")


def _kid(token: str) -> str:
    return str(json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))["kid"])


def drop(name: str, who: str = "") -> Edit:
    def edit(b: Built, store: Path) -> None:
        key = b.keys[name]
        _write(store, key, [t for t in _tokens(store, key) if who and not _kid(t).startswith(who)])
    return edit


def tamper(name: str, who: str) -> Edit:
    def edit(b: Built, store: Path) -> None:
        key = b.keys[name]
        tokens = _tokens(store, key)
        for i, t in enumerate(tokens):
            if _kid(t).startswith(who):
                h, p, s = t.split(".")
                payload = base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))
                payload = payload.replace(b'"path":"/nix/store/', b'"path":"/nix/store/', 1)
                at = payload.index(b"/nix/store/") + 11
                payload = payload[:at] + (b"0" if payload[at:at + 1] != b"0" else b"1") + \
                    payload[at + 1:]
                tokens[i] = f"{h}.{base64.urlsafe_b64encode(payload).rstrip(b'=').decode()}.{s}"
        _write(store, key, tokens)
    return edit


def forge_ia_path(name: str) -> Edit:
    """builderA signs its IA step again, claiming another output path (same key)."""
    def edit(b: Built, store: Path) -> None:
        steps = {s.drv.name: s for s in _steps(b.env, list(b.drvs.values()))}
        step = steps[name]
        fake = {n: OutputClaim(o.path[:11] + "0" * 32 + o.path[43:], o.nar_hash)
                for n, o in step.outputs.items()}
        forged = examine.BuildStep(step.drv_path, step.drv, step.resolution, fake)
        _write(store, b.keys[name], [examine.sign(forged, secret("builderA"), BUILDER)])
    return edit


def sign_with(who: str) -> Edit:
    """Replace every trace by one signed with ``who`` (for keys outside the policy)."""
    def edit(b: Built, store: Path) -> None:
        for step in _steps(b.env, list(b.drvs.values())):
            _write(store, step.resolution.key.key, [examine.sign(step, secret(who), BUILDER)])
    return edit


BOTH = '{ all-of = ["builderA", "builderB"] }'
A = '"builderA"'

# name, target attr, require, policy keys, edit, expected rc, expected text
SCENARIOS: list[tuple[str, str, str, object, Edit | None, int, str]] = [
    ("ca-chain", "caC", BOTH, None, None, 0, "signed by builderA, builderB"),
    ("ia-chain", "iaC", BOTH, None, None, 0, "signed by builderA, builderB"),
    ("ca-on-fixed-output-sources", "caOnFod", BOTH, None, None, 0, "fixed-output"),
    ("multi-output-inputs", "useMulti", BOTH, None, None, 0, "use-multi"),
    ("ia-on-ca-deferred", "iaOnCa", BOTH, None, None, 0, "ia-on-ca"),
    ("awkward-strings", "weirdEnv", BOTH, None, None, 0, "weird-env"),
    ("missing-link-deep-in-chain", "caC", BOTH, None, drop("ca-a"), 1,
     "ca-a: no trace for resolved step"),
    ("missing-link-ia", "iaC", BOTH, None, drop("ia-a"), 1, "ia-a: no trace"),
    ("one-signer-missing-2-of-2", "caC", BOTH, None, drop("ca-b", "builderA"), 1,
     "missing builderA"),
    ("tampered-payload", "caC", A, None, tamper("ca-b", "builderA"), 1, "bad signature"),
    ("forged-ia-output-path", "iaC", A, None, forge_ia_path("ia-b"), 1,
     "but the derivation determines"),
    ("unknown-key", "caC", A, None, sign_with("builderC"), 1, "unknown key builderC:"),
    ("expired-key", "caC", A, {"builderA": "not-after = 2020-01-01T00:00:00Z"}, None, 1,
     "key 'builderA' expired 2020-01-01"),
    ("expired-key-still-valid-then", "caC", A,
     {"builderA": "not-after = 2999-01-01T00:00:00Z"}, None, 0, ""),
    ("revoked-key", "caC", BOTH, {"builderA": "revoked = true", "builderB": ""}, None, 1,
     "key 'builderA' is revoked"),
    ("nested-threshold", "useMulti",
     '{ all-of = ["builderB", { any-of = ["builderA", "builderC"] }] }',
     ("builderA", "builderB", "builderC"), None, 0, ""),
    ("nested-threshold-unmet", "useMulti",
     '{ all-of = ["builderC", { any-of = ["builderA", "builderB"] }] }',
     ("builderA", "builderB", "builderC"), None, 1, "missing builderC"),
]


@pytest.mark.nix
@pytest.mark.parametrize(("name", "attr", "require", "keys", "edit", "rc", "text"), SCENARIOS,
                         ids=[s[0] for s in SCENARIOS])
def test_scenario(
    name: str, attr: str, require: str, keys: object, edit: Edit | None, rc: int, text: str,
    built: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    store = built.good
    if edit is not None:
        store = tmp_path / "traces"
        shutil.copytree(built.good, store)
        edit(built, store)
    policy_keys = keys if keys is not None else ("builderA", "builderB")
    policy = write_policy(tmp_path / "policy.toml", require, policy_keys)  # type: ignore[arg-type]
    args = [built.drvs[attr], "--policy", str(policy), "--store", str(built.env.root),
            "--traces", f"file://{store}"]
    res = run_verify(capsys, *args)
    assert res.rc == rc, res.out + res.err
    assert text in res.out, res.out
    report = run_verify(capsys, *args, "--json").json()
    assert report["verified"] is (rc == 0)
    if rc == 0:
        assert built.outs[attr] in report["outputs"].values()


@pytest.mark.nix
def test_output_path_target_looks_up_its_deriver(
    built: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = write_policy(tmp_path / "policy.toml", BOTH)
    base = ["--policy", str(policy), "--store", str(built.env.root), "--traces",
            f"file://{built.good}"]
    res = run_verify(capsys, built.outs["caC"], built.outs["iaC"], *base, "--json")
    assert res.rc == 0, res.out
    report = res.json()
    assert report["verified"] is True
    [ca, ia] = report["targets"]
    assert ca["drv"] == built.drvs["caC"] and ca["outputs"] == {"out": built.outs["caC"]}
    assert ia["drv"] == built.drvs["iaC"]


@pytest.mark.nix
def test_unused_output_disagreement_does_not_multiply(
    built: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """builderB claims another NAR hash for multi-ia's unused 'doc': use-multi (which takes
    only 'dev') still verifies 2 of 2, with one resolution; multi-ia itself does not."""
    store = tmp_path / "traces"
    shutil.copytree(built.good, store)
    steps = {s.drv.name: s for s in _steps(built.env, [built.drvs["useMulti"]])}
    step = steps["multi-ia"]
    outputs = dict(step.outputs)
    outputs["doc"] = OutputClaim(outputs["doc"].path, b"\x01" * 32)
    other = examine.BuildStep(step.drv_path, step.drv, step.resolution, outputs)
    key = step.resolution.key.key
    _write(store, key, [t for t in _tokens(store, key) if _kid(t).startswith("builderA")]
           + [examine.sign(other, secret("builderB"), BUILDER)])
    policy = write_policy(tmp_path / "policy.toml", BOTH)
    base = ["--policy", str(policy), "--store", str(built.env.root), "--traces",
            f"file://{store}", "--json"]
    report = run_verify(capsys, built.drvs["useMulti"], *base).json()
    assert report["verified"] is True
    consumer = next(s for s in report["steps"] if s["name"] == "use-multi")
    assert len(consumer["resolved_keys"]) == 1
    res = run_verify(capsys, step.drv_path, *base)
    assert res.rc == 1
    assert "claims disagree" in res.json()["reason"]
