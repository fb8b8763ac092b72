"""A generation that ends with the policy unchanged hands its verified steps and allowed
answers to the next one only when nothing they rest on changed
(tracehook.gate.warmstart.WarmStart.follow): real gate processes with --cache-dir and a
short --generation-max-age, the whole closure asked in one generation and again in the
next."""

from __future__ import annotations

import base64
import datetime as dt
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from attackkit import tamper_claimed_hash
from gateproc import GateProcess, gate_argv, gate_process, get, wait_for
from tracehook.errors import ParseError
from tracehook.gate import verdicts
from tracehook.gate.config import GateConfig, build_server
from tracehook.gate.memo import CacheConfig, DecisionCache
from tracehook.gate.verdicts import Succession
from tracehook.gate.warmstart import WarmStart, resting_on, still_standing, trace_keys
from tracehook.stores.eventlog import EventLog, parse_record
from tracehook.verify import replay
from tracehook.verify.trustedset import KeptStep
from traceserver import serve_traces

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from synth import SIGNERS, Closure, with_policy

AGE = 5.0  # --generation-max-age: one round of the 25-step closure takes a fraction of it


def _paths(c: Closure) -> list[str]:
    return [p for pair in c.requests() for p in pair if p]


@pytest.fixture
def closure(tmp_path: Path) -> tuple[Closure, Path]:
    return with_policy(tmp_path, 25)


@pytest.fixture
def gate(closure: tuple[Closure, Path], tmp_path: Path) -> Iterator[GateProcess]:
    c, policy = closure
    argv = gate_argv(policy, [f"file://{c.cache}"], c.root, tmp_path / "gate.log",
                     "--cache-dir", str(tmp_path / "cache-dir"),
                     "--generation-max-age", str(AGE))
    with gate_process(argv) as running:
        yield running


def _ask_all(gate: GateProcess, c: Closure) -> dict[str, tuple[int, bytes]]:
    return {p: get(gate.url + p) for p in _paths(c)}


def _next_generation(gate: GateProcess, c: Closure, began: float) -> dict[str, Any]:
    """Wait for the first generation (begun at ``began``) to end by age, start the next
    with one request, and give its ``gate-generation`` record once the hand-over is done."""
    assert time.monotonic() - began < AGE - 1, "the first round took most of a generation"
    assert not gate.events("gate-generation")
    time.sleep(max(0.0, began + AGE + 0.3 - time.monotonic()))
    # a generation begins at the next request that needs one (a path no step makes,
    # which decides nothing)
    assert get(f"{gate.url}/{'0' * 32}.narinfo")[0] == 404
    wait_for(lambda: bool(gate.events("gate-generation")), 30)
    (record,) = gate.events("gate-generation")
    return record


def _allowed(gate: GateProcess) -> int:
    return len([r for r in gate.records() if r["outcome"] == "allowed"])


def test_the_next_generation_takes_over_the_steps_and_answers(
        closure: tuple[Closure, Path], gate: GateProcess) -> None:
    c, _ = closure
    began = time.monotonic()
    first = _ask_all(gate, c)
    assert {s for s, _ in first.values()} == {200}
    decided = _allowed(gate)
    record = _next_generation(gate, c, began)
    assert record["answers"] == len(first), record
    # every build step and each source a step uses (a fixed-output step)
    assert len(c.steps) < record["steps"] <= len(c.steps) + len(c.sources)
    assert record["generation"] == 2 and record["reason"] is None
    assert _ask_all(gate, c) == first  # the same bytes, and nothing decided again:
    assert _allowed(gate) == decided  # no answer was made afresh


def test_the_traces_checker_processes_read_are_checked_again(tmp_path: Path) -> None:
    """A closure large enough for the engine's checker processes (limits.process_from):
    every trace file they read is among the files the hand-over reads again."""
    c, policy = with_policy(tmp_path, 600)
    traces = [p for p in (c.traces / "traces").iterdir() if not p.name.startswith(".")]
    age = 20.0
    argv = gate_argv(policy, [f"file://{c.cache}"], c.root, tmp_path / "gate.log",
                     "--cache-dir", str(tmp_path / "cache-dir"), "--generation-max-age", str(age))
    with gate_process(argv) as gate:
        began = time.monotonic()
        assert get(f"{gate.url}/realisations/{c.realisation_ids[c.target]}.doi")[0] == 200
        assert time.monotonic() - began < age - 2, "the closure took too long to decide"
        time.sleep(max(0.0, began + age + 0.3 - time.monotonic()))
        assert get(f"{gate.url}/{'0' * 32}.narinfo")[0] == 404
        wait_for(lambda: bool(gate.events("gate-generation")), 30)
        (record,) = gate.events("gate-generation")
        assert record["steps"] > 600 and record["reason"] is None, record
    # what the next generation rests on (its record for a restart, written at the stop)
    # names every trace file the last one read, in the checker processes too
    (path,) = (tmp_path / "cache-dir" / "gate").glob("*.run")
    kept = replay.load_record(str(path), {"files": dict})
    assert kept is not None
    files = kept["files"]
    assert isinstance(files, dict) and len(traces) > 600
    assert all(files.get(str(t.resolve())) for t in traces)


def _trace_of(c: Closure, drv: str) -> Path:
    """The trace file of the build step ``drv`` (the one whose claim names its output)."""
    (out,) = [o for d, o in c.steps if d == drv]
    (trace,) = [p for p in (c.traces / "traces").iterdir()
                if not p.name.startswith(".") and f'"{out}"'.encode() in _payloads(p)]
    return trace


def _payloads(trace: Path) -> bytes:
    doc = json.loads(trace.read_text())
    return b"".join(base64.urlsafe_b64decode(s.split(".")[1] + "==")
                    for s in doc["signatures"])


def _middle(c: Closure) -> str:
    """A build step with steps above it and steps that do not rest on it (pkg-1: the
    synthetic set's second package; its consumers are some of the steps above it)."""
    (drv,) = [d for d, _ in c.steps if d.endswith("-pkg-1.drv")]
    return drv


def _request(record: dict[str, Any]) -> str:
    """The path of the request an ``allowed`` record answered."""
    if record["request"] == "narinfo":
        return f"/{record['id']}"
    return f"/realisations/{record['id']}.doi"


def _stop(gate: GateProcess) -> dict[str, Any]:
    gate.proc.terminate()
    gate.proc.wait(timeout=15)
    wait_for(lambda: bool(gate.events("gate-stop", "ok")), 10)
    (stop,) = gate.events("gate-stop", "ok")
    return stop


def test_a_changed_trace_hands_on_the_steps_that_do_not_rest_on_it(
        closure: tuple[Closure, Path], gate: GateProcess) -> None:
    """The step whose trace changed and every step above it are decided again; every other
    step is taken over, with its answers (none of a step decided again)."""
    c, _ = closure
    began = time.monotonic()
    first = _ask_all(gate, c)
    assert {s for s, _ in first.values()} == {200}
    tamper_claimed_hash(_trace_of(c, _middle(c)))
    decided = _allowed(gate)
    record = _next_generation(gate, c, began)
    assert 0 < record["answers"] < len(first) and record["reason"] is None, record
    assert record["steps"] > 0, record
    second = _ask_all(gate, c)
    refused = {d for d, _ in c.steps
               if second[f"/realisations/{c.realisation_ids[d]}.doi"][0] == 404}
    assert _middle(c) in refused and 1 < len(refused) < len(c.steps), refused
    assert record["steps_again"] == len(refused), record
    # no answer of a step decided again was handed on: its output's narinfo is refused too
    assert {second[f"/{o.rsplit('/', 1)[1][:32]}.narinfo"][0] for d, o in c.steps
            if d in refused} == {404}
    assert {p: a for p, a in second.items() if a[0] == 200} == {
        p: a for p, a in first.items() if second[p][0] == 200}
    assert {s for s, _ in second.values()} == {200, 404}
    # every answer but those of the steps decided again was handed on: no allowed line
    # (the narinfos of sources no step was walked to are made again: they log none)
    assert _allowed(gate) == decided
    # decided afresh: exactly the steps that rest on the changed trace (it and those above)
    stop = _stop(gate)
    assert stop["planned"] == len(refused) and stop["taken_back"] > 0, stop


def test_a_trace_published_meanwhile_hands_on_every_step_taken(
        closure: tuple[Closure, Path], tmp_path: Path) -> None:
    """A step refused for want of a trace (a builder publishes it meanwhile, as the
    post-build hook does for what Nix then builds itself): the steps verified without it
    are taken over, and the step and those above it are decided with the new trace."""
    c, policy = closure
    trace = _trace_of(c, _middle(c))
    data = trace.read_bytes()
    trace.unlink()
    argv = gate_argv(policy, [f"file://{c.cache}"], c.root, tmp_path / "gate.log",
                     "--cache-dir", str(tmp_path / "cache-dir"), "--generation-max-age", "60")
    with gate_process(argv) as gate:
        first = _ask_all(gate, c)
        refused = {d for d, _ in c.steps
                   if first[f"/realisations/{c.realisation_ids[d]}.doi"][0] == 404}
        assert _middle(c) in refused and 1 < len(refused) < len(c.steps), refused
        time.sleep(0.05)  # (a new trace file ends the generation: its directory's mtime)
        before = gate.records()
        trace.write_bytes(data)
        # the next generation begins with a request once the gate looks at the store again
        wait_for(lambda: get(f"{gate.url}/{'0' * 32}.narinfo")[0] == 404
                 and bool(gate.events("gate-generation")), 30)
        (record,) = gate.events("gate-generation")
        assert record["reason"] is None, record
        assert record["steps"] > 0 and record["steps_again"] == 0, record
        second = _ask_all(gate, c)
        # the allowed answers went along (none rests on the step that had no trace): what
        # is decided again is what was refused
        again = {_request(r) for r in gate.records()[len(before):] if r["outcome"] == "allowed"}
        assert record["answers"] > 0 and again == {p for p, a in first.items() if a[0] == 404}
        assert {s for s, _ in second.values()} == {200}
        assert {p: a for p, a in second.items() if first[p][0] == 200} == {
            p: a for p, a in first.items() if a[0] == 200}
        stop = _stop(gate)
    assert stop["planned"] == len(refused) and stop["taken_back"] > 0, stop


def test_a_changed_upstream_narinfo_hands_on_the_steps_alone(
        closure: tuple[Closure, Path], gate: GateProcess, tmp_path: Path) -> None:
    c, _ = closure
    began = time.monotonic()
    first = _ask_all(gate, c)
    assert {s for s, _ in first.values()} == {200}
    # the cache now lies about one output: its NarHash no longer matches the traces
    lying = _paths(c)[1]
    narinfo = c.cache / lying.lstrip("/")
    lines = narinfo.read_text().splitlines()
    narinfo.write_text("\n".join((ln[:-1] + ("0" if ln[-1] != "0" else "1"))
                                 if ln.startswith("NarHash:") else ln for ln in lines) + "\n")
    record = _next_generation(gate, c, began)
    assert record["answers"] == 0 and record["steps"] > len(c.steps), record
    second = _ask_all(gate, c)
    (pair,) = [pair for pair in c.requests() if lying in pair]  # its realisation and itself
    assert {second[p][0] for p in pair if p} == {404}
    assert {p: a for p, a in second.items() if p not in pair} == {
        p: a for p, a in first.items() if p not in pair}
    # the answers were made again from the steps taken over: none was decided again
    gate.proc.terminate()
    gate.proc.wait(timeout=15)
    wait_for(lambda: bool(gate.events("gate-stop", "ok")), 10)
    (stop,) = gate.events("gate-stop", "ok")
    assert stop["planned"] == 0 and stop["taken_back"] > 0, stop


def test_a_generation_that_saw_a_fault_hands_nothing_on(closure: tuple[Closure, Path],
                                                         gate: GateProcess) -> None:
    """A trace that cannot be read (a directory where the file should be) is a fault: 502,
    the generation ends at the next request, and nothing of it is handed on."""
    c, _ = closure
    trace = sorted(p for p in (c.traces / "traces").iterdir() if not p.name.startswith("."))[0]
    data = trace.read_bytes()
    trace.unlink()
    trace.mkdir()
    first = _ask_all(gate, c)
    assert 502 in {s for s, _ in first.values()}
    trace.rmdir()
    trace.write_bytes(data)
    second = _ask_all(gate, c)  # decided afresh: every path is served
    assert {s for s, _ in second.values()} == {200}, [p for p, a in second.items() if a[0] != 200]
    assert not gate.events("gate-generation")


def test_a_changed_policy_hands_nothing_on(closure: tuple[Closure, Path],
                                           gate: GateProcess) -> None:
    c, policy = closure
    assert {s for s, _ in _ask_all(gate, c).values()} == {200}
    text = policy.read_text()
    pub = text.split(f'{SIGNERS[0]} = "', 1)[1].split('"', 1)[0]
    policy.write_text(text.replace(f'{SIGNERS[0]} = "{pub}"',
                                   f'{SIGNERS[0]} = {{ key = "{pub}", revoked = true }}'))
    gate.proc.send_signal(signal.SIGHUP)  # (read again at once)
    first = _paths(c)[0]
    wait_for(lambda: get(gate.url + first)[0] == 404, 10)  # both signers are required
    assert 404 in {s for s, _ in _ask_all(gate, c).values()}
    assert gate.events("policy-reload", "ok")
    assert not gate.events("gate-generation")  # another policy: nothing to hand on


def test_nothing_is_handed_on_past_a_not_after(closure: tuple[Closure, Path],
                                               tmp_path: Path) -> None:
    c, policy = closure
    text = policy.read_text()
    pub = text.split(f'{SIGNERS[1]} = "', 1)[1].split('"', 1)[0]
    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=5)
    policy.write_text(text.replace(
        f'{SIGNERS[1]} = "{pub}"',
        f'{SIGNERS[1]} = {{ key = "{pub}", not-after = {soon:%Y-%m-%dT%H:%M:%SZ} }}'))
    argv = gate_argv(policy, [f"file://{c.cache}"], c.root, tmp_path / "gate.log",
                     "--cache-dir", str(tmp_path / "cache-dir"), "--generation-max-age", "60")
    with gate_process(argv) as gate:
        assert {s for s, _ in _ask_all(gate, c).values()} == {200}
        # the generation ends at the key's not-after (whole seconds: up to a second early)
        time.sleep(max(0.0, (soon - dt.datetime.now(dt.timezone.utc)).total_seconds() + 1.2))
        assert get(f"{gate.url}/{'0' * 32}.narinfo")[0] == 404
        wait_for(lambda: bool(gate.events("gate-generation")), 30)
        (record,) = gate.events("gate-generation")
        assert record["steps"] == 0 and record["answers"] == 0
        assert "not-after" in record["reason"]
        assert 404 in {s for s, _ in _ask_all(gate, c).values()}  # the key has expired


def test_what_was_read_over_http_is_not_handed_on(closure: tuple[Closure, Path],
                                                  tmp_path: Path) -> None:
    c, policy = closure
    with serve_traces() as server:
        server.stand_in(c.traces, policy)
        argv = gate_argv(policy, [f"file://{c.cache}"], c.root, tmp_path / "gate.log",
                         "--cache-dir", str(tmp_path / "cache-dir"),
                         "--generation-max-age", str(AGE))
        with gate_process(argv) as gate:
            began = time.monotonic()
            assert {s for s, _ in _ask_all(gate, c).values()} == {200}
            record = _next_generation(gate, c, began)
            assert record["steps"] == 0 and record["answers"] == 0
            assert "cannot be checked again" in record["reason"]
            assert server.url in record["reason"]


@pytest.mark.parametrize("flags", [("--cache-dir", ""), ("--no-handover",)])
def test_without_a_cache_dir_or_with_no_handover_each_generation_decides_afresh(
        closure: tuple[Closure, Path], tmp_path: Path, flags: tuple[str, ...]) -> None:
    c, policy = closure
    argv = gate_argv(policy, [f"file://{c.cache}"], c.root, tmp_path / "gate.log",
                     "--cache-dir", str(tmp_path / "cache-dir"), *flags,
                     "--generation-max-age", str(AGE))
    with gate_process(argv) as gate:
        began = time.monotonic()
        first = _ask_all(gate, c)
        decided = _allowed(gate)
        time.sleep(max(0.0, began + AGE + 0.3 - time.monotonic()))
        assert _ask_all(gate, c) == first
        assert _allowed(gate) == 2 * decided
        assert not gate.events("gate-generation")


def test_nothing_is_handed_to_a_generation_that_is_no_longer_the_current_one(
        closure: tuple[Closure, Path], tmp_path: Path) -> None:
    """In process: a hand-over that ends after yet another generation began gives that
    one nothing (its steps would be decided under another generation's reads)."""
    c, policy = closure
    log = tmp_path / "events.log"
    cfg = GateConfig(policy=policy, upstreams=(f"file://{c.cache}",), store_root=str(c.root),
                     cache_dir=tmp_path / "cache-dir", index_interval=0)
    server = build_server(cfg, EventLog(log, stderr=None))
    service, warm = server.service, server.warm
    assert warm is not None
    try:
        assert service.realisation_v1(c.realisation_ids[c.target]).status == 200
        digest, serial = service.verifier.generation()
        engine = service.verifier._engine  # (the current generation's)
        assert engine is not None
        # a hand-over to a generation that is not the current one (another began meanwhile)
        warm.begin_generation(Succession((digest, serial), (digest, serial + 1), time.time(),
                                         engine.keep))

        def records() -> list[dict[str, Any]]:
            text = log.read_text() if log.exists() else ""
            return [r for r in map(parse_record, text.splitlines()) if r is not None
                    and r["event"] == "gate-generation"]

        wait_for(lambda: bool(records()), 30)
        (record,) = records()
        assert record["steps"] == 0 and record["reason"] == "another generation began meanwhile"
        assert service.verifier.steps_taken_back == 0
    finally:
        server.server_close()
        service.verifier.close()


def test_an_answer_handed_on_lives_no_longer_than_it_had_left() -> None:
    now = [100.0]
    memo: DecisionCache[str] = DecisionCache(CacheConfig(ttl=10.0), clock=lambda: now[0])
    memo.put(("a", 1), "x")
    now[0] = 104.0
    ((key, expires, value),) = memo.fresh_entries()
    assert (key, expires, value) == (("a", 1), 110.0, "x")
    memo.put(("a", 2), value, expires)
    now[0] = 109.0
    assert memo.peek(("a", 2)) == "x"
    now[0] = 110.0
    assert memo.peek(("a", 2)) is None and memo.fresh_entries() == []


def test_the_steps_rest_on_all_but_the_binary_caches_files(tmp_path: Path) -> None:
    cache, traces = tmp_path / "cache", tmp_path / "cache" / "ts" / "traces"
    files: dict[str, str | None] = {
        f"{cache}/abc.narinfo": "1", f"{cache}/realisations/x.doi": None,
        f"{traces}/key": "2", f"{tmp_path}/store/x.drv": "3", f"{cache}x/other": "4"}
    assert resting_on(files, [str(cache) + "/"], [str(traces)]) == {
        f"{traces}/key": "2", f"{tmp_path}/store/x.drv": "3", f"{cache}x/other": "4"}
    assert resting_on(files, [], []) == files


def test_what_stands_when_traces_changed() -> None:
    """still_standing: lowest first, a step falls with its own trace key, with an input
    that fell or is not kept, or when its derivation cannot be read; a fixed output never
    falls; trace_keys names the keys of changed trace files, or None for another file."""
    def step(*keys: str, fixed: bool = False) -> KeptStep:
        return (fixed, tuple(("ca", k, f"/r/{k}.drv", ()) for k in keys), (), (), 1, 0)

    kept: dict[str, tuple[int, KeptStep]] = {
        "f": (1, step(fixed=True)), "a": (1, step("ka")), "b": (2, step("kb1", "kb2")),
        "c": (3, step("kc")), "d": (2, step("kd")), "e": (2, step("ke"))}
    inputs = {"a": [], "b": ["a", "f"], "c": ["b", "d"], "d": ["a"], "e": ["a", "gone"],
              "f": ["x"]}

    def inputs_of(path: str) -> list[str]:
        if path == "d" and broken:
            raise ParseError("d.drv", "unreadable")
        return inputs[path]

    broken = False
    assert still_standing(kept, frozenset(), inputs_of) == kept
    # b's second key changed: b and c above it fall; e rests on a step that is not kept
    assert set(still_standing(kept, frozenset({"kb2"}), inputs_of)) == {"f", "a", "d"}
    assert set(still_standing(kept, frozenset({"ka"}), inputs_of)) == {"f"}
    assert set(still_standing(kept, frozenset({"nobody's"}), inputs_of)) == {
        "f", "a", "b", "c", "d"}
    broken = True
    assert set(still_standing(kept, frozenset({"kb1"}), inputs_of)) == {"f", "a"}

    dirs = ["/s/one/traces", "/s/two/traces/"]
    assert trace_keys(["/s/one/traces/k1", "/s/two/traces/k2"], dirs) == frozenset({"k1", "k2"})
    assert trace_keys([], dirs) == frozenset()
    assert trace_keys(["/s/one/traces/k1", "/s/one/store/x.drv"], dirs) is None
    assert trace_keys(["/s/one/tracesX/k1"], dirs) is None


@pytest.mark.parametrize("hold", [5.0, 0.2])
def test_a_new_generation_waits_for_what_the_last_one_hands_on(
        closure: tuple[Closure, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        hold: float) -> None:
    """In process: a request that comes while the hand-over is under way waits for it
    (at most HANDOVER_HOLD seconds) rather than deciding afresh the steps it brings; past
    the hold it decides them itself."""
    c, policy = closure
    slow = 1.0  # seconds the hand-over takes
    original = WarmStart._take_over

    def slowly(self: WarmStart, *args: Any) -> None:
        time.sleep(slow)
        original(self, *args)

    monkeypatch.setattr(WarmStart, "_take_over", slowly)
    monkeypatch.setattr(verdicts, "HANDOVER_HOLD", hold)
    cfg = GateConfig(policy=policy, upstreams=(f"file://{c.cache}",), store_root=str(c.root),
                     cache_dir=tmp_path / "cache-dir", index_interval=0,
                     generation_max_age=1.0)
    server = build_server(cfg, EventLog(tmp_path / "events.log", stderr=None))
    service = server.service
    top = c.realisation_ids[c.target]
    try:
        first = service.realisation_v1(top)
        assert first.status == 200
        time.sleep(1.1)  # the generation ends by age: the next request begins another
        started = time.monotonic()
        assert service.realisation_v1(top) == first
        took = time.monotonic() - started
        verifier = service.verifier
        if hold > slow:  # waited for the steps handed on: none decided afresh
            assert took >= slow - 0.1 and verifier.steps_planned == 0
            assert verifier.steps_taken_back > len(c.steps)
        else:  # waited no longer than the hold: decided afresh
            assert took < slow - 0.1 and verifier.steps_planned >= len(c.steps)
    finally:
        server.server_close()
        service.verifier.close()
