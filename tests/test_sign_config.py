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


def test_defaults(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, ""), environ={})
    assert cfg.secret_key_file is None
    assert cfg.publish_to == ()
    assert cfg.spool_dir == config.DEFAULT_SPOOL
    assert cfg.log_file == config.DEFAULT_LOG
    assert cfg.strict is False


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
