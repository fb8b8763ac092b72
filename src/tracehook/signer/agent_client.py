"""The post-build hook's fast path: hand the build to a running signing agent, or sign here.

Starting Python and importing the signer (PyNaCl, sqlite3, the Nix data model)
costs far more than signing itself, and Nix waits for the hook after every build. So the
hook first tries the signing agent (``tracehook publish --daemon`` runs one; see
:mod:`tracehook.signer.agent`) on a Unix socket: this module imports nothing but the C socket
module, sends ``DRV_PATH``/``OUT_PATHS``/``NIX_CONFIG``, relays the agent's answer (its
human line, its exit code) and exits. When no agent answers it falls back to signing in
this process (:mod:`tracehook.signer.hook`), with the same result, only slower.

Socket: ``$TRACEHOOK_AGENT_SOCKET``, default ``/run/tracehook/agent.sock``; set it to ``""``
(or ``off``) to always sign in process.
"""

from __future__ import annotations

import _socket
import os
import sys

DEFAULT_SOCKET = "/run/tracehook/agent.sock"
TIMEOUT = 120.0  # the agent reads the store and signs; this bounds a wedged agent
MAX_REPLY = 1 << 20
_KEYS = ("DRV_PATH", "OUT_PATHS", "NIX_CONFIG")


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


def request(environ: dict[str, str] | os._Environ[str]) -> bytes:
    fields = ",".join(f"{_quote(k)}:{_quote(environ[k])}" for k in _KEYS if k in environ)
    return ("{" + fields + "}\n").encode("utf-8", errors="surrogateescape")


def ask_agent(path: str, payload: bytes) -> bytes | None:
    """The agent's reply, or None when no agent listens (then sign in process)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(path)
        except OSError:
            return None  # no socket, refused, not permitted: fall back
        sock.sendall(payload)
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_REPLY:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except OSError:
        return None  # the agent died mid-request: sign in process (idempotent)
    finally:
        sock.close()


def run() -> None:
    """Entry point of ``tracehook-post-build`` and ``hooks/post-build``."""
    path = os.environ.get("TRACEHOOK_AGENT_SOCKET", DEFAULT_SOCKET)
    if path and path != "off":
        reply = ask_agent(path, request(os.environ))
        # Reply: first line the exit code, the rest is relayed to stderr verbatim.
        if reply:
            head, _, text = reply.partition(b"\n")
            if head.isdigit():
                sys.stderr.write(text.decode("utf-8", errors="replace"))
                sys.stderr.flush()
                sys.exit(int(head))
    from tracehook.signer import hook

    hook.run()


if __name__ == "__main__":
    run()
