"""``tracehook log`` and the CLI's basics: version, help, exit codes, reading logs back."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest

from tracehook import __version__
from tracehook.cli import main
from tracehook.stores.eventlog import EventLog

REFUSAL = {
    "event": "gate", "outcome": "refused",
    "drv": "/nix/store/35fkak9cib4lsfg7d7dbg2fa1nssfvd5-ca-c.drv",
    "reason": "step ca-b: threshold 2 of [builderA, builderB] not met: signed by builderA",
}


def write_log(path: Path) -> None:
    log = EventLog(path, prefix="tracehook-gate", stderr=None)
    log.emit("sign", "ok", "signed ca-a", drv="/nix/store/5mipw43fpg0ln44z1m74fijjadpg2lva-a.drv")
    log.emit("gate", "ok", "allowed ca-c", name="ca-c")
    log.emit("gate", "refused", "refused ca-c", **{k: v for k, v in REFUSAL.items()
                                                  if k not in ("event", "outcome")})


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"tracehook {__version__}"
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "exit codes" in out and "log" in out


def test_console_script_runs() -> None:
    exe = Path(sys.executable).with_name("tracehook")
    res = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == f"tracehook {__version__}"


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        pytest.param([], 2, "usage", id="no-command"),
        pytest.param(["frobnicate"], 2, "invalid choice", id="unknown-command"),
        pytest.param(["log", "/nonexistent/x.log"], 3, "cannot read log", id="missing-file"),
        pytest.param(["log", "--since", "yesterday-ish", "-"], 2, "--since", id="bad-since"),
    ],
)
def test_usage_and_environment_errors(
    argv: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    got, out, err = run_cli(argv, capsys)
    assert got == code
    assert message in out + err
    if code != 2 or argv:
        assert len((out + err).strip().splitlines()) <= 3  # one clear line, not a traceback


def test_human_view_and_refused_filter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gate.log"
    write_log(path)
    code, out, _ = run_cli(["log", str(path)], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 3
    assert "a  " in lines[0] and "ok" in lines[0]  # name taken from the drv path
    code, out, _ = run_cli(["log", "--refused", str(path)], capsys)
    (line,) = out.strip().splitlines()
    assert "ca-c" in line and "refused" in line and "threshold 2 of" in line


def test_json_output_and_event_filter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.log"
    write_log(path)
    code, out, _ = run_cli(["log", "--json", "--event", "sign", str(path)], capsys)
    assert code == 0
    (line,) = out.strip().splitlines()
    record = json.loads(line)
    assert record["event"] == "sign" and record["outcome"] == "ok" and record["time"]


def test_since(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.log"
    old = {**REFUSAL, "time": "2020-01-01T00:00:00.000Z"}
    path.write_text(json.dumps(old) + "\n")
    write_log(path)
    code, out, _ = run_cli(["log", "--refused", "--since", "1h", str(path)], capsys)
    assert (code, len(out.strip().splitlines())) == (0, 1)
    code, out, _ = run_cli(["log", "--refused", "--since", "2019-12-31T00:00:00Z", str(path)],
                           capsys)
    assert (code, len(out.strip().splitlines())) == (0, 2)


def test_reads_journal_lines_from_stdin_and_counts_the_rest(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the gate writes to stderr (the journal) reads back; lines without a record are
    counted on stderr, not skipped silently."""
    err = io.StringIO()
    gate = EventLog(None, prefix="tracehook-gate", stderr=err, journal=True)
    gate.emit("gate", "refused", "refused narinfo x: step ca-c: threshold not met",
              **{k: v for k, v in REFUSAL.items() if k not in ("event", "outcome")})
    gate.emit("gate", "allowed", "allowed ca-a", name="ca-a")
    journal = "\n".join([
        "tracehook-gate: refused ca-c: threshold not met",  # a human line, no record
        *err.getvalue().splitlines(),
        "Traceback (most recent call last):",
        "",  # blank lines are not counted
        "not json at all {",
    ])
    monkeypatch.setattr(sys, "stdin", io.StringIO(journal))
    code, out, stderr = run_cli(["log", "--refused", "-"], capsys)
    assert code == 0
    (line,) = out.strip().splitlines()
    assert "refused" in line and "ca-c" in line and "threshold 2 of" in line
    assert stderr.strip() == ("tracehook log: 3 line(s) could not be read as tracehook events "
                              "and were left out (first: stdin line 1); see "
                              'docs/OPERATIONS.md, "Log lines"')
    monkeypatch.setattr(sys, "stdin", io.StringIO(err.getvalue()))
    code, out, stderr = run_cli(["log", "-"], capsys)
    assert (code, len(out.strip().splitlines()), stderr) == (0, 2, "")


def test_unreadable_lines_in_files_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gate.log"
    write_log(path)
    with path.open("a") as f:
        f.write("garbage\n{\"not\": \"an event\"}\n")
    code, out, err = run_cli(["log", str(path)], capsys)
    assert code == 0 and len(out.strip().splitlines()) == 3
    assert "2 line(s) could not be read" in err and f"(first: {path} line 4)" in err


def test_follow_prints_lines_as_they_arrive(tmp_path: Path) -> None:
    path = tmp_path / "live.log"
    path.write_text("")
    exe = str(Path(sys.executable).with_name("tracehook"))
    child = pexpect.spawn(exe, ["log", "--follow", "--refused", str(path)], timeout=10,
                          encoding="utf-8")
    try:
        time.sleep(0.3)
        write_log(path)
        child.expect("threshold 2 of")
        assert "refused" in (child.before or "") + (child.after or "")
    finally:
        child.terminate(force=True)


def test_repeated_refusals_collapse_into_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nix asks several times for one refused step: the view says it once, with a count;
    --json keeps every record."""
    path = tmp_path / "gate.log"
    log = EventLog(path, prefix="tracehook-gate", stderr=None)
    fields = {k: v for k, v in REFUSAL.items() if k not in ("event", "outcome")}
    for _ in range(4):
        log.emit("gate", "refused", "refused ca-c", **fields)
    log.emit("gate", "refused", "refused other", drv="/nix/store/x-other.drv", reason="r")
    code, out, _ = run_cli(["log", "--refused", str(path)], capsys)
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[0].endswith("(x4)") and "ca-c" in lines[0]
    assert "other" in lines[1] and "(x" not in lines[1]
    code, out, _ = run_cli(["log", "--refused", "--json", str(path)], capsys)
    assert len(out.strip().splitlines()) == 5


def _record(name: str, reason: str, at: str, outcome: str = "failed") -> str:
    return json.dumps({"time": at, "event": "publish", "outcome": outcome, "reason": reason,
                       "drv": f"/nix/store/5mipw43fpg0ln44z1m74fijjadpg2lva-{name}.drv"})


def test_collapse_is_keyed_by_event_not_by_adjacency(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A store-down run: three steps fail over and over, their lines interleaved. The view
    says each once with its count (it used to print 14 lines for 3 steps)."""
    path = tmp_path / "sign.log"
    order = ["a", "b", "c", "a", "c", "b", "a", "a", "b", "c", "a", "b", "c", "a"]
    path.write_text("".join(
        _record(n, "trace store http://t/ unreachable", f"2026-11-25T06:00:{i:02d}.000Z") + "\n"
        for i, n in enumerate(order)))
    code, out, _ = run_cli(["log", "--refused", str(path)], capsys)
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 3, out
    counts = {n: order.count(n) for n in "abc"}
    for line, name in zip(lines, "abc", strict=True):  # in the order each was first seen
        assert f"  {name}  " in line and line.endswith(f"(x{counts[name]})"), line


def test_collapse_window_and_identity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "sign.log"
    path.write_text("".join(line + "\n" for line in [
        _record("a", "r1", "2026-11-25T06:00:00.000Z"),
        _record("a", "r1", "2026-11-25T06:00:59.000Z"),
        _record("a", "r1", "2026-11-25T06:01:01.000Z"),  # more than a minute after the first
        _record("a", "r2", "2026-11-25T06:00:30.000Z"),  # another reason: another event
        _record("a", "r1", "2026-11-25T06:00:10.000Z", outcome="kept"),
    ]))
    code, out, _ = run_cli(["log", str(path)], capsys)
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 4, out
    assert lines[0].endswith("(x2)") and "r1" in lines[0]
    assert [("(x" in line) for line in lines] == [True, False, False, False]


def test_default_sources_include_the_gate_log_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tracehook.cli import log as log_cmd

    signer_dir, gate_dir = tmp_path / "tracehook", tmp_path / "tracehook-gate"
    signer_dir.mkdir()
    gate_dir.mkdir()
    elsewhere = tmp_path / "elsewhere" / "gate.log"
    elsewhere.parent.mkdir()
    monkeypatch.setattr(log_cmd, "DEFAULT_LOG_DIRS", (signer_dir, gate_dir))
    monkeypatch.setenv("TRACEHOOK_GATE_LOG", str(tmp_path / "missing.log"))
    code, out, err = run_cli(["log"], capsys)
    assert code == 3 and str(gate_dir) in err and "journalctl -o cat" in err
    assert len(err.strip().splitlines()) == 1
    EventLog(signer_dir / "sign.log", stderr=None).emit(
        "sign", "ok", "h", drv="/nix/store/5mipw43fpg0ln44z1m74fijjadpg2lva-one.drv")
    EventLog(gate_dir / "gate.log", stderr=None).emit(
        "gate", "refused", "h", reason="no trace", name="two")
    EventLog(elsewhere, stderr=None).emit("gate", "refused", "h", reason="no trace",
                                          name="three")
    monkeypatch.setenv("TRACEHOOK_GATE_LOG", str(elsewhere))
    code, out, _ = run_cli(["log"], capsys)
    assert code == 0
    shown = out.strip().splitlines()
    assert len(shown) == 3 and all(any(f"  {n}  " in s for s in shown)
                                   for n in ("one", "two", "three"))
    code, out, _ = run_cli(["log", "--refused"], capsys)
    assert len(out.strip().splitlines()) == 2


def test_view_escapes_what_the_log_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A record whose fields came from an unsigned trace entry (a kid with a line break and a
    fake 'allowed' line) is shown on one line."""
    path = tmp_path / "gate.log"
    forged = "2026-11-25 06:00:00  gate       hello                         allowed"
    EventLog(path, stderr=None).emit(
        "gate", "refused", "h", name=f"x\n{forged}", reason=f"unknown key evil\r\n{forged}\x1b[2K")
    code, out, _ = run_cli(["log", str(path)], capsys)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 1
    assert "\x1b" not in out and "\\n" in lines[0]
    code, out, _ = run_cli(["log", "--json", str(path)], capsys)
    assert len(out.splitlines()) == 1
