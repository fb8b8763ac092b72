"""The one HTTP client: binary caches, trace stores and S3 buckets all go through it.

- **One URL parser**: :meth:`Endpoint.parse` (scheme, host, port, base path; credentials in
  a URL are refused, never logged).
- **Keep-alive**: idle connections are pooled per endpoint and reused by any thread; a
  pooled connection the server closed meanwhile is retried once, for idempotent requests.
- **Deadlines**: ``timeout`` bounds every single socket operation, and every request has an
  overall deadline (``deadline`` seconds, default ``3 * timeout``) from sending it to the
  last byte of a bounded body: a server that trickles one byte at a time cannot hold a
  caller longer than that. A watchdog thread shuts the socket down when the deadline passes.
- **Size limits**: a bounded body larger than ``limit`` is an error, never truncated.
- **One error mapping**: anything that is not an HTTP answer (refused, reset, timed out,
  over the deadline, over the size limit, a truncated body) raises
  :class:`~tracehook.errors.Unreachable`, an environment fault. What a status code *means*
  (absent, conflict, fault) is the caller's: :func:`status_kind` names the usual meaning.

Streaming bodies (NARs) get their own connection and no overall deadline (a NAR may be
large); each read is still bounded by ``timeout``.
"""

from __future__ import annotations

# The package only: http.client (with ssl and email, ~40 ms of start-up) is imported by the
# first connection (_connect), so a command that reads no URL never loads it.
import http
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import http.client

from tracehook.errors import ConfigError, Unreachable
from tracehook.stores.deadline import WATCHDOG
from tracehook.stores.readlog import note_opaque

DEFAULT_TIMEOUT = 10.0
CHUNK = 256 * 1024
MAX_IDLE = 8  # pooled connections per endpoint
USER_AGENT = "tracehook"

StatusKind = Literal["ok", "absent", "conflict", "fault"]


def status_kind(status: int, absent: tuple[int, ...] = (404, 410)) -> StatusKind:
    """What an HTTP status usually means to a store: 2xx ok, ``absent`` (404, 410; S3
    answers 403 for a missing key without list permission, so binary caches add 403),
    409/412 a conditional write that lost a race, anything else a fault."""
    if 200 <= status < 300:
        return "ok"
    if status in absent:
        return "absent"
    if status in (409, 412):
        return "conflict"
    return "fault"


@dataclass(frozen=True)
class Endpoint:
    """A parsed ``http(s)://HOST[:PORT][/PATH]``."""

    scheme: Literal["http", "https"]
    host: str
    port: int | None
    base: str  # path prefix without a trailing slash ("" for the root)

    @classmethod
    def parse(cls, url: str, what: str) -> Endpoint:
        """ConfigError naming ``what`` (e.g. "trace store URL") when ``url`` is unusable."""
        try:
            parsed = urllib.parse.urlsplit(url)
            port = parsed.port
        except ValueError as exc:
            raise ConfigError(f"{what} {url!r}: {exc}") from None
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"{what} {url!r}: expected http(s)://HOST[:PORT][/PATH]")
        if parsed.username is not None or parsed.password is not None:
            raise ConfigError(f"{what}: put no credentials in the URL")
        if parsed.query or parsed.fragment:
            raise ConfigError(f"{what} {url!r}: no query or fragment expected")
        scheme: Literal["http", "https"] = "https" if parsed.scheme == "https" else "http"
        return cls(scheme, parsed.hostname, port, parsed.path.rstrip("/"))

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port is not None else ""
        return f"{self.scheme}://{host}{port}{self.base}"

    def target(self, rel: str, query: str = "") -> str:
        """The request target for ``rel`` (already safe: quoted here, ``/`` kept)."""
        path = f"{self.base}/{urllib.parse.quote(rel, safe='/:!=+-._~')}"
        return f"{path}?{query}" if query else path


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


# ------------------------------------------------------------------------------ the client


@dataclass
class Body:
    """A streamed response body (a NAR): ``size`` when known, chunks, then ``close``."""

    status: int
    headers: Mapping[str, str]
    size: int | None
    _conn: http.client.HTTPConnection = field(repr=False)
    _resp: http.client.HTTPResponse = field(repr=False)
    _url: str = field(repr=False)

    def chunks(self) -> Iterator[bytes]:
        while True:
            try:
                block = self._resp.read(CHUNK)
            except (OSError, http.client.HTTPException) as exc:
                raise Unreachable(f"{self._url}: download broke off: {exc}") from exc
            if not block:
                return
            yield block

    def close(self) -> None:
        self._conn.close()


class HttpClient:
    """Requests to one endpoint. Thread-safe; connections are pooled and reused."""

    def __init__(self, endpoint: Endpoint, timeout: float = DEFAULT_TIMEOUT,
                 deadline: float | None = None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.deadline = 3 * timeout if deadline is None else deadline
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.endpoint.url

    def __getstate__(self) -> dict[str, object]:
        """For a checker process: the endpoint and limits, not the pool or its lock."""
        return {"endpoint": self.endpoint, "timeout": self.timeout, "deadline": self.deadline}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._idle = []
        self._lock = threading.Lock()

    def _connect(self) -> http.client.HTTPConnection:
        import http.client  # binds the submodule for every use in this module

        ep = self.endpoint
        if ep.scheme == "https":
            return http.client.HTTPSConnection(ep.host, ep.port, timeout=self.timeout)
        return http.client.HTTPConnection(ep.host, ep.port, timeout=self.timeout)

    def _take(self) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._connect(), False

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def request(
        self,
        method: str,
        target: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        limit: int = 1 << 20,
        deadline: float | None = None,
    ) -> Response:
        """One request with a bounded body. Unreachable for anything but an HTTP answer
        whose body is at most ``limit`` bytes, all of it within the deadline."""
        note_opaque(f"read {self.endpoint.url}")  # what a server says cannot be re-checked
        hdrs = {"User-Agent": USER_AGENT, **(headers or {})}
        idempotent = method in ("GET", "HEAD")
        for attempt in (0, 1):
            conn, reused = self._take()
            try:
                return self._exchange(conn, method, target, hdrs, body, limit,
                                      self.deadline if deadline is None else deadline)
            except Unreachable as exc:
                conn.close()
                # A kept-alive connection the server closed meanwhile: try once afresh.
                if attempt == 0 and reused and exc.dropped and idempotent:
                    continue
                raise
        raise AssertionError("unreachable")

    def _exchange(self, conn: http.client.HTTPConnection, method: str, target: str,
                  headers: dict[str, str], body: bytes | None, limit: int,
                  seconds: float) -> Response:
        where = f"{self.url} ({method} {target.split('?', 1)[0][len(self.endpoint.base):]})"
        token: int | None = None
        started = time.monotonic()
        try:
            if conn.sock is None:
                conn.connect()
            assert conn.sock is not None
            token = WATCHDOG.watch(conn.sock, started + seconds)
            conn.request(method, target, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read(limit + 1) if method != "HEAD" else b""
            if len(data) > limit:
                raise Unreachable(f"{where}: answer larger than {limit} bytes")
            if resp.length not in (None, 0):
                raise Unreachable(f"{where}: answer cut short", dropped=True)
        except Unreachable:
            raise
        except (OSError, http.client.HTTPException) as exc:
            late = time.monotonic() - started >= seconds
            if late:
                raise Unreachable(f"{where}: no complete answer within {seconds:g} s") from exc
            dropped = isinstance(exc, (ConnectionError, http.client.RemoteDisconnected,
                                       http.client.IncompleteRead, BrokenPipeError))
            if isinstance(exc, TimeoutError):
                raise Unreachable(f"{where}: timed out after {self.timeout:g} s") from exc
            raise Unreachable(f"{where}: unreachable: {exc}", dropped=dropped) from exc
        finally:
            if token is not None:
                WATCHDOG.release(token)
        result = Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        if resp.will_close:
            conn.close()
        else:
            self._give_back(conn)
        return result

    def open(self, target: str, headers: Mapping[str, str] | None = None) -> Body:
        """A GET whose body is read in chunks by the caller (a NAR), on a connection of
        its own; the headers must arrive within the deadline."""
        conn = self._connect()
        token: int | None = None
        started = time.monotonic()
        try:
            conn.connect()
            assert conn.sock is not None
            token = WATCHDOG.watch(conn.sock, started + self.deadline)
            conn.request("GET", target, headers={"User-Agent": USER_AGENT, **(headers or {})})
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise Unreachable(f"{self.url}: unreachable for {target}: {exc}") from exc
        finally:
            if token is not None:
                WATCHDOG.release(token)
        length = resp.getheader("Content-Length")
        size = int(length) if length is not None and length.isdigit() else None
        return Body(resp.status, {k.lower(): v for k, v in resp.getheaders()}, size, conn,
                    resp, self.url)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
