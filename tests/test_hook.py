"""The hook's own failure handling (no Nix): exit 0 unless strict, one clear line."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from tracehook.errors import ConfigError
from tracehook.signer import examine, hook


def named(*rows: tuple[object, ...]) -> list[Any]:
    return [pytest.param(*row, id=str(row[0])) for row in rows]


def run_hook(env: dict[str, str]) -> tuple[int, str]:
    err = io.StringIO()
    code = hook.main(env, err)
    return code, err.getvalue()


def write_config(tmp: Path, extra: str = "") -> Path:
    path = tmp / "sign.toml"
    path.write_text(f'spool-dir = "{tmp / "spool"}"\nlog-file = "{tmp / "sign.log"}"\n{extra}')
    return path


DRV = "/nix/store/3pvsl5q6w7w309ym4c9378pm2cim0pwl-ca-a.drv"


@pytest.mark.parametrize(
    ("case", "setup", "message", "strict_code"),
    named(
        ("missing config", lambda t: {"TRACEHOOK_CONFIG": str(t / "none.toml")},
         "no signer configuration", 2),
        ("broken config", lambda t: {"TRACEHOOK_CONFIG": str(write_config(t, "strict = ="))},
         "not valid TOML", 2),
        ("no DRV_PATH", lambda t: {"TRACEHOOK_CONFIG": str(write_config(t)), "DRV_PATH": ""},
         "DRV_PATH is not set", 2),
        ("no key anywhere", lambda t: {"TRACEHOOK_CONFIG": str(write_config(t))},
         "no signing key", 2),
        ("missing key file",
         lambda t: {"TRACEHOOK_CONFIG": str(write_config(t, f'secret-key-file = "{t}/k"'))},
         "cannot read key file", 2),
        ("public key given as secret",
         lambda t: {"TRACEHOOK_CONFIG": str(write_config(t, f'secret-key-file = "{_pub(t)}"'))},
         "looks like a public key", 2),
        ("store not local",
         lambda t: {"TRACEHOOK_CONFIG": str(write_config(t, f'secret-key-file = "{_sec(t)}"')),
                    "NIX_CONFIG": "store = ssh-ng://builder\n"},
         "reads local stores only", 2),
        ("no store database",
         lambda t: {"TRACEHOOK_CONFIG": str(write_config(t, f'secret-key-file = "{_sec(t)}"')),
                    "NIX_CONFIG": f"store = {t}/emptyroot\n"},
         "cannot read derivation", 3),
    ),
)
def test_failures(case: str, setup: Any, message: str, strict_code: int, tmp_path: Path) -> None:
    env = {"DRV_PATH": DRV, "OUT_PATHS": ""} | setup(tmp_path)
    code, err = run_hook(env)
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "build continues" in lines[0]
    code, err = run_hook(env | {"TRACEHOOK_STRICT": "1"})
    assert code == strict_code
    assert "failing the build (strict mode)" in err
    log = tmp_path / "sign.log"
    if log.exists():  # the config was readable: the failure is in the JSON log too
        record = json.loads(log.read_text().splitlines()[-1])
        assert record["event"] == "sign" and record["outcome"] == "failed"
        assert message in record["reason"]


def _sec(tmp: Path) -> Path:
    from tracehook.trace import crypto

    if not (tmp / "k.sec").exists():
        crypto.write_key_files(crypto.generate_secret_key("t"), tmp / "k.sec", tmp / "k.pub")
    return tmp / "k.sec"


def _pub(tmp: Path) -> Path:
    _sec(tmp)
    return tmp / "k.pub"


def test_key_from_nix_config_secret_key_files(tmp_path: Path) -> None:
    sec = _sec(tmp_path)
    cfg_path = write_config(tmp_path)
    from tracehook.signer import config

    cfg = config.load(cfg_path, environ={})
    sk = hook.load_key(cfg, examine.parse_nix_config(f"secret-key-files = {sec} /other\n"))
    assert sk.name == "t"


@pytest.mark.parametrize(
    ("case", "nix_config", "root"),
    named(
        ("chroot store", "store = /tmp/root\n", "/tmp/root"),
        ("trailing slash", "store = /tmp/root/\n", "/tmp/root"),
        ("local with root", "store = local?root=/srv/r&state=/x\n", "/srv/r"),
        ("plain local", "store = local\n", None),
        ("daemon", "store = daemon\n", None),
        ("auto", "store = auto\n", None),
        ("unset", "sandbox = true\n", None),
        ("unix socket", "store = unix:///nix/var/nix/daemon-socket/socket\n", None),
        ("later line wins", "store = /a\nstore = /b\n", "/b"),
    ),
)
def test_store_root(case: str, nix_config: str, root: str | None) -> None:
    assert examine.store_root(examine.parse_nix_config(nix_config)) == root


def test_store_root_rejects_remote() -> None:
    with pytest.raises(ConfigError):
        examine.store_root({"store": "s3://bucket"})
