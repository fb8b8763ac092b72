"""store_db: what Nix recorded, read without spawning Nix, from a real store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from conftest import MakeNixEnv
from nixharness import NixEnv, NixTier
from tracehook.errors import EnvironmentFault
from tracehook.nix.derivation import Derivation, DerivationOutput, encode_drv, serialize
from tracehook.nix.storepath import derivation_path
from tracehook.stores.nixdb import StoreDatabase
from tracehook.stores.nixstore import StoreReader

pytestmark = pytest.mark.nix


def test_reads_what_nix_recorded(nix226: NixTier, make_nixenv: MakeNixEnv) -> None:
    env: NixEnv = make_nixenv(nix226)
    res = env.build("iaB")
    out = res.out_paths[0]
    with StoreDatabase(str(env.root)) as db:
        assert db.is_valid(out)
        info = db.path_info(out)
        assert info is not None and info.nar_hash.startswith("sha256:")
        assert info.deriver and info.deriver.endswith("-ia-b.drv")
        assert info.nar_size and info.nar_size > 0 and info.ca is None  # input-addressed
        assert db.derivation_outputs(info.deriver) == {"out": out}
        assert db.path_info("/nix/store/00000000000000000000000000000000-nothing") is None


def test_missing_database_is_an_environment_error(tmp_path: Path) -> None:
    with pytest.raises(EnvironmentFault, match="no Nix store database"):
        StoreDatabase(str(tmp_path)).is_valid("/nix/store/x")


def test_falls_back_to_immutable_when_read_only_open_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that cannot create the WAL index (no write access next to the database,
    no Nix holding it open) reads the checkpointed file as immutable instead of failing."""
    dbdir = tmp_path / "nix/var/nix/db"
    dbdir.mkdir(parents=True)
    conn = sqlite3.connect(dbdir / "db.sqlite")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE ValidPaths (id INTEGER PRIMARY KEY, path TEXT)")
    conn.execute("INSERT INTO ValidPaths (path) VALUES ('/nix/store/x')")
    conn.commit()
    conn.close()  # last connection: the WAL is checkpointed and removed
    assert not (dbdir / "db.sqlite-wal").exists()
    real_connect = sqlite3.connect
    opened: list[str] = []

    def connect(target: str, uri: bool = False, timeout: float = 5.0) -> sqlite3.Connection:
        opened.append(target)
        if "mode=ro" in target:
            # What a reader without write access to dbdir gets: the open succeeds, the first
            # query fails (SQLite cannot create the -shm index). Stand-in: a database with
            # no tables, whose queries fail the same way (OperationalError).
            return real_connect(":memory:")
        return real_connect(target, uri=uri, timeout=timeout)

    monkeypatch.setattr(sqlite3, "connect", connect)
    with StoreDatabase(str(tmp_path)) as db:
        assert db.is_valid("/nix/store/x")
        assert not db.is_valid("/nix/store/y")
    assert any("immutable=1" in u for u in opened)


def test_reader_memo_is_bounded_when_asked(tmp_path: Path) -> None:
    """A long-running gate keeps at most ``max_cached`` parsed derivations (LRU)."""
    store = tmp_path / "nix" / "store"
    store.mkdir(parents=True)
    paths = []
    for i in range(5):
        drv = Derivation({"out": DerivationOutput("", "r:sha256", "")}, {}, (), "x86_64-linux",
                         "/bin/sh", (), {"name": f"d{i}", "out": ""})
        path = derivation_path(drv)
        (store / path.rsplit("/", 1)[1]).write_bytes(encode_drv(serialize(drv)))
        paths.append(path)
    reader = StoreReader(str(tmp_path), max_cached=2)
    first = reader.read_derivation(paths[0])
    for p in paths[1:]:
        reader.read_derivation(p)
    assert len(reader._drvs) == 2
    assert list(reader._drvs.keys()) == paths[3:]
    again = reader.read_derivation(paths[0])  # evicted: read and parsed again, same value
    assert again == first and again is not first
