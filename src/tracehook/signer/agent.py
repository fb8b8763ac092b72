"""The signing agent: a warm process that signs for the post-build hook over a Unix socket.

Nix blocks its build loop on the post-build hook, and most of a cold hook's time is Python
importing the signer. ``tracehook publish --daemon`` therefore also serves this agent: the
hook (:mod:`tracehook.signer.agent_client`) connects, sends one JSON line ``{"DRV_PATH": ...,
"OUT_PATHS": ..., "NIX_CONFIG": ...}``, and the agent runs exactly the hook's logic
(:func:`tracehook.signer.hook.main`: examine, sign, spool, log) with its own configuration, and
answers ``<exit code>\\n<the human lines>``. Nothing else is accepted: no key, no config,
no path other than the build Nix reported.

Only a peer with the agent's own user id (or root) is served (``SO_PEERCRED``), and the
socket is created with mode 0600: another local user must not obtain a "built here"
signature for a path that was never built here.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import socketserver
import struct
import threading
from collections.abc import Mapping
from pathlib import Path

from tracehook.errors import EXIT_REFUSED, EnvironmentFault
from tracehook.signer import hook

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 20
_FIELDS = ("DRV_PATH", "OUT_PATHS", "NIX_CONFIG")


def _peer_uid(sock: socket.socket) -> int | None:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def parse_request(data: bytes) -> dict[str, str]:
    """The hook's three variables; ValueError for anything else."""
    obj = json.loads(data.decode("utf-8", errors="surrogateescape"))
    if not isinstance(obj, dict) or not set(obj) <= set(_FIELDS) or "DRV_PATH" not in obj:
        raise ValueError("expected {DRV_PATH, OUT_PATHS?, NIX_CONFIG?}")
    if not all(isinstance(v, str) for v in obj.values()):
        raise ValueError("values must be strings")
    return dict(obj)


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        uid = _peer_uid(self.request)
        if uid is None or uid not in (0, os.getuid()):
            self.wfile.write(f"{EXIT_REFUSED}\ntracehook: agent: peer uid {uid} refused\n".encode())
            return
        line = self.rfile.readline(MAX_REQUEST + 1)
        try:
            fields = parse_request(line)
        except ValueError as exc:
            msg = f"tracehook: agent: malformed request: {exc}\n"
            self.wfile.write(f"{EXIT_REFUSED}\n{msg}".encode())
            return
        env = {k: v for k, v in self.server.base_env.items() if k not in _FIELDS}
        env.update(fields)
        out = io.StringIO()
        code = hook.main(env, out, via="agent")
        self.wfile.write(f"{code}\n".encode() + out.getvalue().encode("utf-8", "replace"))


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, base_env: Mapping[str, str]) -> None:
        self.base_env = dict(base_env)
        super().__init__(path, _Handler)


class SigningAgent:
    """Serve the hook on ``path`` from a background thread until :meth:`stop`."""

    def __init__(self, path: Path, environ: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        self.environ = dict(os.environ if environ is None else environ)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def _clear_stale(self) -> None:
        if not (self.path.exists() or self.path.is_symlink()):
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink()  # left behind by an agent that died
            return
        finally:
            probe.close()
        raise EnvironmentFault(f"another signing agent already listens on {self.path}")

    def start(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._clear_stale()
            old = os.umask(0o177)
            try:
                self._server = _Server(str(self.path), self.environ)
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
        except OSError as exc:
            raise EnvironmentFault(f"cannot listen on {self.path}: {exc.strerror or exc}") from exc
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        log.info("signing agent listening on %s", self.path)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> SigningAgent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
