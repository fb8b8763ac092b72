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
import random
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tracehook.errors import ConfigError, EnvironmentFault, ParseError
from tracehook.nix import nixbase32
from tracehook.trace.jws import merge_signatures, parse_trace_file, render_trace_file

MAX_TRACE_FILE = 16 * 1024 * 1024
DEFAULT_TIMEOUT = 10.0
CONFLICT_RETRIES = 50
TRANSIENT_RETRIES = 3  # dropped connections retried per append
CONFLICT_BACKOFF_MAX = 0.5  # seconds; jittered, doubling from 5 ms


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
            raise _unreachable(self.url, exc) from exc
        if len(data) > MAX_TRACE_FILE:
            raise EnvironmentFault(f"trace store {self.url}: trace {key} is over 16 MiB")
        return parse_trace_file(data, f"trace {key} from {self.url}"), etag, True

    def get(self, key: str) -> list[str]:
        return self._fetch(key)[0]

    def append(self, key: str, signatures: Sequence[str]) -> None:
        """Append with laut's conditional PUTs.

        A 409/412 (another writer was first) and a dropped connection (reset, closed
        without an answer) start over from a fresh GET, after a jittered backoff: every
        attempt merges into what it just read, so repeating one is always safe, even when
        the lost answer was to a PUT that the server applied.
        """
        transient = 0
        for attempt in range(CONFLICT_RETRIES):
            if attempt:  # jittered exponential backoff: writers racing on one key spread out
                time.sleep(random.uniform(0, min(CONFLICT_BACKOFF_MAX, 0.005 * 2**attempt)))
            try:
                if self._try_append(key, signatures):
                    return
            except _Dropped as exc:
                transient += 1
                if transient > TRANSIENT_RETRIES:
                    raise exc.fault from exc.__cause__
        raise EnvironmentFault(
            f"trace store {self.url}: {CONFLICT_RETRIES} conflicting writes to {key}, giving up"
        )

    def _try_append(self, key: str, signatures: Sequence[str]) -> bool:
        """One GET + conditional PUT; False when another writer got in first."""
        existing, etag, exists = self._fetch(key)
        merged = merge_signatures(existing, signatures)
        if exists and merged == existing:
            return True
        headers = {"Content-Type": "application/json"}
        if not exists:
            headers["If-None-Match"] = "*"
        elif etag is not None:
            headers["If-Match"] = etag
        else:
            # Without an ETag the PUT could replace another signer's newer file.
            raise EnvironmentFault(
                f"trace store {self.url}: GET {key} sent no ETag, so an append cannot "
                "be made safely (the server must support If-Match)"
            )
        req = urllib.request.Request(
            self._key_url(key), data=render_trace_file(merged), method="PUT", headers=headers
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout):
                return True
        except urllib.error.HTTPError as exc:
            if exc.code in (409, 412):
                return False
            raise EnvironmentFault(
                f"trace store {self.url}: PUT {key} answered HTTP {exc.code}"
            ) from exc
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise _unreachable(self.url, exc) from exc


class _Dropped(Exception):
    """A connection dropped mid-request: worth one more try (carries the final error)."""

    def __init__(self, fault: EnvironmentFault) -> None:
        super().__init__(fault.diagnostics())
        self.fault = fault


def _unreachable(url: str, exc: BaseException) -> Exception:
    reason = getattr(exc, "reason", exc)
    fault = EnvironmentFault(f"trace store {url} unreachable: {reason}")
    if isinstance(reason, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        return _Dropped(fault)  # http.client.RemoteDisconnected is a ConnectionResetError
    return fault


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
