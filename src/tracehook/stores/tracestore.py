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
- ``s3://BUCKET[/PREFIX]?endpoint=...``: the same protocol on a bucket
  (:mod:`tracehook.stores.s3`, opened lazily: botocore is imported only then).

**Conditional PUTs are checked, not assumed.** Some servers (nginx WebDAV) answer 2xx to a
PUT whose precondition fails, and two writers then lose each other's signatures. Before its
first write to an HTTP or S3 store, a writer probes it once (:meth:`HttpTraceStore.
check_preconditions`) on the canary key ``traces/.tracehook-probe`` (a valid, empty trace
file): create it with ``If-None-Match: *``, then two PUTs that must fail, ``If-Match`` with
an ETag that cannot exist and ``If-None-Match: *`` on the now existing key. A store that
accepts either is refused (ConfigError) unless its URL says ``single-writer=1`` (the
operator's word that one publisher alone writes to it; nothing is checked then). A store
that cannot be reached is probed again before the next write.

A trace file larger than :data:`MAX_TRACE_FILE` (16 MiB), a body cut short, a store that
cannot be read: :class:`~tracehook.errors.TraceStoreFault`, never "no trace".
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tracehook.errors import (
    ConfigError,
    CredentialsRejected,
    EnvironmentFault,
    ParseError,
    TraceStoreFault,
    Unreachable,
)
from tracehook.nix import nixbase32
from tracehook.stores.files import atomic_write, read_bounded
from tracehook.stores.http import (
    DEFAULT_TIMEOUT,
    Endpoint,
    HttpClient,
    Response,
    StatusKind,
    status_kind,
)
from tracehook.trace.tracefile import TraceDocument, read_trace_document, render_trace_document

log = logging.getLogger(__name__)

MAX_TRACE_FILE = 16 * 1024 * 1024
CONFLICT_RETRIES = 50
TRANSIENT_RETRIES = 3  # dropped connections retried per append
CONFLICT_BACKOFF_MAX = 0.5  # seconds; jittered, doubling from 5 ms
PROBE_KEY = "traces/.tracehook-probe"


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
    """An HTTP(S) trace store. Subclasses (S3) change how one request is sent
    (:meth:`_send`) and what an answer means (:meth:`_kind`, :meth:`_answer`)."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT,
                 single_writer: bool = False) -> None:
        self.client = HttpClient(Endpoint.parse(url, "trace store URL"), timeout)
        self.url = self.client.url
        self._init_writes(single_writer)

    def _init_writes(self, single_writer: bool) -> None:
        self.single_writer = single_writer
        self.puts = 0  # conditional PUTs sent by append
        self.conflicts = 0  # of which another writer was first (409/412)
        self._probed = False
        self._probe_lock = threading.Lock()
        self._last = threading.local()  # this thread's last get(), for the append after it

    def _send(self, method: str, rel: str, headers: Mapping[str, str] | None = None,
              body: bytes | None = None, limit: int = MAX_TRACE_FILE) -> Response:
        try:
            return self.client.request(method, self.client.endpoint.target(rel),
                                       headers=headers, body=body, limit=limit)
        except Unreachable as exc:
            raise TraceStoreFault(f"trace store {exc.diagnostics()}") from exc

    def _kind(self, method: str, resp: Response) -> StatusKind:
        return status_kind(resp.status)

    def _answer(self, resp: Response) -> str:
        return f"HTTP {resp.status}"

    def _fetch(self, key: str) -> tuple[TraceDocument, str | None, bool]:
        """(signatures and evidence, etag, exists)."""
        resp = self._send("GET", f"traces/{check_key(key)}")
        kind = self._kind("GET", resp)
        if kind == "absent":
            return TraceDocument(), None, False
        if kind != "ok":
            raise TraceStoreFault(f"trace store {self.url}: {self._answer(resp)} for {key}")
        return (read_trace_document(resp.body, f"trace {key} from {self.url}"),
                resp.header("ETag"), True)

    # ------------------------------------------------------------ the precondition probe

    def check_preconditions(self) -> None:
        """Once, before the first write: refuse a store that ignores conditional PUTs
        (ConfigError), unless it is marked single-writer. TraceStoreFault when it cannot be
        reached (probed again next time); CredentialsRejected for a wrong secret."""
        if self.single_writer or self._probed:
            return
        with self._probe_lock:
            if not self._probed:
                self._probe()
                self._probed = True
                log.info("trace store %s honours conditional PUTs", self.url)

    def _probe(self) -> None:
        body = render_trace_document(TraceDocument())
        json_type = {"Content-Type": "application/json"}
        first = self._send("PUT", PROBE_KEY, {**json_type, "If-None-Match": "*"}, body)
        if self._kind("PUT", first) not in ("ok", "conflict"):
            self._probe_failed(first)
        impossible = f'"tracehook-probe-{secrets.token_hex(8)}"'
        for header, value, what in (
            ("If-Match", impossible, "a PUT with If-Match and an ETag that cannot match"),
            ("If-None-Match", "*", "a PUT with If-None-Match: * on an existing key"),
        ):
            resp = self._send("PUT", PROBE_KEY, {**json_type, header: value}, body)
            kind = self._kind("PUT", resp)
            if kind == "ok":
                raise ConfigError(
                    f"trace store {self.url} ignores conditional PUTs (it answered "
                    f"{self._answer(resp)} to {what}), so publishers writing to it at once "
                    "would lose each other's signatures: use a store that honours them (an "
                    "S3 bucket, e.g. SeaweedFS: docs/OPERATIONS.md, 'Running a fleet') or, "
                    "if this publisher is its only writer, add single-writer=1 to its URL")
            if kind != "conflict":
                self._probe_failed(resp)

    def _probe_failed(self, resp: Response) -> None:
        where = f"trace store {self.url}: {self._answer(resp)} to a PUT of {PROBE_KEY}"
        if resp.status in (401, 403):
            raise ConfigError(f"{where}: this writer may not write under traces/ (check its "
                              "credentials and permissions)")
        if resp.status >= 500 or resp.status in (408, 429):
            raise TraceStoreFault(f"{where}; cannot check that it honours conditional PUTs "
                                  "yet")
        raise ConfigError(f"{where}: cannot check that it honours conditional PUTs (it must "
                          "accept writes under traces/), or add single-writer=1 to its URL")

    def get(self, key: str) -> list[str]:
        return list(self.read(key).signatures)

    def read(self, key: str) -> TraceDocument:
        found = self._fetch(key)
        self._last.read = (key, found)
        return found[0]

    def _reuse(self, key: str) -> tuple[TraceDocument, str | None, bool] | None:
        """What this thread's last :meth:`read` read, if it was ``key`` (once): a publisher
        reads a key, then appends to it; the conditional PUT makes a stale read harmless
        (it fails, and the next attempt reads afresh)."""
        last = getattr(self._last, "read", None)
        self._last.read = None
        return last[1] if last is not None and last[0] == key else None

    def append(self, key: str, signatures: Sequence[str],
               evidence: Sequence[Mapping[str, Any]] = ()) -> None:
        """Append with laut's conditional PUTs.

        A 409/412 (another writer was first) and a dropped connection (reset, closed
        without an answer) start over from a fresh GET, after a jittered backoff: every
        attempt merges into what it just read, so repeating one is always safe, even when
        the lost answer was to a PUT that the server applied.
        """
        self.check_preconditions()
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
        existing, etag, exists = self._reuse(key) or self._fetch(key)
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
        self.puts += 1
        resp = self._send("PUT", f"traces/{key}", headers, render_trace_document(merged))
        kind = self._kind("PUT", resp)
        if kind == "ok":
            return True
        if kind == "conflict":
            self.conflicts += 1
            return False
        raise TraceStoreFault(f"trace store {self.url}: PUT {key} answered "
                              f"{self._answer(resp)}")


def check_for_writing(store: TraceStore) -> str | None:
    """Before a publisher's first write: probe an HTTP or S3 store's conditional PUTs
    (:meth:`HttpTraceStore.check_preconditions`). None when it honours them (or is a
    directory); a note for the operator when it was not checked: marked single-writer, or
    unreachable now (then it is probed before the first write). ConfigError when it
    ignores them; CredentialsRejected when it refuses the credentials."""
    if not isinstance(store, HttpTraceStore):
        return None
    if store.single_writer:
        return (f"trace store {store.url}: conditional PUTs not checked (single-writer=1): "
                "no other publisher may write to it")
    try:
        store.check_preconditions()
    except CredentialsRejected:
        raise
    except EnvironmentFault as exc:
        return (f"{exc.diagnostics()}; its conditional PUTs will be checked before the "
                "first write")
    return None


def _single_writer(url: str) -> tuple[str, bool]:
    """An http(s) URL without its ``?single-writer=1`` (the only query it may carry)."""
    base, sep, query = url.partition("?")
    if not sep:
        return url, False
    try:
        params = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError as exc:
        raise ConfigError(f"trace store URL {url!r}: {exc}") from None
    if len(params) != 1 or params[0][0] != "single-writer" or \
            params[0][1].lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise ConfigError(f"trace store URL {url!r}: the only parameter an HTTP trace store "
                          "takes is single-writer=1")
    return base, params[0][1].lower() in ("1", "true", "yes")


def open_store(url: str, timeout: float = DEFAULT_TIMEOUT, create: bool = False) -> TraceStore:
    """A trace store from its URL: ``file:///dir``, a plain directory path, http(s) (with
    an optional ``?single-writer=1``) or ``s3://BUCKET[/PREFIX]?...``. ``create``: for a
    writer, a ``file://`` store that does not exist yet is created."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("http", "https"):
        base, single = _single_writer(url)
        return HttpTraceStore(base, timeout, single_writer=single)
    if parsed.scheme == "s3":
        from tracehook.stores.s3 import S3TraceStore

        return S3TraceStore(url, timeout)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"trace store URL {url!r}: file URLs name no host (file:///dir)")
        return FileTraceStore(url, Path(urllib.parse.unquote(parsed.path)), create)
    if parsed.scheme == "" and url.startswith("/"):
        return FileTraceStore(f"file://{url}", Path(url), create)
    raise ConfigError(f"trace store URL {url!r}: use file:///DIR, http(s)://HOST/PATH or "
                      "s3://BUCKET[/PREFIX]?endpoint=HOST:PORT")
