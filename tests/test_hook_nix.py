"""The post-build hook with real Nix (2.26 and 2.8): one valid trace per build step per key.

Nix runs ``hooks/post-build`` (which execs the venv's ``tracehook-post-build``) after every
build in an isolated chroot store; ``tracehook publish`` then delivers the spool to a file
trace store, and the store is checked against what Nix itself says (resolved derivations,
NAR hashes).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import MakeNixEnv
from nixharness import REPO, NixEnv, NixTier
from tracehook import cli
from tracehook.nix.nar import parse_nar_hash
from tracehook.nix.storepath import hash_part
from tracehook.signer import config
from tracehook.signer.agent import SigningAgent
from tracehook.stores import proc
from tracehook.trace import crypto, jws
from tracehook.trace.claim import Claim, parse_claim

pytestmark = pytest.mark.nix

HOOK = REPO / "hooks" / "post-build"


@dataclass
class Signer:
    env: NixEnv
    config: Path
    traces: Path
    spool: Path
    log: Path
    public: crypto.PublicKey

    def publish(self) -> None:
        assert cli.main(["publish", "--config", str(self.config)]) == 0

    def claims(self) -> dict[str, list[Claim]]:
        """Trace key -> the claims in its file, each verified with the signer's key."""
        out: dict[str, list[Claim]] = {}
        for path in sorted((self.traces / "traces").iterdir()):
            if path.name.startswith("."):
                continue
            claims = []
            for text in jws.parse_trace_file(path.read_bytes()):
                token = jws.parse_compact(text)
                jws.verify(token, self.public)
                claim = parse_claim(token)
                assert claim.key == path.name
                claims.append(claim)
            out[path.name] = claims
        return out

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]


def make_signer(env: NixEnv, tmp: Path, extra: str = "") -> Signer:
    sk = crypto.generate_secret_key("test-builder-1")
    crypto.write_key_files(sk, tmp / "key.sec", tmp / "key.pub")
    traces, spool, log = tmp / "trace-store", tmp / "spool", tmp / "sign.log"
    config = tmp / "sign.toml"
    config.write_text(
        f'secret-key-file = "{tmp / "key.sec"}"\n'
        f'publish-to = ["file://{traces}"]\n'
        f'spool-dir = "{spool}"\n'
        f'log-file = "{log}"\n'
        f'store-root = "{env.root}"\n'  # the agent never sees NIX_CONFIG's store
        "strict = true\n" + extra
    )
    env.configure(post_build_hook=str(HOOK))
    env.extra_env["TRACEHOOK_CONFIG"] = str(config)
    env.extra_env["TRACEHOOK_AGENT_SOCKET"] = "off"  # sign in the hook's own process
    return Signer(env, config, traces, spool, log, sk.public)


@pytest.fixture(params=["in-process", "agent"])
def mode(request: pytest.FixtureRequest) -> str:
    """How the hook signs: in its own process, or through a running signing agent."""
    return str(request.param)


def use_mode(signer: Signer, mode: str, tmp: Path) -> SigningAgent | None:
    if mode == "in-process":
        return None
    agent = SigningAgent(tmp / "agent.sock", config.load(signer.config, environ={}),
                         signer.env.env())
    signer.env.extra_env["TRACEHOOK_AGENT_SOCKET"] = str(agent.path)
    agent.start()
    return agent


def nar_hash(env: NixEnv, path: str) -> bytes:
    return parse_nar_hash(env.query_hash(path))


def test_hook_signs_every_step_once(nixenv: NixEnv, tmp_path: Path, mode: str) -> None:
    signer = make_signer(nixenv, tmp_path)
    resolved: dict[str, str] = {}
    outs: dict[str, str] = {}
    agent = use_mode(signer, mode, tmp_path)
    try:
        for attr in ("caC", "iaC", "iaOnCa", "useMulti", "caOnFod"):
            res = nixenv.build(attr, salt="hook")
            resolved.update(res.resolved)
            outs[attr] = res.out_paths[0]
    finally:
        if agent is not None:
            agent.stop()
    signer.publish()
    claims = signer.claims()

    # Exactly one signature per step: ca-a, ca-b, ca-c, ia-a, ia-b, ia-c, ia-on-ca, multi-ca,
    # multi-ia, use-multi, ca-on-fod. The fixed-output fod-flat and fod-rec get none.
    assert all(len(c) == 1 for c in claims.values()), claims
    by_name = {
        c[0].token.payload["in"]["debug"]["drv_name"]: c[0] for c in claims.values()
    }
    assert sorted(by_name) == sorted([
        "ca-a", "ca-b", "ca-c", "ia-a", "ia-b", "ia-c", "ia-on-ca", "multi-ca", "multi-ia",
        "use-multi", "ca-on-fod",
    ])

    # CA steps with content-addressed inputs: laut's key, the hash of what Nix resolved.
    nix_resolved = {Path(r).name.split("-", 1)[1]: r for r in resolved.values()}
    for name in ("ca-b.drv", "ca-c.drv", "ca-on-fod.drv"):
        claim = by_name[name[: -len(".drv")]]
        assert claim.kind == "ca"
        assert claim.key == hash_part(nix_resolved[name])
    assert by_name["ca-a"].kind == "ca"
    assert by_name["ca-a"].key == hash_part(nixenv.instantiate("caA", salt="hook"))

    # IA on CA, and CA with an IA input: the ia key over exactly Nix's resolved derivation.
    for name in ("ia-on-ca", "use-multi"):
        claim = by_name[name]
        assert claim.kind == "ia"
        assert claim.token.payload["in"]["debug"]["rdrv_path"] == nix_resolved[name + ".drv"]
    pins = by_name["use-multi"].token.payload["in"]["debug"]["pins"]
    (dev,) = pins
    assert dev.endswith("-multi-ia-dev")
    assert parse_nar_hash(pins[dev]) == nar_hash(nixenv, dev)
    assert by_name["ia-on-ca"].token.payload["in"]["debug"]["pins"] == {}

    # IA chain: ia keys pinning the input-addressed inputs by the NAR hash Nix recorded.
    ia_c_pins = by_name["ia-c"].token.payload["in"]["debug"]["pins"]
    assert sorted(Path(p).name[33:] for p in ia_c_pins) == ["ia-a", "ia-b"]
    for path, digest in ia_c_pins.items():
        assert parse_nar_hash(digest) == nar_hash(nixenv, path)

    # Every claimed output is what Nix built, with the NAR hash Nix recorded.
    for attr, name in (("caC", "ca-c"), ("iaC", "ia-c"), ("useMulti", "use-multi")):
        out = by_name[name].outputs["out"]
        assert out.path == outs[attr]
        assert out.nar_hash == nar_hash(nixenv, out.path)

    events = [e for e in signer.events() if e["event"] == "sign"]
    assert {e["via"] for e in events} == {"agent" if mode == "agent" else "hook"}
    assert sum(e["outcome"] == "ok" for e in events) == 11
    assert all(e["outcome"] in ("ok", "already-signed", "skipped") for e in events), events
    # Nix's second call for a resolved step reads as what it is, once per resolved step,
    # and never as a "duplicate" (issue 12, item 12).
    second = sorted(Path(e["drv"]).name[33:] for e in events if e["outcome"] == "already-signed")
    assert second == ["ca-b.drv", "ca-c.drv", "ca-on-fod.drv", "ia-on-ca.drv"]

    # Every trace names the Nix that built it (it said "unknown").
    versions = {c[0].token.payload["builder"]["nix_version"] for c in claims.values()}
    assert versions == {nixenv.tier.version}
    skipped = [e for e in events if e["outcome"] == "skipped"]
    assert any("fixed-output" in e["reason"] for e in skipped)
    assert any("resolved copy" in e["reason"] and "use-multi" in e["drv"] for e in skipped)
    ok = next(e for e in events if e["outcome"] == "ok")
    for field in ("drv", "outputs", "kid", "trace_key", "spool_file", "duration_ms"):
        assert field in ok

    # Nothing pending after publishing.
    assert not list((signer.spool / "pending").iterdir())


def test_check_rebuild_adds_nothing(nixenv: NixEnv, tmp_path: Path) -> None:
    signer = make_signer(nixenv, tmp_path)
    nixenv.build("caC", salt="check")
    nixenv.build("iaC", salt="check")
    signer.publish()
    before = signer.claims()
    nixenv.build("caC", "--check", salt="check")
    nixenv.build("iaC", "--check", salt="check")
    signer.publish()
    after = signer.claims()
    assert {k: [c.token.compact for c in v] for k, v in after.items()} == {
        k: [c.token.compact for c in v] for k, v in before.items()
    }
    assert all(len(v) == 1 for v in after.values())
    outcomes = [e["outcome"] for e in signer.events() if e["event"] == "sign"]
    assert outcomes.count("ok") == 6


def test_nix_build_rebuild_adds_nothing(nix226: NixTier, make_nixenv: MakeNixEnv,
                                       tmp_path: Path) -> None:
    """``nix build --rebuild`` (the new CLI's --check) runs the hook again for every step it
    rebuilds: the identical claims are kept once, nothing else changes."""
    env = make_nixenv(nix226)
    signer = make_signer(env, tmp_path)
    env.build("caC", salt="rebuild")
    env.build("iaOnCa", salt="rebuild")
    signer.publish()
    before = {k: [c.token.compact for c in v] for k, v in signer.claims().items()}
    drvs = [env.instantiate(a, salt="rebuild") for a in ("caC", "iaOnCa")]
    env.run("nix", "build", "--rebuild", "--no-link", *(f"{d}^*" for d in drvs))
    signer.publish()
    after = {k: [c.token.compact for c in v] for k, v in signer.claims().items()}
    assert after == before
    reruns = [e for e in signer.events() if e["event"] == "sign" and e["outcome"] != "ok"]
    assert reruns, "the hook did not run for the rebuilt steps"
    assert all(e["outcome"] in ("duplicate", "already-signed", "skipped") for e in reruns)
    assert any(e["outcome"] == "duplicate" for e in reruns)  # the --rebuild repeats


def test_sign_by_hand_matches_hook(
    nixenv: NixEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    signer = make_signer(nixenv, tmp_path)
    nixenv.build("useMulti", salt="byhand")
    signer.publish()
    by_name = {c[0].token.payload["in"]["debug"]["drv_name"]: c[0]
               for c in signer.claims().values()}
    drv = nixenv.instantiate("useMulti", salt="byhand")
    capsys.readouterr()
    assert cli.main(["sign", drv, "--store", str(nixenv.root),
                     "--key", str(tmp_path / "key.sec")]) == 0
    token = jws.parse_compact(capsys.readouterr().out.strip())
    jws.verify(token, signer.public)
    claim = parse_claim(token)
    hook_claim = by_name["use-multi"]
    assert (claim.kind, claim.key, claim.outputs) == (
        hook_claim.kind, hook_claim.key, hook_claim.outputs
    )
    # --to appends straight to a store; the same claim again is one more signature (a new
    # rebuild_id), since signing by hand bypasses the spool's dedupe on purpose.
    assert cli.main(["sign", drv, "--store", str(nixenv.root), "--key",
                     str(tmp_path / "key.sec"), "--to", f"file://{tmp_path}/hand"]) == 0
    assert (tmp_path / "hand" / "traces" / claim.key).exists()
    # A fixed-output derivation is skipped with the reason, exit 0.
    fod = nixenv.instantiate("fodFlat", salt="byhand")
    nixenv.build("fodFlat", salt="byhand")
    assert cli.main(["sign", fod, "--store", str(nixenv.root),
                     "--key", str(tmp_path / "key.sec")]) == 0
    assert "fixed-output" in capsys.readouterr().err


def test_resolved_multi_output_step_asked_for_one_output(
    nixenv: NixEnv, tmp_path: Path, mode: str
) -> None:
    """Issue 12.8: Nix 2.8 names (and records) only the outputs asked for on its second call
    for a resolved step; the hook said "could not sign ... cannot tell which paths"."""
    signer = make_signer(nixenv, tmp_path)
    agent = use_mode(signer, mode, tmp_path)
    try:
        res = nixenv.build("multiOnCaLib", salt="partial")
    finally:
        if agent is not None:
            agent.stop()
    assert len(res.out_paths) == 1 and res.out_paths[0].endswith("-multi-on-ca-lib")
    events = [e for e in signer.events() if e["event"] == "sign"]
    assert [e for e in events if e["outcome"] == "failed"] == []
    multi = [e for e in events if e["drv"].endswith("-multi-on-ca.drv")]
    assert [e["outcome"] for e in multi] == ["ok", "already-signed"]
    signer.publish()
    (claim,) = next(c for c in signer.claims().values()
                    if c[0].token.payload["in"]["debug"]["drv_name"] == "multi-on-ca")
    assert sorted(claim.outputs) == ["dev", "lib", "out"]
    assert claim.outputs["lib"].path == res.out_paths[0]
    for out in claim.outputs.values():
        assert out.nar_hash == nar_hash(nixenv, out.path)


CHAINED = """#!/bin/sh
# Records what a chained hook sees: its environment, and whether the build was signed first.
{{
  echo "DRV_PATH=$DRV_PATH"
  echo "OUT_PATHS=$OUT_PATHS"
  printf '%s\\n' "$NIX_CONFIG" | grep -c '^store = ' | sed 's/^/NIX_CONFIG_STORE_LINES=/'
  echo "SPOOLED=$(ls {spool}/pending | wc -l)"
  echo ---
}} >> {calls}
"""


def test_chain_hooks_run_after_signing_with_nix_environment(
    nixenv: NixEnv, tmp_path: Path, mode: str
) -> None:
    """Issue 16: services.tracehook.sign.chainHooks; the hook runs them after signing."""
    calls = tmp_path / "calls"
    script = tmp_path / "upload-to-cache.sh"
    script.write_text(CHAINED.format(spool=tmp_path / "spool", calls=calls))
    script.chmod(0o755)
    failing = tmp_path / "broken-pusher.sh"
    failing.write_text("#!/bin/sh\nexit 7\n")
    failing.chmod(0o755)
    signer = make_signer(nixenv, tmp_path, f'chain-hooks = ["{failing}", "{script}"]\n')
    agent = use_mode(signer, mode, tmp_path)
    try:
        nixenv.build("caB", salt="chain")  # strict = true: a chain failure must not matter
    finally:
        if agent is not None:
            agent.stop()
    records = [dict(line.split("=", 1) for line in block.strip().splitlines())
               for block in calls.read_text().split("---\n") if block.strip()]
    drvs = [Path(r["DRV_PATH"]).name[33:] for r in records]
    assert sorted(drvs) == ["ca-a.drv", "ca-b.drv", "ca-b.drv"]  # every hook call, in order
    assert all(r["NIX_CONFIG_STORE_LINES"] == "1" for r in records)  # Nix's NIX_CONFIG
    assert [int(r["SPOOLED"]) for r in records] == [1, 2, 2]  # signed before the chain ran
    events = signer.events()
    chained = [e for e in events if e["event"] == "chain"]
    assert len(chained) == 3 and {e["reason"] for e in chained} == {"exit code 7"}
    assert sum(e["event"] == "sign" and e["outcome"] == "ok" for e in events) == 2


def test_daemon_agent_signs_with_the_config_it_was_given(
    nixenv: NixEnv, tmp_path: Path
) -> None:
    """Issue 12.4: `publish --daemon --config F`: the agent read $TRACEHOOK_CONFIG or the
    default instead, so builds went unsigned or were signed with another key."""
    signer = make_signer(nixenv, tmp_path)
    decoy_dir = tmp_path / "decoy"
    decoy_dir.mkdir()
    decoy = make_signer(nixenv, decoy_dir)  # another key, spool and log
    sock = tmp_path / "run" / "agent.sock"
    nixenv.extra_env["TRACEHOOK_CONFIG"] = str(signer.config)
    nixenv.extra_env["TRACEHOOK_AGENT_SOCKET"] = str(sock)
    daemon = proc.spawn(
        [sys.executable, "-m", "tracehook", "publish", "--daemon", "--interval", "0.2",
         "--config", str(signer.config), "--agent-socket", str(sock)],
        env=nixenv.env() | {"TRACEHOOK_CONFIG": str(decoy.config)},
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        nixenv.build("caB", salt="daemon")
        deadline = time.monotonic() + 30
        while list((signer.spool / "pending").iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    assert daemon.returncode == 0
    events = [e for e in signer.events() if e["event"] == "sign"]
    assert {e["via"] for e in events} == {"agent"}
    assert sum(e["outcome"] == "ok" for e in events) == 2
    claims = signer.claims()  # delivered by the daemon, each verified with --config's key
    assert len(claims) == 2
    assert not decoy.log.exists() and not decoy.spool.exists()
