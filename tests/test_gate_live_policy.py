"""A running gate follows its policy file (issue 12): a real ``tracehook gate`` process.

A revocation written to the policy file takes effect within the check interval (2 s by
default), or at once on SIGHUP; each change is a ``policy-reload`` event with the old and
new content digests. A policy file that does not parse (or does not hold) makes the gate
answer 503 with the error: nothing is allowed and nothing is cached, and service resumes
as soon as the file is valid again. And a gate that cannot list its store does not start.
The store, cache and traces are hand-made (tests/gatekit.py ``make_synthetic``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from gatekit import Synthetic, make_synthetic, write_gate_key, write_policy
from gateproc import EXE, GateProcess, gate_argv, gate_process, get, wait_for
from tracehook.nix.storepath import hash_part


@pytest.fixture
def syn(tmp_path: Path) -> Synthetic:
    return make_synthetic(tmp_path / "syn")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def trusting(syn: Synthetic) -> Path:
    return write_policy(syn.policy, syn.traces, '"builderA"', ["builderA"])


def revoking(syn: Synthetic) -> Path:
    return write_policy(syn.policy, syn.traces, '"builderA"', {"builderA": "revoked = true"})


def start(syn: Synthetic, log: Path, *extra: str) -> AbstractContextManager[GateProcess]:
    return gate_process(gate_argv(syn.policy, [f"file://{syn.cache}"], syn.root, log, *extra))


def narinfo(gate: GateProcess, syn: Synthetic) -> tuple[int, bytes]:
    return get(f"{gate.url}/{hash_part(syn.ia_out)}.narinfo")


def realisation(gate: GateProcess, syn: Synthetic) -> tuple[int, bytes]:
    return get(f"{gate.url}/realisations/{syn.ca_id}.doi")


def test_revocation_in_the_file_reaches_a_running_gate(syn: Synthetic, tmp_path: Path) -> None:
    with start(syn, tmp_path / "gate.log") as gate:
        assert narinfo(gate, syn)[0] == 200 and realisation(gate, syn)[0] == 200
        old = digest(syn.policy)
        new = digest(revoking(syn))
        took = wait_for(lambda: narinfo(gate, syn)[0] == 404, timeout=4.0)
        assert took <= 3.5, took  # checked at most every 2 s, answers keyed by the digest
        status, body = realisation(gate, syn)
        assert status == 404 and b"revoked" in body
    reloads = gate.events("policy-reload")
    assert [(r["outcome"], r["old"], r["new"]) for r in reloads] == [("ok", old, new)]
    refused = gate.events("gate", "refused")
    assert refused and all("revoked" in str(r["reason"]) for r in refused)


def test_sighup_reloads_at_once(syn: Synthetic, tmp_path: Path) -> None:
    """With a long check interval only SIGHUP can explain the change."""
    with start(syn, tmp_path / "gate.log", "--policy-interval", "3600") as gate:
        assert narinfo(gate, syn)[0] == 200
        first = digest(syn.policy)
        revoked = digest(revoking(syn))
        assert narinfo(gate, syn)[0] == 200  # the file is not looked at yet
        gate.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: narinfo(gate, syn)[0] == 404, timeout=2.0) < 1.0
        back = digest(trusting(syn))
        assert back == first
        gate.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: narinfo(gate, syn)[0] == 200, timeout=2.0)
        assert realisation(gate, syn)[0] == 200
    reloads = [(r["outcome"], r["old"], r["new"]) for r in gate.events("policy-reload")]
    assert reloads == [("ok", first, revoked), ("ok", revoked, first)]


BROKEN = {
    "not-toml": ("[trust\nrequire = ", "not valid TOML"),
    "no-keys": ('traces = []\n[keys]\n[trust]\nrequire = "nobody"\n', "add a [keys] table"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_policy_fails_closed_until_it_is_fixed(case: str, syn: Synthetic,
                                                        tmp_path: Path) -> None:
    text, named = BROKEN[case]
    with start(syn, tmp_path / "gate.log", "--policy-interval", "0.3") as gate:
        assert narinfo(gate, syn)[0] == 200 and realisation(gate, syn)[0] == 200  # cached
        good = digest(syn.policy)
        syn.policy.write_text(text)
        wait_for(lambda: narinfo(gate, syn)[0] == 503, timeout=3.0)
        for status, body in (narinfo(gate, syn), realisation(gate, syn)):
            assert status == 503 and named in body.decode(), body  # the error, named
        allowed_while_broken = len(gate.events("gate", "allowed"))
        for _ in range(5):  # nothing cached, nothing allowed meanwhile
            assert narinfo(gate, syn)[0] == 503
        assert len(gate.events("gate", "allowed")) == allowed_while_broken
        # Valid again, and revoking: the answer is made under it, not taken from before.
        revoked = digest(revoking(syn))
        wait_for(lambda: narinfo(gate, syn)[0] == 404, timeout=3.0)
        assert realisation(gate, syn)[0] == 404
        trusting(syn)
        wait_for(lambda: narinfo(gate, syn)[0] == 200, timeout=3.0)
    reloads = gate.events("policy-reload")
    failed = [r for r in reloads if r["outcome"] == "failed"]
    assert len(failed) == 1, reloads  # logged once, not at every request
    assert failed[0]["old"] == good and named in str(failed[0]["reason"])
    assert [(r["old"], r["new"]) for r in reloads if r["outcome"] == "ok"] == [
        (good, revoked), (revoked, good)]
    lines = [line for line in gate.lines if "policy-reload" in line]
    assert "refusing everything (503)" in lines[0]


def test_gate_warns_at_start_without_a_signing_key(syn: Synthetic, tmp_path: Path) -> None:
    with start(syn, tmp_path / "gate.log") as gate:
        pass
    warned = gate.events("gate-config", "warning")
    assert len(warned) == 1 and "trusted-public-keys" in str(warned[0]["reason"])
    key, _ = write_gate_key(tmp_path)
    with start(syn, tmp_path / "gate2.log", "--signing-key", str(key)) as gate:
        pass
    assert gate.events("gate-config") == []
    helped = subprocess.run([EXE, "gate", "--help"], capture_output=True, text=True,
                            check=True).stdout
    assert "trusted-public-keys" in helped and "--policy-interval" in helped


# ---------------------------------------------------------------- a store it cannot list

UID = 61236  # a user that may not read the store (no such user needs to exist)


@pytest.mark.parametrize("case", ["missing", "not-a-directory", "permission-denied"])
def test_gate_does_not_start_on_a_store_it_cannot_list(case: str, syn: Synthetic,
                                                       tmp_path: Path) -> None:
    if case == "permission-denied" and os.geteuid() != 0:
        pytest.skip("switching uids needs root")
    base = Path(tempfile.mkdtemp(prefix="tracehook-store-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        policy = base / "policy.toml"
        shutil.copy(syn.policy, policy)
        os.chmod(policy, 0o644)
        cache = shutil.copytree(syn.cache, base / "cache")
        store = base / "store"
        argv = [EXE, "gate", "--policy", str(policy), "--upstream", f"file://{cache}",
                "--listen", "127.0.0.1:0", "--store", str(store)]
        prefix: list[str] = []
        if case == "not-a-directory":
            (store / "nix").mkdir(parents=True)
            (store / "nix" / "store").write_text("")
        elif case == "permission-denied":
            (store / "nix" / "store").mkdir(parents=True)
            os.chmod(store / "nix" / "store", 0o700)
            prefix = ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups"]
            argv[0:1] = [sys.executable, "-m", "tracehook"]
        env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", "TRACEHOOK_CACHE_DIR": ""}
        res = subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=60,
                             check=False, env=env)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert res.returncode == 3, res.stderr
    assert len(res.stderr.splitlines()) == 1, res.stderr  # one line, naming the directory
    assert f"{store}/nix/store" in res.stderr and "cannot list" in res.stderr


@pytest.mark.parametrize("flag,value,ok", [
    ("--index-interval", "-1", False), ("--index-interval", "nan", False),
    ("--verify-deadline", "0", False), ("--index-interval", "0", True),
    ("--generation-max-age", "0", False), ("--generation-max-age", "inf", False),
    ("--generation-max-age", "5", True), ("--verify-ahead", "-1", False),
    ("--verify-ahead", "nan", False), ("--verify-ahead", "0", True)])
def test_gate_checks_its_intervals(flag: str, value: str, ok: bool, syn: Synthetic,
                                   tmp_path: Path) -> None:
    """A negative or non-finite number of seconds is a one-line usage error (exit 2); 0
    turns background indexing (and verifying ahead) off."""
    if ok:
        with start(syn, tmp_path / "gate.log", flag, value) as gate:
            assert get(f"{gate.url}/nix-cache-info")[0] == 200
        return
    res = subprocess.run(gate_argv(syn.policy, [f"file://{syn.cache}"], syn.root,
                                   tmp_path / "gate.log", flag, value),
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.splitlines()) == 1 and flag in res.stderr, res.stderr
