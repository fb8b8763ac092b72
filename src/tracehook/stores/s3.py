"""S3 buckets as trace stores and binary caches, through the one HTTP client.

URL: ``s3://BUCKET[/PREFIX]?endpoint=HOST[:PORT]&scheme=http|https&region=R&profile=P``,
Nix's own s3:// parameters plus an optional key prefix (and, for trace stores,
``single-writer=1``: see :mod:`tracehook.stores.tracestore`). Without ``endpoint`` the
bucket is on AWS (``s3.REGION.amazonaws.com``, virtual-hosted when the bucket name allows
it); with one, requests are path-style (``/BUCKET/KEY``), as MinIO, SeaweedFS, Garage and R2
expect. ``region`` defaults to us-east-1, ``scheme`` to https. Unknown parameters are
refused, so a typo is named rather than ignored.

- **Requests** go through :class:`~tracehook.stores.http.HttpClient` (pooled keep-alive,
  per-request deadlines, size caps, ``Unreachable`` for anything that is not an answer);
  botocore only signs them (SigV4) and is imported when the first S3 store is opened.
- **Credentials**, looked up once when the store is opened: the environment
  (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``), then the shared
  credentials file (``AWS_SHARED_CREDENTIALS_FILE``, default ``~/.aws/credentials``) and the
  config file (``AWS_CONFIG_FILE``, default ``~/.aws/config``) for the profile (``profile=``,
  else ``AWS_PROFILE``, else ``default``). With ``profile=`` the environment's keys are not
  used; a profile named (either way) that has no keys is an error, not anonymous. Nothing
  else (no instance metadata, no STS, no credential processes), so opening a store never
  touches the network. No credentials: requests go unsigned (anonymous reads).
  Secrets never appear in a message or a log line: errors name where the keys came from.
- **Retries**: an answer 500/502/503/504, a timeout or a dropped connection is retried with
  jittered backoff while the client's deadline (``3 * timeout``) lasts, for reads and for
  conditional writes (repeating a conditional PUT is always safe: if the first one was
  applied, the repeat fails its precondition and the caller reads again). A refused
  connection is not retried: the server is not there.
- **Errors**: the S3 error code (``<Code>`` of the XML body) decides, not the status alone.
  ``SignatureDoesNotMatch``, ``InvalidAccessKeyId`` and the other credential codes raise
  :class:`~tracehook.errors.CredentialsRejected` (exit 2 for a command; a fault to readers);
  ``NoSuchBucket`` is a fault; a binary cache's ``AccessDenied`` reads as absent (S3 answers
  403 for a missing key to whoever may not list the bucket; Nix does the same).
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tracehook.errors import (
    ConfigError,
    CredentialsRejected,
    TraceStoreFault,
    Unreachable,
    UpstreamFault,
)
from tracehook.stores.binarycache import MAX_SMALL, RemoteBody, check_relative
from tracehook.stores.http import (
    DEFAULT_TIMEOUT,
    Body,
    Endpoint,
    HttpClient,
    Response,
    StatusKind,
    status_kind,
)
from tracehook.stores.tracestore import MAX_TRACE_FILE, HttpTraceStore

if TYPE_CHECKING:
    from botocore.auth import S3SigV4Auth
    from botocore.credentials import Credentials

log = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"
RETRY_STATUS = (500, 502, 503, 504)
BACKOFF_FIRST = 0.05  # seconds, doubling, jittered
BACKOFF_MAX = 1.0
PARAMETERS = ("endpoint", "scheme", "region", "profile", "single-writer")
# Codes that say the credentials (or the signature made with them) are not accepted.
CREDENTIAL_CODES = frozenset({
    "SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken",
    "TokenRefreshRequired", "AuthorizationHeaderMalformed", "IncompleteSignature",
    "InvalidSecurity", "RequestTimeTooSkewed", "InvalidClientTokenId",
})
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]")
_SEGMENT = re.compile(r"[A-Za-z0-9_+=:@-][A-Za-z0-9._+=:@-]*")
_CODE = re.compile(rb"<Code>([A-Za-z0-9.]{1,64})</Code>")
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def error_code(resp: Response) -> str | None:
    """The S3 error code of an answer (``NoSuchKey``, ``AccessDenied``...), if it has one."""
    if resp.status < 300:
        return None
    m = _CODE.search(resp.body[:8192])
    return m.group(1).decode() if m else None


def describe(resp: Response) -> str:
    code = error_code(resp)
    return f"HTTP {resp.status}" + (f" {code}" if code else "")


@dataclass(frozen=True)
class S3Location:
    """A parsed ``s3://`` URL: where requests go and how they are signed."""

    bucket: str
    prefix: str  # "" or "a/b" (keys are PREFIX/REL)
    endpoint: Endpoint  # base "" (path-style) or the bucket's own host (virtual-hosted)
    path_style: bool
    region: str
    profile: str | None
    single_writer: bool
    url: str  # canonical, without secrets: what logs and messages show

    @classmethod
    def parse(cls, url: str, what: str) -> S3Location:
        """ConfigError naming ``what`` when ``url`` is not a usable s3:// URL."""
        try:
            parts = urllib.parse.urlsplit(url)
            query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True,
                                           strict_parsing=bool(parts.query))
        except ValueError as exc:
            raise ConfigError(f"{what} {url!r}: {exc}") from None
        if parts.scheme != "s3":
            raise ConfigError(f"{what} {url!r}: expected s3://BUCKET[/PREFIX]?endpoint=...")
        if "@" in parts.netloc:
            raise ConfigError(f"{what}: put no credentials in the URL (use the environment "
                              "or a profile)")
        bucket = parts.netloc
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise ConfigError(f"{what} {url!r}: {bucket!r} is not a bucket name (3 to 63 "
                              "letters, digits, '.', '-', '_')")
        segments = [s for s in parts.path.split("/") if s]
        if any(not _SEGMENT.fullmatch(s) for s in segments) or parts.fragment:
            raise ConfigError(f"{what} {url!r}: the key prefix may hold letters, digits and "
                              "'._+=:@-' between slashes, and no fragment")
        params: dict[str, str] = {}
        for name, value in query:
            if name not in PARAMETERS:
                raise ConfigError(f"{what} {url!r}: unknown parameter {name!r} (known: "
                                  f"{', '.join(PARAMETERS)})")
            if name in params:
                raise ConfigError(f"{what} {url!r}: parameter {name!r} given twice")
            params[name] = value
        region = params.get("region") or DEFAULT_REGION
        scheme = params.get("scheme", "https")
        if scheme not in ("http", "https"):
            raise ConfigError(f"{what} {url!r}: scheme must be http or https")
        single = params.get("single-writer", "0").lower()
        if single not in _TRUE + _FALSE:
            raise ConfigError(f"{what} {url!r}: single-writer must be 1 or 0")
        raw_endpoint = params.get("endpoint")
        if raw_endpoint:
            given = raw_endpoint if "://" in raw_endpoint else f"{scheme}://{raw_endpoint}"
            endpoint = Endpoint.parse(given, f"{what} {url!r}: endpoint")
            if endpoint.base:
                raise ConfigError(f"{what} {url!r}: the endpoint takes no path")
            path_style = True
        elif "." in bucket or bucket.lower() != bucket:
            endpoint = Endpoint("https", f"s3.{region}.amazonaws.com", None, "")
            path_style = True
        else:
            endpoint = Endpoint("https", f"{bucket}.s3.{region}.amazonaws.com", None, "")
            path_style = False
        shown = {k: v for k, v in params.items() if k != "single-writer" and v}
        canonical = f"s3://{bucket}" + "".join(f"/{s}" for s in segments)
        if shown:
            canonical += "?" + "&".join(f"{k}={v}" for k, v in shown.items())
        return cls(bucket, "/".join(segments), endpoint, path_style, region,
                   params.get("profile") or None, single in _TRUE, canonical)

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def target(self, rel: str) -> str:
        """The request path for ``rel``, encoded as SigV4 canonicalises it (every byte but
        letters, digits and ``-._~`` escaped; ``/`` kept)."""
        path = f"/{self.bucket}/{self.key(rel)}" if self.path_style else f"/{self.key(rel)}"
        return urllib.parse.quote(path, safe="/~")


# ------------------------------------------------------------------------ credentials


def load_credentials(loc: S3Location, what: str) -> Credentials | None:
    """The standard chain, restricted to what never touches the network (see the module
    docstring); None when there is nothing (anonymous)."""
    try:
        from botocore.credentials import (
            ConfigProvider,
            CredentialProvider,
            CredentialResolver,
            EnvProvider,
            SharedCredentialProvider,
        )
        from botocore.exceptions import BotoCoreError
    except ImportError:
        raise ConfigError(f"{what} {loc.url}: S3 stores need botocore; install the 's3' extra "
                          "(pip install 'tracehook[s3]')") from None
    env = os.environ
    chosen = loc.profile or env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE")
    profile = chosen or "default"
    creds_file = os.path.expanduser(env.get("AWS_SHARED_CREDENTIALS_FILE")
                                    or "~/.aws/credentials")
    config_file = os.path.expanduser(env.get("AWS_CONFIG_FILE") or "~/.aws/config")
    providers: list[CredentialProvider] = [] if loc.profile else [EnvProvider()]
    providers += [SharedCredentialProvider(creds_file, profile),
                  ConfigProvider(config_file, profile)]
    try:
        creds = CredentialResolver(providers).load_credentials()
    except BotoCoreError as exc:  # e.g. a key id without its secret; names no secret
        raise ConfigError(f"{what} {loc.url}: S3 credentials: {exc}") from None
    if creds is None and chosen:  # a profile named but not found: not anonymous
        raise ConfigError(f"{what} {loc.url}: profile {chosen!r} has no credentials in "
                          f"{creds_file} or {config_file}")
    return creds


def _source(creds: Credentials | None, loc: S3Location) -> str:
    if creds is None:
        return "anonymous"
    method = getattr(creds, "method", "")
    if method == "env":
        return "credentials from the environment (AWS_ACCESS_KEY_ID)"
    if method == "explicit":
        return "credentials given explicitly"
    profile = loc.profile or os.environ.get("AWS_PROFILE") or \
        os.environ.get("AWS_DEFAULT_PROFILE") or "default"
    where = "credentials file" if method == "shared-credentials-file" else "config file"
    return f"profile {profile!r} from the AWS {where}"


# ------------------------------------------------------------------------------ client


class S3Client:
    """Signed requests to one bucket through the one HTTP client. Thread-safe."""

    def __init__(self, loc: S3Location, what: str, timeout: float = DEFAULT_TIMEOUT,
                 deadline: float | None = None, keys: tuple[str, str] | None = None) -> None:
        """``keys``: an access key and its secret given explicitly (tools and tests);
        default: the credential chain."""
        self.loc = loc
        self.what = what
        self.http = HttpClient(loc.endpoint, timeout, deadline)
        self.deadline = self.http.deadline
        host = loc.endpoint.url.split("://", 1)[1]
        default_port = 443 if loc.endpoint.scheme == "https" else 80
        self._host = host.removesuffix(f":{default_port}")
        self._origin = f"{loc.endpoint.scheme}://{self._host}"
        if keys is not None:
            from botocore.credentials import Credentials

            creds: Credentials | None = Credentials(*keys, method="explicit")
        else:
            creds = load_credentials(loc, what)
        self.source = _source(creds, loc)
        self._auth: S3SigV4Auth | None = None
        if creds is not None:
            from botocore.auth import S3SigV4Auth

            self._auth = S3SigV4Auth(creds, "s3", loc.region)
        self.retried = 0  # requests repeated after a 5xx, a timeout or a dropped connection

    def _headers(self, method: str, target: str, headers: Mapping[str, str] | None,
                 body: bytes | None) -> dict[str, str]:
        hdrs = {"Host": self._host, **(headers or {})}
        if self._auth is None:
            return hdrs
        from botocore.awsrequest import AWSRequest

        req = AWSRequest(method=method, url=self._origin + target, data=body or b"",
                         headers=hdrs)
        self._auth.add_auth(req)
        return {str(k): str(v) for k, v in req.headers.items()}

    def _check(self, resp: Response) -> Response:
        code = error_code(resp)
        if code in CREDENTIAL_CODES:
            hint = {"RequestTimeTooSkewed": "this machine's clock is off",
                    "AuthorizationHeaderMalformed": f"check region= (now {self.loc.region})",
                    }.get(code or "", "check the secret key")
            raise CredentialsRejected(f"{self.what} {self.loc.url}: the S3 service rejected "
                                      f"the request signature ({code}; {self.source}): {hint}")
        return resp

    def _pause(self, started: float, delay: float) -> bool:
        """Sleep ``delay`` (jittered) if the deadline leaves room for one more try."""
        if time.monotonic() - started + delay >= self.deadline:
            return False
        time.sleep(random.uniform(delay / 2, delay))
        self.retried += 1
        return True

    def request(self, method: str, rel: str, *, headers: Mapping[str, str] | None = None,
                body: bytes | None = None, limit: int = MAX_SMALL,
                retry: bool | None = None, target: str | None = None) -> Response:
        """One request for key ``rel`` (or the raw ``target``), retried as the module
        docstring says (``retry`` defaults to GET/HEAD only). Unreachable when no answer
        came within the deadline; CredentialsRejected; otherwise the answer, any status."""
        target = self.loc.target(rel) if target is None else target
        retry = method in ("GET", "HEAD") if retry is None else retry
        started, delay = time.monotonic(), BACKOFF_FIRST
        while True:
            left = self.deadline - (time.monotonic() - started)
            try:
                resp = self.http.request(method, target, body=body, limit=limit,
                                         headers=self._headers(method, target, headers, body),
                                         deadline=max(left, 0.01))
            except Unreachable as exc:
                refused = isinstance(exc.__cause__, ConnectionRefusedError)
                if retry and not refused and self._pause(started, delay):
                    delay = min(BACKOFF_MAX, delay * 2)
                    continue
                raise Unreachable(exc.diagnostics()) from exc  # final: not worth repeating
            if retry and resp.status in RETRY_STATUS and self._pause(started, delay):
                delay = min(BACKOFF_MAX, delay * 2)
                continue
            return self._check(resp)

    def open(self, rel: str) -> Body | Response:
        """A streamed GET (a NAR), its headers retried like :meth:`request`: the body to
        read when the answer is 2xx, else the error answer, read (it is small)."""
        target = self.loc.target(rel)
        started, delay = time.monotonic(), BACKOFF_FIRST
        while True:
            try:
                body = self.http.open(target, self._headers("GET", target, None, None))
            except Unreachable as exc:
                if not isinstance(exc.__cause__, ConnectionRefusedError) and \
                        self._pause(started, delay):
                    delay = min(BACKOFF_MAX, delay * 2)
                    continue
                raise
            if body.status in RETRY_STATUS and self._pause(started, delay):
                body.close()
                delay = min(BACKOFF_MAX, delay * 2)
                continue
            if body.status < 300:
                return body
            try:
                data = bytearray()
                for block in body.chunks():
                    data += block
                    if len(data) > 65536:
                        break
            finally:
                body.close()
            return self._check(Response(body.status, body.headers, bytes(data)))

    def close(self) -> None:
        self.http.close()


# ------------------------------------------------------------------------ trace store


class S3TraceStore(HttpTraceStore):
    """``PREFIX/traces/<key>`` in a bucket: laut's protocol (GET; PUT with ``If-None-Match:
    *`` or ``If-Match: ETAG``), the compare-and-swap loop of :class:`HttpTraceStore`."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT,
                 deadline: float | None = None) -> None:
        loc = S3Location.parse(url, "trace store URL")
        self.s3 = S3Client(loc, "trace store", timeout, deadline)
        self.url = loc.url
        self._init_writes(loc.single_writer)

    def _send(self, method: str, rel: str, headers: Mapping[str, str] | None = None,
              body: bytes | None = None, limit: int = MAX_TRACE_FILE) -> Response:
        try:
            return self.s3.request(method, rel, headers=headers, body=body, limit=limit,
                                   retry=True)
        except Unreachable as exc:
            raise TraceStoreFault(f"trace store {self.url}: {exc.diagnostics()}") from exc

    def _kind(self, method: str, resp: Response) -> StatusKind:
        code = error_code(resp)
        if code == "NoSuchBucket":
            return "fault"
        if method == "PUT" and resp.status == 404:
            return "conflict"  # If-Match on a key deleted meanwhile (AWS answers 404)
        return status_kind(resp.status)

    def _answer(self, resp: Response) -> str:
        return describe(resp)


# ------------------------------------------------------------------------ binary cache


class S3Upstream:
    """A binary cache in a bucket, laid out as ``nix copy --to s3://`` writes it."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT,
                 deadline: float | None = None) -> None:
        loc = S3Location.parse(url, "upstream")
        if loc.single_writer:
            raise ConfigError(f"upstream {url!r}: single-writer is a trace store parameter")
        self.s3 = S3Client(loc, "binary cache", timeout, deadline)
        self.url = loc.url

    def _kind(self, status: int, code: str | None, rel: str) -> StatusKind:
        if code == "NoSuchBucket":
            raise UpstreamFault(f"binary cache {self.url}: the bucket does not exist")
        return status_kind(status, (403, 404, 410))

    def get(self, rel: str) -> bytes | None:
        try:
            resp = self.s3.request("GET", check_relative(rel), limit=MAX_SMALL)
        except CredentialsRejected as exc:
            raise UpstreamFault(exc.diagnostics()) from exc
        except Unreachable as exc:
            raise UpstreamFault(f"binary cache {self.url}: {exc.diagnostics()}") from exc
        kind = self._kind(resp.status, error_code(resp), rel)
        if kind == "absent":
            return None
        if kind != "ok":
            raise UpstreamFault(f"binary cache {self.url}: {describe(resp)} for {rel}")
        return resp.body

    def open(self, rel: str) -> RemoteBody | None:
        try:
            got = self.s3.open(check_relative(rel))
        except CredentialsRejected as exc:
            raise UpstreamFault(exc.diagnostics()) from exc
        except Unreachable as exc:
            raise UpstreamFault(f"binary cache {self.url}: {exc.diagnostics()}") from exc
        if isinstance(got, Response):
            if self._kind(got.status, error_code(got), rel) == "absent":
                return None
            raise UpstreamFault(f"binary cache {self.url}: {describe(got)} for {rel}")
        return RemoteBody(got, f"{self.url}: ")
