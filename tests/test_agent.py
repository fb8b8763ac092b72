"""The signing agent and the hook's client side of it (no Nix: failure paths, protocol)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agenthelp import listening
from tracehook.errors import ConfigError, EnvironmentFault
from tracehook.signer import agent_client, config, fastconf
from tracehook.signer.agent import SigningAgent, parse_request


def load_config(tmp: Path, text: str = "") -> config.SignConfig:
    path = tmp / "agent.toml"
    path.write_text(f'spool-dir = "{tmp / "spool"}"\nlog-file = "{tmp / "agent.log"}"\n{text}')
    return config.load(path, environ={})


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("plain", id="plain"),
        pytest.param('quote " and back\\slash', id="quote and backslash"),
        pytest.param("new\nline\ttab\r\x00\x1f\x7f", id="control characters"),
        pytest.param("ünïcödé ✓ 雪 🎉", id="non-ASCII and astral"),
    ],
)
def test_request_is_json(text: str) -> None:
    data = agent_client.request({"DRV_PATH": text, "OUT_PATHS": text})
    assert data.endswith(b"\n")
    assert json.loads(data) == {"DRV_PATH": text, "OUT_PATHS": text}
    assert parse_request(data)["DRV_PATH"] == text


def test_request_never_carries_nix_config_or_other_variables() -> None:
    """Issue 13.9: NIX_CONFIG (access-tokens, netrc-file) reached whoever listened."""
    env = {"DRV_PATH": "/nix/store/x.drv", "OUT_PATHS": "/nix/store/x",
           "NIX_CONFIG": "access-tokens = github.com=SECRET\n", "HOME": "/root",
           "TRACEHOOK_CONFIG": "/etc/x.toml", "AWS_SECRET_ACCESS_KEY": "SECRET"}
    data = agent_client.request(env)
    assert json.loads(data) == {"DRV_PATH": "/nix/store/x.drv", "OUT_PATHS": "/nix/store/x"}
    assert b"SECRET" not in data


def test_older_hooks_nix_config_is_dropped_unread() -> None:
    data = b'{"DRV_PATH": "/x.drv", "OUT_PATHS": "", "NIX_CONFIG": "secret-key-files = /k"}\n'
    assert parse_request(data) == {"DRV_PATH": "/x.drv", "OUT_PATHS": ""}


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"[1]\n", id="not an object"),
        pytest.param(b'{"OUT_PATHS": ""}\n', id="no DRV_PATH"),
        pytest.param(b'{"DRV_PATH": "x", "TRACEHOOK_CONFIG": "/evil"}\n', id="extra variable"),
        pytest.param(b'{"DRV_PATH": 1}\n', id="not a string"),
        pytest.param(b"{\n", id="truncated"),
    ],
)
def test_malformed_requests_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_request(data)


def talk(path: Path, payload: bytes) -> bytes:
    reply = agent_client.ask_agent(str(path), payload)
    assert reply is not None
    return reply


def test_agent_answers_with_hook_result_under_its_own_config(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    cfg = load_config(tmp_path)  # no key: the hook's usual one-line failure
    # The agent's environment names another configuration: it must not be read.
    other = tmp_path / "other.toml"
    other.write_text("strict = true\n")
    with SigningAgent(sock, cfg, {"TRACEHOOK_CONFIG": str(other), "TRACEHOOK_STRICT": "1"}):
        assert (sock.stat().st_mode & 0o777) == 0o600
        reply = talk(sock, agent_client.request({"DRV_PATH": "/nix/store/x.drv"}))
        code, _, text = reply.partition(b"\n")
        assert code == b"0" and b"no signing key" in text and b"build continues" in text
        record = json.loads((tmp_path / "agent.log").read_text().splitlines()[-1])
        assert record["via"] == "agent" and record["outcome"] == "failed"
        reply = talk(sock, b'{"DRV_PATH": "x", "TRACEHOOK_CONFIG": "/evil"}\n')
        assert reply.startswith(b"fallback\n") and b"malformed request" in reply
    assert not sock.exists()
    strict = SigningAgent(tmp_path / "b.sock", load_config(tmp_path, "strict = true\n"), {})
    with strict:
        reply = talk(tmp_path / "b.sock", agent_client.request({"DRV_PATH": "/x.drv"}))
        assert reply.startswith(b"2\n")


def test_no_agent_means_fallback(tmp_path: Path) -> None:
    assert agent_client.ask_agent(str(tmp_path / "missing.sock"), b"{}\n") is None


# --- the socket path: only a stale socket is ever removed (issue 13.11a) ----------------


def test_stale_socket_replaced_live_one_refused(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()  # the file stays, nobody listens
    cfg = load_config(tmp_path)
    with SigningAgent(sock, cfg, {}), pytest.raises(EnvironmentFault, match="already listens"):
        SigningAgent(sock, cfg, {}).start()


def _regular(p: Path) -> None:
    p.write_text("precious")


def _directory(p: Path) -> None:
    p.mkdir()
    (p / "inside").write_text("precious")


def _symlink(p: Path) -> None:
    (p.parent / "target").write_text("precious")
    p.symlink_to(p.parent / "target")


def _dangling(p: Path) -> None:
    p.symlink_to(p.parent / "nowhere")


def _fifo(p: Path) -> None:
    os.mkfifo(p)


@pytest.mark.parametrize(
    ("case", "make", "kind"),
    [
        pytest.param("regular file", _regular, "a regular file", id="regular file"),
        pytest.param("directory", _directory, "a directory", id="directory"),
        pytest.param("symlink to elsewhere", _symlink, "a symlink to", id="symlink"),
        pytest.param("dangling symlink", _dangling, "a symlink to", id="dangling symlink"),
        pytest.param("fifo", _fifo, "a FIFO", id="fifo"),
    ],
)
def test_agent_never_removes_what_is_not_a_socket(case: str, make: object, kind: str,
                                                  tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    assert callable(make)
    make(path)
    before = os.lstat(path)
    with pytest.raises(ConfigError) as err:
        SigningAgent(path, load_config(tmp_path), {}).start()
    assert str(path) in err.value.diagnostics() and kind in err.value.diagnostics()
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    target = tmp_path / "target"
    if target.exists():
        assert target.read_text() == "precious"


# --- the hook checks the agent before it sends anything (issue 13.9) ---------------------


def test_agent_of_another_uid_gets_nothing(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    with listening(sock) as fake, pytest.raises(agent_client.Unusable, match="runs as uid 0"):
        agent_client.ask_agent(str(sock), b'{"DRV_PATH": "/x.drv"}\n', uid=4242)
    assert fake.received == b""


def test_wedged_agent_bounded_by_timeout(tmp_path: Path) -> None:
    """Issue 13.8: a wedged agent added 120 s to every build."""
    sock = tmp_path / "a.sock"
    with listening(sock, answer=None):
        start = time.monotonic()
        with pytest.raises(agent_client.Unusable, match=r"within 0\.5 s"):
            agent_client.ask_agent(str(sock), b'{"DRV_PATH": "/x.drv"}\n', uid=0, timeout=0.5)
        assert time.monotonic() - start < 2.0


@pytest.mark.parametrize(
    ("case", "mode", "owner", "message"),
    [
        pytest.param("world writable", 0o777, 0, "writable by group or others", id="o+w"),
        pytest.param("group writable", 0o770, 0, "writable by group or others", id="g+w"),
        pytest.param("other owner", 0o755, 4243, "belongs to uid 4243", id="other owner"),
    ],
)
def test_untrusted_socket_directory(case: str, mode: int, owner: int, message: str,
                                    tmp_path: Path) -> None:
    directory = tmp_path / "run"
    directory.mkdir()
    os.chmod(directory, mode)
    os.chown(directory, owner, -1)
    with pytest.raises(agent_client.Unusable, match=message):
        agent_client.check_directory(str(directory / "agent.sock"), 4242)
    os.chown(directory, 4242, -1)
    os.chmod(directory, 0o755)
    assert agent_client.check_directory(str(directory / "agent.sock"), 4242)
    assert not agent_client.check_directory(str(tmp_path / "missing" / "agent.sock"), 0)


def test_agent_user_names() -> None:
    assert agent_client.expected_uid("root") == 0
    assert agent_client.expected_uid("4242") == 4242
    assert agent_client.expected_uid("nobody") == 65534
    with pytest.raises(agent_client.Unusable, match="not a user"):
        agent_client.expected_uid("no-such-user-tracehook")


def _hook_env(tmp: Path, sock: Path, extra: str = "") -> dict[str, str]:
    conf = tmp / "hook.toml"
    conf.write_text(f'agent-socket = "{sock}"\nspool-dir = "{tmp / "spool"}"\n'
                    f'log-file = "{tmp / "hook.log"}"\n{extra}')
    return {"TRACEHOOK_CONFIG": str(conf), "DRV_PATH": "/nix/store/x.drv", "OUT_PATHS": "",
            "PATH": os.environ["PATH"]}


def run_fast_path(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The hook's entry point in its own process; prints the modules it imported."""
    code = ("import sys\nfrom tracehook.signer import agent_client\ntry:\n"
            "    agent_client.run()\nfinally:\n"
            "    print(' '.join(sorted(sys.modules)))\n")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def test_fast_path_imports_almost_nothing(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    with listening(sock, b"0\ntracehook: signed by the agent\n") as fake:
        proc = run_fast_path(_hook_env(tmp_path, sock, "agent-timeout = 2\n"))
    assert proc.returncode == 0, proc.stderr
    assert "signed by the agent" in proc.stderr
    assert json.loads(fake.received) == {"DRV_PATH": "/nix/store/x.drv", "OUT_PATHS": ""}
    modules = set(proc.stdout.split())
    assert {m for m in modules if m.startswith("tracehook")} == {
        "tracehook", "tracehook.signer", "tracehook.signer.agent_client",
        "tracehook.signer.chain", "tracehook.signer.fastconf"}
    assert not modules & {"tomllib", "tomli", "json", "subprocess", "nacl", "sqlite3",
                           "collections", "typing", "dataclasses", "re"}


@pytest.mark.parametrize(
    ("case", "extra", "answer", "says"),
    [
        pytest.param("agent of another user", 'agent-user = "4242"\n', b"0\nok\n",
                     "runs as uid 0, not 4242", id="wrong uid"),
        pytest.param("unknown agent-user", 'agent-user = "no-such-user-tracehook"\n',
                     b"0\nok\n", "not a user", id="unknown user"),
        pytest.param("wedged agent", "agent-timeout = 0.5\n", None, "did not answer",
                     id="wedged"),
        pytest.param("agent says fallback", "", b"fallback\ntracehook: agent: nope\n",
                     "agent: nope", id="fallback"),
    ],
)
def test_fast_path_signs_in_process_when_agent_unusable(
    case: str, extra: str, answer: bytes | None, says: str, tmp_path: Path
) -> None:
    sock = tmp_path / "a.sock"
    with listening(sock, answer):
        proc = run_fast_path(_hook_env(tmp_path, sock, extra))
    assert proc.returncode == 0, proc.stderr
    assert says in proc.stderr
    record = json.loads((tmp_path / "hook.log").read_text().splitlines()[-1])
    assert (record["via"], record["outcome"]) == ("hook", "failed")  # signed in process
    assert "tracehook.signer.hook" in proc.stdout.split()


def test_fast_path_config_it_cannot_read_signs_in_process(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    env = _hook_env(tmp_path, sock)
    Path(env["TRACEHOOK_CONFIG"]).write_text(f'"agent-socket" = "{sock}"\n')
    assert fastconf.read(env["TRACEHOOK_CONFIG"]) is None
    with listening(sock) as fake:
        proc = run_fast_path(env)
    assert fake.received == b""  # never asked: the file said something the fast reader skips
    assert "plain top-level lines" in proc.stderr
