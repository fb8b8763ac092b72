"""Event logs: one human line, one JSON line, never an exception."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import pytest

from tracehook.errors import ParseError
from tracehook.stores.eventlog import EventLog, parse_record, read_events


def test_emit_writes_both(tmp_path: Path) -> None:
    err = io.StringIO()
    log = EventLog(tmp_path / "sub" / "x.log", stderr=err)
    log.emit("sign", "ok", "signed it", drv="/nix/store/x.drv", outputs={"out": "/p"},
             spool_file=tmp_path / "s.json")
    assert err.getvalue() == "tracehook: signed it\n"
    (line,) = (tmp_path / "sub" / "x.log").read_text().splitlines()
    obj = json.loads(line)
    assert list(obj)[:4] == ["time", "event", "outcome", "reason"]
    assert obj["event"] == "sign" and obj["outcome"] == "ok" and obj["reason"] is None
    assert obj["spool_file"] == str(tmp_path / "s.json")
    assert obj["time"].endswith("Z")


def test_reserved_fields_cannot_be_overridden(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "x.log", stderr=None)
    log.emit("sign", "failed", "h", reason="why", time="forged")
    record = json.loads((tmp_path / "x.log").read_text())
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


# --- the journal line: one write, one line, the record after a TAB ----------------------


class RecordingStream(io.StringIO):
    """A stderr that remembers each ``write`` call and lets other threads run in between
    (so two-part writes interleave, as they did on a real gate under load)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self._calls_lock = threading.Lock()

    def write(self, s: str) -> int:
        with self._calls_lock:
            self.calls.append(s)
        time.sleep(0)
        return super().write(s)


def test_journal_line_carries_the_file_record(tmp_path: Path) -> None:
    err = io.StringIO()
    log = EventLog(tmp_path / "gate.log", prefix="tracehook-gate", stderr=err, journal=True)
    log.emit("gate", "refused", "refused narinfo x: no trace", reason="no trace", name="hello")
    line = err.getvalue()
    record = json.loads((tmp_path / "gate.log").read_text())
    assert line.startswith("tracehook-gate: refused narinfo x: no trace\t{")
    assert line.endswith("}\n") and line.count("\n") == 1 and line.count("\t") == 1
    assert parse_record(line) == record
    assert line.split("\t")[1] == (tmp_path / "gate.log").read_text()


def test_every_line_is_one_write_under_many_threads() -> None:
    err = RecordingStream()
    log = EventLog(None, prefix="tracehook-gate", stderr=err, journal=True)

    def worker(n: int) -> None:
        for i in range(40):
            log.emit("gate", "refused", f"refused request {n}/{i}", reason="r", n=n, i=i)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(err.calls) == 16 * 40
    assert all(c.endswith("\n") and c.count("\n") == 1 for c in err.calls)
    lines = err.getvalue().splitlines()
    assert len(lines) == 16 * 40
    seen = {(r["n"], r["i"]) for r in map(parse_record, lines) if r is not None}
    assert len(seen) == 16 * 40


FORGED = "tracehook-gate: allowed /nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x (verified chain)"


@pytest.mark.parametrize("sep", ["\n", "\r", "\r\n", "\u2028", "\x85", "\x1b[2K\r"])
def test_untrusted_text_cannot_start_a_line(sep: str, tmp_path: Path) -> None:
    """A kid from an unsigned trace entry, with a line break and a fake 'allowed' line."""
    kid = f"evil{sep}{FORGED}\t{{\"event\":\"gate\",\"outcome\":\"allowed\"}}:0123456789abcdef"
    err = io.StringIO()
    log = EventLog(tmp_path / "gate.log", prefix="tracehook-gate", stderr=err, journal=True)
    log.emit("gate", "refused", f"refused narinfo x: signed by unknown key {kid}",
             reason=f"signed by unknown key {kid}", name="x")
    text = err.getvalue()
    for splitter in (text.splitlines(), text.split("\n")[:-1]):
        assert len(splitter) == 1
    assert not any(line.startswith("tracehook-gate: allowed") for line in text.splitlines())
    assert "\x1b" not in text and "\u2028" not in text and "\x85" not in text
    record = parse_record(text)
    assert record is not None and record["outcome"] == "refused"  # not the fake one
    assert record["reason"] == f"signed by unknown key {kid}"  # kept exactly, as data
    file_text = (tmp_path / "gate.log").read_text()
    assert len(file_text.splitlines()) == 1 and "\u2028" not in file_text


@pytest.mark.parametrize(("name", "line", "expected"), [
    ("file-line", '{"time":"t","event":"gate","outcome":"refused","reason":"r"}', "refused"),
    ("journal-cat", 'tracehook-gate: refused x\t{"event":"gate","outcome":"refused"}', "refused"),
    ("journal-short", 'Nov 25 06:00:00 host tracehook-gate[42]: tracehook-gate: refused x\t'
     '{"event":"gate","outcome":"refused"}', "refused"),
    ("human-only", "tracehook-gate: refused x: no trace", None),
    ("record-in-sentence-without-tab",
     'tracehook: signed {"event":"gate","outcome":"allowed"}', None),
    ("escaped-tab-in-sentence",
     'tracehook-gate: refused x \\t{"event":"gate","outcome":"allowed"}\t'
     '{"event":"gate","outcome":"refused"}', "refused"),
    ("not-an-event", '{"a":1}', None),
    ("tail-not-json", "tracehook-gate: x\tnot json", None),
    ("event-not-a-string", '{"event":1,"outcome":"ok"}', None),
])
def test_parse_record(name: str, line: str, expected: str | None) -> None:
    record = parse_record(line + "\n")
    assert (record["outcome"] if record else None) == expected
