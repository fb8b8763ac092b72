"""Chained post-build hooks (issue 16): run after signing, with Nix's environment, in order;
their failures are reported and never change the hook's exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agenthelp import listening
from tracehook.signer import chain

NIX_ENV = {"DRV_PATH": "/nix/store/0000000000000000000000000000000a-x.drv",
           "OUT_PATHS": "/nix/store/0000000000000000000000000000000b-x",
           "NIX_CONFIG": "access-tokens = github.com=TOKEN\nsecret-key-files = /k\n",
           "SOMETHING_ELSE": "kept as Nix gave it"}


def script(tmp: Path, name: str, body: str) -> Path:
    path = tmp / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def recorder(tmp: Path, name: str, code: int = 0) -> Path:
    """A chained hook that appends its name and environment to ``calls`` and exits ``code``."""
    return script(tmp, name, f'{{ echo "{name}"; env | sort; echo ---; }} >> {tmp}/calls\n'
                  f"echo '{name} says hello' >&2\nexit {code}")


def calls(tmp: Path) -> list[tuple[str, dict[str, str]]]:
    out = []
    for block in (tmp / "calls").read_text().split("---\n"):
        lines = block.strip().splitlines()
        if lines:
            env = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
            out.append((lines[0], env))
    return out


def test_run_all_in_order_with_the_same_environment(tmp_path: Path) -> None:
    hooks = [str(recorder(tmp_path, "first")), str(tmp_path / "missing"),
             str(recorder(tmp_path, "fails", 3)), str(script(tmp_path, "killed", "kill -9 $$")),
             str(recorder(tmp_path, "last"))]
    failures = chain.run_all(hooks, NIX_ENV)
    assert failures == [(hooks[1], "cannot start it: No such file or directory"),
                        (hooks[2], "exit code 3"), (hooks[3], "killed by signal 9")]
    seen = calls(tmp_path)
    assert [name for name, _ in seen] == ["first", "fails", "last"]  # in order, all run
    for _, env in seen:
        for key in ("DRV_PATH", "OUT_PATHS", "SOMETHING_ELSE"):
            assert env[key] == NIX_ENV[key]
        assert env["NIX_CONFIG"].startswith("access-tokens = github.com=TOKEN")


def _config(tmp: Path, hooks: list[Path], extra: str = "") -> Path:
    listed = ", ".join(f'"{h}"' for h in hooks)
    conf = tmp / "sign.toml"
    conf.write_text(f'agent-socket = "{tmp / "a.sock"}"\nspool-dir = "{tmp / "spool"}"\n'
                    f'log-file = "{tmp / "sign.log"}"\nchain-hooks = [{listed}]\n{extra}')
    return conf


def run_hook(tmp: Path, conf: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "TRACEHOOK_CONFIG": str(conf)} | NIX_ENV | extra
    return subprocess.run(
        [sys.executable, "-c", "from tracehook.signer.agent_client import run; run()"],
        env=env, capture_output=True, text=True, timeout=60, check=False)


def log_events(tmp: Path) -> list[dict[str, object]]:
    path = tmp / "sign.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_chained_after_the_agent_signed_and_failure_does_not_fail_the_build(
    tmp_path: Path,
) -> None:
    conf = _config(tmp_path, [recorder(tmp_path, "pusher", 1), recorder(tmp_path, "after")],
                   "strict = true\n")
    with listening(tmp_path / "a.sock", b"0\ntracehook: signed (agent)\n") as agent:
        proc = run_hook(tmp_path, conf)
    assert proc.returncode == 0, proc.stderr  # strict: only signing decides
    assert agent.received  # signed first...
    assert proc.stderr.index("signed (agent)") < proc.stderr.index("pusher says hello")
    assert [name for name, _ in calls(tmp_path)] == ["pusher", "after"]  # ...then the chain
    assert calls(tmp_path)[0][1]["NIX_CONFIG"].startswith("access-tokens")
    (event,) = log_events(tmp_path)
    assert (event["event"], event["outcome"], event["reason"]) == ("chain", "failed",
                                                                   "exit code 1")
    assert event["hook"] == str(tmp_path / "pusher")
    assert "chained hook" in proc.stderr and "the signature stands" in proc.stderr


@pytest.mark.parametrize(("strict", "code"), [(False, 0), (True, 2)],
                         ids=["not strict", "strict"])
def test_chain_runs_when_signing_fails_and_only_signing_sets_the_exit_code(
    strict: bool, code: int, tmp_path: Path
) -> None:
    conf = _config(tmp_path, [recorder(tmp_path, "pusher")],
                   "strict = true\n" if strict else "")
    proc = run_hook(tmp_path, conf, TRACEHOOK_AGENT_SOCKET="")  # in process, and no key
    assert proc.returncode == code, proc.stderr
    assert [name for name, _ in calls(tmp_path)] == ["pusher"]
    outcomes = [(e["event"], e["outcome"]) for e in log_events(tmp_path)]
    assert outcomes == [("sign", "failed")]


def test_no_chain_spawns_nothing(tmp_path: Path) -> None:
    conf = _config(tmp_path, [])
    with listening(tmp_path / "a.sock", b"0\nok\n"):
        proc = run_hook(tmp_path, conf)
    assert proc.returncode == 0 and not (tmp_path / "calls").exists()
