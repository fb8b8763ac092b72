"""Binary caches the gate reads from: ``file://DIR`` and ``http(s)://`` behind one interface.

Two kinds of read:

- :meth:`Upstream.get`: a small file (``nix-cache-info``, a narinfo, a realisation), read
  whole up to a size limit; ``None`` when the cache does not have it (404 / no such file).
- :meth:`Upstream.open`: a NAR, as a :class:`Body` read in chunks, never held whole.

Anything else (a refused connection, a timeout, an HTTP 5xx, a file too large, an
unreadable file) is an :class:`UpstreamFault`: the caller answers 502 and never takes it
for "absent". Relative paths are checked here too (no ``..``, no absolute paths), so a
traversal that slipped past the HTTP layer still cannot leave the cache directory.
"""

from __future__ import annotations

import http.client
import os
import re
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from tracehook.errors import ConfigError, EnvironmentFault, ParseError
from tracehook.nix import narinfo
from tracehook.nix.narinfo import NarInfo
from tracehook.nix.storepath import hash_part

CHUNK = 256 * 1024
MAX_SMALL = 1024 * 1024  # narinfos and realisations are a few hundred bytes
DEFAULT_TIMEOUT = 10.0
_REL = re.compile(r"[A-Za-z0-9+_:=!-][A-Za-z0-9+_:=!.-]*(/[A-Za-z0-9+_:=!-][A-Za-z0-9+_:=!.-]*)*")


class UpstreamFault(EnvironmentFault):
    """An upstream could not be read: the answer is 502, never 'absent', never 'yes'."""


def check_relative(rel: str) -> str:
    """``rel`` if it is a safe relative cache path (no ``..``, no leading ``/`` or ``.``)."""
    if len(rel) > 1024 or not _REL.fullmatch(rel) or ".." in rel.split("/"):
        raise ValueError(f"unsafe cache path {rel[:100]!r}")
    return rel


class Body(Protocol):
    """A NAR being read: ``size`` when known, chunks of at most CHUNK bytes, then close."""

    size: int | None

    def chunks(self) -> Iterator[bytes]: ...

    def close(self) -> None: ...


class Upstream(Protocol):
    url: str

    def get(self, rel: str) -> bytes | None: ...

    def open(self, rel: str) -> Body | None: ...


@dataclass
class _FileBody:
    f: BinaryIO
    size: int | None

    def chunks(self) -> Iterator[bytes]:
        while True:
            try:
                block = self.f.read(CHUNK)
            except OSError as exc:
                raise UpstreamFault(f"reading NAR: {exc}") from exc
            if not block:
                return
            yield block

    def close(self) -> None:
        self.f.close()


@dataclass
class FileUpstream:
    url: str
    root: Path

    def _path(self, rel: str) -> Path:
        return self.root / check_relative(rel)

    def get(self, rel: str) -> bytes | None:
        path = self._path(rel)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_SMALL + 1)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as exc:
            raise UpstreamFault(f"{self.url}: cannot read {rel}: {exc.strerror}") from exc
        if len(data) > MAX_SMALL:
            raise UpstreamFault(f"{self.url}: {rel} is larger than {MAX_SMALL} bytes")
        return data

    def open(self, rel: str) -> Body | None:
        path = self._path(rel)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the Body's owner
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as exc:
            raise UpstreamFault(f"{self.url}: cannot open {rel}: {exc.strerror}") from exc
        try:
            size: int | None = os.fstat(f.fileno()).st_size
        except OSError:
            size = None
        return _FileBody(f, size)


@dataclass
class _HttpBody:
    conn: http.client.HTTPConnection
    resp: http.client.HTTPResponse
    size: int | None
    url: str

    def chunks(self) -> Iterator[bytes]:
        while True:
            try:
                block = self.resp.read(CHUNK)
            except (OSError, http.client.HTTPException) as exc:
                raise UpstreamFault(f"{self.url}: NAR download broke off: {exc}") from exc
            if not block:
                return
            yield block

    def close(self) -> None:
        self.conn.close()


class HttpUpstream:
    """An HTTP(S) binary cache. Small files reuse one keep-alive connection per thread."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"upstream {url!r}: expected http(s)://HOST[:PORT][/PATH]")
        self.url = url.rstrip("/")
        self.scheme = parsed.scheme
        self.host = parsed.hostname
        self.port = parsed.port
        self.base = parsed.path.rstrip("/")
        self.timeout = timeout
        self._local = threading.local()

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def _request(
        self, conn: http.client.HTTPConnection, rel: str
    ) -> http.client.HTTPResponse:
        target = f"{self.base}/{urllib.parse.quote(check_relative(rel), safe='/:!=+')}"
        conn.request("GET", target, headers={"User-Agent": "tracehook-gate"})
        return conn.getresponse()

    def get(self, rel: str) -> bytes | None:
        for attempt in (0, 1):  # a kept-alive connection the server closed: retry once
            conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
            fresh = conn is None
            if conn is None:
                conn = self._connect()
                self._local.conn = conn
            try:
                resp = self._request(conn, rel)
                data = resp.read(MAX_SMALL + 1)
                if resp.will_close or len(data) > MAX_SMALL:
                    conn.close()
                    self._local.conn = None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self._local.conn = None
                if attempt == 0 and not fresh and not isinstance(exc, TimeoutError):
                    continue
                raise UpstreamFault(f"{self.url} unreachable for {rel}: {exc}") from exc
            return self._small_result(resp.status, data, rel)
        raise AssertionError("unreachable")

    def _small_result(self, status: int, data: bytes, rel: str) -> bytes | None:
        if status in (403, 404, 410):  # S3 answers 403 for a missing key
            return None
        if status != 200:
            raise UpstreamFault(f"{self.url}: HTTP {status} for {rel}")
        if len(data) > MAX_SMALL:
            raise UpstreamFault(f"{self.url}: {rel} is larger than {MAX_SMALL} bytes")
        return data

    def open(self, rel: str) -> Body | None:
        conn = self._connect()
        try:
            resp = self._request(conn, rel)
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise UpstreamFault(f"{self.url} unreachable for {rel}: {exc}") from exc
        if resp.status in (403, 404, 410):
            conn.close()
            return None
        if resp.status != 200:
            conn.close()
            raise UpstreamFault(f"{self.url}: HTTP {resp.status} for {rel}")
        length = resp.getheader("Content-Length")
        size = int(length) if length is not None and length.isdigit() else None
        return _HttpBody(conn, resp, size, self.url)


def fetch_narinfo(up: Upstream, path: str) -> NarInfo | None:
    """The narinfo ``up`` serves for ``path``; None when it has none.

    UpstreamFault when it cannot be read; ParseError when what it serves is malformed or is
    the narinfo of another path.
    """
    data = up.get(f"{hash_part(path)}.narinfo")
    if data is None:
        return None
    what = f"narinfo for {path} from {up.url}"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParseError(what, f"not UTF-8 ({exc.reason})") from None
    ni = narinfo.parse(text, what)
    if ni.store_path != path:
        raise ParseError(what, f"it is the narinfo of {ni.store_path}")
    return ni


def open_upstream(url: str, timeout: float = DEFAULT_TIMEOUT) -> Upstream:
    """An upstream from its URL: ``file:///dir`` or ``http(s)://...``."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("http", "https"):
        return HttpUpstream(url, timeout)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"upstream {url!r}: file URLs name no host (file:///dir)")
        root = Path(urllib.parse.unquote(parsed.path))
        if not root.is_dir():
            raise ConfigError(f"upstream {url!r}: {root} is not a directory")
        return FileUpstream(url, root)
    raise ConfigError(f"upstream {url!r}: use file:///DIR, http:// or https://")
