"""Trace stores: many concurrent writers never lose each other's signatures."""

from __future__ import annotations

import concurrent.futures
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from tracehook.errors import ConfigError, EnvironmentFault, ParseError
from tracehook.stores import tracestore
from tracehook.trace.jws import render_trace_file
from traceserver import serve_traces

KEY = "286wqgdqv715j8yrca9lkzhyk9j3s9a8"
WRITERS = 16
PER_WRITER = 6


def named(*rows: tuple[object, ...]) -> list[Any]:
    return [pytest.param(*row, id=str(row[0])) for row in rows]


def _write_all(url: str, writer: int) -> None:
    store = tracestore.open_store(url)
    for n in range(PER_WRITER):
        store.append(KEY, [f"writer{writer}.sig{n}.x"])


def _expected() -> set[str]:
    return {f"writer{w}.sig{n}.x" for w in range(WRITERS) for n in range(PER_WRITER)}


def test_http_concurrent_writers_lose_nothing() -> None:
    with serve_traces() as server:
        barrier = threading.Barrier(WRITERS)

        def writer(w: int) -> None:
            barrier.wait()
            _write_all(server.url, w)

        with concurrent.futures.ThreadPoolExecutor(WRITERS) as pool:
            list(pool.map(writer, range(WRITERS)))
        got = tracestore.open_store(server.url).get(KEY)
        assert len(got) == len(set(got)) == WRITERS * PER_WRITER
        assert set(got) == _expected()
        assert server.state.conflicts > 0  # the test did exercise the conflict path


def test_file_concurrent_processes_lose_nothing(tmp_path: Path) -> None:
    url = f"file://{tmp_path}"
    with concurrent.futures.ProcessPoolExecutor(8) as pool:
        list(pool.map(_write_all, [url] * WRITERS, range(WRITERS)))
    got = tracestore.open_store(url).get(KEY)
    assert len(got) == len(set(got)) == WRITERS * PER_WRITER
    assert set(got) == _expected()
    # The file is laut's shape: {"signatures": [...]}, indented, with a newline.
    data = (tmp_path / "traces" / KEY).read_bytes()
    assert data == render_trace_file(json.loads(data)["signatures"])


def test_http_keeps_other_signers_entry() -> None:
    with serve_traces() as server:
        server.state.files[KEY] = render_trace_file(["laut.builderB.sig"])
        store = tracestore.open_store(server.url)
        store.append(KEY, ["ours.sig.x"])
        store.append(KEY, ["ours.sig.x"])  # idempotent: no second copy, no write
        assert store.get(KEY) == ["laut.builderB.sig", "ours.sig.x"]
        assert server.state.puts == 1


def test_http_down_is_environment_fault() -> None:
    with serve_traces() as server:
        server.state.down = True
        store = tracestore.open_store(server.url)
        with pytest.raises(EnvironmentFault, match="503"):
            store.append(KEY, ["a.b.c"])
        with pytest.raises(EnvironmentFault):
            store.get(KEY)


def test_http_unreachable_is_environment_fault() -> None:
    with serve_traces() as server:
        url = server.url
    store = tracestore.open_store(url, timeout=2)
    with pytest.raises(EnvironmentFault, match="unreachable"):
        store.get(KEY)


def test_http_without_etag_refuses_blind_overwrite() -> None:
    with serve_traces() as server:
        server.state.send_etag = False
        server.state.files[KEY] = render_trace_file(["theirs.sig.x"])
        store = tracestore.open_store(server.url)
        with pytest.raises(EnvironmentFault, match="ETag"):
            store.append(KEY, ["ours.sig.x"])
        assert store.get(KEY) == ["theirs.sig.x"]


def test_http_corrupt_remote_file_is_not_overwritten() -> None:
    with serve_traces() as server:
        server.state.files[KEY] = b"<html>oops</html>"
        store = tracestore.open_store(server.url)
        with pytest.raises(ParseError):
            store.append(KEY, ["ours.sig.x"])
        assert server.state.files[KEY] == b"<html>oops</html>"


@pytest.mark.parametrize(
    ("case", "url", "error"),
    named(
        ("ftp scheme", "ftp://example.org/x", ConfigError),
        ("relative path", "traces", ConfigError),
        ("file with host", "file://host/dir", ConfigError),
        ("http without host", "http:///x", ConfigError),
    ),
)
def test_open_store_rejects(case: str, url: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        tracestore.open_store(url)


@pytest.mark.parametrize(
    ("case", "key"),
    named(
        ("path traversal", "../../etc/passwd"),
        ("too short", "abc"),
        ("letter e not in nix32", "e" * 32),
        ("lock file", ".lock"),
    ),
)
def test_bad_keys_refused(case: str, key: str, tmp_path: Path) -> None:
    store = tracestore.open_store(str(tmp_path))
    with pytest.raises(ParseError):
        store.get(key)
    with pytest.raises(ParseError):
        store.append(key, ["a.b.c"])
