"""The signer's configuration: one TOML file, overridable by environment variables.

The file is ``$TRACEHOOK_CONFIG``, else ``/etc/tracehook/sign.toml``::

    secret-key-file = "/etc/nix/builder.sec"   # optional: else nix.conf's secret-key-files
    publish-to = ["file:///var/lib/tracehook/traces", "https://traces.example.org"]
    spool-dir = "/var/lib/tracehook/spool"     # default shown
    log-file = "/var/log/tracehook/sign.log"   # default shown; "" for stderr only
    strict = false                             # true: the hook fails the build on error
    store-root = ""                            # optional: chroot store root override
    nix-flavor = "nix"                         # optional: written into traces
    nix-version = "2.26.3"                     # optional: written into traces

Relative paths are relative to the file's directory. Unknown keys are errors (a typo must
not silently disable something). Environment variables override the file:
``TRACEHOOK_SECRET_KEY_FILE``, ``TRACEHOOK_SPOOL_DIR``, ``TRACEHOOK_LOG_FILE``,
``TRACEHOOK_STRICT`` (``1``/``0``, ``true``/``false``), ``TRACEHOOK_STORE_ROOT``;
``TRACEHOOK_PUBLISH_TO`` (space separated URLs) replaces ``publish-to``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracehook.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

DEFAULT_CONFIG = Path("/etc/tracehook/sign.toml")
DEFAULT_SPOOL = Path("/var/lib/tracehook/spool")
DEFAULT_LOG = Path("/var/log/tracehook/sign.log")
CONFIG_ENV = "TRACEHOOK_CONFIG"

_KEYS = {
    "secret-key-file": str,
    "publish-to": list,
    "spool-dir": str,
    "log-file": str,
    "strict": bool,
    "store-root": str,
    "nix-flavor": str,
    "nix-version": str,
}


@dataclass(frozen=True)
class SignConfig:
    """Everything the signer, the spool and the publisher need, loaded once."""

    source: Path | None  # the file it came from (None: defaults only)
    secret_key_file: Path | None
    publish_to: tuple[str, ...]
    spool_dir: Path
    log_file: Path | None
    strict: bool
    store_root: str | None
    nix_flavor: str | None
    nix_version: str | None


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    value = env.get(CONFIG_ENV, "")
    return Path(value) if value else DEFAULT_CONFIG


def parse_bool(value: str, what: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{what}={value!r}: expected 1/0, true/false, yes/no or on/off")


def strict_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Strict mode as far as it is known without a config file (for config errors)."""
    env = os.environ if environ is None else environ
    try:
        return parse_bool(env.get("TRACEHOOK_STRICT", ""), "TRACEHOOK_STRICT")
    except ConfigError:
        return False


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"no signer configuration at {path}: create it (see docs/FORMAT.md and the "
            f"README) or point {CONFIG_ENV} at one"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read signer configuration {path}: {exc.strerror}") from None
    try:
        parsed: dict[str, Any] = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"signer configuration {path} is not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"signer configuration {path} is not valid TOML: {exc}") from None
    return parsed


def _check_types(raw: Mapping[str, Any], path: Path) -> None:
    for key, value in raw.items():
        expected = _KEYS.get(key)
        if expected is None:
            known = ", ".join(sorted(_KEYS))
            raise ConfigError(f"{path}: unknown setting {key!r} (known: {known})")
        if not isinstance(value, expected):
            raise ConfigError(
                f"{path}: {key} must be a {expected.__name__}, not {type(value).__name__}"
            )
    for url in raw.get("publish-to", []):
        if not isinstance(url, str) or not url:
            raise ConfigError(f"{path}: publish-to must list non-empty URL strings")


def _path(value: str, base: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def load(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    require_file: bool = True,
) -> SignConfig:
    """Read the configuration; ConfigError (exit 2) for a missing or malformed file.

    ``require_file=False`` gives the defaults when the file does not exist (for commands
    that take everything from flags, such as ``tracehook sign --key ... --to ...``).
    """
    env = os.environ if environ is None else environ
    given = path if path is not None else config_path(env)
    raw: dict[str, Any] = {}
    source: Path | None = None
    if require_file or given.exists():
        raw = _read_toml(given)
        _check_types(raw, given)
        source = given
    base = source.parent if source is not None else Path.cwd()

    def setting(key: str, env_name: str) -> str | None:
        if env.get(env_name):
            return env[env_name]
        value = raw.get(key)
        return value if isinstance(value, str) and value else None

    key_file = setting("secret-key-file", "TRACEHOOK_SECRET_KEY_FILE")
    spool = setting("spool-dir", "TRACEHOOK_SPOOL_DIR")
    if "TRACEHOOK_LOG_FILE" in env:
        log_value: str | None = env["TRACEHOOK_LOG_FILE"]
    else:
        log_value = raw.get("log-file", str(DEFAULT_LOG))
    if "TRACEHOOK_PUBLISH_TO" in env:
        publish = tuple(env["TRACEHOOK_PUBLISH_TO"].split())
    else:
        publish = tuple(raw.get("publish-to", ()))
    strict = bool(raw.get("strict", False))
    if "TRACEHOOK_STRICT" in env:
        strict = parse_bool(env["TRACEHOOK_STRICT"], "TRACEHOOK_STRICT")
    root = setting("store-root", "TRACEHOOK_STORE_ROOT")
    return SignConfig(
        source=source,
        secret_key_file=_path(key_file, base) if key_file else None,
        publish_to=publish,
        spool_dir=_path(spool, base) if spool else DEFAULT_SPOOL,
        log_file=_path(log_value, base) if log_value else None,
        strict=strict,
        store_root=root,
        nix_flavor=raw.get("nix-flavor") or None,
        nix_version=raw.get("nix-version") or None,
    )
