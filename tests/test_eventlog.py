"""Event logs: one human line, one JSON line, never an exception."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest

from tracehook.errors import ParseError
from tracehook.stores.eventlog import EventLog, read_events


def test_emit_writes_both(tmp_path: Path) -> None:
    err = io.StringIO()
    log = EventLog(tmp_path / "sub" / "x.log", stderr=err)
    record = log.emit("sign", "ok", "signed it", drv="/nix/store/x.drv", outputs={"out": "/p"},
                      spool_file=tmp_path / "s.json")
    assert err.getvalue() == "tracehook: signed it\n"
    (line,) = (tmp_path / "sub" / "x.log").read_text().splitlines()
    obj = json.loads(line)
    assert obj == record
    assert list(obj)[:4] == ["time", "event", "outcome", "reason"]
    assert obj["event"] == "sign" and obj["outcome"] == "ok" and obj["reason"] is None
    assert obj["spool_file"] == str(tmp_path / "s.json")
    assert obj["time"].endswith("Z")


def test_reserved_fields_cannot_be_overridden(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "x.log", stderr=None)
    record = log.emit("sign", "failed", "h", reason="why", time="forged")
    assert record["reason"] == "why" and record["time"] != "forged"


def test_unwritable_log_warns_once_and_goes_on(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = io.StringIO()
    log = EventLog(blocker / "x.log", stderr=err)
    log.emit("sign", "ok", "first")
    log.emit("sign", "ok", "second")
    text = err.getvalue()
    assert text.count("cannot write log file") == 1
    assert "first" in text and "second" in text


def test_concurrent_writers_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "x.log"

    def worker(n: int) -> None:
        log = EventLog(path, stderr=None)
        for i in range(50):
            log.emit("sign", "ok", "h", n=n, i=i, pad="x" * 500)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = list(read_events(path))
    assert len(records) == 400


def test_non_ascii_and_odd_values(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "x.log", stderr=None)
    log.emit("sign", "ok", "h", name="ünïcödé ✓", pins=("a", "b"), n=None)
    (record,) = read_events(tmp_path / "x.log")
    assert record["name"] == "ünïcödé ✓" and record["pins"] == ["a", "b"]


def test_read_events_names_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    path.write_text('{"event":"sign","outcome":"ok"}\nnot json\n')
    with pytest.raises(ParseError, match="line 2"):
        list(read_events(path))
