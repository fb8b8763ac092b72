"""A fleet with real Nix 2.26 and a real SeaweedFS: builders sign into one bucket, a
consumer requires 2 of 2 of them through a gate that reads traces and the binary cache
from buckets.

- Done when (issue 15): ``tracehook sign --to 's3://...'`` run by 48 processes at once, for
  two keys over the same steps, leaves every signature in the bucket, and ``tracehook
  verify`` with a 2-of-2 policy whose ``traces`` is that URL verifies, reading anonymously.
- End to end: two builder stores with different keys build the same chains with the real
  post-build hook, ``tracehook publish`` sends both spools to one bucket, the cache goes to
  a second bucket (``nix copy --to file://`` uploaded through the project's S3 client:
  Debian's Nix has no S3 store), a consumer substitutes through a gate requiring 2 of 2;
  then builder B's signatures are removed from the bucket and the gate refuses.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from gatekit import copy_to_cache, running_gate, step_keys, use_hook, write_gate_key
from nixharness import NixEnv, NixTier
from seaweed import ADMIN, BUILDER_A, BUILDER_B, Identity, Seaweed, clean_aws_env, upload_tree
from testkeys import public_text, secret
from tracehook.stores.s3 import S3TraceStore
from tracehook.trace import crypto, jws
from tracehook.trace.claim import parse_claim
from tracehook.trace.jws import render_trace_file

pytestmark = pytest.mark.nix

SALT = "s3-fleet"
ATTRS = ("caA", "caB", "caC", "iaA", "iaB", "iaC")
CHAINS = ("caC", "iaC")
TRACEHOOK = [sys.executable, "-m", "tracehook"]


@dataclass
class Builder:
    env: NixEnv
    config: Path  # sign.toml: the hook spools, `tracehook publish --config` sends
    secret: Path
    identity: Identity
    drvs: dict[str, str]
    outs: dict[str, str]


@dataclass
class Fleet:
    a: Builder
    b: Builder
    cache: Path  # builder A's outputs, `nix copy --to file://`


def _builder(tier: NixTier, base: Path, name: str, who: Identity) -> Builder:
    env = NixEnv(tier, base / name)
    config = use_hook(env, secret(name), base / "unused", base / f"signer-{name}")
    secret_file = base / f"signer-{name}" / "builder.secret"
    drvs = {a: env.instantiate(a, salt=SALT) for a in ATTRS}
    outs = {a: env.build(a, salt=SALT).out_paths[0] for a in ATTRS}  # the hook signs each
    return Builder(env, config, secret_file, who, drvs, outs)


@pytest.fixture(scope="module")
def fleet(nix226: NixTier, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    base = tmp_path_factory.mktemp("fleet")
    a = _builder(nix226, base, "builderA", BUILDER_A)
    b = _builder(nix226, base, "builderB", BUILDER_B)
    assert a.outs == b.outs, "the test derivations are deterministic"
    cache = base / "cache"
    copy_to_cache(a.env, cache, list(a.drvs.values()), list(a.outs.values()))
    return Fleet(a, b, cache)


def policy_2of2(path: Path, traces_url: str) -> Path:
    path.write_text(
        f"traces = [{json.dumps(traces_url)}]\n\n[keys]\n"
        f'builderA = {{ key = "{public_text("builderA")}" }}\n'
        f'builderB = {{ key = "{public_text("builderB")}" }}\n\n'
        '[trust]\nrequire = { threshold = 2, of = ["builderA", "builderB"] }\n')
    return path


def kids_in(store: S3TraceStore, trace_key: str) -> list[str]:
    return [jws.kid_of(jws.parse_compact(t)) or "" for t in store.get(trace_key)]


# ------------------------------------------------------------------------ done when


def test_done_when_48_signers_at_once_then_verify_anonymously(
    fleet: Fleet, seaweed: Seaweed, tmp_path: Path
) -> None:
    url = seaweed.url(seaweed.bucket("traces"))
    a = fleet.a
    signer_env = clean_aws_env() | BUILDER_A.env()  # credentials in the environment
    secrets = {"builderA": a.secret, "builderB": fleet.b.secret}
    jobs = [(name, attr) for name in secrets for attr in ATTRS for _ in range(4)]
    assert len(jobs) >= 40
    procs = [subprocess.Popen([*TRACEHOOK, "sign", a.drvs[attr], "--store", str(a.env.root),
                               "--key", str(secrets[name]), "--to", url],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=signer_env)
             for name, attr in jobs]  # all at once
    appended: dict[str, int] = {}
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        found = re.search(r"appended \w+ trace (\w{32}) to", err)
        assert found is not None, err
        appended[found.group(1)] = appended.get(found.group(1), 0) + 1
    assert len(appended) == len(ATTRS) and set(appended.values()) == {8}
    # Every signature is in the bucket: 8 distinct tokens a step (each signature carries a
    # fresh rebuild_id), 4 by each key, every one valid.
    reader = S3TraceStore(url)
    keys = {n: crypto.parse_public_key(public_text(n)) for n in secrets}
    for trace_key in appended:
        tokens = reader.get(trace_key)
        assert len(tokens) == len(set(tokens)) == 8, trace_key
        signers = []
        for token in tokens:
            parsed = jws.parse_compact(token)
            name = (jws.kid_of(parsed) or "").split(":")[0]
            jws.verify(parsed, keys[name])
            assert parse_claim(parsed).key == trace_key
            signers.append(name)
        assert sorted(signers) == ["builderA"] * 4 + ["builderB"] * 4
    # tracehook verify, 2 of 2, traces = that URL, no credentials at all.
    policy = policy_2of2(tmp_path / "policy.toml", url)
    verify = subprocess.run(
        [*TRACEHOOK, "verify", *(a.drvs[c] for c in CHAINS), "--policy", str(policy),
         "--store", str(a.env.root)], capture_output=True, text=True, env=clean_aws_env(),
        timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "AWS" not in verify.stderr


# ----------------------------------------------------------------------- end to end


def consume(tier: NixTier, base: Path, policy: Path, cache_url: str) -> tuple[
        dict[str, bool], dict[str, str], list[dict[str, object]]]:
    """A fresh consumer that may only substitute, through a gate reading the buckets."""
    consumer = NixEnv(tier, base / "consumer")
    for attr in CHAINS:
        consumer.instantiate(attr, salt=SALT)
    gate_key, gate_pub = write_gate_key(base)
    with running_gate(policy, [cache_url], str(consumer.root), base / "gate.log",
                      signing_key=gate_key) as gate:
        consumer.configure(substituters=gate.url, trusted_public_keys=gate_pub)
        got: dict[str, bool] = {}
        errs: dict[str, str] = {}
        for attr in CHAINS:
            res = consumer.build(attr, "--max-jobs", "0", salt=SALT, check=False)
            got[attr] = bool(res.out_paths) and all(consumer.real(p).exists()
                                                   for p in res.out_paths)
            errs[attr] = res.stderr
        return got, errs, gate.refusals()


def test_fleet_two_builders_one_bucket_two_of_two(
    fleet: Fleet, seaweed: Seaweed, nix226: NixTier, tmp_path: Path,
    anonymous_env: dict[str, str]
) -> None:
    traces_bucket, cache_bucket = seaweed.bucket("fleet-traces"), seaweed.bucket("fleet-nix")
    traces_url, cache_url = seaweed.url(traces_bucket), seaweed.url(cache_bucket)
    for builder in (fleet.a, fleet.b):  # each builder's publisher, its own credentials
        out = subprocess.run(
            [*TRACEHOOK, "publish", "--config", str(builder.config), "--to", traces_url],
            capture_output=True, text=True, env=clean_aws_env() | builder.identity.env(),
            timeout=300)
        assert out.returncode == 0, out.stderr
    assert upload_tree(seaweed.client(cache_bucket), fleet.cache) > len(ATTRS)
    policy = policy_2of2(tmp_path / "policy.toml", traces_url)

    got, errs, refusals = consume(nix226, tmp_path / "both", policy, cache_url)
    assert got == dict.fromkeys(CHAINS, True), errs
    assert refusals == []

    # Builder B's signatures leave the bucket: 1 of 2 is not enough any more.
    reader = S3TraceStore(traces_url)
    admin = seaweed.client(traces_bucket, ADMIN)
    removed = 0
    signed = step_keys(fleet.a.env, list(fleet.a.drvs.values()))
    for _, trace_key in signed.steps.values():
        tokens = reader.get(trace_key)
        kept = [t for t in tokens
                if not (jws.kid_of(jws.parse_compact(t)) or "").startswith("builderB:")]
        removed += len(tokens) - len(kept)
        put = admin.request("PUT", f"traces/{trace_key}", body=render_trace_file(kept))
        assert put.status == 200
        assert kids_in(reader, trace_key) and all(k.startswith("builderA:")
                                                  for k in kids_in(reader, trace_key))
    assert removed >= len(ATTRS)
    got, errs, refusals = consume(nix226, tmp_path / "one", policy, cache_url)
    assert got == dict.fromkeys(CHAINS, False), errs
    reasons = " ".join(str(r.get("reason")) for r in refusals)
    assert "threshold" in reasons or "2 of" in reasons, refusals
