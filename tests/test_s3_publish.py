"""Publishing to stores that must honour conditional PUTs: a store that ignores them is
refused when ``tracehook publish`` starts (unless marked single-writer), and a SeaweedFS
stopped in the middle of a publishing run loses nothing: the spool keeps what was not
delivered and the daemon delivers it once SeaweedFS is back.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from seaweed import BUILDER_A, Seaweed, clean_aws_env
from spoolhelp import OTHER, SK, make_entry
from tracehook import cli
from tracehook.errors import ConfigError
from tracehook.stores import tracestore
from tracehook.stores.s3 import S3TraceStore
from tracehook.stores.spool import Spool
from traceserver import serve_traces


def write_config(tmp: Path, *urls: str) -> Path:
    config = tmp / "sign.toml"
    listed = ", ".join(json.dumps(u) for u in urls)
    config.write_text(f"publish-to = [{listed}]\nspool-dir = \"{tmp / 'spool'}\"\n"
                      f"log-file = \"{tmp / 'publish.log'}\"\n")
    return config


def fill(tmp: Path, n: int, start: int = 0) -> Spool:
    spool = Spool(tmp / "spool")
    for i in range(start, start + n):
        spool.add(make_entry(i, OTHER if i % 2 else SK))
    return spool


def events(tmp: Path) -> list[dict[str, object]]:
    log = tmp / "publish.log"
    if not log.exists():
        return []
    # the daemon may be writing a line this moment: read the lines it has ended
    text = log.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line]


# ------------------------------------------------------------ the precondition probe


def test_publish_refuses_a_store_that_ignores_preconditions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """nginx WebDAV's behaviour (2xx to failed If-Match / If-None-Match): refused at start,
    exit 2, one line; nothing is written and the spool keeps every entry."""
    spool = fill(tmp_path, 3)
    with serve_traces() as server:
        server.state.ignore_preconditions = True
        config = write_config(tmp_path, server.url)
        assert cli.main(["publish", "--config", str(config)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "ignores conditional PUTs" in err[0], err
        assert "single-writer=1" in err[0]
        assert server.state.files == {} and server.state.puts == 0
        assert len(spool.pending()) == 3
        # The daemon does not start either.
        daemon = subprocess.run(
            [sys.executable, "-m", "tracehook", "publish", "--daemon", "--no-agent",
             "--config", str(config)], capture_output=True, text=True, timeout=60)
        assert daemon.returncode == 2 and "ignores conditional PUTs" in daemon.stderr
        # `tracehook sign --to` and every other writer: the store refuses the first append.
        with pytest.raises(ConfigError, match="ignores conditional PUTs"):
            tracestore.open_store(server.url).append(make_entry(0).key, ["a.b.c"])
        assert server.state.files == {}


def test_single_writer_store_is_not_probed_and_says_so(tmp_path: Path) -> None:
    spool = fill(tmp_path, 3)
    with serve_traces() as server:
        server.state.ignore_preconditions = True
        config = write_config(tmp_path, f"{server.url}?single-writer=1")
        assert cli.main(["publish", "--config", str(config)]) == 0
        assert server.state.probes == 0 and len(server.state.files) == 3
    assert spool.pending() == []
    unchecked = [e for e in events(tmp_path) if e["outcome"] == "unchecked"]
    assert len(unchecked) == 1 and "single-writer" in str(unchecked[0]["reason"])


def test_store_that_honours_preconditions_is_probed_once_first(tmp_path: Path) -> None:
    fill(tmp_path, 3)
    with serve_traces() as server:
        config = write_config(tmp_path, server.url)
        assert cli.main(["publish", "--config", str(config)]) == 0
        puts = [path for method, path in server.state.requests if method == "PUT"]
        assert puts[:3] == ["/traces/.tracehook-probe"] * 3  # before any trace is written
        assert server.state.probes == 3 and len(server.state.files) == 3


def test_seaweedfs_passes_the_probe(seaweed: Seaweed, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in BUILDER_A.env().items():
        monkeypatch.setenv(name, value)
    store = tracestore.open_store(seaweed.url(seaweed.bucket("probe")))
    assert tracestore.check_for_writing(store) is None
    assert isinstance(store, S3TraceStore) and store.s3.source.startswith("credentials from")


# ------------------------------------------------------ SeaweedFS down mid-publish


def _wait_for(cond: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_seaweedfs_stopped_mid_publish_loses_nothing(tmp_path: Path) -> None:
    weed = Seaweed(tmp_path / "weed")
    weed.start()
    try:
        bucket = weed.bucket("midway")
        url = weed.url(bucket)
        total = 120  # entries 0..139 (spoolhelp makes at most 256)
        spool = fill(tmp_path, total)
        config = write_config(tmp_path, url)
        env = clean_aws_env() | BUILDER_A.env()
        daemon_log = tmp_path / "daemon.stderr"
        proc = subprocess.Popen(
            [sys.executable, "-m", "tracehook", "-v", "publish", "--daemon", "--no-agent",
             "--interval", "0.2", "--max-backoff", "1", "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=daemon_log.open("w"), text=True, env=env)
        try:
            reader = S3TraceStore(url)
            twentieth = make_entry(20, SK)
            assert _wait_for(lambda: twentieth.jws in reader.get(twentieth.key), 60)
            weed.kill()  # in the middle of the run
            assert _wait_for(lambda: any(e["outcome"] == "kept" for e in events(tmp_path)),
                             30)
            # the round that failed ends by moving what it did deliver to sent/: wait for that
            def settled() -> bool:
                before = len(spool.sent())
                time.sleep(0.3)
                return before == len(spool.sent()) and \
                    before + len(spool.pending()) == total

            assert _wait_for(settled, 10)
            sent = len(spool.sent())
            assert len(spool.pending()) == total - sent > 0
            time.sleep(1.5)  # a few rounds while it is down: nothing lost, nothing sent
            assert len(spool.sent()) == sent
            fill(tmp_path, 20, start=total)  # builds go on meanwhile
            weed.start()
            assert _wait_for(lambda: not spool.pending(), 90), \
                daemon_log.read_text()[-3000:]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        assert proc.returncode == 0, daemon_log.read_text()[-3000:]
        for i in range(total + 20):
            entry = make_entry(i, OTHER if i % 2 else SK)
            assert entry.jws in reader.get(entry.key), i
        # the publisher said the store was back ("reachable again", with its failure count)
        assert any(e["outcome"] == "ok" and e.get("failures") for e in events(tmp_path))
    finally:
        weed.stop()
