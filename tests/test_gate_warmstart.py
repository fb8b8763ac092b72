"""A restarted gate replays the last run's answers only when nothing they rest on changed
(tracehook.gate.warmstart): real gate processes, stopped with SIGTERM and started again on
the same --cache-dir."""

from __future__ import annotations

import base64
import datetime as dt
import json
import sys
import time
from pathlib import Path

import pytest

from attackkit import tamper_claimed_hash
from gatekit import write_gate_key
from gateproc import gate_argv, gate_process, get
from testkeys import secret
from tracehook.trace import crypto
from traceserver import serve_traces

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from synth import SIGNERS, Closure, generate, with_policy


def _paths(c: Closure) -> list[str]:
    return [p for pair in c.requests() for p in pair if p]


Answers = dict[str, tuple[int, bytes]]
STDERR: list[str] = []


def _run(c: Closure, policy: Path, tmp: Path, *extra: str
         ) -> tuple[Answers, list[dict[str, object]]]:
    """Every path of the closure asked of a gate process that is then stopped: the answers
    and the gate's event records (its whole stderr in STDERR[-1])."""
    argv = gate_argv(policy, [f"file://{c.cache}"], c.root, tmp / "gate.log",
                     "--cache-dir", str(tmp / "cache-dir"), *extra)
    with gate_process(argv) as gate:
        answers = {p: get(gate.url + p) for p in _paths(c)}
    STDERR.append(gate.stderr)
    return answers, gate.records()


def _warm(records: list[dict[str, object]]) -> int:
    got = [r for r in records if r["event"] == "gate-warm-start"]
    return int(got[0]["answers"]) if got else 0  # type: ignore[call-overload]


@pytest.fixture
def closure(tmp_path: Path) -> tuple[Closure, Path]:
    return with_policy(tmp_path, 25)


def test_a_restart_replays_the_last_runs_answers(closure: tuple[Closure, Path],
                                                  tmp_path: Path) -> None:
    c, policy = closure
    key, _ = write_gate_key(tmp_path)
    first, records = _run(c, policy, tmp_path, "--signing-key", str(key))
    assert {s for s, _ in first.values()} == {200}
    kept = [r for r in records if r["event"] == "gate-stop" and r["outcome"] == "ok"]
    assert kept and kept[0]["answers"] == len(first)
    second, records = _run(c, policy, tmp_path, "--signing-key", str(key))
    assert _warm(records) == len(first)
    assert second == first  # the same bytes, signatures included
    # the second run decided nothing: no "allowed" line, yet it kept its answers again
    assert not [r for r in records if r["outcome"] == "allowed"]
    assert [r for r in records if r["event"] == "gate-stop" and r["outcome"] == "ok"]
    third, records = _run(c, policy, tmp_path, "--signing-key", str(key))
    assert _warm(records) == len(first) and third == first


def _first_trace(c: Closure) -> Path:
    return sorted(p for p in (c.traces / "traces").iterdir() if not p.name.startswith("."))[0]


@pytest.mark.parametrize("change", ["tampered-trace", "removed-trace", "revoked-key",
                                    "upstream-narinfo", "other-signing-key",
                                    "other-nar-urls", "expired-meanwhile"])
def test_a_restart_never_replays_what_changed(closure: tuple[Closure, Path], tmp_path: Path,
                                              change: str) -> None:
    c, policy = closure
    key, _ = write_gate_key(tmp_path)
    if change == "expired-meanwhile":
        text = policy.read_text()
        pub = text.split(f'{SIGNERS[1]} = "', 1)[1].split('"', 1)[0]
        soon = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=4)).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
        policy.write_text(text.replace(f'{SIGNERS[1]} = "{pub}"',
                                       f'{SIGNERS[1]} = {{ key = "{pub}", not-after = {soon} }}'))
    first, _ = _run(c, policy, tmp_path, "--signing-key", str(key))
    assert {s for s, _ in first.values()} == {200}
    extra = ["--signing-key", str(key)]
    if change == "tampered-trace":
        tamper_claimed_hash(_first_trace(c))
    elif change == "removed-trace":
        _first_trace(c).unlink()
    elif change == "revoked-key":
        text = policy.read_text()
        pub = text.split(f'{SIGNERS[0]} = "', 1)[1].split('"', 1)[0]
        policy.write_text(text.replace(f'{SIGNERS[0]} = "{pub}"',
                                       f'{SIGNERS[0]} = {{ key = "{pub}", revoked = true }}'))
    elif change == "upstream-narinfo":
        # the cache now lies about one output: its NarHash no longer matches the traces
        path = _paths(c)[1]
        ni = c.cache / path.lstrip("/")
        lines = ni.read_text().splitlines()
        lines = [(ln[:-1] + ("0" if ln[-1] != "0" else "1")) if ln.startswith("NarHash:")
                 else ln for ln in lines]
        ni.write_text("\n".join(lines) + "\n")
    elif change == "other-signing-key":
        other = tmp_path / "other.secret"
        other.write_text(crypto.format_secret_key(secret("gate-2")))
        extra = ["--signing-key", str(other)]
    elif change == "other-nar-urls":
        extra += ["--nar-urls", "gate"]
    else:
        time.sleep(4.5)
    second, records = _run(c, policy, tmp_path, *extra)
    if change in ("tampered-trace", "removed-trace"):
        # only the answers of the steps that do not rest on that trace are replayed (the
        # others are refused below)
        assert _warm(records) < len(first)
    else:
        assert _warm(records) == 0
    if change == "other-signing-key":
        assert {s for s, _ in second.values()} == {200}
        assert all(b"gate-2:" in body for p, (_, body) in second.items()
                   if p.endswith(".narinfo"))
    elif change == "upstream-narinfo":
        assert second[_paths(c)[1]][0] == 404
    elif change == "other-nar-urls":
        narinfos = [b for p, (_, b) in second.items() if p.endswith(".narinfo")]
        assert {s for s, _ in second.values()} == {200}
        assert all(b"\nURL: nar/" in b for b in narinfos)
        assert all(b"\nURL: file://" in b for p, (_, b) in first.items()
                   if p.endswith(".narinfo"))
    else:
        assert 404 in {s for s, _ in second.values()}


def test_what_cannot_be_rechecked_is_not_kept(closure: tuple[Closure, Path],
                                              tmp_path: Path) -> None:
    """A trace store over HTTP: its answers cannot be re-read at start; nothing is kept."""
    c, policy = closure
    with serve_traces() as server:
        server.stand_in(c.traces, policy)
        first, records = _run(c, policy, tmp_path)
        assert {s for s, _ in first.values()} == {200}
        assert not [r for r in records if r["event"] == "gate-stop" and r["outcome"] == "ok"]
        _, records = _run(c, policy, tmp_path)
        assert _warm(records) == 0
    assert not list((tmp_path / "cache-dir").glob("gate/*.run"))


def test_a_damaged_record_is_removed_and_decided_again(closure: tuple[Closure, Path],
                                                       tmp_path: Path) -> None:
    c, policy = closure
    first, _ = _run(c, policy, tmp_path)
    (record,) = (tmp_path / "cache-dir" / "gate").glob("*.run")
    record.write_bytes(record.read_bytes()[:100])
    second, records = _run(c, policy, tmp_path)
    assert _warm(records) == 0 and second == first
    assert f"verification record {record} unusable" in STDERR[-1]
    third, records = _run(c, policy, tmp_path)  # the second run kept a good one again
    assert _warm(records) == len(first) and third == first


def _changed_only(tmp: Path, c: Closure, policy: Path, cache_dir: str, *, tamper: bool = False,
                  ) -> tuple[Answers, list[dict[str, object]]]:
    """The closure's last ordinary step changed (it and the aggregates above it are new),
    and only the new steps asked of a gate on ``cache_dir``, as Nix asks when it has the
    rest; with ``tamper``, a trace of an unchanged step below is forged first."""
    changed = generate(tmp, 25, changed="pkg-23", store=c.root)
    new = {d for d, _ in changed.steps} - {d for d, _ in c.steps}
    assert len(new) >= 2
    if tamper:
        tamper_claimed_hash(_first_trace(c))
    argv = gate_argv(policy, [f"file://{changed.cache}"], changed.root, tmp / "gate.log",
                     "--cache-dir", str(tmp / cache_dir))
    with gate_process(argv) as gate:
        answers = {p: get(gate.url + p) for pair in changed.requests(new) for p in pair}
    STDERR.append(gate.stderr)
    return answers, gate.records()


def _stopped(records: list[dict[str, object]]) -> dict[str, object]:
    (stop,) = [r for r in records if r["event"] == "gate-stop" and r["outcome"] == "ok"]
    return stop


def test_a_changed_step_after_a_restart_is_decided_on_the_kept_steps_below_it(
        closure: tuple[Closure, Path], tmp_path: Path) -> None:
    c, policy = closure
    first, records = _run(c, policy, tmp_path)
    kept = _stopped(records)["steps"]
    # every build step, and each source some step uses (a fixed-output step)
    assert len(c.steps) < kept <= len(c.steps) + len(c.sources)  # type: ignore[operator]
    cold_dir = tmp_path / "cold"
    cold_dir.mkdir()
    cold, cold_records = _changed_only(cold_dir, *with_policy(cold_dir, 25), "cache-dir")
    warm, records = _changed_only(tmp_path, c, policy, "cache-dir")
    assert _warm(records) == len(first)
    assert {s for s, _ in warm.values()} == {200}
    # the same answers as a gate that kept nothing (the closures are generated alike)
    here, there = str(tmp_path / "cache").encode(), str(cold_dir / "cache").encode()
    assert list(warm.values()) == [(s, b.replace(there, here)) for s, b in cold.values()]
    stop, cold_stop = _stopped(records), _stopped(cold_records)
    new = len(warm) // 2
    # the warm gate decided the new steps alone, on the kept steps they build on; the
    # cold one walked and decided the whole closure below them
    assert stop["planned"] == new and 0 < int(stop["taken_back"]) < len(c.steps)  # type: ignore[call-overload]
    assert cold_stop["planned"] >= len(c.steps)  # type: ignore[operator]
    assert cold_stop["taken_back"] == 0


def test_kept_steps_are_not_taken_back_when_a_trace_below_changed(
        closure: tuple[Closure, Path], tmp_path: Path) -> None:
    c, policy = closure
    _run(c, policy, tmp_path)
    answers, records = _changed_only(tmp_path, c, policy, "cache-dir", tamper=True)
    (warm,) = [r for r in records if r["event"] == "gate-warm-start"]
    assert int(warm["steps_again"]) > 0  # type: ignore[call-overload]
    # the changed steps rest on the forged one (the aggregates gather every leaf): refused
    assert 404 in {s for s, _ in answers.values()}


def test_a_restart_after_a_trace_changed_takes_back_the_steps_that_do_not_rest_on_it(
        closure: tuple[Closure, Path], tmp_path: Path) -> None:
    """Only trace files changed while the gate was stopped (a builder published, or a
    trace was forged): the steps that rest on a changed trace (it and every step above it)
    are decided again, and every other step is taken back with its answers."""
    c, policy = closure
    first, records = _run(c, policy, tmp_path)
    assert {s for s, _ in first.values()} == {200}
    recorded = int(_stopped(records)["steps"])  # type: ignore[call-overload]
    (middle,) = [d for d, _ in c.steps if d.endswith("-pkg-1.drv")]
    (out,) = [o for d, o in c.steps if d == middle]
    (trace,) = [p for p in (c.traces / "traces").iterdir()
                if not p.name.startswith(".") and out.encode() in b"".join(
                    base64.urlsafe_b64decode(sig.split(".")[1] + "==")
                    for sig in json.loads(p.read_text())["signatures"])]
    tamper_claimed_hash(trace)
    second, records = _run(c, policy, tmp_path)
    refused = {d for d, _ in c.steps
               if second[f"/realisations/{c.realisation_ids[d]}.doi"][0] == 404}
    assert middle in refused and 1 < len(refused) < len(c.steps), refused
    (warm,) = [r for r in records if r["event"] == "gate-warm-start"]
    assert 0 < int(warm["answers"]) < len(first), warm  # type: ignore[call-overload]
    assert warm["steps_again"] == len(refused), warm
    # every answer of a step taken back was replayed: the run wrote no allowed line
    assert not [r for r in records if r["outcome"] == "allowed"]
    # and none of a step decided again: every path of those is refused, narinfos included
    assert {second[f"/{o.rsplit('/', 1)[1][:32]}.narinfo"][0] for d, o in c.steps
            if d in refused} == {404}
    assert warm["steps"] == recorded - len(refused), warm
    assert {p: a for p, a in second.items() if a[0] == 200} == {
        p: a for p, a in first.items() if second[p][0] == 200}
    assert {s for s, _ in second.values()} == {200, 404}
    # what the second run decided: the steps above the forged trace, nothing else
    stop = [r for r in records if r["event"] == "gate-stop"]
    assert stop and stop[0]["planned"] == len(refused), stop
