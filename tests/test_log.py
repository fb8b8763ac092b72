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


def test_reads_journal_and_relayed_lines_from_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = "\n".join([
        "tracehook-gate: refused ca-c: threshold not met",  # a human line: passed over
        "Nov 25 06:00:00 host tracehook-gate[42]: " + json.dumps(
            {**REFUSAL, "time": "2026-11-25T06:00:00.000Z"}),
        "post-build-hook: " + json.dumps(
            {"time": "2026-11-25T06:00:01.000Z", "event": "sign", "outcome": "ok",
             "reason": None, "drv": "/nix/store/5mipw43fpg0ln44z1m74fijjadpg2lva-a.drv"}),
        "not json at all {",
    ])
    monkeypatch.setattr(sys, "stdin", io.StringIO(journal))
    code, out, _ = run_cli(["log", "--refused", "-"], capsys)
    assert code == 0
    (line,) = out.strip().splitlines()
    assert "refused" in line and "ca-c" in line


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
