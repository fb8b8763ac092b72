"""The signer's configuration: one TOML file, overridable by environment variables.

The file is ``$TRACEHOOK_CONFIG``, else ``/etc/tracehook/sign.toml``::

    secret-key-file = "/etc/nix/builder.sec"   # optional: else nix.conf's secret-key-files
    publish-to = ["file:///var/lib/tracehook/traces", "https://traces.example.org"]
    spool-dir = "/var/lib/tracehook/spool"     # default shown
    log-file = "/var/log/tracehook/sign.log"   # default shown; "" for stderr only
    strict = false                             # true: the hook fails the build on error
    store-root = ""                            # optional: chroot store root override
    nix-flavor = "nix"                         # optional: written into traces
    nix-version = "2.26.3"                     # optional: else found from the Nix executable
    keep-sent = "7d"                           # default shown: forget delivered entries after
    agent-socket = "/run/tracehook/agent.sock" # default shown: the signing agent's socket
    agent-user = "root"                        # default shown: who must run the agent
    agent-timeout = 5                          # default shown: seconds the hook waits for it
    chain-hooks = ["/etc/nix/upload-to-cache.sh"]  # run by the hook after signing, in order
    evidence-command = ["/usr/local/bin/snp-evidence"]  # optional: hardware evidence per claim
    evidence-timeout = 10                      # default shown: seconds it may take

Relative paths are relative to the file's directory (``chain-hooks`` must be absolute;
``evidence-command`` is an argument list run without a shell, docs/FORMAT.md 9.4, its
program found on ``PATH`` when not a path).
Unknown keys are errors (a typo must not silently disable something). Environment variables
override the file: ``TRACEHOOK_SECRET_KEY_FILE``, ``TRACEHOOK_SPOOL_DIR``,
``TRACEHOOK_LOG_FILE``, ``TRACEHOOK_STRICT`` (``1``/``0``, ``true``/``false``),
``TRACEHOOK_STORE_ROOT``, ``TRACEHOOK_AGENT_SOCKET``; ``TRACEHOOK_PUBLISH_TO`` (space
separated URLs) replaces ``publish-to``.

The four ``agent-*``/``chain-hooks`` settings are also read by the hook's fast path without
a TOML parser (:mod:`tracehook.signer.fastconf`): write them as plain top-level
``key = value`` lines; a file where that reader and tomllib disagree is refused here.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracehook.errors import ConfigError
from tracehook.signer import fastconf

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

DEFAULT_CONFIG = Path(fastconf.DEFAULT_CONFIG)
DEFAULT_SPOOL = Path("/var/lib/tracehook/spool")
DEFAULT_LOG = Path("/var/log/tracehook/sign.log")
CONFIG_ENV = fastconf.CONFIG_ENV
DEFAULT_KEEP_SENT = 7 * 86400.0
DEFAULT_EVIDENCE_TIMEOUT = 10.0  # tracehook.stores.provider.DEFAULT_TIMEOUT (not imported)

_KEYS: dict[str, type | tuple[type, ...]] = {
    "secret-key-file": str,
    "publish-to": list,
    "spool-dir": str,
    "log-file": str,
    "strict": bool,
    "store-root": str,
    "nix-flavor": str,
    "nix-version": str,
    "keep-sent": (int, float, str),
    "agent-socket": str,
    "agent-user": str,
    "agent-timeout": (int, float),
    "chain-hooks": list,
    "evidence-command": list,
    "evidence-timeout": (int, float),
}
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


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
    keep_sent: float = DEFAULT_KEEP_SENT  # seconds a delivered entry stays in sent/
    agent_socket: Path | None = Path(fastconf.DEFAULT_SOCKET)  # None: no agent (``off``)
    agent_user: str = fastconf.DEFAULT_USER  # a user name or a numeric uid
    agent_timeout: float = fastconf.DEFAULT_TIMEOUT
    chain_hooks: tuple[str, ...] = ()
    evidence_command: tuple[str, ...] = ()  # empty: no hardware evidence is asked for
    evidence_timeout: float = DEFAULT_EVIDENCE_TIMEOUT


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


def parse_duration(value: object, what: str) -> float:
    """Seconds from a number or a string such as ``"90s"``, ``"12h"``, ``"7d"``, ``"2w"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be seconds or a duration such as \"7d\", not a bool")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        unit = _UNITS.get(text[-1:])
        number = text[:-1] if unit is not None else text
        try:
            seconds = float(number) * (unit or 1.0)
        except ValueError:
            raise ConfigError(
                f"{what} = {value!r}: expected seconds or a number with a unit s, m, h, d or w "
                "(\"7d\")"
            ) from None
    else:
        raise ConfigError(f"{what} must be seconds or a duration string")
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"{what} = {value!r}: must be a finite, non-negative duration")
    return seconds


def _read_toml(path: Path) -> tuple[dict[str, Any], str]:
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
        text = data.decode("utf-8")
        parsed: dict[str, Any] = tomllib.loads(text)
    except UnicodeDecodeError:
        raise ConfigError(f"signer configuration {path} is not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"signer configuration {path} is not valid TOML: {exc}") from None
    return parsed, text


def _check_types(raw: Mapping[str, Any], path: Path) -> None:
    for key, value in raw.items():
        expected = _KEYS.get(key)
        if expected is None:
            known = ", ".join(sorted(_KEYS))
            raise ConfigError(f"{path}: unknown setting {key!r} (known: {known})")
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            names = " or ".join(t.__name__ for t in (
                expected if isinstance(expected, tuple) else (expected,)))
            raise ConfigError(f"{path}: {key} must be a {names}, not {type(value).__name__}")
    for url in raw.get("publish-to", []):
        if not isinstance(url, str) or not url:
            raise ConfigError(f"{path}: publish-to must list non-empty URL strings")
    for hook in raw.get("chain-hooks", []):
        if not isinstance(hook, str) or not hook.startswith("/"):
            raise ConfigError(f"{path}: chain-hooks must list absolute paths of executables, "
                              f"not {hook!r}")
    command = raw.get("evidence-command")
    if command is not None and (not command or not all(
            isinstance(a, str) and a and "\0" not in a for a in command)):
        raise ConfigError(f"{path}: evidence-command must list the program and its arguments "
                          "as non-empty strings (docs/FORMAT.md 9.4)")
    evidence_timeout = raw.get("evidence-timeout", 1)
    if not math.isfinite(evidence_timeout) or not 0 < evidence_timeout <= 3600:
        raise ConfigError(f"{path}: evidence-timeout = {evidence_timeout!r}: seconds, above 0, "
                          "at most 3600")
    timeout = raw.get("agent-timeout", 1)
    if not math.isfinite(timeout) or not 0 < timeout <= 3600:
        raise ConfigError(f"{path}: agent-timeout = {timeout!r}: seconds, above 0, at most 3600")
    if raw.get("agent-user", "root") == "":
        raise ConfigError(f"{path}: agent-user must name a user (or a numeric uid)")
    if not raw.get("agent-socket", "/").startswith("/"):
        raise ConfigError(f"{path}: agent-socket must be an absolute path")


def _check_fast_reader(raw: Mapping[str, Any], text: str, path: Path) -> None:
    """The hook's fast path reads four keys without tomllib: it must read what tomllib read."""
    fast = fastconf.parse(text)
    expected = fastconf.FastSettings(
        raw.get("agent-socket", fastconf.DEFAULT_SOCKET),
        raw.get("agent-user", fastconf.DEFAULT_USER),
        float(raw.get("agent-timeout", fastconf.DEFAULT_TIMEOUT)),
        tuple(raw.get("chain-hooks", ())),
    ).as_dict()
    if fast is None or fast.as_dict() != expected:
        keys = ", ".join(fastconf.KEYS)
        raise ConfigError(
            f"{path}: write {keys} as plain top-level lines (key = \"string\", a number, or "
            "a list of strings), outside any table: the post-build hook reads them without "
            "a TOML parser"
        )


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
        raw, text = _read_toml(given)
        _check_types(raw, given)
        _check_fast_reader(raw, text, given)
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
    socket = setting("agent-socket", fastconf.SOCKET_ENV) or fastconf.DEFAULT_SOCKET
    if env.get(fastconf.SOCKET_ENV) == "off":
        socket = ""
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
        keep_sent=parse_duration(raw.get("keep-sent", DEFAULT_KEEP_SENT), f"{given}: keep-sent"),
        agent_socket=_path(socket, base) if socket else None,
        agent_user=raw.get("agent-user", fastconf.DEFAULT_USER),
        agent_timeout=float(raw.get("agent-timeout", fastconf.DEFAULT_TIMEOUT)),
        chain_hooks=tuple(raw.get("chain-hooks", ())),
        evidence_command=tuple(raw.get("evidence-command", ())),
        evidence_timeout=float(raw.get("evidence-timeout", DEFAULT_EVIDENCE_TIMEOUT)),
    )
