"""Bounded reads of regular files only: what a hostile writer of a store directory tries."""

from __future__ import annotations

import os
import resource
import threading
from pathlib import Path

import pytest

from tracehook.errors import EnvironmentFault, TraceStoreFault
from tracehook.stores.files import read_bounded
from tracehook.stores.tracestore import FileTraceStore

KEY = "0" * 32


def test_regular_file_within_the_limit(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    assert read_bounded(tmp_path / "f", 3, "file") == b"abc"
    assert read_bounded(tmp_path / "missing", 3, "file") is None
    assert read_bounded(tmp_path / "missing" / "deeper", 3, "file") is None


@pytest.mark.parametrize("attack", ["symlink-to-dev-zero", "fifo", "directory", "oversized",
                                    "symlink-to-regular-file"])
def test_attacks_are_faults_not_hangs_or_memory(tmp_path: Path, attack: str) -> None:
    path = tmp_path / "t"
    if attack == "symlink-to-dev-zero":
        path.symlink_to("/dev/zero")
    elif attack == "fifo":
        os.mkfifo(path)
    elif attack == "directory":
        path.mkdir()
    elif attack == "oversized":
        path.write_bytes(b"x" * 1001)
    else:
        (tmp_path / "real").write_bytes(b"{}")
        path.symlink_to(tmp_path / "real")
    done: list[BaseException] = []

    def read() -> None:
        try:
            read_bounded(path, 1000, "trace file")
        except BaseException as exc:
            done.append(exc)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "read_bounded hung"
    assert len(done) == 1 and isinstance(done[0], EnvironmentFault)
    assert str(path) in done[0].diagnostics()


def test_file_trace_store_bounds_a_huge_trace_file(tmp_path: Path) -> None:
    """A 300 MB trace file (sparse) is refused before it is read, as a fault naming it."""
    traces = tmp_path / "traces"
    traces.mkdir()
    with open(traces / KEY, "wb") as f:
        f.truncate(300 * 1024 * 1024)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    store = FileTraceStore(f"file://{tmp_path}", tmp_path)
    with pytest.raises(TraceStoreFault, match="larger than 16777216 bytes"):
        store.get(KEY)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024


def test_file_trace_store_refuses_dev_zero_symlink(tmp_path: Path) -> None:
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / KEY).symlink_to("/dev/zero")
    store = FileTraceStore(f"file://{tmp_path}", tmp_path)
    with pytest.raises(TraceStoreFault, match="symlink"):
        store.get(KEY)


@pytest.mark.parametrize(("raw", "shown"), [
    ("plain kid:abc", "plain kid:abc"),
    ("kid\ntracehook-gate: allowed /nix/store/x", "kid\\ntracehook-gate: allowed /nix/store/x"),
    ("a\rb\tc\\d", "a\\rb\\tc\\\\d"),
    ("esc\x1b[31mred", "esc\\x1b[31mred"),
    ("nel\x85 ls\u2028", "nel\\x85 ls\\u2028"),
    ("ünïcode ok", "ünïcode ok"),
])
def test_printable_keeps_untrusted_text_on_one_line(raw: str, shown: str) -> None:
    from tracehook.text import printable

    assert printable(raw) == shown
    assert "\n" not in printable(raw) and "\r" not in printable(raw)
