"""The post-build hook's fast path: hand the build to a running signing agent, or sign here.

Starting Python and importing the signer (PyNaCl, sqlite3, the Nix data model) costs far
more than signing itself, and Nix waits for the hook after every build. So the hook first
tries the signing agent (``tracehook publish --daemon`` runs one; see
:mod:`tracehook.signer.agent`) on a Unix socket. This module imports only the C socket
module and two small modules of its own, and:

1. reads ``agent-socket``, ``agent-user``, ``agent-timeout`` and ``chain-hooks`` from sign.toml
   without a TOML parser (:mod:`tracehook.signer.fastconf`);
2. checks the socket's directory (owned by root or the agent's user, not writable by group
   or others) and, once connected, the agent's uid (``SO_PEERCRED``: root, or
   ``agent-user``) **before it sends anything**;
3. sends only ``DRV_PATH`` and ``OUT_PATHS`` (never ``NIX_CONFIG``, which holds secrets such
   as ``access-tokens``, nor any other variable), relays the agent's answer (its human lines,
   its exit code), waiting at most ``agent-timeout`` seconds (default 5);
4. when no agent listens, the agent may not be used, or it does not answer in time, signs in
   this process (:mod:`tracehook.signer.hook`), with the same result, only slower (the spool
   keeps one claim once, so an agent that answers late adds nothing);
5. runs the ``chain-hooks`` with the environment Nix gave it (:mod:`tracehook.signer.chain`)
   and exits with the signing's exit code.

Socket: ``$TRACEHOOK_AGENT_SOCKET``, else ``agent-socket``, else ``/run/tracehook/agent.sock``;
``TRACEHOOK_AGENT_SOCKET=""`` (or ``off``) always signs in process. An agent that is not
there is normal and silent; one that may not be used or does not answer says so on stderr.
"""

from __future__ import annotations

import _socket
import os
import sys
import time

from tracehook.signer import chain, fastconf

# Types only: importing collections.abc costs the hook's fast path ~2.5 ms (mypy reads the
# name TYPE_CHECKING as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

MAX_REPLY = 1 << 20
_KEYS = ("DRV_PATH", "OUT_PATHS")
FALLBACK = b"fallback"  # the agent's answer when it will not sign this call: sign here


class Unusable(Exception):
    """An agent is there but must not (or cannot) be used: say why, sign in process."""


def _quote(s: str) -> str:
    """A JSON string, without importing json (slow to import on the hot path)."""
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch < " " or ch > "~":
            code = ord(ch)
            if code > 0xFFFF:  # surrogate pair
                code -= 0x10000
                out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
            else:
                out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def request(environ: Mapping[str, str]) -> bytes:
    """The one line sent to the agent: ``DRV_PATH`` and ``OUT_PATHS``, nothing else."""
    fields = ",".join(f"{_quote(k)}:{_quote(environ[k])}" for k in _KEYS if k in environ)
    return ("{" + fields + "}\n").encode("utf-8", errors="surrogateescape")


def expected_uid(user: str) -> int:
    """The uid ``agent-user`` names: root, a number, or a user name (Unusable if unknown)."""
    if user == "root":
        return 0
    if user.isdigit() and user.isascii():
        return int(user)
    import pwd  # a C module; only for a named user

    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise Unusable(f"agent-user {user!r} is not a user on this machine") from None


def check_directory(path: str, uid: int) -> bool:
    """Whether the socket's directory may be trusted; False when it does not exist."""
    directory = os.path.dirname(path) or "."
    try:
        st = os.stat(directory)
    except OSError:
        return False  # no directory, no agent
    if st.st_uid not in (0, uid):
        raise Unusable(f"socket directory {directory} belongs to uid {st.st_uid}, "
                       f"neither root nor the agent's uid {uid}")
    if st.st_mode & 0o022:
        raise Unusable(f"socket directory {directory} is writable by group or others "
                       f"(mode {st.st_mode & 0o7777:o})")
    return True


def ask_agent(path: str, payload: bytes, uid: int = 0, timeout: float = 5.0) -> bytes | None:
    """The agent's reply; None when no agent listens or it went away (sign in process).

    Raises Unusable when the peer is not ``uid`` (then nothing was sent) or the answer
    does not come within ``timeout`` seconds of starting to connect.
    """
    deadline = time.monotonic() + timeout
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except TimeoutError:
            raise
        except OSError:
            return None  # no socket, refused, not permitted: no agent here
        creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
        peer = int.from_bytes(creds[4:8], sys.byteorder, signed=True)
        if peer != uid:
            raise Unusable(f"the agent at {path} runs as uid {peer}, not {uid} (agent-user); "
                           "nothing was sent to it")
        sock.sendall(payload)
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_REPLY:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except TimeoutError:
        raise Unusable(f"the agent at {path} did not answer within {timeout:g} s "
                       "(agent-timeout)") from None
    except OSError:
        return None  # the agent died mid-request: sign in process (idempotent)
    finally:
        sock.close()


def via_agent(environ: Mapping[str, str], fast: fastconf.FastSettings) -> int | None:
    """The exit code the agent answered with, or None: sign in this process."""
    path = environ.get(fastconf.SOCKET_ENV, fast.agent_socket)
    if not path or path == "off":
        return None
    try:
        uid = expected_uid(fast.agent_user)
        if not check_directory(path, uid):
            return None
        reply = ask_agent(path, request(environ), uid, fast.agent_timeout)
    except Unusable as exc:
        sys.stderr.write(f"tracehook: signing agent not used: {exc}; signing in process\n")
        return None
    if not reply:
        return None
    # Reply: first line the exit code (or "fallback"), the rest relayed to stderr verbatim.
    head, _, text = reply.partition(b"\n")
    if head.isdigit() or head == FALLBACK:
        sys.stderr.write(text.decode("utf-8", errors="replace"))
        sys.stderr.flush()
    return int(head) if head.isdigit() else None


def _chain_from_full_config(environ: Mapping[str, str]) -> tuple[str, ...]:
    from tracehook.errors import TracehookError
    from tracehook.signer import config

    try:
        return config.load(None, environ).chain_hooks
    except TracehookError:
        return ()  # the signing line already said what is wrong with the file


def run() -> None:
    """Entry point of ``tracehook-post-build`` and ``hooks/post-build``."""
    environ = os.environ
    fast = fastconf.read(environ.get(fastconf.CONFIG_ENV) or fastconf.DEFAULT_CONFIG)
    code = via_agent(environ, fast) if fast is not None else None
    if code is None:
        from tracehook.signer import hook

        code = hook.main()
    hooks = fast.chain_hooks if fast is not None else _chain_from_full_config(environ)
    if hooks:
        failures = chain.run_all(hooks, environ)
        if failures:
            chain.report(failures, environ)
    sys.exit(code)


if __name__ == "__main__":
    run()
