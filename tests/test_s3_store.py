"""S3 trace stores and binary caches on a real SeaweedFS (tests/seaweed.py): URLs, reads
(anonymous), the compare-and-swap append under many concurrent writer processes, wrong
credentials, 500s and slow answers retried within the deadline, missing buckets as faults.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from seaweed import BUILDER_A, BUILDER_B, READER, Seaweed, clean_aws_env, fault_proxy
from tracehook.errors import (
    ConfigError,
    CredentialsRejected,
    EnvironmentFault,
    TraceStoreFault,
    UpstreamFault,
)
from tracehook.stores import tracestore
from tracehook.stores.binarycache import open_upstream
from tracehook.stores.s3 import S3Location, S3TraceStore, S3Upstream
from tracehook.trace.jws import render_trace_file

KEYS = [c * 32 for c in "0123456789abcdfghijklmnpqrsvwxyz"]


def named(*rows: tuple[object, ...]) -> list[Any]:
    return [pytest.param(*row, id=str(row[0])) for row in rows]


# --------------------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    ("case", "url", "want"),
    named(
        ("endpoint host:port", "s3://traces?endpoint=127.0.0.1:9000&scheme=http",
         ("traces", "", "http://127.0.0.1:9000", True, "us-east-1", None, False)),
        ("prefix, region, profile", "s3://bkt/fleet/one?endpoint=s3.example.org&region=eu-1"
         "&profile=ci", ("bkt", "fleet/one", "https://s3.example.org", True, "eu-1", "ci", False)),
        ("endpoint as URL", "s3://bkt?endpoint=http://minio:9000",
         ("bkt", "", "http://minio:9000", True, "us-east-1", None, False)),
        ("AWS, virtual-hosted", "s3://my-bucket?region=eu-west-1",
         ("my-bucket", "", "https://my-bucket.s3.eu-west-1.amazonaws.com", False, "eu-west-1",
          None, False)),
        ("AWS, dotted bucket: path-style", "s3://my.bucket",
         ("my.bucket", "", "https://s3.us-east-1.amazonaws.com", True, "us-east-1", None,
          False)),
        ("single writer", "s3://bkt?endpoint=h:1&single-writer=1",
         ("bkt", "", "https://h:1", True, "us-east-1", None, True)),
    ),
)
def test_s3_url(case: str, url: str, want: tuple[object, ...]) -> None:
    loc = S3Location.parse(url, "trace store URL")
    got = (loc.bucket, loc.prefix, loc.endpoint.url, loc.path_style, loc.region, loc.profile,
           loc.single_writer)
    assert got == want
    assert "single-writer" not in loc.url


def test_s3_target_is_sigv4_canonical() -> None:
    loc = S3Location.parse("s3://bkt/p?endpoint=h:1", "x")
    assert loc.target("realisations/sha256:ab!out.doi") == \
        "/bkt/p/realisations/sha256%3Aab%21out.doi"


@pytest.mark.parametrize(
    ("case", "url", "message"),
    named(
        ("unknown parameter", "s3://bkt?endpoint=h:1&regoin=x", "unknown parameter 'regoin'"),
        ("credentials in URL", "s3://key:secret@bkt?endpoint=h:1", "no credentials"),
        ("bad bucket", "s3://B_/x", "not a bucket name"),
        ("traversal in prefix", "s3://bucket/../x?endpoint=h:1", "key prefix"),
        ("bad scheme", "s3://bucket?scheme=ftp", "scheme must be"),
        ("endpoint with path", "s3://bucket?endpoint=http://h:1/p", "takes no path"),
        ("given twice", "s3://bucket?region=a&region=b", "given twice"),
        ("single-writer typo", "s3://bucket?single-writer=maybe", "single-writer"),
    ),
)
def test_s3_url_refused(case: str, url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        S3Location.parse(url, "trace store URL")


def test_http_single_writer_parameter() -> None:
    store = tracestore.open_store("http://127.0.0.1:1/t?single-writer=1")
    assert isinstance(store, tracestore.HttpTraceStore) and store.single_writer
    with pytest.raises(ConfigError, match="single-writer"):
        tracestore.open_store("http://127.0.0.1:1/t?other=1")


def test_commands_that_do_not_touch_s3_do_not_import_botocore() -> None:
    """``tracehook --version``, the parser of every subcommand, and the post-build hook's
    client (on every build's hot path) stay free of botocore."""
    code = (
        "import sys\n"
        "from tracehook import cli\n"
        "from tracehook.signer import agent_client\n"
        "assert cli.main(['--version']) == 0\n"
        "cli.build_parser()\n"
        "from tracehook.stores import tracestore, binarycache\n"
        "tracestore.open_store('file:///tmp'); tracestore.open_store('http://h:1')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('botocore', 'boto3')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


# ----------------------------------------------------------------- reads and writes


def test_round_trip_anonymous_read(seaweed: Seaweed, anonymous_env: dict[str, str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = seaweed.bucket("rt")
    url = seaweed.url(bucket, "fleet")
    reader = tracestore.open_store(url)  # anonymous: no credentials in the environment
    assert isinstance(reader, S3TraceStore) and reader.s3.source == "anonymous"
    assert reader.get(KEYS[0]) == []
    with pytest.raises(ConfigError, match="may not write"):  # anonymous may not write
        reader.append(KEYS[0], ["a.b.c"])
    for name, value in BUILDER_A.env().items():
        monkeypatch.setenv(name, value)
    writer = tracestore.open_store(url)
    writer.append(KEYS[0], ["one.sig.x"])
    writer.append(KEYS[0], ["two.sig.x", "one.sig.x"])
    writer.append(KEYS[0], ["one.sig.x"])  # already there: no write
    assert reader.get(KEYS[0]) == ["one.sig.x", "two.sig.x"]
    raw = seaweed.client(bucket).request("GET", f"fleet/traces/{KEYS[0]}")
    assert raw.body == render_trace_file(["one.sig.x", "two.sig.x"])  # laut's file shape
    assert isinstance(writer, S3TraceStore) and writer.puts == 2


def test_missing_bucket_is_a_fault_not_absent(seaweed: Seaweed,
                                              anonymous_env: dict[str, str]) -> None:
    store = tracestore.open_store(seaweed.url("no-such-bucket-here"))
    with pytest.raises(TraceStoreFault, match="NoSuchBucket"):
        store.get(KEYS[1])
    up = open_upstream(seaweed.url("no-such-bucket-here"))
    with pytest.raises(UpstreamFault, match="does not exist"):
        up.get("nix-cache-info")


def test_stopped_endpoint_is_a_fault(anonymous_env: dict[str, str]) -> None:
    from seaweed import free_ports

    store = tracestore.open_store(f"s3://bkt?endpoint=127.0.0.1:{free_ports(1)[0]}&scheme=http")
    started = time.monotonic()
    with pytest.raises(TraceStoreFault, match="refused"):
        store.get(KEYS[2])
    assert time.monotonic() - started < 2  # a refused connection is not retried


_start: Any = None


def _init_writer(barrier: Any) -> None:
    global _start
    _start = barrier


def _key(writer: int, r: int, s: int) -> str:
    """The first two rounds: every writer appends to one hot key, 60 times in a row (they
    collide: writers going through many keys in one order form a pipeline a few ms apart
    and rarely meet); then each writer its own order of the shared keys."""
    return KEYS[0] if r < 2 else KEYS[(s + writer) % len(KEYS)]


def _append_rounds(url: str, writer: int, rounds: int, steps: int) -> tuple[int, int]:
    """One writer process: every round, a signature of its own on each shared key."""
    store = tracestore.open_store(url)
    assert isinstance(store, S3TraceStore)
    store.check_preconditions()  # the probe, and a warm connection, before the start line
    _start.wait(60)  # all writers start together
    for r in range(rounds):
        for s in range(steps):
            store.append(_key(writer, r, s), [f"w{writer}.r{r}.s{s}"])
    return store.puts, store.conflicts


def test_concurrent_writer_processes_lose_no_signature(seaweed: Seaweed) -> None:
    """3 processes x 30 steps x 4 rounds on overlapping keys: every signature survives."""
    import multiprocessing

    bucket = seaweed.bucket("conc")
    url = seaweed.url(bucket)
    writers, rounds, steps = 3, 4, 30
    saved = {k: os.environ.get(k) for k in BUILDER_A.env()}
    os.environ.update(BUILDER_A.env())  # inherited by the worker processes
    try:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
                writers, mp_context=ctx, initializer=_init_writer,
                initargs=(ctx.Barrier(writers),)) as pool:
            stats = list(pool.map(_append_rounds, [url] * writers, range(writers),
                                  [rounds] * writers, [steps] * writers))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    reader = S3TraceStore(url)
    expected: dict[str, set[str]] = {}
    for w in range(writers):
        for r in range(rounds):
            for s in range(steps):
                expected.setdefault(_key(w, r, s), set()).add(f"w{w}.r{r}.s{s}")
    for key, sigs in expected.items():
        got = reader.get(key)
        assert len(got) == len(set(got)), key  # no duplicates
        assert set(got) == sigs, key
    assert sum(c for _, c in stats) > 0, stats  # writers did collide (412/409 retried)


# -------------------------------------------------------------------- credentials


def _publish_cli(url: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``tracehook publish --to URL`` with an empty spool: opens the store and probes it."""
    code = ("import sys; from tracehook import cli; sys.exit(cli.main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, "publish", "--spool-dir",
                           env["SPOOL"], "--to", url], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize(
    ("case", "keys", "code"),
    named(
        ("wrong secret", (BUILDER_A.access_key, "not-the-secret"), "SignatureDoesNotMatch"),
        ("unknown access key", ("NOSUCHACCESSKEY000", "whatever-secret"), "InvalidAccessKeyId"),
    ),
)
def test_wrong_credentials_are_one_clear_line(seaweed: Seaweed, tmp_path: Any, case: str,
                                              keys: tuple[str, str], code: str) -> None:
    """Exit 2 (configuration), one line naming the S3 code and where the keys came from,
    and never the secret."""
    env = clean_aws_env() | {"AWS_ACCESS_KEY_ID": keys[0], "AWS_SECRET_ACCESS_KEY": keys[1],
                             "SPOOL": str(tmp_path / "spool")}
    out = _publish_cli(seaweed.url(seaweed.bucket("cred")), env)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert code in lines[0] and "environment" in lines[0], lines[0]
    assert keys[1] not in out.stderr and keys[1] not in out.stdout


def test_wrong_secret_reads_are_faults(seaweed: Seaweed,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", BUILDER_B.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    bucket = seaweed.bucket("credr")
    with pytest.raises(CredentialsRejected) as info:
        tracestore.open_store(seaweed.url(bucket)).get(KEYS[3])
    assert isinstance(info.value, EnvironmentFault)  # to a reader: could not check
    assert info.value.exit_code == 2
    with pytest.raises(UpstreamFault, match="SignatureDoesNotMatch"):
        S3Upstream(seaweed.url(bucket)).get("nix-cache-info")


def test_reader_credentials_cannot_publish(seaweed: Seaweed,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in READER.env().items():
        monkeypatch.setenv(name, value)
    store = tracestore.open_store(seaweed.url(seaweed.bucket("ro")))
    assert store.get(KEYS[4]) == []
    with pytest.raises(ConfigError, match=r"AccessDenied.*may not write"):
        tracestore.check_for_writing(store)


def test_explicit_profile(seaweed: Seaweed, tmp_path: Any,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    """profile= reads the shared credentials file and ignores the environment's keys."""
    creds = tmp_path / "credentials"
    creds.write_text(f"[fleet]\naws_access_key_id = {BUILDER_A.access_key}\n"
                     f"aws_secret_access_key = {BUILDER_A.secret_key}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "IGNOREDKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ignored")
    bucket = seaweed.bucket("prof")
    store = tracestore.open_store(seaweed.url(bucket, profile="fleet"))
    store.append(KEYS[5], ["by.profile.x"])
    assert store.get(KEYS[5]) == ["by.profile.x"]
    with pytest.raises(ConfigError, match="profile 'other' has no credentials"):
        tracestore.open_store(seaweed.url(bucket, profile="other"))


# ------------------------------------------------------- 500s and slow answers


def test_500s_and_slow_answers_are_retried(seaweed: Seaweed,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in BUILDER_A.env().items():
        monkeypatch.setenv(name, value)
    bucket = seaweed.bucket("flaky")
    with fault_proxy(seaweed) as proxy:
        store = S3TraceStore(proxy.url(bucket), timeout=0.5, deadline=3.0)
        proxy.faults.fail_next = 3
        store.append(KEYS[6], ["through.500s.x"])  # probe and append, after three 500s
        assert store.s3.retried >= 3
        proxy.faults.slow_next, proxy.faults.delay = 1, 1.0  # longer than one read may take
        assert store.get(KEYS[6]) == ["through.500s.x"]  # (0.5 s): retried in time
        assert store.s3.retried >= 4
        # Always slower than the deadline: a fault, within the deadline (and a little).
        proxy.faults.always_slow = True
        started = time.monotonic()
        with pytest.raises(TraceStoreFault, match=r"within|timed out"):
            store.get(KEYS[6])
        assert time.monotonic() - started < 3.0 + 1.0
        # A 500 that never ends: a fault naming it, never "no trace".
        proxy.faults.always_slow, proxy.faults.fail_next = False, 10_000
        with pytest.raises(TraceStoreFault, match="500 InternalError"):
            store.get(KEYS[7])


# --------------------------------------------------------------- binary caches


def test_upstream_reads_and_streams(seaweed: Seaweed, anonymous_env: dict[str, str]) -> None:
    bucket = seaweed.bucket("cache")
    admin = seaweed.client(bucket)
    nar = os.urandom(3 * 256 * 1024 + 17)
    for rel, data in (("nix-cache-info", b"StoreDir: /nix/store\n"), ("nar/abc.nar", nar),
                      ("realisations/sha256:00!out.doi", b"{}")):
        assert admin.request("PUT", rel, body=data, limit=1 << 16).status == 200
    up = open_upstream(seaweed.url(bucket))
    assert up.get("nix-cache-info") == b"StoreDir: /nix/store\n"
    assert up.get("realisations/sha256:00!out.doi") == b"{}"
    assert up.get("missing.narinfo") is None
    assert up.open("nar/missing.nar") is None
    body = up.open("nar/abc.nar")
    assert body is not None and body.size == len(nar)
    try:
        chunks = list(body.chunks())
    finally:
        body.close()
    assert b"".join(chunks) == nar and max(len(c) for c in chunks) <= 256 * 1024


def test_append_reuses_the_read_before_it_and_a_stale_one_is_harmless() -> None:
    """A publisher reads a key, then appends: the append's first attempt takes that read
    (one GET fewer); when another writer was first meanwhile, the conditional PUT fails and
    the next attempt reads afresh: nothing is lost."""
    from traceserver import serve_traces

    with serve_traces() as server:
        ours, theirs = tracestore.open_store(server.url), tracestore.open_store(server.url)
        assert isinstance(ours, tracestore.HttpTraceStore)
        assert ours.get(KEYS[8]) == []
        theirs.append(KEYS[8], ["theirs.sig.x"])  # between our read and our append
        gets = sum(1 for m, _ in server.state.requests if m == "GET")
        ours.append(KEYS[8], ["ours.sig.x"])
        assert ours.conflicts == 1 and ours.puts == 2
        assert sum(1 for m, _ in server.state.requests if m == "GET") == gets + 1
        assert sorted(ours.get(KEYS[8])) == ["ours.sig.x", "theirs.sig.x"]
        ours.get(KEYS[9])
        ours.append(KEYS[9], ["fresh.sig.x"])  # nothing in between: no second GET
        assert ours.conflicts == 1 and ours.puts == 3
