"""The gate with cache signatures, end to end with real Nix 2.26.

A builder store with ``secret-key-files`` (the cache key "cache-1") builds the chains, so
Nix signs every narinfo and realisation; everything is ``nix copy``d to a file cache. Only
the upper step of each chain (ca-c, ia-c) has a trace (builderA); the lower half (a, b) is
only cache-signed. A consumer that can substitute only through the gate (``--max-jobs 0``)
gets both chains under ``any-of = [builderA, narinfo-key cache-1]``, and the gate's log says
which paths it accepted on a cache signature alone; under ``builderA`` alone the same
request is refused and the log names the step that lacked a trace.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from gatekit import copy_to_cache, key, running_gate, sign_closure, write_gate_key, write_policy
from nixharness import NixEnv, NixTier
from tracehook.trace import crypto

pytestmark = pytest.mark.nix

SALT = "gate-cache-sigs"
CHAINS = ("caC", "iaC")
LOWER = ("ca-a", "ca-b", "ia-a", "ia-b")
CACHE_PUB = crypto.format_public_key(key("cache-1").public)
MIXED = f'{{ any-of = ["builderA", {{ narinfo-key = "{CACHE_PUB}" }}] }}'


@dataclass(frozen=True)
class Built:
    cache: Path
    traces: Path
    drvs: dict[str, str]
    outs: dict[str, str]  # attr -> output path
    lower_outs: dict[str, str]  # step name -> output path


@pytest.fixture(scope="module")
def built(nix226: NixTier, tmp_path_factory: pytest.TempPathFactory) -> Built:
    base = tmp_path_factory.mktemp("gate-cache-sigs")
    sec = base / "cache-1.secret"
    sec.write_text(crypto.format_secret_key(key("cache-1")))
    env = NixEnv(nix226, base / "builder")
    env.configure(secret_key_files=str(sec))
    attrs = (*CHAINS, "caA", "caB", "iaA", "iaB")
    drvs = {a: env.instantiate(a, salt=SALT) for a in attrs}
    outs = {a: env.build(a, salt=SALT).out_paths[0] for a in attrs}
    traces = base / "traces"
    signed = sign_closure(env, [drvs[a] for a in CHAINS], key("builderA"), traces)
    for step in LOWER:  # the lower half has no trace: only the cache's signature
        (traces / "traces" / signed.key_of(step)).unlink()
    cache = base / "cache"
    copy_to_cache(env, cache, list(drvs.values()), list(outs.values()))
    lower = {"ca-a": outs["caA"], "ca-b": outs["caB"], "ia-a": outs["iaA"], "ia-b": outs["iaB"]}
    return Built(cache, traces, drvs, outs, lower)


@dataclass
class Result:
    substituted: dict[str, bool]
    events: list[dict[str, object]]
    consumer: NixEnv


def consume(tier: NixTier, built: Built, tmp: Path, require: str) -> Result:
    traces = tmp / "traces"
    shutil.copytree(built.traces, traces)
    policy = write_policy(tmp / "policy.toml", traces, require, ["builderA"])
    gate_key, gate_pub = write_gate_key(tmp)
    consumer = NixEnv(tier, tmp / "consumer")
    for attr in CHAINS:
        consumer.instantiate(attr, salt=SALT)
    with running_gate(policy, [f"file://{built.cache}"], str(consumer.root), tmp / "gate.log",
                      signing_key=gate_key) as gate:
        consumer.configure(substituters=gate.url, trusted_public_keys=gate_pub)
        done = {}
        for attr in CHAINS:
            res = consumer.build(attr, "--max-jobs", "0", salt=SALT, check=False)
            done[attr] = bool(res.out_paths) and all(consumer.real(p).exists()
                                                     for p in res.out_paths)
        events = gate.events()
    return Result(done, events, consumer)


def test_mixed_policy_substitutes_half_traced_chains(
    nix226: NixTier, built: Built, tmp_path: Path
) -> None:
    out = consume(nix226, built, tmp_path, MIXED)
    assert out.substituted == {"caC": True, "iaC": True}
    for attr in CHAINS:
        assert out.consumer.real(built.outs[attr]).exists()
    assert [e for e in out.events if e["outcome"] == "refused"] == []
    allowed = [e for e in out.events if e["outcome"] == "allowed"]
    assert allowed and all(e["trust"] == "traces" and e["signers"] == ["builderA"]
                           for e in allowed), allowed
    said: set[str] = set()
    for e in allowed:  # the top steps verify by traces and rely on cache signatures below
        said |= {str(x) for x in e["cache_signed"]}  # type: ignore[attr-defined]
    assert said <= set(built.lower_outs.values())
    assert {built.lower_outs["ca-b"], built.lower_outs["ia-b"]} <= said
    assert all(e["covered_without_traces"] == 0 for e in allowed)  # a-steps: no trace kept


def test_traces_only_policy_refuses_and_names_the_untraced_step(
    nix226: NixTier, built: Built, tmp_path: Path
) -> None:
    out = consume(nix226, built, tmp_path, '"builderA"')
    assert out.substituted == {"caC": False, "iaC": False}
    for attr in CHAINS:
        assert not out.consumer.real(built.outs[attr]).exists()
    refused = {str(e.get("name")): str(e.get("reason")) for e in out.events
               if e["outcome"] == "refused"}
    for step in ("ca-a", "ia-a"):
        assert step in refused, refused
        assert "no trace" in refused[step], refused[step]
