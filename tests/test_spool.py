"""The spool: atomic entries, dedupe of identical claims, delivered ledger, bad entries."""

from __future__ import annotations

import concurrent.futures
import os
import stat
import time
from pathlib import Path

import pytest

from spoolhelp import make_entry
from tracehook.errors import EnvironmentFault
from tracehook.stores.spool import Spool, SpoolEntry


def test_add_and_list(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    first, second = make_entry(1), make_entry(2)
    p1, p2 = spool.add(second), spool.add(first)
    assert p1 is not None and p2 is not None
    assert [it.entry for it in spool.pending()] == [first, second]  # oldest first
    assert (os.stat(p1).st_mode & 0o777) == 0o600
    assert (os.stat(tmp_path / "spool").st_mode & 0o777) == 0o700
    assert not list((tmp_path / "spool" / "tmp").iterdir())  # no half-written leftovers


def test_same_claim_other_rebuild_id_is_a_duplicate(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert spool.add(make_entry(1, rebuild_id=1)) is not None
    assert spool.add(make_entry(1, rebuild_id=2)) is None
    assert len(spool.pending()) == 1


def test_different_outputs_are_a_new_claim(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert spool.add(make_entry(1)) is not None
    assert spool.add(make_entry(1, out_byte=9)) is not None
    assert len(spool.pending()) == 2


def test_sent_claim_is_not_spooled_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.add(make_entry(1))
    (item,) = spool.pending()
    spool.mark_sent(item)
    spool.mark_sent(item)  # a second move is a no-op
    assert spool.pending() == []
    assert spool.add(make_entry(1, rebuild_id=7)) is None
    assert spool.known(make_entry(1).name)


def test_concurrent_identical_claims_spooled_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: spool.add(make_entry(3, rebuild_id=i)), range(32)))
    assert sum(r is not None for r in results) == 1
    assert len(spool.pending()) == 1


def test_entry_round_trip() -> None:
    entry = make_entry(4)
    assert SpoolEntry.from_json(entry.to_json(), "x") == entry


@pytest.mark.parametrize(
    ("case", "data"),
    [
        pytest.param("not json", b"{", id="not json"),
        pytest.param("wrong version", b'{"version": 99}', id="wrong version"),
        pytest.param("missing jws", b'{"version": 1, "kind": "ca"}', id="missing field"),
        pytest.param("a list", b"[1]", id="a list"),
    ],
)
def test_bad_entries_are_reported_and_quarantined(case: str, data: bytes, tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.add(make_entry(1))
    bad = tmp_path / "pending" / "zzz.json"
    bad.write_bytes(data)
    scan = spool.scan()
    assert len(scan.items) == 1 and scan.locked == []
    assert [p for p, _ in scan.bad] == [bad]
    moved = spool.quarantine(bad)
    assert moved.read_bytes() == data and not bad.exists()


def test_unwritable_spool_is_environment_fault(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(EnvironmentFault, match="spool"):
        Spool(blocker / "spool").add(make_entry(1))


def test_prune_sent_counts_from_delivery(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.add(make_entry(1))
    spool.add(make_entry(2))
    (old, _) = spool.pending()
    os.utime(old.path, (1000.0, 1000.0))  # written long ago (a long outage)...
    spool.mark_sent(old)  # ...but delivered just now: it stays for keep-sent
    assert spool.prune_sent(3600) == 0
    assert len(spool.sent()) == 1 and len(spool.pending()) == 1  # pending is never pruned
    assert spool.prune_sent(3600, now=time.time() + 3601) == 1
    assert spool.sent() == [] and len(spool.pending()) == 1


def test_find(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    entry = make_entry(1)
    assert spool.find(entry.name) is None
    spool.add(entry)
    assert spool.find(entry.name) == entry
    spool.mark_sent(spool.pending()[0])
    assert spool.find(entry.name) == entry


def test_shared_spool_gives_entries_its_group(tmp_path: Path) -> None:
    """A setgid spool directory is shared with its group (an unprivileged publisher)."""
    root = tmp_path / "spool"
    root.mkdir()
    os.chown(root, -1, 4321)
    os.chmod(root, 0o2770)
    old = os.umask(0o077)  # the nix-daemon's umask must not matter
    try:
        spool = Spool(root)
        path = spool.add(make_entry(1))
        assert path is not None
        spool.quarantine(path)
    finally:
        os.umask(old)
    for d in ("tmp", "pending", "sent", "bad"):
        st = os.stat(root / d)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o2770, 4321), d
    st = os.stat(root / "bad" / path.name)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, 4321)


def test_existing_private_subdirectory_is_shared_once_the_spool_is(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.add(make_entry(1))  # private: created 0700 by an earlier version or setup
    os.chown(spool.root, -1, 4321)
    os.chmod(spool.root, 0o2770)
    spool.add(make_entry(2))
    st = os.stat(spool.pending_dir)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o2770, 4321)
