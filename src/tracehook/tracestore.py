"""Trace stores: where signed traces live, ``<store>/traces/<key>`` = ``{"signatures": [...]}``.

Two kinds behind one interface:

- ``file://DIR``: a directory; appends are atomic (write a temp file, rename) and serialised
  between processes by an exclusive ``flock`` on ``DIR/traces/.lock``.
- ``http://`` / ``https://``: laut's protocol. GET the file; to append, PUT with
  ``If-None-Match: *`` when it is absent, else PUT the merged list with ``If-Match: <etag>``;
  on 409/412 (someone else wrote first) read again and retry. Another signer's entry is
  never dropped: every write is a merge of what was read.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tracehook import nixbase32
from tracehook.errors import ConfigError, EnvironmentFault, ParseError
from tracehook.jws import merge_signatures, parse_trace_file, render_trace_file

MAX_TRACE_FILE = 16 * 1024 * 1024
DEFAULT_TIMEOUT = 10.0
CONFLICT_RETRIES = 20


class TraceStore(Protocol):
    url: str

    def get(self, key: str) -> list[str]:
        """The signatures stored under ``key`` ([] when none); EnvironmentFault if unreachable."""
        ...

    def append(self, key: str, signatures: Sequence[str]) -> None:
        """Add ``signatures`` under ``key``, keeping every entry already there."""
        ...


def check_key(key: str) -> str:
    if not nixbase32.is_valid(key, 20):
        raise ParseError("trace key", f"{key!r} is not 32 nix-base32 characters")
    return key


@dataclass
class FileTraceStore:
    url: str
    root: Path

    def _path(self, key: str) -> Path:
        return self.root / "traces" / check_key(key)

    def get(self, key: str) -> list[str]:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise EnvironmentFault(f"cannot read {path}: {exc.strerror}") from exc
        return parse_trace_file(data, f"trace file {path}")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        traces = self.root / "traces"
        try:
            traces.mkdir(parents=True, exist_ok=True)
            fd = os.open(traces / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as exc:
            raise EnvironmentFault(f"cannot write to trace store {self.url}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def append(self, key: str, signatures: Sequence[str]) -> None:
        path = self._path(key)
        with self._locked():
            merged = merge_signatures(self.get(key), signatures)
            atomic_write(path, render_trace_file(merged))


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass
class HttpTraceStore:
    url: str
    timeout: float = DEFAULT_TIMEOUT

    def _key_url(self, key: str) -> str:
        return f"{self.url.rstrip('/')}/traces/{check_key(key)}"

    def _fetch(self, key: str) -> tuple[list[str], str | None, bool]:
        """(signatures, etag, exists)."""
        req = urllib.request.Request(self._key_url(key), method="GET")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                data = resp.read(MAX_TRACE_FILE + 1)
                etag = resp.headers.get("ETag")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return [], None, False
            raise EnvironmentFault(f"trace store {self.url}: HTTP {exc.code} for {key}") from exc
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise EnvironmentFault(f"trace store {self.url} unreachable: {reason}") from exc
        if len(data) > MAX_TRACE_FILE:
            raise EnvironmentFault(f"trace store {self.url}: trace {key} is over 16 MiB")
        return parse_trace_file(data, f"trace {key} from {self.url}"), etag, True

    def get(self, key: str) -> list[str]:
        return self._fetch(key)[0]

    def append(self, key: str, signatures: Sequence[str]) -> None:
        for _ in range(CONFLICT_RETRIES):
            existing, etag, exists = self._fetch(key)
            merged = merge_signatures(existing, signatures)
            if exists and merged == existing:
                return
            headers = {"Content-Type": "application/json"}
            if not exists:
                headers["If-None-Match"] = "*"
            elif etag is not None:
                headers["If-Match"] = etag
            req = urllib.request.Request(
                self._key_url(key), data=render_trace_file(merged), method="PUT", headers=headers
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout):
                    return
            except urllib.error.HTTPError as exc:
                if exc.code in (409, 412):
                    continue
                raise EnvironmentFault(
                    f"trace store {self.url}: PUT {key} answered HTTP {exc.code}"
                ) from exc
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                reason = getattr(exc, "reason", exc)
                raise EnvironmentFault(f"trace store {self.url} unreachable: {reason}") from exc
        raise EnvironmentFault(
            f"trace store {self.url}: {CONFLICT_RETRIES} conflicting writes to {key}, giving up"
        )


def open_store(url: str, timeout: float = DEFAULT_TIMEOUT) -> TraceStore:
    """A trace store from its URL: ``file:///dir``, a plain directory path, or http(s)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("http", "https"):
        if not parsed.netloc:
            raise ConfigError(f"trace store URL {url!r} has no host")
        return HttpTraceStore(url, timeout)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"trace store URL {url!r}: file URLs name no host (file:///dir)")
        return FileTraceStore(url, Path(urllib.parse.unquote(parsed.path)))
    if parsed.scheme == "" and url.startswith("/"):
        return FileTraceStore(f"file://{url}", Path(url))
    raise ConfigError(f"trace store URL {url!r}: use file:///DIR, http:// or https://")
