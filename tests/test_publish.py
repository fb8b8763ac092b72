"""Publishing the spool: every store gets every trace; a store that is down loses nothing."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateproc import wait_for
from spoolhelp import OTHER, make_entry
from tracehook import cli
from tracehook.signer import agent_client
from tracehook.signer.publish import Publisher, holds_claim
from tracehook.stores import tracestore
from tracehook.stores.eventlog import EventLog
from tracehook.stores.spool import Spool, SpooledItem, SpoolEntry
from tracehook.trace import crypto, jws
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
        # Two keys failing in a row stop the round for that store: no retry storm (one
        # failure alone could be that key's own problem, see the poisoned-store tests).
        assert requests == 2

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


def _entry_with(n: int, key: str | None = None, kind: str | None = None,
                jws: str | None = None) -> SpoolEntry:
    entry = make_entry(n)
    return dataclasses.replace(entry, key=key or entry.key, kind=kind or entry.kind,
                               jws=jws or entry.jws)


@pytest.mark.parametrize(
    ("case", "entry", "reason"),
    [
        pytest.param("invalid trace key", _entry_with(1, key="not-a-key"),
                     "not 32 nix-base32", id="invalid key"),
        pytest.param("key with a path", _entry_with(1, key="../../../../etc/passwd"),
                     "not 32 nix-base32", id="traversal key"),
        pytest.param("unknown kind", _entry_with(1, kind="xx"), "neither 'ca' nor 'ia'",
                     id="unknown kind"),
        pytest.param("jws not parsing", _entry_with(1, jws="a.b"), "2 dot-separated",
                     id="malformed jws"),
        pytest.param("trace for another key", _entry_with(1, key=make_entry(2).key),
                     "its trace claims ca key", id="key mismatch"),
    ],
)
def test_entry_that_can_never_be_published_goes_to_bad(
    case: str, entry: SpoolEntry, reason: str, tmp_path: Path
) -> None:
    """Issue 13.4: one spool entry with an invalid key stopped every later delivery."""
    spool = Spool(tmp_path / "spool")
    for i in range(3, 33):
        spool.add(make_entry(i))
    poisoned = spool.pending_dir / "poisoned.json"  # as a broken or older signer left it
    poisoned.write_bytes(entry.to_json())
    store = tracestore.open_store(f"file://{tmp_path}/ts")
    report = Publisher(spool, [store], quiet(tmp_path)).drain()
    assert report.bad == [poisoned.name]
    assert len(report.delivered) == 30 and report.complete
    assert (spool.bad_dir / poisoned.name).read_bytes() == entry.to_json()
    bad = [json.loads(line) for line in (tmp_path / "publish.log").read_text().splitlines()
           if '"outcome":"bad"' in line]
    assert len(bad) == 1 and reason in bad[0]["reason"]


def _poison_file(store_dir: Path, key: str, data: bytes) -> Path:
    path = store_dir / "traces" / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _thirty_one(tmp: Path) -> Spool:
    spool = Spool(tmp / "spool")
    for i in range(31):  # entry 0's key is the poisoned one
        spool.add(make_entry(i))
    return spool


@pytest.mark.parametrize(
    "poison",
    [pytest.param(b"\x00\x01 not json", id="binary garbage"),
     pytest.param(b'{"signatures": "a.b.c"}', id="signatures not a list"),
     pytest.param(b"[]", id="a list"),
     pytest.param(b'{"signatures": [', id="truncated")],
)
def test_poisoned_file_in_file_store_does_not_stall_the_others(
    poison: bytes, tmp_path: Path
) -> None:
    """Issue 13.4: one malformed trace file in a store: 0 of 29 other traces delivered."""
    spool = _thirty_one(tmp_path)
    store_dir = tmp_path / "ts"
    poisoned = _poison_file(store_dir, make_entry(0).key, poison)
    clock = Clock()
    pub = Publisher(spool, [tracestore.open_store(f"file://{store_dir}")], quiet(tmp_path),
                    clock=clock, base_backoff=10.0)
    report = pub.drain()
    assert len(report.delivered) == 30 and report.kept == [spool.pending()[0].path.name]
    assert not report.errors  # the store is not "down"
    assert poisoned.read_bytes() == poison  # never overwritten
    (key_error,) = report.key_errors.values()
    assert "malformed trace file" in key_error and make_entry(0).key in key_error
    # That key alone backs off; the next round leaves it alone until its retry is due.
    assert pub.drain().kept == report.kept
    assert pub.next_wakeup(60.0) == pytest.approx(10.0)
    poisoned.unlink()  # a person removed it
    clock.now += 10.0
    assert pub.drain().complete and spool.pending() == []


def test_poisoned_file_in_http_store_does_not_stall_the_others(tmp_path: Path) -> None:
    spool = _thirty_one(tmp_path)
    with serve_traces() as server:
        server.state.files[make_entry(0).key] = b"\xff\xfe garbage"
        report = Publisher(spool, [tracestore.open_store(server.url)], quiet(tmp_path)).drain()
        assert len(report.delivered) == 30 and len(report.kept) == 1
        assert not report.errors
        assert server.state.files[make_entry(0).key] == b"\xff\xfe garbage"
        assert len(server.state.files) == 31


def test_unreadable_path_for_one_key_does_not_stall_the_others(tmp_path: Path) -> None:
    """An environment error for one key only (here a directory where the file belongs) is
    that key's problem once the next key goes through: the store is not backed off."""
    spool = _thirty_one(tmp_path)
    store_dir = tmp_path / "ts"
    (store_dir / "traces" / make_entry(0).key).mkdir(parents=True)
    report = Publisher(spool, [tracestore.open_store(f"file://{store_dir}")],
                       quiet(tmp_path)).drain()
    assert len(report.delivered) == 30 and len(report.kept) == 1 and not report.errors


@pytest.mark.parametrize(
    ("case", "existing", "kept"),
    [
        pytest.param("non-string entries", b'{"signatures": [7, "someone.else.x", {"a": 1}]}',
                     ["someone.else.x"], id="non-string entries"),
        pytest.param("utf-8 bom", b'\xef\xbb\xbf{"signatures": ["someone.else.x"]}',
                     ["someone.else.x"], id="bom"),
        pytest.param("duplicate key", b'{"signatures": ["a.b.c"], "signatures": ["d.e.f"]}',
                     ["a.b.c", "d.e.f"], id="duplicate signatures key"),
    ],
)
def test_partly_malformed_file_is_merged_around(case: str, existing: bytes, kept: list[str],
                                               tmp_path: Path) -> None:
    """Valid entries beside a malformed one are kept; entries that are not strings are
    dropped on rewrite (docs/FORMAT.md, section 5)."""
    spool = _thirty_one(tmp_path)
    store_dir = tmp_path / "ts"
    _poison_file(store_dir, make_entry(0).key, existing)
    store = tracestore.open_store(f"file://{store_dir}")
    report = Publisher(spool, [store], quiet(tmp_path)).drain()
    assert report.complete and len(report.delivered) == 31
    assert store.get(make_entry(0).key) == [*kept, make_entry(0).jws]


def test_prune_sent_wired_and_rate_limited(tmp_path: Path) -> None:
    """Issue 11.7: sent/ grew without bound; prune_sent existed but nothing called it."""
    spool = filled_spool(tmp_path, 2)
    clock = Clock()
    pub = Publisher(spool, [tracestore.open_store(f"file://{tmp_path}/ts")], quiet(tmp_path),
                    clock=clock, keep_sent=0.0, prune_every=600.0)
    assert len(pub.drain().delivered) == 2
    assert len(spool.sent()) == 2
    spool.add(make_entry(5))
    clock.now += 599.0
    report = pub.drain()  # delivered, but no look at sent/ yet
    assert report.pruned == 0 and len(spool.sent()) == 3
    clock.now += 1.0
    time.sleep(0.01)  # ctime granularity
    report = pub.drain()
    assert report.pruned == 3 and spool.sent() == []
    assert any('"outcome":"pruned"' in line
               for line in (tmp_path / "publish.log").read_text().splitlines())


def test_default_keep_sent_keeps_fresh_entries(tmp_path: Path) -> None:
    spool = filled_spool(tmp_path, 2)
    config = write_config(tmp_path, f"file://{tmp_path}/ts")
    assert cli.main(["publish", "--config", str(config)]) == 0
    assert cli.main(["publish", "--config", str(config)]) == 0
    assert len(spool.sent()) == 2


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


def write_config(tmp: Path, *urls: str, extra: str = "", name: str = "sign.toml") -> Path:
    config = tmp / name
    listed = ", ".join(f'"{u}"' for u in urls)
    config.write_text(
        f"publish-to = [{listed}]\n"
        f'spool-dir = "{tmp / "spool"}"\nlog-file = "{tmp / "publish.log"}"\n{extra}'
    )
    return config


def key_file(tmp: Path, name: str = "builder-1") -> Path:
    path = tmp / f"{name}.sec"
    if not path.exists():
        crypto.write_key_files(crypto.generate_secret_key(name), path, tmp / f"{name}.pub")
    return path


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
        out = capsys.readouterr().out.splitlines()
        assert len(out) == 3 and out[-1].startswith("2 pending, 0 sent, 0 unreadable")
        assert cli.main(["spool", "--config", str(config), "--json"]) == 0
        assert [json.loads(line)["kind"] for line in capsys.readouterr().out.splitlines()] == [
            "ca", "ca"]

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


@pytest.mark.parametrize("agent_ok", [True, False], ids=["with agent", "agent cannot start"])
def test_cli_daemon_serves_agent_and_stops_on_sigterm(tmp_path: Path, agent_ok: bool) -> None:
    filled_spool(tmp_path, 2)
    config = write_config(tmp_path, f"file://{tmp_path}/ts",
                          extra=f'secret-key-file = "{key_file(tmp_path)}"\n')
    # The environment names another configuration; the agent must sign with --config's.
    (tmp_path / "decoy").mkdir()
    decoy = write_config(tmp_path / "decoy", f"file://{tmp_path}/decoy-ts", name="decoy.toml",
                         extra=f'secret-key-file = "{key_file(tmp_path, "other-1")}"\n')
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    sock = tmp_path / "agent.sock" if agent_ok else blocker / "agent.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracehook", "publish", "--daemon", "--interval", "0.1",
         "--config", str(config), "--agent-socket", str(sock)],
        stderr=subprocess.PIPE, text=True, env=os.environ | {"TRACEHOOK_CONFIG": str(decoy)},
    )
    try:
        wait_for(lambda: not list((tmp_path / "spool" / "pending").iterdir()), 20)
        if agent_ok:
            wait_for(sock.exists, 20)
            reply = agent_client.ask_agent(str(sock), agent_client.request({"DRV_PATH": "x"}))
            assert reply is not None and reply.startswith(b"0\n")
            signed = [json.loads(line) for line in
                      (tmp_path / "publish.log").read_text().splitlines()
                      if '"event":"sign"' in line]
            assert [e["via"] for e in signed] == ["agent"]  # --config's log, not the decoy's
            assert "no signing key" not in signed[0]["reason"]  # its key loaded
            assert not (tmp_path / "decoy" / "publish.log").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert not sock.exists()
    if not agent_ok:
        assert "signing agent not started" in err


def _run_daemon(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tracehook", "publish", "--daemon",
                           "--interval", "0.1", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def _wrong_key(tmp: Path) -> str:
    return f'secret-key-file = "{tmp / "missing.sec"}"\n'


def _public_as_secret(tmp: Path) -> str:
    key_file(tmp)
    return f'secret-key-file = "{tmp / "builder-1.pub"}"\n'


def _garbage_key(tmp: Path) -> str:
    (tmp / "garbage.sec").write_text("builder-1:not base64 !!\n")
    return f'secret-key-file = "{tmp / "garbage.sec"}"\n'


def _unwritable_log(tmp: Path) -> str:
    (tmp / "logdir").write_text("a file where the log directory belongs")
    return (f'secret-key-file = "{key_file(tmp)}"\n'
            f'log-file = "{tmp / "logdir" / "sign.log"}"\n')


@pytest.mark.parametrize(
    ("case", "extra", "message"),
    [
        pytest.param("key path wrong", _wrong_key, "cannot read key file", id="key missing"),
        pytest.param("public key given", _public_as_secret, "public key", id="public key"),
        pytest.param("key garbage", _garbage_key, "secret-key-file", id="key garbage"),
        pytest.param("log not writable", _unwritable_log, "not writable", id="log"),
    ],
)
def test_daemon_checks_key_and_log_at_start(case: str, extra: Callable[[Path], str],
                                            message: str, tmp_path: Path) -> None:
    """Issue 12.4/12.12: a wrong key path failed only per build, after start."""
    text = extra(tmp_path)
    config = tmp_path / "sign.toml"
    log = "" if "log-file" in text else f'log-file = "{tmp_path / "publish.log"}"\n'
    config.write_text(f'publish-to = ["file://{tmp_path}/ts"]\n'
                      f'spool-dir = "{tmp_path / "spool"}"\n{log}{text}')
    proc = _run_daemon(["--config", str(config), "--agent-socket", str(tmp_path / "a.sock")])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "a.sock").exists()


@pytest.mark.parametrize("flags", [["--no-agent"], []], ids=["--no-agent", "agent wanted"])
def test_daemon_without_key_publishes_and_serves_no_agent(flags: list[str],
                                                          tmp_path: Path) -> None:
    """Without secret-key-file the agent could not sign (it never sees nix.conf's
    secret-key-files): the daemon publishes, starts no agent and says why; the hook then
    signs in process with nix.conf's key, as before."""
    filled_spool(tmp_path, 2)
    config = write_config(tmp_path, f"file://{tmp_path}/ts")
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracehook", "publish", "--daemon", "--interval", "0.1",
         "--config", str(config), "--agent-socket", str(sock), *flags],
        stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: not list((tmp_path / "spool" / "pending").iterdir()), 20)
        assert proc.poll() is None and not sock.exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    if flags:
        assert "signing agent" not in err
    else:
        assert "signing agent not started: no secret-key-file" in err


@pytest.mark.parametrize("kind", ["regular file", "directory", "symlink"])
def test_daemon_refuses_what_is_not_a_socket_at_its_path(kind: str, tmp_path: Path) -> None:
    """Issue 13.11a: publish --daemon deleted a regular file at --agent-socket."""
    path = tmp_path / "agent.sock"
    if kind == "regular file":
        path.write_text("precious")
    elif kind == "directory":
        path.mkdir()
    else:
        (tmp_path / "elsewhere").write_text("precious")
        path.symlink_to(tmp_path / "elsewhere")
    config = write_config(tmp_path, f"file://{tmp_path}/ts",
                          extra=f'secret-key-file = "{key_file(tmp_path)}"\n')
    proc = _run_daemon(["--config", str(config), "--agent-socket", str(path)])
    assert proc.returncode == 2, proc.stderr
    assert str(path) in proc.stderr and kind in proc.stderr
    assert path.is_symlink() or path.exists()
    if kind == "regular file":
        assert path.read_text() == "precious"
