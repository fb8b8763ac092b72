"""Trace stores: where signed traces live, ``<store>/traces/<key>`` = ``{"signatures": [...]}``.

A file may also hold hardware evidence beside the signatures (``"evidence": [...]``,
docs/FORMAT.md 9.2): :meth:`TraceStore.read` returns both (:mod:`tracehook.trace.tracefile`),
and every append keeps the evidence already there, whoever wrote it.

Two kinds behind one interface:

- ``file://DIR``: a directory; appends are atomic (write a temp file, rename) and serialised
  between processes by an exclusive ``flock`` on ``DIR/traces/.lock``. Reads take regular
  files only, at most :data:`MAX_TRACE_FILE` bytes (:func:`tracehook.stores.files.read_bounded`).
- ``http://`` / ``https://``: laut's protocol, through the one HTTP client. GET the file; to
  append, PUT with ``If-None-Match: *`` when it is absent, else PUT the merged list with
  ``If-Match: <etag>``; on 409/412 (someone else wrote first) read again and retry. Another
  signer's entry is never dropped: every write is a merge of what was read.

A trace file larger than :data:`MAX_TRACE_FILE` (16 MiB), a body cut short, a store that
cannot be read: :class:`~tracehook.errors.TraceStoreFault`, never "no trace".
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tracehook.errors import ConfigError, EnvironmentFault, ParseError, TraceStoreFault, Unreachable
from tracehook.nix import nixbase32
from tracehook.stores.files import atomic_write, read_bounded
from tracehook.stores.http import DEFAULT_TIMEOUT, Endpoint, HttpClient, status_kind
from tracehook.trace.tracefile import TraceDocument, read_trace_document, render_trace_document

MAX_TRACE_FILE = 16 * 1024 * 1024
CONFLICT_RETRIES = 50
TRANSIENT_RETRIES = 3  # dropped connections retried per append
CONFLICT_BACKOFF_MAX = 0.5  # seconds; jittered, doubling from 5 ms


class TraceStore(Protocol):
    url: str

    def get(self, key: str) -> list[str]:
        """The signatures stored under ``key`` ([] when none); TraceStoreFault if unreadable."""
        ...

    def read(self, key: str) -> TraceDocument:
        """The signatures and evidence entries under ``key`` (empty when none)."""
        ...

    def append(self, key: str, signatures: Sequence[str],
               evidence: Sequence[Mapping[str, Any]] = ()) -> None:
        """Add ``signatures`` (and evidence entries) under ``key``, keeping every entry
        already there."""
        ...


def check_key(key: str) -> str:
    if not nixbase32.is_valid(key, 20):
        raise ParseError("trace key", f"{key!r} is not 32 nix-base32 characters")
    return key


@dataclass
class FileTraceStore:
    """``create``: a store this process writes to (a publisher) and creates on its first
    append; reading it before then finds no trace. Otherwise a store directory that does
    not exist is a fault, never "no trace"."""

    url: str
    root: Path
    create: bool = False

    def _path(self, key: str) -> Path:
        return self.root / "traces" / check_key(key)

    def get(self, key: str) -> list[str]:
        return list(self.read(key).signatures)

    def read(self, key: str) -> TraceDocument:
        traces = f"{self.root}/traces"  # strings, not Paths: this runs for every step
        path = f"{traces}/{check_key(key)}"
        try:
            data = read_bounded(path, MAX_TRACE_FILE, "trace file")
        except EnvironmentFault as exc:
            raise TraceStoreFault(f"trace store {self.url}: {exc.diagnostics()}") from None
        if data is None:
            if not self.create and not os.path.isdir(traces):  # missing: a fault, not "no trace"
                raise TraceStoreFault(f"trace store {self.url}: {traces} is not a "
                                      "directory (missing or unreadable)")
            return TraceDocument()
        return read_trace_document(data, f"trace file {path}")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        traces = self.root / "traces"
        try:
            traces.mkdir(parents=True, exist_ok=True)
            fd = os.open(traces / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as exc:
            raise TraceStoreFault(f"cannot write to trace store {self.url}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def append(self, key: str, signatures: Sequence[str],
               evidence: Sequence[Mapping[str, Any]] = ()) -> None:
        path = self._path(key)
        with self._locked():
            merged = self.read(key).merged(signatures, evidence)
            try:
                atomic_write(path, render_trace_document(merged))
            except OSError as exc:
                raise TraceStoreFault(f"cannot write to trace store {self.url}: "
                                      f"{exc.strerror or exc}") from exc


class HttpTraceStore:
    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.client = HttpClient(Endpoint.parse(url, "trace store URL"), timeout)
        self.url = self.client.url

    def _target(self, key: str) -> str:
        return self.client.endpoint.target(f"traces/{check_key(key)}")

    def _fetch(self, key: str) -> tuple[TraceDocument, str | None, bool]:
        """(signatures and evidence, etag, exists)."""
        try:
            resp = self.client.request("GET", self._target(key), limit=MAX_TRACE_FILE)
        except Unreachable as exc:
            raise TraceStoreFault(f"trace store {exc.diagnostics()}",
                                  ) from exc
        kind = status_kind(resp.status)
        if kind == "absent":
            return TraceDocument(), None, False
        if kind != "ok":
            raise TraceStoreFault(f"trace store {self.url}: HTTP {resp.status} for {key}")
        return (read_trace_document(resp.body, f"trace {key} from {self.url}"),
                resp.header("ETag"), True)

    def get(self, key: str) -> list[str]:
        return list(self.read(key).signatures)

    def read(self, key: str) -> TraceDocument:
        return self._fetch(key)[0]

    def append(self, key: str, signatures: Sequence[str],
               evidence: Sequence[Mapping[str, Any]] = ()) -> None:
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
                if self._try_append(key, signatures, evidence):
                    return
            except TraceStoreFault as exc:
                cause = exc.__cause__
                if not (isinstance(cause, Unreachable) and cause.dropped):
                    raise
                transient += 1
                if transient > TRANSIENT_RETRIES:
                    raise
        raise TraceStoreFault(
            f"trace store {self.url}: {CONFLICT_RETRIES} conflicting writes to {key}, giving up"
        )

    def _try_append(self, key: str, signatures: Sequence[str],
                    evidence: Sequence[Mapping[str, Any]]) -> bool:
        """One GET + conditional PUT; False when another writer got in first."""
        existing, etag, exists = self._fetch(key)
        merged = existing.merged(signatures, evidence)
        if exists and merged.same_content(existing):
            return True
        headers = {"Content-Type": "application/json"}
        if not exists:
            headers["If-None-Match"] = "*"
        elif etag is not None:
            headers["If-Match"] = etag
        else:
            # Without an ETag the PUT could replace another signer's newer file.
            raise TraceStoreFault(
                f"trace store {self.url}: GET {key} sent no ETag, so an append cannot "
                "be made safely (the server must support If-Match)"
            )
        try:
            resp = self.client.request("PUT", self._target(key), headers=headers,
                                       body=render_trace_document(merged))
        except Unreachable as exc:
            raise TraceStoreFault(f"trace store {exc.diagnostics()}") from exc
        kind = status_kind(resp.status)
        if kind == "ok":
            return True
        if kind == "conflict":
            return False
        raise TraceStoreFault(f"trace store {self.url}: PUT {key} answered HTTP {resp.status}")


def open_store(url: str, timeout: float = DEFAULT_TIMEOUT, create: bool = False) -> TraceStore:
    """A trace store from its URL: ``file:///dir``, a plain directory path, or http(s).
    ``create``: for a writer, a ``file://`` store that does not exist yet is created."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("http", "https"):
        return HttpTraceStore(url, timeout)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"trace store URL {url!r}: file URLs name no host (file:///dir)")
        return FileTraceStore(url, Path(urllib.parse.unquote(parsed.path)), create)
    if parsed.scheme == "" and url.startswith("/"):
        return FileTraceStore(f"file://{url}", Path(url), create)
    raise ConfigError(f"trace store URL {url!r}: use file:///DIR, http:// or https://")
