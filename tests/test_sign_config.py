"""The signer's configuration file and its environment overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tracehook.errors import EXIT_USAGE, ConfigError
from tracehook.signer import config


def named(*rows: tuple[object, ...]) -> list[Any]:
    return [pytest.param(*row, id=str(row[0])) for row in rows]


FULL = """
secret-key-file = "keys/builder.sec"
publish-to = ["file:///srv/traces", "https://traces.example.org"]
spool-dir = "/var/spool/th"
log-file = "/var/log/th.log"
strict = true
store-root = "/mnt/store"
nix-flavor = "lix"
nix-version = "2.91.1"
keep-sent = "12h"
agent-socket = "/run/th/agent.sock"
agent-user = "tracehook"
agent-timeout = 2.5
chain-hooks = ["/etc/nix/upload-to-cache.sh", "/usr/local/bin/notify"]
"""


def write(tmp: Path, text: str) -> Path:
    path = tmp / "sign.toml"
    path.write_text(text)
    return path


def test_full_file(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, FULL), environ={})
    assert cfg.secret_key_file == tmp_path / "keys/builder.sec"  # relative to the file
    assert cfg.publish_to == ("file:///srv/traces", "https://traces.example.org")
    assert cfg.spool_dir == Path("/var/spool/th")
    assert cfg.log_file == Path("/var/log/th.log")
    assert cfg.strict is True
    assert cfg.store_root == "/mnt/store"
    assert (cfg.nix_flavor, cfg.nix_version) == ("lix", "2.91.1")
    assert cfg.keep_sent == 12 * 3600
    assert cfg.agent_socket == Path("/run/th/agent.sock")
    assert (cfg.agent_user, cfg.agent_timeout) == ("tracehook", 2.5)
    assert cfg.chain_hooks == ("/etc/nix/upload-to-cache.sh", "/usr/local/bin/notify")


def test_defaults(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, ""), environ={})
    assert cfg.secret_key_file is None
    assert cfg.publish_to == ()
    assert cfg.spool_dir == config.DEFAULT_SPOOL
    assert cfg.log_file == config.DEFAULT_LOG
    assert cfg.strict is False
    assert cfg.keep_sent == 7 * 86400
    assert cfg.agent_socket == Path("/run/tracehook/agent.sock")
    assert (cfg.agent_user, cfg.agent_timeout, cfg.chain_hooks) == ("root", 5.0, ())


@pytest.mark.parametrize(
    ("case", "value", "seconds"),
    named(("seconds int", 90, 90.0), ("seconds float", 1.5, 1.5), ("zero", 0, 0.0),
          ("string seconds", '"90"', 90.0), ("minutes", '"90m"', 5400.0),
          ("days", '"7d"', 604800.0), ("weeks", '"2w"', 1209600.0),
          ("spaces", '" 3h "', 10800.0)),
)
def test_keep_sent(case: str, value: object, seconds: float, tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, f"keep-sent = {value}\n"), environ={})
    assert cfg.keep_sent == seconds


def test_agent_socket_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, 'agent-socket = "/run/a.sock"\n')
    cfg = config.load(path, environ={"TRACEHOOK_AGENT_SOCKET": "/run/b.sock"})
    assert cfg.agent_socket == Path("/run/b.sock")
    assert config.load(path, environ={"TRACEHOOK_AGENT_SOCKET": "off"}).agent_socket is None
    assert config.load(path, environ={"TRACEHOOK_AGENT_SOCKET": ""}).agent_socket == Path(
        "/run/a.sock")


def test_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, 'spool-dir = "/s"\n')
    cfg = config.load(None, environ={"TRACEHOOK_CONFIG": str(path)})
    assert cfg.source == path and cfg.spool_dir == Path("/s")


def test_environment_overrides(tmp_path: Path) -> None:
    env = {
        "TRACEHOOK_SECRET_KEY_FILE": "/k.sec",
        "TRACEHOOK_SPOOL_DIR": "/sp",
        "TRACEHOOK_LOG_FILE": "",
        "TRACEHOOK_STRICT": "0",
        "TRACEHOOK_PUBLISH_TO": "file:///a http://b",
        "TRACEHOOK_STORE_ROOT": "/r",
    }
    cfg = config.load(write(tmp_path, FULL), environ=env)
    assert cfg.secret_key_file == Path("/k.sec")
    assert cfg.spool_dir == Path("/sp")
    assert cfg.log_file is None  # empty: stderr only
    assert cfg.strict is False
    assert cfg.publish_to == ("file:///a", "http://b")
    assert cfg.store_root == "/r"


def test_missing_file_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path / "nope.toml", environ={})
    msg = info.value.diagnostics()
    assert "no signer configuration" in msg and "TRACEHOOK_CONFIG" in msg and "\n" not in msg
    assert info.value.exit_code == EXIT_USAGE


def test_missing_file_allowed_when_not_required(tmp_path: Path) -> None:
    cfg = config.load(tmp_path / "nope.toml", environ={}, require_file=False)
    assert cfg.source is None


@pytest.mark.parametrize(
    ("case", "text", "message"),
    named(
        ("not toml", "strict = = true", "not valid TOML"),
        ("typo in key", 'spool_dir = "/x"', "unknown setting 'spool_dir'"),
        ("strict as string", 'strict = "yes"', "strict must be a bool"),
        ("publish-to as string", 'publish-to = "file:///x"', "publish-to must be a list"),
        ("publish-to with number", "publish-to = [1]", "publish-to must list"),
        ("publish-to with empty url", 'publish-to = [""]', "publish-to must list"),
        ("not utf-8", b"strict = \xff", "not UTF-8"),
        ("keep-sent unit", 'keep-sent = "7 days"', "unit s, m, h, d or w"),
        ("keep-sent negative", "keep-sent = -1", "non-negative"),
        ("keep-sent bool", "keep-sent = true", "keep-sent must be"),
        ("keep-sent nan", "keep-sent = nan", "finite"),
        ("agent-timeout zero", "agent-timeout = 0", "above 0"),
        ("agent-timeout huge", "agent-timeout = 86400", "at most 3600"),
        ("agent-timeout string", 'agent-timeout = "5"', "agent-timeout must be"),
        ("agent-user empty", 'agent-user = ""', "agent-user must name"),
        ("agent-socket relative", 'agent-socket = "run/a.sock"', "absolute"),
        ("chain-hooks relative", 'chain-hooks = ["upload.sh"]', "absolute paths"),
        ("chain-hooks string", 'chain-hooks = "/a"', "chain-hooks must be a list"),
        ("chain-hooks number", "chain-hooks = [1]", "absolute paths"),
    ),
)
def test_malformed(case: str, text: str | bytes, message: str, tmp_path: Path) -> None:
    path = tmp_path / "sign.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config.load(path, environ={})


@pytest.mark.parametrize(
    ("case", "value", "expected"),
    named(("one", "1", True), ("true", "TRUE", True), ("off", "off", False), ("empty", "", False)),
)
def test_strict_env(case: str, value: str, expected: bool, tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, ""), environ={"TRACEHOOK_STRICT": value})
    assert cfg.strict is expected


def test_strict_env_garbage(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TRACEHOOK_STRICT"):
        config.load(write(tmp_path, ""), environ={"TRACEHOOK_STRICT": "maybe"})
    assert config.strict_from_env({"TRACEHOOK_STRICT": "maybe"}) is False
