"""The persistent verification cache: crash safety, damage detection, two writers, bounds,
and the never-wrong rule (a warm cache never answers a question the policy or the trace
stores have changed)."""

from __future__ import annotations

import logging
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tracehook import cli
from tracehook.stores.factcache import FactCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from synth import SIGNERS, Closure, policy_text, with_policy

from attackkit import tamper_claimed_hash
from testkeys import secret

WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from tracehook.stores.factcache import FactCache
    cache = FactCache(Path(sys.argv[1]), background=sys.argv[4:] == ["background"])
    tag = sys.argv[2].encode()
    for i in range(int(sys.argv[3])):
        key = tag + b"%d" % i
        cache.put("test", key, b"value-" + key * 20)
    cache.close()
    print("done", flush=True)
""")


def _all_rows(directory: Path) -> list[tuple[str, bytes]]:
    with sqlite3.connect(directory / "facts.sqlite") as db:
        return [(ns, bytes(k)) for ns, k in db.execute("SELECT ns, key FROM facts")]


def _written(directory: Path) -> bool:
    """Whether some rows are committed (read only: the file is not created here)."""
    try:
        db = sqlite3.connect(f"file:{directory / 'facts.sqlite'}?mode=ro", uri=True)
        try:
            return db.execute("SELECT 1 FROM facts LIMIT 1").fetchone() is not None
        finally:
            db.close()
    except sqlite3.Error:  # not there yet, or no table yet
        return False


@pytest.mark.parametrize("mode", ["inline", "background"])
def test_killed_mid_write_leaves_a_cache_that_reads_right(tmp_path: Path, mode: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), "k", "10000000",
                             mode])
    # killed once it is writing (a fixed sleep was too short on a loaded machine: the
    # writer had not committed anything yet), well before its 10,000,000 rows are done
    deadline = time.monotonic() + 60
    while not _written(tmp_path):
        assert proc.poll() is None, "the writer stopped before writing"
        assert time.monotonic() < deadline, "the writer wrote nothing within 60 s"
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cache = FactCache(tmp_path)
    rows = _all_rows(tmp_path)
    assert rows, "nothing was written before the kill"
    for ns, key in rows[:500]:
        value = cache.get(ns, key)
        assert value == b"value-" + key * 20  # every surviving row is whole and right


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_file_is_discarded_and_rebuilt(tmp_path: Path, damage: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    cache = FactCache(tmp_path)
    for i in range(3000):
        cache.put("test", b"%d" % i, b"x" * 200)
    cache.close()
    db = tmp_path / "facts.sqlite"
    for extra in ("-wal", "-shm"):
        Path(f"{db}{extra}").unlink(missing_ok=True)
    data = db.read_bytes()
    db.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x07" * 4096,
                    "empty": b""}[damage])
    with caplog.at_level(logging.WARNING):
        again = FactCache(tmp_path)
        for i in range(0, 3000, 7):
            assert again.get("test", b"%d" % i) in (None, b"x" * 200)  # never another value
        again.put("test", b"new", b"fact")
        again.flush()
        assert again.get("test", b"new") == b"fact"
    warned = any("unusable" in r.getMessage() for r in caplog.records)
    if damage == "garbage":
        assert warned  # not a database: moved aside, rebuilt, said so
    if damage == "empty":
        assert not warned  # an empty file is just an empty cache


def _schema_2_cache(directory: Path) -> None:
    """A cache as tracehook wrote it before schema 3 (a WITHOUT ROWID table), with a row."""
    directory.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(directory / "facts.sqlite") as db:
        db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT)")
        db.execute("CREATE TABLE facts (ns TEXT NOT NULL, key BLOB NOT NULL, value BLOB NOT "
                   "NULL, check_ BLOB NOT NULL, size INTEGER NOT NULL, used INTEGER NOT NULL, "
                   "PRIMARY KEY (ns, key)) WITHOUT ROWID")
        db.execute("CREATE INDEX facts_used ON facts (used)")
        db.execute("INSERT INTO meta VALUES ('schema', '2')")
        db.execute("INSERT INTO facts VALUES ('sig', x'01', x'02', x'03', 40, 1)")


def test_an_older_cache_is_started_afresh_quietly(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A cache an older tracehook wrote (schema 2) is emptied and made anew in place, with
    an info line, not the 'unusable' warning of a damaged file; a second cache opened on
    it meanwhile works too."""
    _schema_2_cache(tmp_path)
    with caplog.at_level(logging.INFO):
        first, second = FactCache(tmp_path), FactCache(tmp_path)
    assert "older tracehook (schema 2): started afresh" in caplog.text
    assert "unusable" not in caplog.text
    assert not list(tmp_path.glob("facts.broken-*"))
    assert first.get("sig", b"\x01") is None
    first.put("sig", b"k", b"v")
    first.flush()
    assert FactCache(tmp_path).get("sig", b"k") == b"v"
    second.put("sig", b"k2", b"v2")
    second.flush()
    assert FactCache(tmp_path).get("sig", b"k2") == b"v2"
    with sqlite3.connect(tmp_path / "facts.sqlite") as db:
        assert db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone() == ("3",)
        sql = db.execute("SELECT sql FROM sqlite_master WHERE name = 'facts'").fetchone()[0]
        assert "WITHOUT ROWID" not in sql


def test_a_cache_of_an_unknown_schema_is_moved_aside(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A schema this tracehook does not know (a newer one, or garbage in the meta table) is
    not read: the file is moved aside and a new cache made, with a warning."""
    _schema_2_cache(tmp_path)
    with sqlite3.connect(tmp_path / "facts.sqlite") as db:
        db.execute("UPDATE meta SET value = '99' WHERE name = 'schema'")
    with caplog.at_level(logging.WARNING):
        cache = FactCache(tmp_path)
    assert "unusable (schema 99, expected 3)" in caplog.text
    assert list(tmp_path.glob("facts.broken-*"))
    cache.put("sig", b"k", b"v")
    cache.flush()
    assert FactCache(tmp_path).get("sig", b"k") == b"v"


def test_a_damaged_row_is_dropped_not_believed(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    cache = FactCache(tmp_path)
    cache.put("sig", b"key", b"the signature is valid")
    cache.close()
    with sqlite3.connect(tmp_path / "facts.sqlite") as db:
        db.execute("UPDATE facts SET value = ? WHERE key = ?", (b"forged", b"key"))
    with caplog.at_level(logging.WARNING):
        assert FactCache(tmp_path).get("sig", b"key") is None
    assert any("damaged entry" in r.getMessage() for r in caplog.records)
    assert _all_rows(tmp_path) == []


@pytest.mark.parametrize("mode", ["inline", "background"])
def test_two_writers_at_once_lose_nothing(tmp_path: Path, mode: str) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), tag, "3000", mode],
                              stdout=subprocess.PIPE, text=True) for tag in ("a", "b")]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0 and "done" in out
    cache = FactCache(tmp_path)
    for tag in (b"a", b"b"):
        for i in range(0, 3000, 13):
            key = tag + b"%d" % i
            # a writer that found the database busy keeps its facts for a later write
            # (a bounded number: under heavy load some may go); a fact there is right
            got = cache.get("test", key)
            assert got in (None, b"value-" + key * 20)
    assert len(_all_rows(tmp_path)) > 5000


def test_a_background_writer_writes_while_the_putting_thread_goes_on(tmp_path: Path) -> None:
    """With ``background``, a write that falls due is done by the cache's own thread (the
    facts reach the file with no flush from the thread that put them); close() writes
    the rest and stops it; a put after that is written as without a writer."""
    cache = FactCache(tmp_path, background=True)
    for i in range(600):
        cache.put("test", b"%04d" % i, b"v%d" % i)
    writer = cache._writer
    assert writer is not None and writer.name == "tracehook-facts" and writer.is_alive()
    deadline = time.monotonic() + 10
    while len(_all_rows(tmp_path)) < 512 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(_all_rows(tmp_path)) >= 512  # two writes of 256 fell due and were done
    assert cache.get("test", b"0599") == b"v599"  # pending or written: read back either way
    cache.close()
    assert not writer.is_alive()
    assert len(_all_rows(tmp_path)) == 600
    cache.put("test", b"late", b"x")
    cache.flush()
    assert FactCache(tmp_path).get("test", b"late") == b"x"


def test_a_database_locked_by_another_process_is_left_alone(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Busy is not damage: a cache another process holds locked is neither renamed nor
    rebuilt (that would pull the file from under the other process); this one goes on
    without a cache, and the other's rows are intact afterwards."""
    first = FactCache(tmp_path)
    first.put_many("test", [(b"k", b"v")])
    first.close()
    holder = sqlite3.connect(tmp_path / "facts.sqlite", isolation_level=None)
    holder.execute("PRAGMA journal_mode=DELETE")
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("INSERT OR REPLACE INTO meta VALUES ('held', '1')")
    with caplog.at_level(logging.WARNING):
        second = FactCache(tmp_path, busy_timeout=0.05)
    assert "going on without it" in caplog.text and "rebuilt" not in caplog.text
    assert second.get("test", b"k") is None  # no cache, not a wrong answer
    second.put("test", b"other", b"x")
    second.flush()
    holder.execute("COMMIT")
    holder.close()
    assert sorted(tmp_path.glob("facts.broken-*")) == []
    assert FactCache(tmp_path).get("test", b"k") == b"v"


def test_an_unusable_directory_means_no_cache_not_an_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("")
    with caplog.at_level(logging.WARNING):
        cache = FactCache(tmp_path / "file" / "sub")
    assert "going on without it" in caplog.text
    cache.put("test", b"k", b"v")
    cache.flush()
    assert cache.get("test", b"k") is None


def test_bounded_in_size_least_recently_used_out(tmp_path: Path) -> None:
    cache = FactCache(tmp_path, max_bytes=200_000)
    for i in range(2000):
        cache.put("test", b"%06d" % i, b"v" * 300)
    cache.flush()
    cache.evict()
    assert cache.size() <= 200_000
    assert cache.get("test", b"%06d" % 1999) == b"v" * 300  # the newest stay


def test_what_a_process_writes_is_kept_in_memory_only_within_the_bound(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A namespace read into memory takes what the process writes after (so it finds it
    again), but only up to MEMORY_BOUND: a gate writes facts all day, and the namespace in
    memory grew with every one of them. Past the bound it is let go of and read row by
    row, every fact still found; a process that mostly writes (a drvpool worker) keeps
    none in memory at all."""
    from tracehook.stores import factcache

    monkeypatch.setattr(factcache, "MEMORY_BOUND", 50_000)
    monkeypatch.setattr(factcache, "BULK_AFTER", 0)  # (read whole at the first fact asked)
    cache = FactCache(tmp_path / "a")
    cache.put("test", b"first", b"v")
    cache.flush()
    assert cache.get("test", b"first") == b"v"  # (the namespace is now in memory)
    for i in range(40):
        cache.put("test", b"%04d" % i, b"x" * 1000)
    assert cache._loaded["test"] is not None and len(cache._loaded["test"]) == 41
    for i in range(40, 200):
        cache.put("test", b"%04d" % i, b"x" * 1000)
    assert cache._loaded["test"] is None  # let go of: 200 kB is over the bound
    cache.flush()
    assert all(cache.get("test", b"%04d" % i) == b"x" * 1000 for i in range(200))
    assert cache.get("test", b"first") == b"v" and cache.get("test", b"none") is None
    cache.close()

    writer = FactCache(tmp_path / "b")
    writer.mirror = False
    for i in range(200):
        writer.put("test", b"%04d" % i, b"x" * 1000)
    assert writer.get("test", b"0001") == b"x" * 1000
    writer.flush()
    assert writer.get("test", b"0199") == b"x" * 1000
    assert writer._loaded == {}
    writer.close()


def test_a_few_facts_are_read_alone_many_in_one_query(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that needs a few facts of a large namespace (a restarted gate deciding the
    steps that changed) reads those alone, not the whole namespace; one that asks for more
    than BULK_AFTER reads the namespace in one query then. The answers are the same either
    way, found or not, damaged rows dropped."""
    from tracehook.stores import factcache

    monkeypatch.setattr(factcache, "BULK_AFTER", 5)
    cache = FactCache(tmp_path / "a")
    for i in range(50):
        cache.put("test", b"%04d" % i, b"v%d" % i)
    cache.close()
    cache = FactCache(tmp_path / "a")
    asked = [3, 7, 49, 60, 3]  # (60: absent)
    assert [cache.get("test", b"%04d" % i) for i in asked] == [b"v3", b"v7", b"v49", None,
                                                               b"v3"]
    assert "test" not in cache._loaded  # read one at a time
    assert cache.get("test", b"0011") == b"v11" and cache.get("test", b"0099") is None
    loaded = cache._loaded["test"]
    assert loaded is not None and len(loaded) == 50  # the sixth: the namespace in one query
    assert all(cache.get("test", b"%04d" % i) == b"v%d" % i for i in range(50))
    cache.put("test", b"new", b"n")  # written after the read: joins it
    assert cache.get("test", b"new") == b"n"
    cache.close()


# ----------------------------------------------------------------- never wrong, warm


def _verify(capsys: pytest.CaptureFixture[str], c: Closure, policy: Path, cache: Path,
            *extra: str) -> int:
    capsys.readouterr()
    return cli.main(["verify", c.target, "--policy", str(policy), "--store", str(c.root),
                     "--cache-dir", str(cache), *extra])


@pytest.mark.parametrize("change", ["revoked-key", "expired-key", "tampered-trace",
                                    "changed-policy", "trace-removed"])
def test_a_warm_cache_never_answers_what_changed(tmp_path: Path, change: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    c, policy = with_policy(tmp_path, 40)
    cache = tmp_path / "cache"
    assert _verify(capsys, c, policy, cache) == 0  # cold: fills the cache
    assert _verify(capsys, c, policy, cache) == 0  # warm: the same answer
    assert {ns for ns, _ in _all_rows(cache)} >= {"drv", "sig", "resolve"}
    extra: list[str] = []
    if change == "revoked-key":
        text = policy.read_text()
        name = SIGNERS[0]
        key = text.split(f'{name} = "', 1)[1].split('"', 1)[0]
        policy.write_text(text.replace(f'{name} = "{key}"',
                                       f'{name} = {{ key = "{key}", revoked = true }}'))
    elif change == "expired-key":
        text = policy.read_text()
        name = SIGNERS[1]
        key = text.split(f'{name} = "', 1)[1].split('"', 1)[0]
        policy.write_text(text.replace(
            f'{name} = "{key}"', f'{name} = {{ key = "{key}", not-after = 2030-01-01 }}'))
        extra = ["--at", "2031-01-01T00:00:00Z"]
    elif change == "tampered-trace":
        tamper_claimed_hash(sorted((c.traces / "traces").iterdir())[0])
    elif change == "changed-policy":
        policy.write_text(policy_text(c.traces, require='{ all-of = ["builderA", '
                                      '"builderB", "builderC"] }').replace(
            "[trust]", f'builderC = "{_public("builderC")}"\n\n[trust]'))
    else:
        sorted((c.traces / "traces").iterdir())[0].unlink()
    assert _verify(capsys, c, policy, cache, *extra) == 1, capsys.readouterr().out


def _public(name: str) -> str:
    from tracehook.trace import crypto

    return crypto.format_public_key(secret(name).public)
