"""The four sign.toml settings the post-build hook's fast path needs, read without tomllib.

Nix waits for the post-build hook after every build, and the hook's fast path (hand the
build to the signing agent, :mod:`tracehook.signer.agent_client`) must stay a Python start
and a Unix-socket round trip. Importing ``tomllib`` alone costs about 4 ms, so this module
(which imports nothing) reads only these top-level settings, each on ``key = value`` lines:

* ``agent-socket = "/run/tracehook/agent.sock"``  a string
* ``agent-user = "root"``                         a string: a user name or a numeric uid
* ``agent-timeout = 5``                           seconds, an integer or a decimal (``2.5``)
* ``chain-hooks = ["/a", "/b"]``                  strings, on one line or over several

Strings are TOML basic strings (``"..."``, escapes ``\\"`` and ``\\\\`` only) or literal strings
(``'...'``); a ``#`` comment may end a line. Everything else in the file is skipped. When one
of these keys is written in any other way (quoted key, other escapes, a table, twice, ...)
:func:`parse` answers None and the hook signs in process, where the whole file is read with
tomllib. :func:`tracehook.signer.config.load` refuses a file that this reader and tomllib
read differently, so what the fast path reads is what the configuration says.
"""

from __future__ import annotations

CONFIG_ENV = "TRACEHOOK_CONFIG"
DEFAULT_CONFIG = "/etc/tracehook/sign.toml"
SOCKET_ENV = "TRACEHOOK_AGENT_SOCKET"
DEFAULT_SOCKET = "/run/tracehook/agent.sock"
DEFAULT_USER = "root"
DEFAULT_TIMEOUT = 5.0
KEYS = ("agent-socket", "agent-user", "agent-timeout", "chain-hooks")


class FastSettings:
    """The hook's settings with their defaults (what an absent key means)."""

    __slots__ = ("agent_socket", "agent_timeout", "agent_user", "chain_hooks")

    def __init__(
        self,
        agent_socket: str = DEFAULT_SOCKET,
        agent_user: str = DEFAULT_USER,
        agent_timeout: float = DEFAULT_TIMEOUT,
        chain_hooks: tuple[str, ...] = (),
    ) -> None:
        self.agent_socket = agent_socket
        self.agent_user = agent_user
        self.agent_timeout = agent_timeout
        self.chain_hooks = chain_hooks

    def as_dict(self) -> dict[str, object]:
        return {"agent-socket": self.agent_socket, "agent-user": self.agent_user,
                "agent-timeout": self.agent_timeout, "chain-hooks": self.chain_hooks}


class _NotUnderstood(Exception):
    pass


def read(path: str) -> FastSettings | None:
    """The settings of the file at ``path``; defaults when it does not exist; None when it
    cannot be read or says something this reader does not understand."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except FileNotFoundError:
        return FastSettings()
    except OSError:
        return None
    try:
        return parse(data.decode("utf-8"))
    except UnicodeDecodeError:
        return None


def parse(text: str) -> FastSettings | None:
    """See the module docstring; None when a key of ours is not written the simple way."""
    try:
        found = _scan(text)
    except _NotUnderstood:
        return None
    timeout = found.get("agent-timeout", DEFAULT_TIMEOUT)
    hooks = found.get("chain-hooks", ())
    socket = found.get("agent-socket", DEFAULT_SOCKET)
    user = found.get("agent-user", DEFAULT_USER)
    assert isinstance(timeout, float) and isinstance(hooks, tuple)
    assert isinstance(socket, str) and isinstance(user, str)
    if timeout <= 0:
        return None
    return FastSettings(socket, user, timeout, hooks)


def _scan(text: str) -> dict[str, object]:
    found: dict[str, object] = {}
    lines = text.splitlines()
    in_table = False
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line[0] == "#":
            continue
        if line[0] == "[":
            in_table = True  # ours are top-level keys: a mention below is not one of them
            continue
        head, sep, rest = line.partition("=")
        key = head.strip()
        if not any(k in key for k in KEYS):
            continue
        if in_table or not sep or key not in KEYS or key in found:
            raise _NotUnderstood  # in a table, quoted, dotted, repeated or without a value
        if key == "chain-hooks":
            value, i = _array(rest, lines, i)
            found[key] = value
        elif key == "agent-timeout":
            found[key] = _number(rest)
        else:
            found[key], tail = _string(rest.strip())
            _end(tail)
    return found


def _end(tail: str) -> None:
    tail = tail.strip()
    if tail and tail[0] != "#":
        raise _NotUnderstood


def _number(text: str) -> float:
    value = text.partition("#")[0]
    value = value.strip()
    whole, dot, frac = value.partition(".")
    if not whole.isdigit() or not whole.isascii() or (dot and not (frac.isdigit()
                                                                    and frac.isascii())):
        raise _NotUnderstood
    if len(whole) > 1 and whole[0] == "0":
        raise _NotUnderstood  # TOML has no leading zeros
    return float(value)


def _string(text: str) -> tuple[str, str]:
    """A basic or literal string at the start of ``text``; (value, what follows)."""
    if text[:1] == "'":
        end = text.find("'", 1)
        if end < 0 or text[1:3] == "''":
            raise _NotUnderstood
        value, tail = text[1:end], text[end + 1:]
    elif text[:1] == '"':
        if text[1:3] == '""':
            raise _NotUnderstood  # a multi-line string
        out: list[str] = []
        j = 1
        while True:
            if j >= len(text):
                raise _NotUnderstood
            ch = text[j]
            if ch == '"':
                break
            if ch == "\\":
                nxt = text[j + 1:j + 2]
                if nxt not in ('"', "\\"):
                    raise _NotUnderstood
                out.append(nxt)
                j += 2
                continue
            out.append(ch)
            j += 1
        value, tail = "".join(out), text[j + 1:]
    else:
        raise _NotUnderstood
    if any(c < " " or c == "\x7f" for c in value):
        raise _NotUnderstood
    return value, tail


def _array(rest: str, lines: list[str], i: int) -> tuple[tuple[str, ...], int]:
    """Strings between ``[`` and ``]``, commas between them, over as many lines as needed."""
    text = rest.strip()
    if text[:1] != "[":
        raise _NotUnderstood
    text = text[1:]
    values: list[str] = []
    expect_value = True
    while True:
        text = text.strip()
        if not text or text[0] == "#":
            if i >= len(lines):
                raise _NotUnderstood
            text = lines[i]
            i += 1
            continue
        if text[0] == "]":
            _end(text[1:])
            return tuple(values), i
        if text[0] == ",":
            if expect_value:
                raise _NotUnderstood
            expect_value = True
            text = text[1:]
            continue
        if not expect_value:
            raise _NotUnderstood
        value, text = _string(text)
        values.append(value)
        expect_value = False
