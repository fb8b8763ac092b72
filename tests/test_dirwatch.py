"""stores/dirwatch.py: a directory's written names, from Linux inotify, on real files."""

from __future__ import annotations

import os
import struct
import sys
import time
from pathlib import Path

import pytest

from tracehook.stores.dirwatch import ENDED, OVERFLOW, DirWatch, parse_events


def _record(mask: int, name: bytes = b"") -> bytes:
    padded = name + b"\0" * (16 - len(name) % 16) if name else b""  # (NUL-ended, padded)
    return struct.pack("iIII", 1, mask, 0, len(padded)) + padded


def test_names_written_created_or_moved_in_are_told(tmp_path: Path) -> None:
    with DirWatch.open(str(tmp_path)) as watch:  # type: ignore[union-attr]
        assert watch.wait(0.01) == set()
        (tmp_path / "a.drv").write_text("Derive(")
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "inner").write_text("x")  # (not the directory's own entry)
        outside = tmp_path.parent / f"{tmp_path.name}-b.drv"
        outside.write_text("Derive(")
        outside.rename(tmp_path / "b.drv")
        got: set[str] = set()
        deadline = time.monotonic() + 5
        while got != {"a.drv", "out", "b.drv"} and time.monotonic() < deadline:
            got |= watch.wait(0.5)
        assert got == {"a.drv", "out", "b.drv"}
        assert watch.wait(0.01) == set()  # each told once


def test_a_wait_with_nothing_written_lasts_its_timeout(tmp_path: Path) -> None:
    with DirWatch.open(str(tmp_path)) as watch:  # type: ignore[union-attr]
        started = time.monotonic()
        assert watch.wait(0.2) == set()
        assert 0.15 <= time.monotonic() - started < 2


def test_a_removed_directory_ends_the_watch(tmp_path: Path) -> None:
    watched = tmp_path / "store"
    watched.mkdir()
    watch = DirWatch.open(str(watched))
    assert watch is not None
    watched.rmdir()
    got: set[str] = set()
    deadline = time.monotonic() + 5
    while ENDED not in got and time.monotonic() < deadline:
        got |= watch.wait(0.5)
    assert ENDED in got
    watch.close()
    watch.close()  # (twice is harmless)


def test_no_watch_of_a_directory_that_is_not_there(tmp_path: Path) -> None:
    assert DirWatch.open(str(tmp_path / "absent")) is None
    (tmp_path / "file").write_text("")
    assert DirWatch.open(str(tmp_path / "file" / "below")) is None


def test_events_are_parsed_overflow_and_short_records_said() -> None:
    data = _record(0x8, b"a.drv") + _record(0x100, b"out") + _record(0x80, b"b")
    assert parse_events(data) == {"a.drv", "out", "b"}
    assert parse_events(_record(0x4000)) == {OVERFLOW}  # the kernel's queue overflowed
    assert parse_events(_record(0x8000)) == {ENDED}  # the watch is gone
    assert parse_events(_record(0x8, b"a.drv")[:-3]) == {OVERFLOW}  # cut short
    assert parse_events(b"\0" * 7) == {OVERFLOW}
    assert parse_events(b"") == set()
    assert parse_events(_record(0x8, os.fsencode("é.drv"))) == {"é.drv"}


def test_a_wait_is_woken_from_another_thread(tmp_path: Path) -> None:
    import threading

    watch = DirWatch.open(str(tmp_path))
    assert watch is not None
    threading.Timer(0.1, watch.wake).start()
    started = time.monotonic()
    assert watch.wait(10) == set()
    assert time.monotonic() - started < 5
    (tmp_path / "a.drv").write_text("")  # (told after a wake as before it)
    assert watch.wait(5) == {"a.drv"}
    watch.close()
    watch.wake()  # (after close: nothing, no error)


def test_no_watch_where_there_is_no_inotify(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Another system, or inotify's limits reached: no watch (the index then looks every
    interval), never an error."""
    from tracehook.stores import dirwatch

    monkeypatch.setattr(sys, "platform", "darwin")
    dirwatch._libc.cache_clear()
    try:
        assert DirWatch.open(str(tmp_path)) is None
    finally:
        monkeypatch.undo()
        dirwatch._libc.cache_clear()

    class Exhausted:  # inotify_init1 failing as at fs.inotify.max_user_instances
        @staticmethod
        def inotify_init1(flags: int) -> int:
            return -1

    monkeypatch.setattr(dirwatch, "_libc", lambda: Exhausted())
    assert DirWatch.open(str(tmp_path)) is None
