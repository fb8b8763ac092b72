"""``tracehook verify`` replays an earlier answer only when nothing it read has changed
(tracehook.verify.replay): the record, what is never replayed, what a damaged record does."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import pytest

from tracehook import cli
from tracehook.stores import readlog
from tracehook.trace import crypto
from tracehook.verify import replay

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from synth import SIGNERS, Closure, policy_text, with_policy

from testkeys import secret
from traceserver import serve_traces

REPLAYED = "replayed the answer of an earlier run"


def _run(capsys: pytest.CaptureFixture[str], c: Closure, policy: Path, cache: Path,
         *extra: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(["-v", "verify", c.target, "--policy", str(policy), "--store", str(c.root),
                     "--cache-dir", str(cache), *extra])
    got = capsys.readouterr()
    return code, got.out, got.err


def _records(cache: Path) -> list[Path]:
    return sorted((cache / "runs").glob("*.run")) if (cache / "runs").is_dir() else []


@pytest.fixture
def closure(tmp_path: Path) -> tuple[Closure, Path]:
    return with_policy(tmp_path, 30)


def test_a_second_run_is_replayed_with_its_own_reference_time(
        closure: tuple[Closure, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    c, policy = closure
    cache = tmp_path / "cache"
    code, first, err = _run(capsys, c, policy, cache, "--json")
    assert code == 0 and REPLAYED not in err
    assert len(_records(cache)) == 1
    time.sleep(0.01)
    code, second, err = _run(capsys, c, policy, cache, "--json")
    assert code == 0 and REPLAYED in err
    one, two = json.loads(first), json.loads(second)
    assert one["reference_time"] < two["reference_time"]  # the replay's own time
    two["reference_time"] = one["reference_time"]
    assert one == two
    # the human report too: the same lines, its own reference time
    code, human, _ = _run(capsys, c, policy, cache)
    code2, again, err = _run(capsys, c, policy, cache)
    assert code == code2 == 0 and REPLAYED in err
    assert human != again and human.split("reference time")[0] == again.split(
        "reference time")[0]


def _key_of(text: str, name: str) -> str:
    return text.split(f'{name} = "', 1)[1].split('"', 1)[0]


@pytest.mark.parametrize("change", ["revoked-key", "tampered-trace", "trace-removed",
                                    "trace-restored", "policy-requires-more",
                                    "expired-meanwhile"])
def test_a_replay_never_answers_what_changed(
        closure: tuple[Closure, Path], tmp_path: Path, change: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    c, policy = closure
    cache = tmp_path / "cache"
    first_trace = sorted((c.traces / "traces").iterdir())[0]
    kept = first_trace.read_bytes()
    if change == "trace-restored":  # absent at the first run: recorded as absent
        first_trace.unlink()
    if change == "expired-meanwhile":
        text = policy.read_text()
        key = _key_of(text, SIGNERS[1])
        soon = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=2)).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
        policy.write_text(text.replace(f'{SIGNERS[1]} = "{key}"',
                                       f'{SIGNERS[1]} = {{ key = "{key}", not-after = {soon} }}'))
    first, _, _ = _run(capsys, c, policy, cache)
    again, _, err = _run(capsys, c, policy, cache)
    assert again == first and REPLAYED in err  # unchanged: replayed
    if change == "revoked-key":
        text = policy.read_text()
        key = _key_of(text, SIGNERS[0])
        policy.write_text(text.replace(f'{SIGNERS[0]} = "{key}"',
                                       f'{SIGNERS[0]} = {{ key = "{key}", revoked = true }}'))
    elif change == "tampered-trace":
        doc = json.loads(kept)
        sig = doc["signatures"][0]
        doc["signatures"][0] = sig[:-2] + ("AA" if not sig.endswith("AA") else "BB")
        first_trace.write_text(json.dumps(doc))
    elif change == "trace-removed":
        first_trace.unlink()
    elif change == "trace-restored":
        first_trace.write_bytes(kept)
    elif change == "policy-requires-more":
        c_key = crypto.format_public_key(secret("builderC").public)
        policy.write_text(policy_text(c.traces, require='{ all-of = ["builderA", '
                                      '"builderB", "builderC"] }').replace(
            "[trust]", f'builderC = "{c_key}"\n\n[trust]'))
    else:
        time.sleep(2.5)
    code, out, err = _run(capsys, c, policy, cache)
    assert REPLAYED not in err
    assert code == (0 if change == "trace-restored" else 1), out
    assert first == (1 if change == "trace-restored" else 0)


def test_what_cannot_be_rechecked_is_never_recorded(
        closure: tuple[Closure, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    c, policy = closure
    # a warning (a replay would not repeat it)
    cache = tmp_path / "warned"
    assert _run(capsys, c, policy, cache, "--narinfo-from", f"file://{c.cache}")[0] == 0
    assert _records(cache) == []
    # an HTTP trace store: what a server says cannot be re-checked without asking it
    cache = tmp_path / "http"
    with serve_traces() as server:
        server.serve_copy(c.traces)
        got = _run(capsys, c, policy, cache, "--traces", server.url)
        assert got[0] == 0, got
    assert _records(cache) == []
    # a fault (exit 3): never recorded, never replayed
    cache = tmp_path / "fault"
    broken = tmp_path / "not-a-store"
    broken.mkdir()
    (broken / "traces").write_text("a file where a directory should be")
    assert _run(capsys, c, policy, cache, "--traces", f"file://{broken}")[0] == 3
    assert _records(cache) == []
    # no cache directory at all: nothing written anywhere
    code, _, _ = _run(capsys, c, policy, tmp_path / "unused", "--cache-dir", "")
    assert code == 0 and not (tmp_path / "unused").exists()


def test_what_checker_processes_read_is_recorded_too(
        closure: tuple[Closure, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Traces checked in worker processes: each batch's answer carries what the process
    read, so the run is replayed, and a trace changed afterwards is seen."""
    c, policy = closure
    cache = tmp_path / "cache"
    assert _run(capsys, c, policy, cache, "--processes", "2")[0] == 0
    (record,) = _records(cache)
    import marshal

    files = marshal.loads(record.read_bytes())["files"]
    traces = {p for p in files if p.startswith(str(c.traces))}
    assert len(traces) == len(list((c.traces / "traces").iterdir()))
    assert REPLAYED in _run(capsys, c, policy, cache, "--processes", "2")[2]
    last = sorted((c.traces / "traces").iterdir())[-1]
    last.unlink()
    code, _, err = _run(capsys, c, policy, cache, "--processes", "2")
    assert code == 1 and REPLAYED not in err


def test_a_damaged_record_is_removed_and_the_run_done_again(
        closure: tuple[Closure, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    c, policy = closure
    cache = tmp_path / "cache"
    assert _run(capsys, c, policy, cache)[0] == 0
    (record,) = _records(cache)
    good = record.read_bytes()
    for damage in (good[: len(good) // 2], b"", b"\x00not marshal at all"):
        record.write_bytes(damage)
        code, _, err = _run(capsys, c, policy, cache)
        assert code == 0 and REPLAYED not in err
        assert f"verification record {record} unusable" in err or damage == b""
        assert record.read_bytes() != damage  # rewritten by the run done again
    assert _run(capsys, c, policy, cache)[2].count(REPLAYED) == 1


def test_records_are_bounded(closure: tuple[Closure, Path], tmp_path: Path,
                             capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    c, policy = closure
    cache = tmp_path / "cache"
    monkeypatch.setattr(replay, "MAX_RECORDS", 3)
    for depth in range(100, 106):  # six different command lines
        assert _run(capsys, c, policy, cache, "--max-depth", str(depth))[0] == 0
        time.sleep(0.01)
    assert len(_records(cache)) == 3
    # the newest is kept
    assert REPLAYED in _run(capsys, c, policy, cache, "--max-depth", "105")[2]
    # and bounded in bytes: one record's size allows one record
    monkeypatch.setattr(replay, "MAX_BYTES", 100 + max(r.stat().st_size for r in _records(cache)))
    assert _run(capsys, c, policy, cache, "--max-depth", "106")[0] == 0
    assert len(_records(cache)) == 1


def test_holds_compares_every_input_and_the_side_of_every_date() -> None:
    record = {"files": {"/a": "1", "/b": None}, "stats": {"/db": (1, 2, 3, 4, 5)},
              "now": 100.0, "bounds": [150.0]}
    assert replay.holds(record, {"/a": "1", "/b": None}, {"/db": (1, 2, 3, 4, 5)}, 120.0)
    assert not replay.holds(record, {"/a": "2", "/b": None}, {"/db": (1, 2, 3, 4, 5)}, 120)
    assert not replay.holds(record, {"/a": "1", "/b": "new"}, {"/db": (1, 2, 3, 4, 5)}, 120)
    assert not replay.holds(record, {"/a": "1", "/b": None}, {"/db": (1, 2, 3, 4, 6)}, 120)
    assert not replay.holds(record, {"/a": "1", "/b": None}, {"/db": (1, 2, 3, 4, 5)}, 150)
    assert not replay.holds({**record, "bounds": "x"}, {"/a": "1", "/b": None},
                            {"/db": (1, 2, 3, 4, 5)}, 120)


def test_the_record_name_changes_with_the_code(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "m.py").write_text("x = 1\n")
    monkeypatch.setattr(replay, "_PACKAGE", str(tmp_path))
    argv = {"targets": ["/nix/store/x.drv"], "policy": "p.toml"}
    one = replay.run_key(argv, "/", {})
    assert replay.run_key(argv, "/", {"HOME": "/elsewhere"}) == one
    assert replay.run_key(argv, "/", {"TRACEHOOK_X": "1"}) != one
    assert replay.run_key(argv, "/tmp", {}) != one
    assert replay.run_key({**argv, "json": True}, "/", {}) != one
    (tmp_path / "m.py").write_text("x = 22\n")
    os.utime(tmp_path / "m.py", ns=(1, 1))
    assert replay.run_key(argv, "/", {}) != one


def test_a_replayed_run_does_not_load_the_verifier(closure: tuple[Closure, Path],
                                                   tmp_path: Path) -> None:
    """What makes a replay cheap: no engine, no PyNaCl, no SQLite, no policy parser."""
    import subprocess

    c, policy = closure
    argv = [sys.executable, "-X", "importtime", "-m", "tracehook", "verify", c.target,
            "--policy", str(policy), "--store", str(c.root), "--cache-dir",
            str(tmp_path / "cache")]
    first = subprocess.run(argv, capture_output=True, text=True, check=True)
    second = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert first.stdout.split("reference time")[0] == second.stdout.split("reference time")[0]
    loaded = {line.rsplit("|", 1)[1].strip() for line in second.stderr.splitlines()
              if line.startswith("import time:")}
    assert "tracehook.verify.replay" in loaded
    for heavy in ("tracehook.verify.engine", "nacl", "sqlite3", "tracehook.verify.policy",
                  "tomllib", "dataclasses"):
        assert heavy not in loaded, heavy
    assert "tracehook.verify.engine" in {
        line.rsplit("|", 1)[1].strip() for line in first.stderr.splitlines()
        if line.startswith("import time:")}


def test_the_store_database_is_recorded_by_identity_and_times(tmp_path: Path) -> None:
    """An output-path target reads the Nix database: a replay needs it unchanged (any
    Nix operation changes it, and then the run is done again)."""
    import sqlite3

    from tracehook.stores.nixdb import StoreDatabase
    from tracehook.stores.readlog import recording, stat_of

    db_dir = tmp_path / "nix" / "var" / "nix" / "db"
    db_dir.mkdir(parents=True)
    conn = sqlite3.connect(db_dir / "db.sqlite")
    conn.execute("CREATE TABLE ValidPaths (id INTEGER PRIMARY KEY, path TEXT, hash TEXT, "
                 "narSize INTEGER, deriver TEXT, ca TEXT, sigs TEXT)")
    conn.commit()
    conn.close()
    with recording() as seen, StoreDatabase(str(tmp_path)) as db:
        assert db.path_info("/nix/store/00000000000000000000000000000000-x") is None
    db_file = str(db_dir / "db.sqlite")
    assert seen.stats[db_file] is not None and seen.stats[f"{db_file}-wal"] is None
    assert not seen.opaque
    before = stat_of(db_file)
    conn = sqlite3.connect(db_file)
    conn.execute("INSERT INTO ValidPaths (path) VALUES ('/nix/store/y')")
    conn.commit()
    conn.close()
    assert stat_of(db_file) != before


def test_two_runs_at_once_leave_one_good_record(closure: tuple[Closure, Path],
                                                 tmp_path: Path) -> None:
    """Records are written atomically: two processes recording the same command at once
    leave a record that replays, never a mixed one."""
    import subprocess

    c, policy = closure
    argv = [sys.executable, "-m", "tracehook", "-v", "verify", c.target, "--policy",
            str(policy), "--store", str(c.root), "--cache-dir", str(tmp_path / "cache")]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert len(_records(tmp_path / "cache")) == 1
    again = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert REPLAYED in again.stderr and again.stdout.startswith("verified: ")
    assert not list((tmp_path / "cache" / "runs").glob(".*.tmp"))


def test_a_record_others_could_write_is_not_used(closure: tuple[Closure, Path],
                                                 tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Whoever can write a record decides what is replayed: only our own directory."""
    c, policy = closure
    cache = tmp_path / "cache"
    assert _run(capsys, c, policy, cache)[0] == 0
    (cache / "runs").chmod(0o777)
    code, _, err = _run(capsys, c, policy, cache)
    assert code == 0 and REPLAYED not in err and "writable by others" in err
    (cache / "runs").chmod(0o755)
    assert REPLAYED in _run(capsys, c, policy, cache)[2]


@pytest.mark.parametrize("path", [
    "/a/b", "/a//b", "/a/./b", "/a/../b", "/a/b/", "/a/b/.", "/a/b/..", "a/b", "/", "//",
    "/.", "/..", "/a/.b", "/a/..b", "/a/b..", "/a/b.", "./a", "../a", "", "///a", "/a/b/./"])
def test_a_read_is_noted_under_its_absolute_path(path: str) -> None:
    """What a log notes a read under is ``os.path.abspath`` of the path, including where the
    common case (an absolute, normal path) is taken as it is."""
    with readlog.recording() as log:
        readlog.note_read(path, b"x")
        readlog.note_stat(path)
    assert list(log.files) == [os.path.abspath(path)]
    assert list(log.stats) == [os.path.abspath(path)]
