"""Faults are faults, and what the caches hold now is never remembered (issue 12).

- a ``file://`` trace store that does not exist, or an HTTP one that does not answer, is a
  fault: ``tracehook verify`` exits 3 and its "why" names the store (never only "no
  trace"); the gate answers 502 and logs ``failed`` naming the store;
- a path no binary cache has (no narinfo; a narinfo whose NAR is missing) is logged as
  ``unavailable`` at every request, never reused: it is served as soon as the cache has it;
- a refusal's 404 carries its reason (``curl`` shows it; Nix ignores it) and its log line
  names the step once.
The store, cache and traces are hand-made (tests/gatekit.py ``make_synthetic``).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from gatekit import Synthetic, make_synthetic, running_gate, write_policy
from gateproc import get
from tracehook import cli
from tracehook.errors import Refusal
from tracehook.gate.gatelog import GateLog
from tracehook.nix.storepath import hash_part
from tracehook.stores.eventlog import EventLog
from verifyhelp import run_verify


@pytest.fixture
def syn(tmp_path: Path) -> Synthetic:
    return make_synthetic(tmp_path / "syn")


UNREACHABLE = "http://127.0.0.1:9/"


@pytest.mark.parametrize("store", ["missing-file-store", "unreachable-http-store"])
def test_verify_names_the_trace_store_it_could_not_read(
    store: str, syn: Synthetic, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"file://{tmp_path}/no-such-store" if store.startswith("missing") else UNREACHABLE
    args = [syn.ia_drv, "--policy", str(syn.policy), "--store", str(syn.root)]
    res = run_verify(capsys, *args, "--traces", url)
    assert res.rc == 3, res.out
    why = next(line for line in res.out.splitlines() if line.startswith("  why:"))
    assert "could not check" in why and f"trace store {url.rstrip('/')}" in why, why
    assert "no trace" not in why
    assert f"  could not read: trace store {url.rstrip('/')}" in res.out
    assert res.err.count(url.rstrip("/")) == 0  # said once, in the report
    # Beside a store that answers (and has nothing), what that one said is kept too.
    empty = tmp_path / "empty"
    (empty / "traces").mkdir(parents=True)
    res = run_verify(capsys, *args, "--traces", url, "--traces", f"file://{empty}", "--json")
    report = res.json()
    assert res.rc == 3 and report["failed_step"]["failure"] == "unreadable"
    assert "other trace store(s): no trace" in report["reason"]
    assert [f.startswith(f"trace store {url.rstrip('/')}") for f in report["store_faults"]] \
        == [True]


def test_gate_answers_502_for_a_missing_file_trace_store(syn: Synthetic, tmp_path: Path
                                                         ) -> None:
    shutil.rmtree(syn.traces)
    with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root),
                      tmp_path / "gate.log") as gate:
        for path in (f"/{hash_part(syn.ia_out)}.narinfo", f"/realisations/{syn.ca_id}.doi"):
            status, body = get(gate.url + path)
            assert status == 502, body
            assert f"trace store file://{syn.traces}" in body.decode()
    events = gate.events()
    assert {e["outcome"] for e in events} == {"failed"}, events
    assert all(f"trace store file://{syn.traces}" in str(e["reason"])
               and "no trace" not in str(e["reason"]) for e in events)


def test_a_path_no_cache_has_is_never_remembered(syn: Synthetic, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The cache is filled after the first request: the path is served at once (no wait
    for a cache TTL), and every request meanwhile was logged (``tracehook log`` collapses
    them)."""
    narinfo = syn.cache / f"{hash_part(syn.ia_out)}.narinfo"
    kept = narinfo.rename(tmp_path / "kept.narinfo")
    log = tmp_path / "gate.log"
    url = f"/{hash_part(syn.ia_out)}.narinfo"
    with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root), log) as gate:
        for _ in range(3):
            status, body = get(gate.url + url)
            assert status == 404 and b"not available upstream" in body
        kept.rename(narinfo)  # the cache is filled
        assert get(gate.url + url)[0] == 200
    unavailable = [e for e in gate.events() if e["outcome"] == "unavailable"]
    assert len(unavailable) == 3 and all(e["name"] == "hello" for e in unavailable)
    assert "no binary cache has a narinfo" in str(unavailable[0]["reason"])
    capsys.readouterr()
    assert cli.main(["log", "--refused", str(log)]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert len(shown) == 1 and shown[0].endswith("(x3)") and "unavailable" in shown[0]


def test_a_missing_nar_is_unavailable_not_refused(syn: Synthetic, tmp_path: Path) -> None:
    """The claims attest no references, so the gate reads the NAR (to check the narinfo's
    References) and finds it missing; Nix's own NAR request is answered 404 (Nix then
    builds the path) and logged the same way."""
    nar = syn.cache / syn.nar_url
    kept = nar.rename(tmp_path / "kept.nar")
    with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root),
                      tmp_path / "gate.log") as gate:
        status, body = get(f"{gate.url}/{hash_part(syn.ia_out)}.narinfo")
        assert status == 404 and syn.nar_url.encode() in body
        assert get(f"{gate.url}/{syn.nar_url}")[0] == 404
        kept.rename(nar)
        assert get(f"{gate.url}/{hash_part(syn.ia_out)}.narinfo")[0] == 200
        assert get(f"{gate.url}/{syn.nar_url}")[0] == 200
    outcomes = [(e["outcome"], e["request"]) for e in gate.events()]
    assert outcomes[:2] == [("unavailable", "narinfo"), ("unavailable", "nar")], outcomes
    assert "refused" not in {o for o, _ in outcomes}
    said = [str(e["reason"]) for e in gate.events()[:2]]
    assert syn.nar_url in said[0] and f"binary cache file://{syn.cache}" in said[0]
    assert syn.nar_url in said[1]


def test_a_refusal_says_why_in_its_answer_and_names_the_step_once(
    syn: Synthetic, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path / "p.toml", syn.traces, '"builderB"', ["builderB"])
    with running_gate(policy, [f"file://{syn.cache}"], str(syn.root),
                      tmp_path / "gate.log") as gate:
        status, body = get(f"{gate.url}/{hash_part(syn.ia_out)}.narinfo")
    assert status == 404
    assert body.startswith(b"refused by tracehook gate: ") and b"builderA" in body
    # A reason that starts with the step's name (a graph error, a refusal from below):
    out = io.StringIO()
    GateLog(EventLog(None, prefix="tracehook-gate", stderr=out)).refused(
        "narinfo", "x.narinfo", "/nix/store/" + "a" * 32 + "-op-one.drv",
        Refusal("op-one: no trace for resolved step ca:" + "b" * 32))
    line = out.getvalue()
    assert "step op-one: no trace" in line and line.count("op-one") == 1, line
    record = json.loads(line.split("\t")[-1]) if "\t" in line else None
    assert record is None or record["reason"].startswith("op-one: ")
