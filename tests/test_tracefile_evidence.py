"""Trace files carry evidence (docs/FORMAT.md 9.2): reading returns the signatures and the
evidence entries (a bad entry hides no other), and every append, by file and HTTP stores,
keeps the evidence already there; evidence is appended merged and deduplicated. Negative
cases are named after what a careless or hostile writer does to the file."""

from __future__ import annotations

import concurrent.futures
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from tracehook.errors import ParseError
from tracehook.stores import tracestore
from tracehook.trace.jws import render_trace_file
from tracehook.trace.tracefile import (
    TraceDocument,
    merge_evidence,
    read_trace_document,
    render_trace_document,
)
from traceserver import serve_traces

KEY = "286wqgdqv715j8yrca9lkzhyk9j3s9a8"
E1: dict[str, Any] = {"format": "tracehook-evidence-v1", "kind": "sev-snp", "report": "AAAA",
                      "claim": {"kind": "ia", "key": KEY, "outputs": {}}, "vcek": "BBBB"}
E2: dict[str, Any] = {**E1, "report": "CCCC"}


def doc(**fields: Any) -> bytes:
    return json.dumps({"signatures": ["a.b.c"], **fields}).encode()


# name, file, signatures, evidence entries, problems
READS: list[tuple[str, bytes, list[str], list[Any], int]] = [
    ("laut-file-without-evidence", render_trace_file(["a.b.c"]), ["a.b.c"], [], 0),
    ("evidence-beside-signatures", doc(evidence=[E1, E2]), ["a.b.c"], [E1, E2], 0),
    ("malformed-entry-hides-no-other", doc(evidence=[{"kind": 1}, E1, "junk"]), ["a.b.c"],
     [{"kind": 1}, E1, "junk"], 0),
    ("evidence-not-a-list", doc(evidence={"kind": "sev-snp"}), ["a.b.c"], [], 1),
    ("evidence-key-escaped",
     b'{"signatures": ["a.b.c"], "\\u0065vidence": [' + json.dumps(E1).encode() + b"]}",
     ["a.b.c"], [E1], 0),
    ("evidence-before-signatures",
     b'{"evidence": [' + json.dumps(E1).encode() + b'], "signatures": ["a.b.c"]}', ["a.b.c"],
     [E1], 0),
]


@pytest.mark.parametrize(("name", "data", "sigs", "evidence", "problems"), READS,
                         ids=[r[0] for r in READS])
def test_reading(name: str, data: bytes, sigs: list[str], evidence: list[Any],
                 problems: int) -> None:
    got = read_trace_document(data, "f")
    assert list(got.signatures) == sigs
    assert list(got.evidence) == evidence
    assert len(got.problems) == problems
    if problems:
        assert "'evidence' is a JSON dict, not a list" in got.problems[0]


def test_a_file_that_is_not_a_trace_file_is_still_malformed() -> None:
    with pytest.raises(ParseError, match="no 'signatures' key"):
        read_trace_document(b'{"evidence": []}')


def test_rendering_without_evidence_is_lauts_layout_and_with_it_round_trips() -> None:
    assert render_trace_document(TraceDocument(("a.b.c",))) == render_trace_file(["a.b.c"])
    data = render_trace_document(TraceDocument(("a.b.c",), (E1,)))
    assert read_trace_document(data) == TraceDocument(("a.b.c",), (E1,))


def test_evidence_merges_deduplicated_whatever_the_key_order() -> None:
    reordered = dict(reversed(list(E1.items())))
    assert merge_evidence([E1], [reordered, E2, E2]) == [E1, E2]
    assert merge_evidence([E2, E1], [E1]) == [E2, E1]  # existing order kept


# --- stores ----------------------------------------------------------------------------


def _file_store(tmp_path: Path) -> tracestore.TraceStore:
    return tracestore.open_store(f"file://{tmp_path}")


def test_file_append_of_a_signature_keeps_the_evidence(tmp_path: Path) -> None:
    store = _file_store(tmp_path)
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / KEY).write_bytes(doc(evidence=[E1]))
    store.append(KEY, ["ours.sig.x"])
    got = store.read(KEY)
    assert got.signatures == ("a.b.c", "ours.sig.x") and got.evidence == (E1,)
    assert store.get(KEY) == ["a.b.c", "ours.sig.x"]


def test_file_append_of_evidence_merges(tmp_path: Path) -> None:
    store = _file_store(tmp_path)
    store.append(KEY, ["a.b.c"], [E1])
    store.append(KEY, [], [E1, E2])
    store.append(KEY, ["a.b.c"], [E2])
    got = store.read(KEY)
    assert got.signatures == ("a.b.c",) and got.evidence == (E1, E2)


def _append_evidence(url: str, n: int) -> None:
    tracestore.open_store(url).append(KEY, [f"s{n}.x.y"], [{**E1, "report": f"R{n}"}])


def test_file_concurrent_writers_lose_no_evidence(tmp_path: Path) -> None:
    url = f"file://{tmp_path}"
    with concurrent.futures.ProcessPoolExecutor(4) as pool:
        list(pool.map(_append_evidence, [url] * 12, range(12)))
    got = tracestore.open_store(url).read(KEY)
    assert sorted(e["report"] for e in got.evidence) == sorted(f"R{n}" for n in range(12))
    assert len(got.signatures) == 12


def test_http_append_of_a_signature_keeps_the_evidence() -> None:
    with serve_traces() as server:
        server.state.files[KEY] = doc(evidence=[E1])
        store = tracestore.open_store(server.url)
        store.append(KEY, ["ours.sig.x"])
        got = store.read(KEY)
        assert got.signatures == ("a.b.c", "ours.sig.x") and got.evidence == (E1,)
        store.append(KEY, ["ours.sig.x"], [E1])  # nothing new: no write
        assert server.state.puts == 1


def test_http_concurrent_evidence_writers_lose_nothing() -> None:
    with serve_traces() as server:
        barrier = threading.Barrier(8)

        def writer(n: int) -> None:
            barrier.wait()
            _append_evidence(server.url, n)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(writer, range(8)))
        got = tracestore.open_store(server.url).read(KEY)
        assert sorted(e["report"] for e in got.evidence) == sorted(f"R{n}" for n in range(8))
        assert server.state.conflicts > 0
