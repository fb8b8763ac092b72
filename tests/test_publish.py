"""Publishing the spool: every store gets every trace; a store that is down loses nothing."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from spoolhelp import OTHER, make_entry
from tracehook import cli
from tracehook.signer import agent_client
from tracehook.signer.publish import Publisher, holds_claim
from tracehook.stores import tracestore
from tracehook.stores.eventlog import EventLog
from tracehook.stores.spool import Spool, SpooledItem
from tracehook.trace import jws
from traceserver import serve_traces


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def quiet(tmp: Path) -> EventLog:
    return EventLog(tmp / "publish.log", stderr=None)


def filled_spool(tmp: Path, n: int = 3) -> Spool:
    spool = Spool(tmp / "spool")
    for i in range(n):
        spool.add(make_entry(i))
    return spool


def test_drain_to_file_and_http(tmp_path: Path) -> None:
    spool = filled_spool(tmp_path)
    with serve_traces() as server:
        stores = [tracestore.open_store(f"file://{tmp_path}/ts"), tracestore.open_store(server.url)]
        report = Publisher(spool, stores, quiet(tmp_path)).drain()
        assert report.complete and len(report.delivered) == 3
        for store in stores:
            for i in range(3):
                entry = make_entry(i)
                assert store.get(entry.key) == [entry.jws]
    assert spool.pending() == [] and len(spool.sent()) == 3


def test_store_down_keeps_entries_then_delivers(tmp_path: Path) -> None:
    spool = filled_spool(tmp_path)
    clock = Clock()
    with serve_traces() as server:
        server.state.down = True
        file_store = tracestore.open_store(f"file://{tmp_path}/ts")
        http_store = tracestore.open_store(server.url)
        pub = Publisher(spool, [file_store, http_store], quiet(tmp_path), clock=clock,
                        base_backoff=2.0, max_backoff=5.0)
        report = pub.drain()
        assert not report.complete and len(report.kept) == 3
        assert server.url in report.errors and "503" in report.errors[server.url]
        assert len(spool.pending()) == 3  # nothing lost
        assert file_store.get(make_entry(0).key) == [make_entry(0).jws]  # the up store has it
        requests = len(server.state.requests)
        assert requests == 1  # one failure stops the round for that store: no retry storm

        # Backing off: the next round does not touch the down store.
        pub.drain()
        assert len(server.state.requests) == requests
        assert pub.next_wakeup(60.0) == pytest.approx(2.0)

        clock.now += 2.0  # retry: still down, backoff doubles (capped at 5)
        pub.drain()
        assert pub.state[server.url].failures == 2
        assert pub.next_wakeup(60.0) == pytest.approx(4.0)
        clock.now += 4.0
        pub.drain()
        assert pub.next_wakeup(60.0) == pytest.approx(5.0)

        server.state.down = False
        clock.now += 5.0
        report = pub.drain()
        assert report.complete and len(report.delivered) == 3
        assert pub.state[server.url].failures == 0
        for i in range(3):  # re-delivery to the file store added no duplicate
            assert file_store.get(make_entry(i).key) == [make_entry(i).jws]
            assert http_store.get(make_entry(i).key) == [make_entry(i).jws]
    events = [line for line in (tmp_path / "publish.log").read_text().splitlines()]
    assert any('"outcome":"kept"' in e for e in events)
    assert any('"outcome":"ok"' in e and '"failures":3' in e for e in events)


def test_same_claim_already_in_store_is_not_added(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.add(make_entry(1, rebuild_id=5))
    store = tracestore.open_store(f"file://{tmp_path}/ts")
    earlier = make_entry(1, rebuild_id=4)  # same claim, signed on an earlier run
    store.append(earlier.key, ["someone.else.x", earlier.jws])
    assert Publisher(spool, [store], quiet(tmp_path)).drain().complete
    assert store.get(earlier.key) == ["someone.else.x", earlier.jws]


def test_forged_copy_of_our_claim_does_not_suppress_ours(tmp_path: Path) -> None:
    ours = make_entry(1)
    forged = make_entry(1, sk=OTHER)  # same payload shape, other key...
    token = jws.parse_compact(forged.jws)
    # ...relabelled with our kid: parses as our claim, but does not verify under our key.
    h = jws.b64url_encode(jws.dumps_compact({**token.header, "kid": ours.kid}))
    relabelled = f"{h}.{forged.jws.split('.', 2)[1]}.{forged.jws.split('.', 2)[2]}"
    item = SpooledItem(tmp_path / "x.json", ours)
    assert not holds_claim([relabelled], item)
    assert holds_claim([relabelled, ours.jws], item)
    assert holds_claim([make_entry(1, rebuild_id=99).jws], item)
    assert not holds_claim([make_entry(1, out_byte=3).jws], item)  # other outputs


def test_bad_entry_is_quarantined_others_delivered(tmp_path: Path) -> None:
    spool = filled_spool(tmp_path, 2)
    (spool.pending_dir / "broken.json").write_text("{")
    report = Publisher(spool, [tracestore.open_store(str(tmp_path / "ts"))],
                       quiet(tmp_path)).drain()
    assert report.bad == ["broken.json"] and len(report.delivered) == 2
    assert (spool.root / "bad" / "broken.json").exists()


def test_daemon_rounds_until_store_is_back(tmp_path: Path) -> None:
    spool = filled_spool(tmp_path, 2)
    with serve_traces() as server:
        server.state.down = True
        pub = Publisher(spool, [tracestore.open_store(server.url)], quiet(tmp_path),
                        base_backoff=0.05, max_backoff=0.1)
        stop = threading.Event()
        thread = threading.Thread(target=pub.run, args=(0.05, stop))
        thread.start()
        try:
            threading.Event().wait(0.3)
            assert len(spool.pending()) == 2
            server.state.down = False
            for _ in range(100):
                if not spool.pending():
                    break
                threading.Event().wait(0.05)
        finally:
            stop.set()
            thread.join(5)
        assert spool.pending() == []
        assert len(server.state.files) == 2


def write_config(tmp: Path, *urls: str) -> Path:
    config = tmp / "sign.toml"
    listed = ", ".join(f'"{u}"' for u in urls)
    config.write_text(
        f"publish-to = [{listed}]\n"
        f'spool-dir = "{tmp / "spool"}"\nlog-file = "{tmp / "publish.log"}"\n'
    )
    return config


def test_cli_publish_exit_codes_and_dry_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    filled_spool(tmp_path, 2)
    with serve_traces() as server:
        config = write_config(tmp_path, server.url)
        assert cli.main(["publish", "--config", str(config), "--dry-run"]) == 0
        assert "would publish" in capsys.readouterr().out
        assert server.state.requests == []

        assert cli.main(["spool", "--config", str(config)]) == 0
        assert capsys.readouterr().out.count("\n") == 2

        server.state.down = True
        assert cli.main(["publish", "--config", str(config)]) == 3
        server.state.down = False
        assert cli.main(["publish", "--config", str(config)]) == 0
        assert len(server.state.files) == 2


@pytest.mark.parametrize(
    ("case", "config_text", "code"),
    [
        pytest.param("no stores", 'spool-dir = "/tmp/x"\n', 2, id="no stores"),
        pytest.param("bad url", 'publish-to = ["ftp://x"]\n', 2, id="bad url"),
        pytest.param("bad toml", "publish-to = [\n", 2, id="bad toml"),
    ],
)
def test_cli_publish_config_errors(case: str, config_text: str, code: int, tmp_path: Path) -> None:
    config = tmp_path / "sign.toml"
    config.write_text(config_text)
    assert cli.main(["publish", "--config", str(config)]) == code


def test_cli_publish_missing_config(tmp_path: Path) -> None:
    assert cli.main(["publish", "--config", str(tmp_path / "missing.toml")]) == 2


def _wait_for(cond: Callable[[], bool], seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("agent_ok", [True, False], ids=["with agent", "agent cannot start"])
def test_cli_daemon_serves_agent_and_stops_on_sigterm(tmp_path: Path, agent_ok: bool) -> None:
    filled_spool(tmp_path, 2)
    config = write_config(tmp_path, f"file://{tmp_path}/ts")
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    sock = tmp_path / "agent.sock" if agent_ok else blocker / "agent.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracehook", "publish", "--daemon", "--interval", "0.1",
         "--config", str(config), "--agent-socket", str(sock)],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        assert _wait_for(lambda: not list((tmp_path / "spool" / "pending").iterdir()))
        if agent_ok:
            assert _wait_for(sock.exists)
            reply = agent_client.ask_agent(str(sock), agent_client.request({"DRV_PATH": "x"}))
            assert reply is not None and reply.startswith(b"0\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert not sock.exists()
    if not agent_ok:
        assert "signing agent not started" in err
