"""``tracehook verify OUTPUT_PATH`` on a consumer's store, with real Nix.

A builder (Nix 2.26) builds and signs; a consumer (Nix 2.26 and 2.8) instantiates the same
expressions and substitutes the outputs through the gate (--max-jobs 0). For content-
addressed and deferred outputs Nix records the builder's *resolved* .drv as the deriver,
which the consumer does not have; the verifier finds the consumer's own original .drv
through its realisations (docs/POLICY.md), and for input-addressed outputs through its
derivers. What the consumer cannot tell (no derivation in the store) is a one-line exit 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from gatekit import copy_to_cache, key, running_gate, sign_closure, write_gate_key, write_policy
from nixharness import NixEnv, NixTier
from tracehook.stores.nixdb import StoreDatabase
from verifyhelp import run_verify

pytestmark = pytest.mark.nix

SALT = "verify-consumer"
# attr -> what kind of output it is
KINDS = {
    "caC": "floating CA on a CA chain",
    "iaOnCa": "deferred input-addressed (on a CA input)",
    "iaC": "input-addressed",
    "useMulti": "floating CA on a multi-output CA and a multi-output IA step",
    "caOnFod": "floating CA on fixed-output inputs",
}


@dataclass
class Builder:
    env: NixEnv
    cache: Path
    traces: Path
    policy: Path
    outs: dict[str, str]


@pytest.fixture(scope="module")
def builder(nix226: NixTier, tmp_path_factory: pytest.TempPathFactory) -> Builder:
    base = tmp_path_factory.mktemp("verify-consumer")
    env = NixEnv(nix226, base / "builder")
    drvs = {a: env.instantiate(a, salt=SALT) for a in KINDS}
    outs = {a: env.build(a, salt=SALT).out_paths[0] for a in KINDS}
    traces = base / "traces"
    sign_closure(env, list(drvs.values()), key("builderA"), traces)
    cache = base / "cache"
    copy_to_cache(env, cache, list(drvs.values()), list(outs.values()))
    policy = write_policy(base / "policy.toml", traces, '"builderA"', ["builderA"])
    return Builder(env, cache, traces, policy, outs)


@dataclass
class Consumer:
    env: NixEnv
    drvs: dict[str, str]


@pytest.fixture
def consumer(nix_tier: NixTier, builder: Builder, tmp_path: Path) -> Consumer:
    """A fresh store that instantiates the expressions and substitutes every output through
    the gate, building nothing."""
    env = NixEnv(nix_tier, tmp_path / "consumer")
    drvs = {a: env.instantiate(a, salt=SALT) for a in KINDS}
    gate_key, gate_pub = write_gate_key(tmp_path)
    with running_gate(builder.policy, [f"file://{builder.cache}"], str(env.root),
                      tmp_path / "gate.log", signing_key=gate_key) as gate:
        env.configure(substituters=gate.url, trusted_public_keys=gate_pub)
        for attr in KINDS:
            res = env.build(attr, "--max-jobs", "0", salt=SALT, check=False)
            assert res.out_paths == (builder.outs[attr],), res.stderr[-2000:]
    return Consumer(env, drvs)


def verify(capsys: pytest.CaptureFixture[str], store: Path, policy: Path, traces: Path,
           *targets: str, json_out: bool = True) -> tuple[int, str, str]:
    args = [*targets, "--policy", str(policy), "--store", str(store),
            "--traces", f"file://{traces}"]
    res = run_verify(capsys, *args, *(["--json"] if json_out else []))
    return res.rc, res.out, res.err


@pytest.mark.parametrize("attr", list(KINDS), ids=list(KINDS))
def test_substituted_output_path_verifies(
    attr: str, builder: Builder, consumer: Consumer, capsys: pytest.CaptureFixture[str]
) -> None:
    path = builder.outs[attr]
    with StoreDatabase(str(consumer.env.root)) as db:
        info = db.path_info(path)
    assert info is not None and info.deriver is not None
    if attr != "iaC":  # the recorded deriver is the builder's resolved .drv, absent here
        assert info.deriver != consumer.drvs[attr]
        assert not consumer.env.real(info.deriver).exists()
    rc, out, err = verify(capsys, consumer.env.root, builder.policy, builder.traces, path)
    assert (rc, err) == (0, ""), out + err
    report = run_verify(capsys, path, "--policy", str(builder.policy), "--store",
                        str(consumer.env.root), "--traces", f"file://{builder.traces}",
                        "--json").json()
    assert report["drv"] == consumer.drvs[attr]  # the consumer's own original .drv
    assert report["outputs"] == {"out": path}
    assert report["target"] == path


def test_all_substituted_paths_at_once_and_after_a_revocation(
    builder: Builder, consumer: Consumer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What docs/OPERATIONS.md tells an operator to do after a revocation: verify the paths
    already substituted; they no longer verify."""
    paths = [builder.outs[a] for a in KINDS]
    rc, out, _ = verify(capsys, consumer.env.root, builder.policy, builder.traces, *paths,
                        json_out=False)
    assert rc == 0 and out.count("verified") >= len(paths), out
    revoked = write_policy(tmp_path / "revoked.toml", builder.traces, '"builderA"',
                           {"builderA": "revoked = true"})
    rc, out, _ = verify(capsys, consumer.env.root, revoked, builder.traces, *paths,
                        json_out=False)
    assert rc == 1 and "revoked" in out, out


def test_paths_the_store_cannot_place(
    nix226: NixTier, builder: Builder, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A store that got the paths with ``nix copy`` (no evaluation): no derivation to verify
    them through, said in one line, exit 2; so for a source and a path not in the store."""
    env = NixEnv(nix226, tmp_path / "copied")
    paths = [builder.outs[a] for a in ("caC", "iaC")]
    env.run("nix", "copy", "--no-check-sigs", "--from", f"file://{builder.cache}", *paths)
    for path in paths:
        assert env.real(path).exists()
        rc, out, err = verify(capsys, env.root, builder.policy, builder.traces, path)
        assert rc == 2 and out == "", out
        assert len(err.strip().splitlines()) == 1, err
        assert f"{path}: the store holds no derivation for this path" in err
        assert "nix-instantiate" in err and "[Errno" not in err
    [source] = (builder.env.root / "nix" / "store").glob("*-busybox-static")
    rc, _, err = verify(capsys, builder.env.root, builder.policy, builder.traces,
                        f"/nix/store/{source.name}")
    assert rc == 2 and "no deriver is recorded for it" in err, err
    missing = "/nix/store/" + "0" * 32 + "-nothing"
    rc, _, err = verify(capsys, env.root, builder.policy, builder.traces, missing)
    assert rc == 2 and "not a valid path in the store" in err
