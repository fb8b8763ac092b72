"""The signing agent: a warm process that signs for the post-build hook over a Unix socket.

Nix blocks its build loop on the post-build hook, and most of a cold hook's time is Python
importing the signer. ``tracehook publish --daemon`` therefore also serves this agent: the
hook (:mod:`tracehook.signer.agent_client`) connects, sends one JSON line ``{"DRV_PATH": ...,
"OUT_PATHS": ...}``, and the agent runs exactly the hook's logic
(:func:`tracehook.signer.hook.main`: examine, sign, spool, log) with the configuration the
publisher loaded (``--config``, else ``$TRACEHOOK_CONFIG``, else the default), and answers
``<exit code>\\n<the human lines>`` (``fallback\\n<why>`` for a peer or a request it will
not serve: the hook then signs in its own process). Nothing else is accepted: no key, no
config, no path other than the build Nix reported. The hook no longer sends ``NIX_CONFIG``
(it holds secrets such as ``access-tokens``); an older hook's ``NIX_CONFIG`` is accepted and
dropped unread. So the agent signs with ``secret-key-file`` and reads the store at
``store-root`` (default ``/nix/store``) of its own configuration.

Only a peer with the agent's own user id (or root) is served (``SO_PEERCRED``), and the
socket is created with mode 0600: another local user must not obtain a "built here"
signature for a path that was never built here. The hook checks the other direction (the
agent's uid and its socket directory) before it sends anything.

At its socket path the agent removes only a socket no one listens on (left by an agent that
died); a regular file, a directory, a symlink or anything else there is a configuration
error that names it, never deleted.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import socketserver
import stat
import struct
import threading
from collections.abc import Mapping
from pathlib import Path

from tracehook.errors import ConfigError, EnvironmentFault
from tracehook.signer import config, hook, nixversion

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 20
_FIELDS = ("DRV_PATH", "OUT_PATHS")
_DROPPED = ("NIX_CONFIG",)  # sent by older hooks: accepted, never used


def _peer(sock: socket.socket) -> tuple[int, int] | None:
    """(pid, uid) of the connected process."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    pid, uid, _gid = struct.unpack("3i", creds)
    return int(pid), int(uid)


def parse_request(data: bytes) -> dict[str, str]:
    """The hook's two variables; ValueError for anything else."""
    obj = json.loads(data.decode("utf-8", errors="surrogateescape"))
    allowed = set(_FIELDS) | set(_DROPPED)
    if not isinstance(obj, dict) or not set(obj) <= allowed or "DRV_PATH" not in obj:
        raise ValueError("expected {DRV_PATH, OUT_PATHS?}")
    if not all(isinstance(v, str) for v in obj.values()):
        raise ValueError("values must be strings")
    return {k: v for k, v in obj.items() if k in _FIELDS}


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        peer = _peer(self.request)
        pid, uid = peer if peer is not None else (None, None)
        if uid is None or uid not in (0, os.getuid()):
            self.wfile.write(f"fallback\ntracehook: agent: peer uid {uid} refused\n".encode())
            return
        line = self.rfile.readline(MAX_REQUEST + 1)
        try:
            fields = parse_request(line)
        except ValueError as exc:
            msg = f"tracehook: agent: malformed request: {exc}\n"
            self.wfile.write(f"fallback\n{msg}".encode())
            return
        env = {k: v for k, v in self.server.base_env.items()
               if k not in _FIELDS and k not in _DROPPED}
        env.update(fields)
        out = io.StringIO()
        nix_pid = nixversion.parent_pid(pid) if pid else None  # the hook's parent: Nix
        code = hook.main(env, out, via="agent", cfg=self.server.cfg, nix_pid=nix_pid,
                         versions=self.server.versions)
        self.wfile.write(f"{code}\n".encode() + out.getvalue().encode("utf-8", "replace"))


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, cfg: config.SignConfig, base_env: Mapping[str, str]) -> None:
        self.cfg = cfg
        self.base_env = dict(base_env)
        self.versions = nixversion.VersionCache()  # per process: `nix --version` once
        super().__init__(path, _Handler)


class SigningAgent:
    """Serve the hook on ``path`` from a background thread until :meth:`stop`.

    ``cfg``: the configuration every signature uses (the publisher's); ``environ``: the
    environment the hook logic sees (``PATH`` finds Nix for its version).
    """

    def __init__(
        self, path: Path, cfg: config.SignConfig, environ: Mapping[str, str] | None = None
    ) -> None:
        self.path = Path(path)
        self.cfg = cfg
        self.environ = dict(os.environ if environ is None else environ)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def _clear_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(
                f"agent socket path {self.path} holds {_kind(self.path, st.st_mode)}, not a "
                "socket: remove it or choose another --agent-socket (it is never deleted)"
            )
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
        """Listen; ConfigError when something else occupies the path (exit 2),
        EnvironmentFault when the socket cannot be made or another agent listens."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._clear_stale()
            old = os.umask(0o177)
            try:
                self._server = _Server(str(self.path), self.cfg, self.environ)
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
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):  # ours; nothing else is removed
                self.path.unlink()

    def __enter__(self) -> SigningAgent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _kind(path: Path, mode: int) -> str:
    if stat.S_ISLNK(mode):
        try:
            return f"a symlink to {os.readlink(path)}"
        except OSError:
            return "a symlink"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    return "a device or other special file"
