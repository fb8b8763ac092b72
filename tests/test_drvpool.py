"""Reading many .drv files in worker processes (tracehook.stores.drvpool): the gate's
index read that way is the index read in its own thread, broken files included, a store
larger than the gate may hold parsed at once is read in rounds, inputs first, and a pool
that cannot start or dies leaves the rest to the caller, never an error."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from tracehook.gate.index import DrvIndex
from tracehook.nix.derivation import Derivation
from tracehook.stores import drvpool
from tracehook.stores.factcache import FactCache
from tracehook.stores.nixstore import StoreReader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from synth import Closure, generate


def _store(tmp_path: Path) -> tuple[Closure, dict[str, str]]:
    """A 60-step closure, and beside it what a local user can leave in a store: junk, a
    .drv whose bytes are another's (they do not hash to its path), one whose input is
    missing. Returns the closure and the broken paths with the words the index says."""
    closure = generate(tmp_path, 60)
    store = closure.root / "nix" / "store"
    drvs = sorted(p for p in store.iterdir() if p.name.endswith(".drv"))
    (store / ("a" * 32 + "-junk.drv")).write_text("Derive([junk")
    shutil.copy(drvs[0], store / ("b" * 32 + "-copy.drv"))
    # a real .drv whose one input that nothing else uses is then removed
    texts = {p: p.read_text() for p in drvs}
    users = {d: [p for p in drvs if d.name in texts[p]] for d in drvs}
    missing = next(d for d in drvs if len(users[d]) == 1)
    orphan = users[missing][0]
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(str(orphan), moved / orphan.name)
    shutil.move(str(missing), moved / missing.name)
    shutil.copy(moved / orphan.name, store / orphan.name)
    return closure, {
        f"/nix/store/{'a' * 32}-junk.drv": "junk",
        f"/nix/store/{'b' * 32}-copy.drv": "hash to",
        f"/nix/store/{orphan.name}": missing.name,
    }


def _index(root: Path, facts: FactCache | None = None) -> DrvIndex:
    index = DrvIndex(StoreReader(str(root), max_cached=20_000, facts=facts))
    index.refresh()
    return index


def _same(a: DrvIndex, b: DrvIndex) -> None:
    assert a._by_id == b._by_id and a._by_output == b._by_output and a._seen == b._seen
    assert a.skipped == b.skipped


def _counting_reader(root: Path, parsed: list[str]) -> StoreReader:
    """A reader that keeps 10 parses and notes in ``parsed`` every .drv it reads from its
    file itself (what the worker processes left to this thread)."""
    reader = StoreReader(str(root), max_cached=10)
    real = reader._read

    def counting(drv_path: str, name: str) -> tuple[Derivation, int]:
        parsed.append(drv_path)
        return real(drv_path, name)

    reader._read = counting  # type: ignore[method-assign]
    return reader


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Processes for a few dozen files, in batches of 8 (the defaults wait for 2,000)."""
    monkeypatch.setattr(drvpool, "MIN_PATHS", 10)
    monkeypatch.setattr(drvpool, "BATCH", 8)


def test_an_index_read_in_processes_is_the_index_read_here(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_batches: None) -> None:
    closure, broken = _store(tmp_path)
    store = closure.root / "nix" / "store"
    paths = sorted(f"/nix/store/{p.name}" for p in store.iterdir() if p.name.endswith(".drv"))
    reader = StoreReader(str(closure.root))
    unreadable = [p for p, words in broken.items() if words in ("junk", "hash to")]
    # given back inputs first, each the derivation this thread reads from the file
    here = StoreReader(str(closure.root))
    given: list[str] = []
    for path, drv, size in drvpool.read_ordered(reader, paths, workers=2):
        assert drv == here.read_derivation(path) and size > 0
        assert all(inp in given for inp in drv.input_drvs if inp in paths
                   and inp not in unreadable), path
        given.append(path)
    # every .drv that reads was read by the pool (or by this thread while it started),
    # the orphan too (its missing input matters only to its hash); junk and the copy
    # were left to the caller
    assert sorted(given) == [p for p in paths if p not in unreadable]

    pooled = _index(closure.root)
    monkeypatch.setattr(drvpool, "MIN_PATHS", 10**9)
    alone = _index(closure.root)
    _same(pooled, alone)
    for path, words in broken.items():
        assert words in pooled.skipped[path], pooled.skipped[path]
    # (the steps above the removed input cannot be indexed: the others are, by the ids
    # Nix asks with)
    indexed = [d for d, _ in closure.steps if d in pooled._seen]
    assert len(indexed) >= 20
    assert all(closure.realisation_ids[d] in pooled._by_id for d in indexed)


def test_the_workers_write_the_parses_to_the_verification_cache(
        tmp_path: Path, small_batches: None) -> None:
    closure = generate(tmp_path, 30)
    facts = FactCache(tmp_path / "facts")
    _index(closure.root, facts)
    facts.close()
    again = FactCache(tmp_path / "facts")
    drvs = [f"/nix/store/{p.name}" for p in (closure.root / "nix" / "store").iterdir()
            if p.name.endswith(".drv")]
    assert len(drvs) > 30
    assert all(again.get("drv", d.encode()) is not None for d in drvs)
    assert all(again.get("index", d.encode()) is not None for d in drvs)
    again.close()


def _dying_pool(reader: StoreReader, workers: int) -> ProcessPoolExecutor:
    import multiprocessing

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=os._exit, initargs=(3,))


def test_a_pool_that_dies_or_cannot_start_leaves_the_rest_to_the_caller(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_batches: None,
        caplog: pytest.LogCaptureFixture) -> None:
    closure, _ = _store(tmp_path)
    monkeypatch.setattr(drvpool, "MIN_PATHS", 10**9)
    alone = _index(closure.root)
    monkeypatch.setattr(drvpool, "MIN_PATHS", 10)
    monkeypatch.setattr(drvpool, "_start", _dying_pool)
    with caplog.at_level(logging.WARNING, logger="tracehook.stores.drvpool"):
        _same(_index(closure.root), alone)
    assert "reading the rest here" in caplog.text

    def cannot(reader: StoreReader, workers: int) -> ProcessPoolExecutor:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(drvpool, "_start", cannot)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tracehook.stores.drvpool"):
        _same(_index(closure.root), alone)
    assert "cannot start processes" in caplog.text

    class NoProcess:
        """An executor that cannot start its process when the first batch comes (a
        service at its task limit: EAGAIN from fork)."""

        def submit(self, *args: object) -> None:
            raise OSError(11, "Resource temporarily unavailable")

        def shutdown(self, wait: bool, cancel_futures: bool) -> None:
            pass

    monkeypatch.setattr(drvpool, "_start", lambda reader, workers: NoProcess())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tracehook.stores.drvpool"):
        _same(_index(closure.root), alone)
    assert "reading the rest here" in caplog.text


def _big_drvs(store: Path, count: int, size: int) -> list[str]:
    """``count`` valid fixed-output .drv files of about ``size`` bytes (a long env var)."""
    import hashlib

    from tracehook.nix.derivation import Derivation, DerivationOutput, encode_drv, serialize
    from tracehook.nix.storepath import derivation_path, make_fixed_output_path

    paths = []
    for i in range(count):
        name = f"big-{i}"
        digest = hashlib.sha256(name.encode()).digest()
        out = make_fixed_output_path("flat", "sha256", digest, name)
        drv = Derivation({"out": DerivationOutput(out, "sha256", digest.hex())}, {}, (),
                         "x86_64-linux", "/bin/sh", ("-c", "fetch"),
                         {"name": name, "out": out, "blob": "x" * size})
        path = derivation_path(drv)
        (store / path.rsplit("/", 1)[1]).write_bytes(encode_drv(serialize(drv)))
        paths.append(path)
    return paths


def test_what_a_worker_sends_back_is_bounded_in_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_batches: None) -> None:
    """A local user can add .drv files of up to 32 MiB: a worker leaves one over LARGE
    unread, and sends at most ANSWER_BYTES of parses in one answer; the caller reads the
    rest itself, so the index is the same."""
    closure = generate(tmp_path, 20)
    store = closure.root / "nix" / "store"
    big = _big_drvs(store, 3, 200_000)
    small = sorted(f"/nix/store/{p.name}" for p in store.iterdir()
                   if p.name.endswith(".drv") and f"/nix/store/{p.name}" not in big)
    drvpool._init(str(closure.root), "/nix/store", True, None, (100_000, 10_000))
    answer = drvpool._read_batch(big + small)
    sent = [path for path, _, _ in answer]
    assert not set(sent) & set(big)  # over LARGE: not read at all
    assert 0 < len(sent) < len(small)  # the budget ran out before the small ones did
    assert sum(len(plain) for _, plain, _ in answer) <= 10_000
    monkeypatch.setattr(drvpool, "MIN_PATHS", 10**9)
    alone = _index(closure.root)
    assert all(p in alone._seen for p in big)
    monkeypatch.setattr(drvpool, "MIN_PATHS", 10)
    monkeypatch.setattr(drvpool, "LARGE", 100_000)
    monkeypatch.setattr(drvpool, "ANSWER_BYTES", 10_000)
    _same(_index(closure.root), alone)


def test_a_store_larger_than_the_readers_memory_is_parsed_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_batches: None) -> None:
    """The gate keeps 20,000 parses; a NixOS store can hold more .drv files. Indexed in
    directory order, hashing one read inputs that were pushed out meanwhile, again and
    again; indexed inputs first, each parse handed over just before it is hashed, no .drv
    is parsed twice (here: keeping 10)."""
    closure, broken = _store(tmp_path)
    monkeypatch.setattr(drvpool, "MIN_PATHS", 10**9)
    alone = _index(closure.root)
    monkeypatch.setattr(drvpool, "MIN_PATHS", 4)
    parsed: list[str] = []
    index = DrvIndex(_counting_reader(closure.root, parsed))
    index.refresh()
    _same(index, alone)
    # this thread read what the processes left to it (what it read itself while they
    # started, and the broken files, which it reads again to say why), each good one once
    good = [p for p in parsed if p not in broken]
    assert len(good) == len(set(good))


def test_a_store_larger_than_a_round_is_read_in_rounds_inputs_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_batches: None) -> None:
    """A store whose .drv files come to more than ROUND_BYTES (a NixOS store of 60,000:
    the parses of all of them are more than the gate may hold at once) is read in rounds
    of at most that many bytes, in an order worked out from the inputs each file names:
    every parse comes after its inputs' across the rounds, the index is the one read in
    this thread, and this thread parses none of the good .drv files (it used to read every
    one past the budget itself, in directory order)."""
    closure, broken = _store(tmp_path)
    store = closure.root / "nix" / "store"
    paths = sorted(f"/nix/store/{p.name}" for p in store.iterdir() if p.name.endswith(".drv"))
    sizes = {p: (store / p.rsplit("/", 1)[1]).stat().st_size for p in paths}
    here = StoreReader(str(closure.root))
    # the inputs a file names, without parsing it: what parsing it finds
    edges = dict(drvpool._edges(here, paths))
    assert set(edges) == set(paths)  # (junk too: it reads; it names no input)
    for path in paths:
        if path not in broken:
            assert set(edges[path]) == set(here.read_derivation(path).input_drvs), path

    # the parses (about twice their files) are more than may be held at once
    monkeypatch.setattr(drvpool, "TOTAL_BYTES", sum(sizes.values()))
    monkeypatch.setattr(drvpool, "ROUND_BYTES", sum(sizes.values()) // 5)
    rounds: list[list[str]] = []
    parses = drvpool._Readers.parses

    def recorded(self: drvpool._Readers, todo: list[str]) -> list[drvpool.Read]:
        rounds.append(list(todo))
        return parses(self, todo)

    monkeypatch.setattr(drvpool._Readers, "parses", recorded)
    given: list[str] = []
    for path, drv, _ in drvpool.read_ordered(here, paths, sizes, workers=2):
        assert drv == here.read_derivation(path)
        assert all(inp in given for inp in drv.input_drvs if inp in paths
                   and inp not in broken), path
        given.append(path)
    assert len(rounds) >= 5
    assert all(sum(sizes[p] for p in r) <= drvpool.ROUND_BYTES for r in rounds if len(r) > 1)
    assert sorted(given) == sorted(p for p in paths if p not in broken
                                   or broken[p] not in ("junk", "hash to"))

    monkeypatch.setattr(drvpool, "MIN_PATHS", 10**9)
    alone = _index(closure.root)
    monkeypatch.setattr(drvpool, "MIN_PATHS", 4)
    rounds.clear()
    parsed: list[str] = []
    index = DrvIndex(_counting_reader(closure.root, parsed))
    index.refresh()
    _same(index, alone)
    assert len(rounds) >= 5
    # (what else it tried to read: the input that is not in the store)
    assert [p for p in parsed if p in paths and p not in broken] == []


def _as_they_come(batches: list[list[drvpool.Read]], paths: list[str]
                  ) -> list[tuple[str, Derivation, int, bool]]:
    """What :func:`drvpool.as_inputs_arrive` gives for ``batches``: (path, derivation,
    batches taken when it was given, whether the batches had ended)."""
    taken: list[int] = []
    ended: list[bool] = []

    def batched() -> Iterator[list[drvpool.Read]]:
        for n, batch in enumerate(batches):
            taken.append(n)
            yield batch

    return [(path, drv, len(taken), bool(ended)) for path, drv, _ in
            drvpool.as_inputs_arrive(batched(), paths, lambda: ended.append(True))]


def test_each_parse_is_given_as_soon_as_its_inputs_were(tmp_path: Path) -> None:
    """Within a round the caller hashes parses as the workers send them: each is given once
    every input of it among the paths read was given, whatever order the batches come in,
    before the next batch is taken (the caller hashes while the workers read); what still
    waits when the batches end (after an input that never came: the workers could not read
    it, the caller reads it itself) is given then, inputs first."""
    import marshal
    import random

    from tracehook.nix.aterm import to_plain

    closure = generate(tmp_path, 80)
    reader = StoreReader(str(closure.root))
    store = closure.root / "nix" / "store"
    paths = sorted(f"/nix/store/{p.name}" for p in store.iterdir() if p.name.endswith(".drv"))
    drvs = {p: reader.read_derivation(p) for p in paths}
    lost = next(d for d, _ in closure.steps[5:] if any(d in drvs[u].input_drvs
                                                         for u in paths))
    reads = [(p, marshal.dumps(to_plain(drvs[p])), 1) for p in paths if p != lost]
    for seed in range(5):
        random.Random(seed).shuffle(reads)
        batches = [reads[i:i + 7] for i in range(0, len(reads), 7)]
        given: dict[str, int] = {}  # path -> batches taken when it was given
        came = {path: n + 1 for n, batch in enumerate(batches) for path, _, _ in batch}
        out = _as_they_come(batches, paths)
        for path, drv, taken, ended in out:
            assert drv == drvs[path]
            assert all(inp in given for inp in drv.input_drvs if inp in drvs and inp != lost)
            if not ended:
                assert lost not in drv.input_drvs  # (it waits for the end)
                # given before the next batch was taken, once it came and its inputs were
                # given
                due = max([came[path]] + [given[i] for i in drv.input_drvs if i in given])
                assert taken == due, path
            given[path] = taken
        assert sorted(given) == sorted(p for p in paths if p != lost)
        assert sum(not ended for *_, ended in out) >= 20  # (the sources and more, early)
        assert any(ended for *_, ended in out)  # (those above the lost input)


def test_few_files_or_one_core_are_read_in_the_calling_thread(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    closure = generate(tmp_path, 20)
    paths = [f"/nix/store/{p.name}" for p in (closure.root / "nix" / "store").iterdir()
             if p.name.endswith(".drv")]

    def never(reader: StoreReader, workers: int) -> ProcessPoolExecutor:
        raise AssertionError("no processes for this")

    monkeypatch.setattr(drvpool, "_start", never)
    reader = StoreReader(str(closure.root))
    assert list(drvpool.read_ordered(reader, paths)) == []  # under MIN_PATHS
    monkeypatch.setattr(drvpool, "MIN_PATHS", 10)
    assert list(drvpool.read_ordered(reader, paths, workers=1)) == []
