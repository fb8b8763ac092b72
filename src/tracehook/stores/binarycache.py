"""Binary caches the gate reads from: ``file://DIR``, ``http(s)://`` and ``s3://`` (in
:mod:`tracehook.stores.s3`) behind one interface.

Two kinds of read:

- :meth:`Upstream.get`: a small file (``nix-cache-info``, a narinfo, a realisation), read
  whole up to a size limit; ``None`` when the cache does not have it (404 / no such file).
- :meth:`Upstream.open`: a NAR, as a :class:`Body` read in chunks, never held whole.

Anything else (a refused connection, a timeout, an HTTP 5xx, a file too large, an
unreadable file, a symlink or a FIFO in a ``file://`` cache) is an
:class:`~tracehook.errors.UpstreamFault`: the caller answers 502 and never takes it for
"absent". Relative paths are checked here too (no ``..``, no absolute paths), so a
traversal that slipped past the HTTP layer still cannot leave the cache directory. HTTP
goes through the one client, :mod:`tracehook.stores.http`.
"""

from __future__ import annotations

import os
import re
import stat
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from tracehook.errors import ConfigError, EnvironmentFault, ParseError, Unreachable, UpstreamFault
from tracehook.nix import narinfo
from tracehook.nix.narinfo import NarInfo
from tracehook.nix.storepath import hash_part
from tracehook.stores.files import read_bounded
from tracehook.stores.http import DEFAULT_TIMEOUT, Endpoint, HttpClient, status_kind

CHUNK = 256 * 1024
MAX_SMALL = 1024 * 1024  # narinfos and realisations are a few hundred bytes
_REL = re.compile(r"[A-Za-z0-9+_:=!-][A-Za-z0-9+_:=!.-]*(/[A-Za-z0-9+_:=!-][A-Za-z0-9+_:=!.-]*)*")
_ABSENT = (403, 404, 410)  # S3 answers 403 for a missing key


# What urllib.parse.quote(safe="/") changes in a path check_relative let through: a path
# without these characters is its own quoted form.
_QUOTED = re.compile(r"[+:=!]")


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
    where: str = "binary cache"  # "binary cache URL: REL", for errors

    def chunks(self) -> Iterator[bytes]:
        while True:
            try:
                block = self.f.read(CHUNK)
            except OSError as exc:
                raise UpstreamFault(f"{self.where}: reading broke off: "
                                    f"{exc.strerror or exc}") from exc
            if not block:
                return
            yield block

    def close(self) -> None:
        self.f.close()


@dataclass
class FileUpstream:
    url: str
    root: Path
    _file_prefix: str | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # quoted once: file_url runs for every narinfo answered
        self._file_prefix = ("file://" + urllib.parse.quote(f"{self.root}/", safe="/")
                             if self.root.is_absolute() else None)

    def _path(self, rel: str) -> str:
        return f"{self.root}/{check_relative(rel)}"  # a string: this runs for every request

    def file_url(self, rel: str) -> str | None:
        """``rel`` as an absolute ``file://`` URL that Nix reads itself (None when the root
        is not an absolute path, e.g. ``file:relative``)."""
        if self._file_prefix is None:
            return None
        rel = check_relative(rel)
        return self._file_prefix + (urllib.parse.quote(rel, safe="/")
                                    if _QUOTED.search(rel) else rel)

    def get(self, rel: str) -> bytes | None:
        try:
            return read_bounded(self._path(rel), MAX_SMALL, f"binary cache {self.url}: file")
        except EnvironmentFault as exc:
            raise UpstreamFault(exc.diagnostics()) from None

    def open(self, rel: str) -> Body | None:
        path = self._path(rel)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise UpstreamFault(f"binary cache {self.url}: cannot open {rel}: "
                                f"{exc.strerror}") from exc
        f = os.fdopen(fd, "rb")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UpstreamFault(f"binary cache {self.url}: {rel} is not a regular file")
            os.set_blocking(fd, True)
        except BaseException:
            f.close()
            raise
        return _FileBody(f, st.st_size, f"binary cache {self.url}: {rel}")


class RemoteBody:
    """A NAR from a remote cache (HTTP, S3): a read that fails is an UpstreamFault, its
    message ``binary cache `` + ``prefix`` + what the client said."""

    def __init__(self, body: Body, prefix: str = "") -> None:
        self._body = body
        self.size = body.size
        self._prefix = prefix

    def chunks(self) -> Iterator[bytes]:
        try:
            yield from self._body.chunks()
        except Unreachable as exc:
            raise UpstreamFault(f"binary cache {self._prefix}{exc.diagnostics()}") from exc

    def close(self) -> None:
        self._body.close()


class HttpUpstream:
    """An HTTP(S) binary cache, through the one HTTP client."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.client = HttpClient(Endpoint.parse(url, "upstream"), timeout)
        self.url = self.client.url

    def get(self, rel: str) -> bytes | None:
        try:
            resp = self.client.request("GET", self.client.endpoint.target(check_relative(rel)),
                                       limit=MAX_SMALL)
        except Unreachable as exc:
            raise UpstreamFault(f"binary cache {exc.diagnostics()}") from exc
        kind = status_kind(resp.status, _ABSENT)
        if kind == "absent":
            return None
        if kind != "ok":
            raise UpstreamFault(f"binary cache {self.url}: HTTP {resp.status} for {rel}")
        return resp.body

    def open(self, rel: str) -> Body | None:
        try:
            body = self.client.open(self.client.endpoint.target(check_relative(rel)))
        except Unreachable as exc:
            raise UpstreamFault(f"binary cache {exc.diagnostics()}") from exc
        kind = status_kind(body.status, _ABSENT)
        if kind != "ok":
            body.close()
            if kind == "absent":
                return None
            raise UpstreamFault(f"binary cache {self.url}: HTTP {body.status} for {rel}")
        return RemoteBody(body)


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
    """An upstream from its URL: ``file:///dir``, ``http(s)://...`` or
    ``s3://BUCKET[/PREFIX]?endpoint=...`` (:mod:`tracehook.stores.s3`, imported only then)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("http", "https"):
        return HttpUpstream(url, timeout)
    if parsed.scheme == "s3":
        from tracehook.stores.s3 import S3Upstream

        return S3Upstream(url, timeout)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"binary cache {url!r}: file URLs name no host (file:///dir)")
        root = Path(urllib.parse.unquote(parsed.path))
        try:
            is_dir = stat.S_ISDIR(os.stat(root).st_mode)
        except FileNotFoundError:
            is_dir = False
        except OSError as exc:
            raise ConfigError(f"binary cache {url}: cannot read {root}: "
                              f"{exc.strerror or exc}") from None
        if not is_dir:
            raise ConfigError(f"binary cache {url}: {root} is not a directory")
        return FileUpstream(url, root)
    raise ConfigError(f"upstream {url!r}: use file:///DIR, http(s)://HOST/PATH or "
                      "s3://BUCKET?endpoint=HOST:PORT")
