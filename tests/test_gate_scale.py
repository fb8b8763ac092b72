"""The gate at scale: no head-of-line blocking, overall deadlines, slow clients, junk .drv
files, and a whole closure served once per step (issue: the gate at NixOS scale)."""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from gatekit import Synthetic, make_synthetic, running_gate, write_policy
from gateproc import wait_for
from test_gate_http import get
from tracehook.gate.front import HttpLimits
from tracehook.nix.storepath import hash_part
from tracehook.trace.stepkey import step_key
from traceserver import serve_traces

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from synth import generate, with_policy


@pytest.fixture
def syn(tmp_path: Path) -> Synthetic:
    return make_synthetic(tmp_path / "syn")


def _policy(path: Path, traces_url: str) -> Path:
    """builderA's policy reading traces from ``traces_url``."""
    write_policy(path, Path("/unused"), '"builderA"', ["builderA"])
    lines = path.read_text().splitlines()
    lines[0] = f'traces = ["{traces_url}"]'
    path.write_text("\n".join(lines) + "\n")
    return path


def _http_traces(syn: Synthetic, server_files: dict[str, bytes]) -> None:
    for f in (syn.traces / "traces").iterdir():
        if not f.name.startswith("."):
            server_files[f.name] = f.read_bytes()


def _key_of(syn: Synthetic, drv_path: str) -> str:
    from tracehook.stores.nixstore import StoreReader

    drv = StoreReader(str(syn.root)).read_derivation(drv_path)
    return step_key(drv, {}).key.key


def test_a_store_that_never_answers_one_key_does_not_delay_another_path(
        syn: Synthetic, tmp_path: Path) -> None:
    """The trace store hangs on one step's key: that request waits (then 502 at the
    deadline, not cached); an unrelated path is answered at once meanwhile."""
    with serve_traces() as server:
        _http_traces(syn, server.state.files)
        stuck = threading.Event()
        server.state.hang[_key_of(syn, syn.ca_drv)] = stuck
        policy = _policy(tmp_path / "policy.toml", server.url)
        with running_gate(policy, [f"file://{syn.cache}"], str(syn.root),
                          tmp_path / "gate.log", verify_deadline=2.0) as gate, \
                ThreadPoolExecutor(2) as pool:
            slow = pool.submit(get, gate.url, f"/realisations/{syn.ca_id}.doi")
            time.sleep(0.3)  # the hanging verification is under way
            started = time.monotonic()
            assert get(gate.url, f"/{hash_part(syn.ia_out)}.narinfo")[0] == 200
            assert time.monotonic() - started < 0.5
            status, body = slow.result(timeout=10)
            assert status == 502 and b"not decided within 2 s" in body, body
            # a fault is never cached: once the store answers, the same request verifies
            stuck.set()
            deadline = time.monotonic() + 10
            while get(gate.url, f"/realisations/{syn.ca_id}.doi")[0] != 200:
                assert time.monotonic() < deadline, "never recovered"
                time.sleep(0.2)
            refused = [e for e in gate.events() if e["outcome"] == "refused"]
            assert refused == []


def test_a_store_that_trickles_is_a_fault_not_no_trace(syn: Synthetic, tmp_path: Path) -> None:
    """A trace store that sends its answer a byte at a time is cut off at its overall
    deadline: 502 (a fault), never 'no trace' (404)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    stop = threading.Event()

    def trickle() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            threading.Thread(target=_trickle_one, args=(conn, stop), daemon=True).start()

    threading.Thread(target=trickle, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.getsockname()[1]}"
        policy = _policy(tmp_path / "policy.toml", url)
        with running_gate(policy, [f"file://{syn.cache}"], str(syn.root),
                          tmp_path / "gate.log", upstream_timeout=0.5) as gate:
            started = time.monotonic()
            status, _ = get(gate.url, f"/{hash_part(syn.ia_out)}.narinfo")
            assert status == 502
            assert time.monotonic() - started < 5  # 3 x the 0.5 s timeout, not per byte
    finally:
        stop.set()
        srv.close()


def _trickle_one(conn: socket.socket, stop: threading.Event) -> None:
    with conn:
        try:
            conn.recv(4096)
            for b in b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"{" * 1000:
                if stop.is_set():
                    return
                conn.sendall(bytes([b]))
                time.sleep(0.2)
        except OSError:
            return


def test_520_trickling_connections_do_not_keep_a_client_out(syn: Synthetic,
                                                           tmp_path: Path) -> None:
    with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root),
                      tmp_path / "gate.log", http=HttpLimits(header_timeout=30)) as gate:
        host, port = gate.url.removeprefix("http://").split(":")
        flood = []
        for i in range(520):
            s = socket.create_connection((host, int(port)))
            s.sendall(b"GET /nix-cache-info HTTP/1.1\r\n" if i % 2 else b"G")
            flood.append(s)
        try:
            time.sleep(0.5)
            for _ in range(3):
                started = time.monotonic()
                assert get(gate.url, f"/{hash_part(syn.ia_out)}.narinfo")[0] == 200
                assert time.monotonic() - started < 1.0
        finally:
            for s in flood:
                s.close()


def test_junk_drv_files_are_read_once(syn: Synthetic, tmp_path: Path) -> None:
    """Junk .drv files in the store (a failed nix-store --add leaves one) are remembered,
    not reread and reparsed on every request for an unknown path."""
    store = syn.root / "nix" / "store"
    for i in range(200):
        (store / f"{i:032d}-junk.drv".replace("0", "a", 1)).write_text("Derive([junk")
    with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root),
                      tmp_path / "gate.log") as gate:
        index = gate.server.service.index
        assert get(gate.url, "/realisations/sha256:" + "ab" * 32 + "!out.doi")[0] == 404
        assert len(index.skipped) >= 200
        reads = {"n": 0}
        reader = index.reader
        original = reader.read_derivation

        def counting(path: str) -> object:
            reads["n"] += 1
            return original(path)

        reader.read_derivation = counting  # type: ignore[method-assign,assignment]
        os.utime(store)  # the directory "changed": a rescan, but no junk is reread
        for i in range(20):
            assert get(gate.url, f"/realisations/sha256:{i:064x}!out.doi")[0] == 404
        assert reads["n"] == 0


def test_a_whole_closure_in_nix_order_decides_each_step_once(tmp_path: Path) -> None:
    """300 steps requested as Nix does (realisation then narinfo, random order, 8 clients at
    once): every answer 200, and every step planned once for all of them."""
    closure, policy = with_policy(tmp_path, 300)
    work = closure.requests()
    random.Random(7).shuffle(work)
    lock = threading.Lock()
    statuses: list[int] = []
    with running_gate(policy, [f"file://{closure.cache}"], str(closure.root),
                      tmp_path / "gate.log") as gate:
        host, port = gate.url.removeprefix("http://").split(":")

        def client() -> None:
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            while True:
                with lock:
                    if not work:
                        return
                    pair = work.pop()
                for path in pair:
                    if path:
                        conn.request("GET", path)
                        resp = conn.getresponse()
                        resp.read()
                        statuses.append(resp.status)

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        verifier = gate.server.service.verifier
        engine = verifier._engine
        assert engine is not None
        assert set(statuses) == {200}
        assert verifier.steps_planned == len(engine.graph.heights)
        allowed = [e for e in gate.events() if e["outcome"] == "allowed"]
        assert json.dumps(allowed)  # the log is well-formed


def test_a_realisations_checks_answer_the_narinfo_asked_for_next(
        syn: Synthetic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nix asks for a realisation, then for its output's narinfo: the second answer reuses
    the first's verdict and its checked upstream narinfo (one engine submission, one
    upstream read), within the generation only; a path refused for what the upstream holds
    is decided again at every request."""
    from tracehook.gate import service, upstreams
    from tracehook.verify.engine import Engine

    reads: list[str] = []
    submits: list[str] = []
    real_fetch, real_submit = upstreams.fetch_narinfos, Engine.submit

    def fetch(upstreams: Any, path: str) -> Any:
        reads.append(path)
        return real_fetch(upstreams, path)

    def submit(self: Engine, target: Any) -> Any:
        submits.append(target.drv_path)
        return real_submit(self, target)

    monkeypatch.setattr(service, "fetch_narinfos", fetch)
    monkeypatch.setattr(Engine, "submit", submit)
    with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root),
                      tmp_path / "gate.log") as gate:
        assert get(gate.url, f"/realisations/{syn.ca_id}.doi")[0] == 200
        status, body = get(gate.url, f"/{hash_part(syn.ca_out)}.narinfo")
        assert status == 200 and syn.ca_out.encode() in body
        assert reads == [syn.ca_out] and submits == [syn.ca_drv]
        # a new generation (the trace store changed): decided and read again
        (syn.traces / "traces" / "unrelated").write_text("{}")
        time.sleep(0.4)
        assert get(gate.url, f"/{hash_part(syn.ca_out)}.narinfo")[0] == 200
        assert reads == [syn.ca_out] * 2 and submits == [syn.ca_drv] * 2
        # what the upstream holds now is never taken from an earlier choice
        narinfo_file = syn.cache / f"{hash_part(syn.ia_out)}.narinfo"
        kept = narinfo_file.read_bytes()
        narinfo_file.unlink()
        assert get(gate.url, f"/{hash_part(syn.ia_out)}.narinfo")[0] == 404
        narinfo_file.write_bytes(kept)
        assert get(gate.url, f"/{hash_part(syn.ia_out)}.narinfo")[0] == 200


def _counting_reads(reader: Any) -> list[str]:
    """The .drv paths ``reader`` reads from now on (a list it appends to)."""
    reads: list[str] = []
    real = reader.read_derivation

    def counting(path: str) -> Any:
        reads.append(path)
        return real(path)

    reader.read_derivation = counting
    return reads


def test_a_restarted_index_reads_what_it_found_from_the_facts(tmp_path: Path) -> None:
    """The .drv index's findings (realisation ids, output paths named) are facts of the
    .drv files: a gate started again on the same --cache-dir does not parse them again,
    and a row of another shape is indexed from the file again."""
    from tracehook.gate.index import DrvIndex
    from tracehook.stores.factcache import FactCache
    from tracehook.stores.nixstore import StoreReader

    closure = generate(tmp_path, 20)
    facts = FactCache(tmp_path / "facts")
    first = DrvIndex(StoreReader(str(closure.root), facts=facts))
    count = first.refresh()
    facts.close()
    facts = FactCache(tmp_path / "facts")
    reader = StoreReader(str(closure.root), facts=facts)
    reads = _counting_reads(reader)
    again = DrvIndex(reader)
    assert again.refresh() == count and reads == []
    assert again._by_id == first._by_id and again._by_output == first._by_output
    victim = sorted(again._seen)[0]
    facts.put("index", victim.encode(), b"\x00not marshal")
    third = DrvIndex(reader)
    assert third.refresh() == count and victim in reads
    assert third._by_id == first._by_id
    facts.close()


def test_a_restarted_index_reads_only_the_new_drv_files(tmp_path: Path) -> None:
    """A derivation's own (unmasked) hash modulo is kept with what the index found in it:
    a .drv added while the gate was stopped is indexed from its own file alone, without
    reading the closure below it again (before, every input was read and hashed anew), and
    its ids are the ones a fresh index finds. A row in the format before (without the
    hash) is indexed from the file again."""
    import marshal

    from tracehook.gate.index import DrvIndex
    from tracehook.stores.factcache import FactCache
    from tracehook.stores.nixstore import StoreReader

    closure = generate(tmp_path, 40)
    facts = FactCache(tmp_path / "facts")
    DrvIndex(StoreReader(str(closure.root), facts=facts)).refresh()
    facts.close()
    changed = generate(tmp_path / "changed", 40, changed="pkg-30", store=closure.root)
    new = {d for d, _ in changed.steps} - {d for d, _ in closure.steps}
    assert 0 < len(new) < 10
    facts = FactCache(tmp_path / "facts")
    reader = StoreReader(str(closure.root), facts=facts)
    reads = _counting_reads(reader)
    again = DrvIndex(reader)
    again.refresh()
    assert set(reads) == new
    fresh = DrvIndex(StoreReader(str(closure.root)))
    fresh.refresh()
    assert again._by_id == fresh._by_id and again._by_output == fresh._by_output
    assert all(changed.realisation_ids[d] in again._by_id for d in new)
    old = sorted(again._seen - new)[0]
    ids, outputs, _, _ = marshal.loads(facts.get("index", old.encode()) or b"")
    facts.put("index", old.encode(), marshal.dumps((ids, outputs)))
    reads.clear()
    third = DrvIndex(reader)
    third.refresh()
    assert old in reads and third._by_id == fresh._by_id
    facts.close()


def test_a_restarted_index_reads_the_whole_index_in_one_fact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a scan has indexed SNAPSHOT_AFTER .drv files, the whole index is kept in one
    fact: a gate started again reads that instead of a fact per .drv (or the files), for
    the .drv files still in the store (one gone since is not indexed); a .drv added
    meanwhile is hashed from the hashes it kept. A whole index of another shape, or a row
    of another shape, is indexed from the facts of each .drv: the same maps."""
    import marshal

    from tracehook.gate import index as index_module
    from tracehook.gate.index import SNAPSHOT_NS, DrvIndex
    from tracehook.stores.factcache import FactCache
    from tracehook.stores.nixstore import StoreReader

    monkeypatch.setattr(index_module, "SNAPSHOT_AFTER", 10)
    closure = generate(tmp_path, 40)
    facts = FactCache(tmp_path / "facts")
    first = DrvIndex(StoreReader(str(closure.root), facts=facts))
    first.refresh()
    facts.close()
    gone = sorted(first._seen)[3]
    (closure.root / gone.lstrip("/")).unlink()
    facts = FactCache(tmp_path / "facts")
    reader = StoreReader(str(closure.root), facts=facts)
    asked: list[str] = []
    real_get = facts.get

    def get(ns: str, key: bytes) -> bytes | None:
        asked.append(ns)
        return real_get(ns, key)

    facts.get = get  # type: ignore[method-assign]
    reads = _counting_reads(reader)
    again = DrvIndex(reader)
    assert again.refresh() == len(first) - 1
    assert asked == [SNAPSHOT_NS] and reads == []
    expected_ids = {rid: at for rid, at in first._by_id.items() if at[0] != gone}
    expected_outputs = {hp: [at for at in ats if at[0] != gone]
                        for hp, ats in first._by_output.items()}
    expected_outputs = {hp: ats for hp, ats in expected_outputs.items() if ats}
    assert again._by_id == expected_ids and again._by_output == expected_outputs
    assert gone not in again._seen
    assert all(again._hashes[p] == first._hashes[p] for p in again._seen)
    # a .drv added while the gate was stopped: hashed from the hashes kept
    changed = generate(tmp_path / "changed", 40, changed="pkg-30", store=closure.root)
    new = {d for d, _ in changed.steps} - {d for d, _ in closure.steps}
    again.refresh()
    assert all(again.by_realisation_id(changed.realisation_ids[d]) == (d, "out") for d in new)
    assert set(reads) == new

    key = again.real_dir.encode()
    whole = facts.get(SNAPSHOT_NS, key)
    assert whole is not None
    rows = marshal.loads(whole)
    victim = sorted(rows)[0]
    rows[victim] = ("another", "shape")
    for value in (marshal.dumps(["not", "a", "dict"]), b"\x00not marshal",
                  marshal.dumps(rows)):
        facts.put(SNAPSHOT_NS, key, value)
        asked.clear()
        other = DrvIndex(reader)
        other.refresh()
        assert "index" in asked
        assert other._by_id == again._by_id and other._by_output == again._by_output
    facts.close()


def test_the_whole_index_is_written_again_after_many_more_and_when_the_gate_stops(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole index is not written again for a few new .drv files (a store that grows a
    little at a time), but when the index is closed (the gate stops) it is, with them."""
    import marshal

    from tracehook.gate import index as index_module
    from tracehook.gate.index import SNAPSHOT_NS, DrvIndex
    from tracehook.stores.factcache import FactCache
    from tracehook.stores.nixstore import StoreReader

    monkeypatch.setattr(index_module, "SNAPSHOT_AFTER", 10)
    closure = generate(tmp_path, 40)
    facts = FactCache(tmp_path / "facts")
    index = DrvIndex(StoreReader(str(closure.root), facts=facts))
    index.refresh()
    key = index.real_dir.encode()

    def kept() -> set[str]:
        return set(marshal.loads(facts.get(SNAPSHOT_NS, key) or b""))

    assert kept() == index._seen
    changed = generate(tmp_path / "changed", 40, changed="pkg-30", store=closure.root)
    new = {d for d, _ in changed.steps} - {d for d, _ in closure.steps}
    assert 0 < len(new) < 10
    index.refresh()
    assert new <= index._seen and not new & kept()
    index.close()
    assert kept() == index._seen
    facts.close()


def test_the_realisation_of_a_fixed_output_step_is_answered_as_its_narinfo_is(
        tmp_path: Path) -> None:
    """A fixed-output step's value is pinned by its .drv, not by a NAR hash in a trace: its
    realisation is checked against the upstream's narinfo as the narinfo request checks it
    (it was checked against an empty NAR hash, and answered 500)."""
    closure, policy = with_policy(tmp_path / "built", 30)
    with running_gate(policy, [f"file://{closure.cache}"], str(closure.root),
                      tmp_path / "gate.log") as gate:
        index = gate.server.service.index
        index.refresh()
        reader = index.reader
        fixed = [(rid, drv) for rid, (drv, _) in index._by_id.items()
                 if reader.read_derivation(drv).kind == "fixed"]
        assert fixed
        for rid, drv in fixed:
            status, body = get(gate.url, f"/realisations/{rid}.doi")
            assert status == 200, body
            out = reader.read_derivation(drv).outputs["out"].path
            assert json.loads(body)["outPath"] == out.rsplit("/", 1)[1]


def test_drv_files_written_while_the_gate_runs_are_indexed_before_a_request(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What nix-instantiate writes while the gate runs is indexed in the background (every
    --index-interval), so the substitution that follows does not wait for it; a store
    directory that cannot be read meanwhile is logged once, and indexing resumes."""
    import logging
    import shutil

    closure, policy = with_policy(tmp_path / "built", 30)
    root = tmp_path / "consumer"
    store = root / "nix" / "store"
    store.mkdir(parents=True)
    caplog.set_level(logging.INFO, logger="tracehook.gate.index")
    with running_gate(policy, [f"file://{closure.cache}"], str(root), tmp_path / "gate.log",
                      index_interval=0.05) as gate:
        index = gate.server.service.index
        drvs = sorted((closure.root / "nix" / "store").glob("*.drv"))
        for drv in drvs:  # as nix-instantiate writes them
            shutil.copy(drv, store / drv.name)
        wait_for(lambda: len(index) == len(drvs), 10)
        reads: list[str] = []
        original = index.reader.read_derivation

        def counting(path: str) -> Any:
            reads.append(path)
            return original(path)

        index.reader.read_derivation = counting  # type: ignore[method-assign,assignment]
        rid = next(iter(index._by_id))
        status, body = get(gate.url, f"/realisations/{rid}.doi")
        assert status == 200, body
        assert not any(r.endswith(".drv") and r not in index._seen for r in reads)
        store.rename(root / "moved")  # the store directory is gone for a while
        wait_for(lambda: "background indexing" in caplog.text, 10)
        time.sleep(0.3)
        assert caplog.text.count("background indexing") == 1  # once, not every look
        (root / "moved").rename(store)
        wait_for(lambda: "can be read again" in caplog.text, 10)
    assert index._watch is None  # stopped with the server


def _consumer_without_last(tmp_path: Path, built: Path) -> tuple[Path, Path, list[Path]]:
    """A consumer store (its root, its store directory) holding every .drv file of the
    store at ``built`` but the last by name, and those .drv files, the last one included."""
    root = tmp_path / "consumer"
    store = root / "nix" / "store"
    store.mkdir(parents=True)
    drvs = sorted((built / "nix" / "store").glob("*.drv"))
    for drv in drvs[:-1]:
        shutil.copy(drv, store / drv.name)
    return root, store, drvs


def test_a_drv_read_while_it_was_being_written_is_indexed_once_it_is_whole(
        tmp_path: Path) -> None:
    """Nix writes a .drv in place: the index may read it half written (it does not parse).
    Its end changes the file, not the directory: the index still looks at it again and
    indexes it once it is whole, without any other change to the store."""
    closure, policy = with_policy(tmp_path / "built", 5)
    root, store, drvs = _consumer_without_last(tmp_path, closure.root)
    last = drvs[-1]
    whole = last.read_bytes()
    with running_gate(policy, [f"file://{closure.cache}"], str(root), tmp_path / "gate.log",
                      index_interval=0.05) as gate:
        index = gate.server.service.index
        wait_for(lambda: len(index) == len(drvs) - 1, 10)
        with (store / last.name).open("wb") as f:
            f.write(whole[: len(whole) // 2])
            f.flush()
            wait_for(lambda: f"{index.store_dir}/{last.name}" in index.skipped, 10)
            f.write(whole[len(whole) // 2:])
        wait_for(lambda: len(index) == len(drvs), 5)


def test_a_drv_whose_writing_ends_just_after_a_failed_read_is_read_again(
        tmp_path: Path) -> None:
    """The race in the test above at its narrowest: the read finds the file half written,
    and the writing ends before the index notes the failure. What the failure is
    remembered by is the file as it was read, so the whole file differs from it and is
    indexed (it was remembered by the whole file's size and time, and never read again)."""
    from tracehook.gate.index import DrvIndex
    from tracehook.stores.nixstore import StoreReader

    closure = generate(tmp_path / "built", 5)
    root, store, drvs = _consumer_without_last(tmp_path, closure.root)
    last = drvs[-1]
    whole = last.read_bytes()
    (store / last.name).write_bytes(whole[: len(whole) // 2])
    index = DrvIndex(StoreReader(str(root)))
    real = index.reader.read_derivation
    path = f"{index.store_dir}/{last.name}"

    def read_then_finish(drv_path: str) -> Any:
        try:
            return real(drv_path)
        finally:
            if drv_path == path and (store / last.name).stat().st_size < len(whole):
                with (store / last.name).open("ab") as f:  # the writer ends meanwhile
                    f.write(whole[len(whole) // 2:])

    index.reader.read_derivation = read_then_finish  # type: ignore[method-assign]
    index.refresh()
    assert path in index.skipped and len(index) == len(drvs) - 1
    index.refresh()  # (a failure this young makes the next look list the store again)
    assert len(index) == len(drvs) and path not in index.skipped


def test_a_drv_indexed_while_an_input_is_half_written_is_indexed_once_it_is_whole(
        tmp_path: Path) -> None:
    """nix-instantiate writes a consumer and its inputs in any order the scan may see: a
    whole .drv whose input does not parse yet is not remembered as broken itself (its own
    file never changes again); once the input is whole, both are indexed."""
    from tracehook.gate.index import DrvIndex
    from tracehook.stores.nixstore import StoreReader

    closure = generate(tmp_path / "built", 5)
    root = tmp_path / "consumer"
    store = root / "nix" / "store"
    shutil.copytree(closure.root / "nix" / "store", store)
    reader = StoreReader(str(root))
    top = closure.target
    half = store / Path(sorted(reader.read_derivation(top).input_drvs)[0]).name
    whole = half.read_bytes()
    half.write_bytes(whole[: len(whole) // 2])
    index = DrvIndex(reader)
    index.refresh()
    assert top in index.skipped and "input" in index.skipped[top]
    with half.open("ab") as f:  # the writer ends (the store directory does not change)
        f.write(whole[len(whole) // 2:])
    index.refresh()  # (a failure this young makes the next look list the store again)
    assert top not in index.skipped and len(index) == len(list(store.glob("*.drv")))


def test_index_interval_0_indexes_only_when_a_request_asks(tmp_path: Path) -> None:
    import shutil

    closure, policy = with_policy(tmp_path / "built", 10)
    root = tmp_path / "consumer"
    store = root / "nix" / "store"
    store.mkdir(parents=True)
    with running_gate(policy, [f"file://{closure.cache}"], str(root), tmp_path / "gate.log",
                      index_interval=0) as gate:
        index = gate.server.service.index
        drvs = sorted((closure.root / "nix" / "store").glob("*.drv"))
        for drv in drvs:
            shutil.copy(drv, store / drv.name)
        time.sleep(0.3)
        assert len(index) == 0 and index._watch is None
        assert get(gate.url, "/realisations/sha256:" + "ab" * 32 + "!out.doi")[0] == 404
        assert len(index) == len(drvs)


def test_the_background_index_looks_less_often_when_a_look_takes_long() -> None:
    from tracehook.gate.index import next_look

    assert next_look(1.0, 0.001) == 1.0  # a stat, or a few new files: every interval
    assert next_look(1.0, 0.3) == pytest.approx(3.0)  # a large store listed: 10 % of a core
    assert next_look(0.05, 0.0) == 0.05


def _watched_index(tmp_path: Path, steps: int) -> tuple[Any, Path, list[Path]]:
    """An index of an empty consumer store, and the .drv files of a closure of ``steps``."""
    from tracehook.gate.index import DrvIndex
    from tracehook.stores.nixstore import StoreReader

    closure = generate(tmp_path / "built", steps)
    root = tmp_path / "consumer"
    store = root / "nix" / "store"
    store.mkdir(parents=True)
    return (DrvIndex(StoreReader(str(root))), store,
            sorted((closure.root / "nix" / "store").glob("*.drv")))


def test_a_drv_written_while_the_gate_runs_is_indexed_at_once_not_at_the_next_look(
        tmp_path: Path) -> None:
    """The store directory is watched (inotify): what nix-instantiate writes is read while
    it writes, not at the next look (30 s here), so decisions ahead start with it."""
    index, store, drvs = _watched_index(tmp_path, 20)
    index.start_watch(30.0)
    try:
        time.sleep(0.2)  # (the first look, of the empty store)
        started = time.monotonic()
        for drv in drvs:
            shutil.copy(drv, store / drv.name)
        wait_for(lambda: len(index) == len(drvs), 10)
        assert time.monotonic() - started < 5
        more = store / "junk.drv"  # (one that does not parse is looked at, not indexed)
        more.write_text("Derive(")
        wait_for(lambda: f"{index.store_dir}/junk.drv" in index.skipped, 10)
    finally:
        closing = time.monotonic()
        index.close()
    assert index._watch is None
    assert time.monotonic() - closing < 2  # (the waiting thread is woken, not waited out)


def test_without_a_watch_the_index_looks_every_interval(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where there is no inotify (not Linux, its limits reached) the index looks every
    interval, as before."""
    from tracehook.stores.dirwatch import DirWatch

    monkeypatch.setattr(DirWatch, "open", classmethod(lambda cls, path: None))
    index, store, drvs = _watched_index(tmp_path, 5)
    index.start_watch(30.0)
    try:
        time.sleep(0.2)
        for drv in drvs:
            shutil.copy(drv, store / drv.name)
        time.sleep(0.5)
        assert len(index) == 0  # not before the next look, 30 s on
    finally:
        index.close()
    again = type(index)(index.reader)  # (a closed index does not start again)
    again.start_watch(0.1)
    try:
        wait_for(lambda: len(again) == len(drvs), 10)
    finally:
        again.close()


def test_a_store_directory_removed_and_made_again_is_watched_again(tmp_path: Path) -> None:
    """The watch ends with its directory: the index goes on looking, and watches the new
    one (or looks every interval until it can)."""
    index, store, drvs = _watched_index(tmp_path, 5)
    index.start_watch(0.2)
    try:
        time.sleep(0.2)
        store.rmdir()
        wait_for(lambda: index._dirwatch is None, 10)  # the watch ended with it
        store.mkdir()
        for drv in drvs:
            shutil.copy(drv, store / drv.name)
        wait_for(lambda: len(index) == len(drvs), 10)
        wait_for(lambda: index._dirwatch is not None, 10)  # watched again
        late = store / "late.drv"
        late.write_text("Derive(")
        wait_for(lambda: f"{index.store_dir}/late.drv" in index.skipped, 10)
    finally:
        index.close()


def test_a_drv_written_in_the_same_clock_tick_as_the_last_look_is_read(
        tmp_path: Path) -> None:
    """The store directory's mtime moves in clock ticks (milliseconds): a file created in
    the tick of the last look's stat leaves it as that look saw it. A look the watch asks
    for lists the directory whatever its mtime says."""
    index, store, _ = _watched_index(tmp_path, 5)
    index.start_watch(30.0)
    try:
        wait_for(lambda: index._mtime is not None, 10)  # (the first look, of the empty store)
        seen = index._mtime
        with index._scan_lock:  # (the look the watch asks for waits until the file is made)
            (store / "same-tick.drv").write_text("Derive(")
            os.utime(store, ns=(seen, seen))  # as if created in the tick of the last stat
        wait_for(lambda: f"{index.store_dir}/same-tick.drv" in index.skipped, 10)
    finally:
        index.close()
