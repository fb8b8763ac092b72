"""An unprivileged publisher with real uids (issue 16): the hook writes as root, the publisher
and its signing agent run as their own user, switched to with ``setpriv`` (no user needs to
exist: numeric uids and gids). Needs root, as the post-build hook in the nix-daemon has."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spoolhelp import make_entry
from tracehook.stores.spool import Spool

PUBLISHER = 61234  # uid and primary gid of the publisher
SPOOL_GROUP = 61235  # the spool's group: the publisher's supplementary group

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching uids needs root")


@dataclass
class Site:
    base: Path
    spool: Path
    store: Path
    log: Path
    config: Path


@pytest.fixture
def site() -> Iterator[Site]:
    # Under /tmp with 0755 parents: pytest's tmp_path is 0700 root, closed to other uids.
    base = Path(tempfile.mkdtemp(prefix="tracehook-uids-", dir="/tmp"))
    os.chmod(base, 0o755)
    spool, store, logdir = base / "spool", base / "traces", base / "log"
    spool.mkdir()
    os.chown(spool, 0, SPOOL_GROUP)
    os.chmod(spool, 0o2770)  # as docs/OPERATIONS.md says: setgid, the publisher's group
    for d in (store, logdir):
        d.mkdir()
        os.chown(d, PUBLISHER, PUBLISHER)
    config = base / "sign.toml"
    config.write_text(f'publish-to = ["file://{store}"]\nspool-dir = "{spool}"\n'
                      f'log-file = "{logdir / "sign.log"}"\n')
    os.chmod(config, 0o644)
    try:
        yield Site(base, spool, store, logdir / "sign.log", config)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def as_publisher(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={PUBLISHER}", f"--regid={PUBLISHER}", f"--groups={SPOOL_GROUP}",
         sys.executable, "-m", "tracehook", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
        env={"PATH": os.environ["PATH"], "HOME": "/nonexistent"},
    )


def write_as_hook(spool: Path, n: int) -> list[Path]:
    """What the hook, signing in process as root in the nix-daemon (umask 022), leaves."""
    old = os.umask(0o022)
    try:
        paths = [Spool(spool).add(make_entry(i)) for i in range(n)]
    finally:
        os.umask(old)
    assert all(p is not None for p in paths)
    return [p for p in paths if p is not None]


def test_publisher_reads_moves_and_prunes_what_root_wrote(site: Site) -> None:
    written = write_as_hook(site.spool, 3)
    for path in written:
        st = os.stat(path)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, SPOOL_GROUP, 0o640)
    for d in ("tmp", "pending", "sent"):
        st = os.stat(site.spool / d)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, SPOOL_GROUP, 0o2770)

    proc = as_publisher("publish", "--config", str(site.config))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (site.spool / "sent").iterdir()) == sorted(
        p.name for p in written)
    assert len(list((site.store / "traces").glob("[!.]*"))) == 3

    # The ledger is pruned by the publisher too (keep-sent = 0): root's files, its deletes.
    site.config.write_text(site.config.read_text() + "keep-sent = 0\n")
    time.sleep(0.01)
    proc = as_publisher("publish", "--config", str(site.config))
    assert proc.returncode == 0, proc.stderr
    assert list((site.spool / "sent").iterdir()) == []


def test_entry_the_publisher_cannot_read_is_kept_not_quarantined(site: Site) -> None:
    """An entry written before the spool was shared (0600 root) stays pending, untouched,
    with the reason; the others are delivered."""
    written = write_as_hook(site.spool, 3)
    os.chmod(written[0], 0o600)
    proc = as_publisher("publish", "--config", str(site.config))
    assert proc.returncode == 3, proc.stderr
    assert written[0].exists() and not (site.spool / "bad").exists()
    assert len(list((site.spool / "sent").iterdir())) == 2
    assert "setgid" in proc.stderr and "Permission denied" in proc.stderr
    proc = as_publisher("spool", "--config", str(site.config))
    assert "1 pending" not in proc.stdout and "1 unreadable" in proc.stdout


def test_unprivileged_agent_is_used_only_when_agent_user_names_it(site: Site) -> None:
    key = site.base / "builder.sec"
    from tracehook.trace import crypto

    crypto.write_key_files(crypto.generate_secret_key("builder-1"), key, site.base / "b.pub")
    os.chown(key, PUBLISHER, PUBLISHER)
    os.chmod(key, 0o400)  # the publisher's key, unreadable to everyone else
    run = site.base / "run"
    run.mkdir()
    os.chown(run, PUBLISHER, PUBLISHER)
    sock = run / "agent.sock"
    site.config.write_text(site.config.read_text() + f'secret-key-file = "{key}"\n'
                           f'agent-socket = "{sock}"\nagent-user = "{PUBLISHER}"\n')
    daemon = subprocess.Popen(
        ["setpriv", f"--reuid={PUBLISHER}", f"--regid={PUBLISHER}", f"--groups={SPOOL_GROUP}",
         sys.executable, "-m", "tracehook", "publish", "--daemon", "--interval", "0.2",
         "--config", str(site.config)],
        stderr=subprocess.PIPE, text=True,
        env={"PATH": os.environ["PATH"], "HOME": "/nonexistent"},
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        hook_env = {"PATH": os.environ["PATH"], "TRACEHOOK_CONFIG": str(site.config),
                    "DRV_PATH": "/nix/store/00000000000000000000000000000000-x.drv",
                    "OUT_PATHS": ""}
        entry = "from tracehook.signer.agent_client import run; run()"
        hook = subprocess.run([sys.executable, "-c", entry], env=hook_env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert hook.returncode == 0, hook.stderr
        # The other direction: a hook that expects root must not talk to this agent.
        wrong = site.base / "root-agent.toml"
        wrong.write_text(site.config.read_text().replace(f'agent-user = "{PUBLISHER}"',
                                                         'agent-user = "root"'))
        refused = subprocess.run([sys.executable, "-c", entry],
                                 env=hook_env | {"TRACEHOOK_CONFIG": str(wrong)},
                                 capture_output=True, text=True, timeout=60, check=False)
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=30)
    assert daemon.returncode == 0, err
    events = [json.loads(line) for line in site.log.read_text().splitlines()]
    signs = [(e["via"], e["outcome"]) for e in events if e["event"] == "sign"]
    # The agent answered the first hook (it could not read a store here: no Nix needed to
    # show who signed); the second hook signed in its own process instead.
    assert signs == [("agent", "failed"), ("hook", "failed")]
    # Refused before anything was sent: the socket directory is the agent user's, not root's.
    assert "signing agent not used" in refused.stderr
    assert f"belongs to uid {PUBLISHER}, neither root" in refused.stderr
