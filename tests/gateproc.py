"""A real ``tracehook gate`` process for tests, its stderr a pipe (the journal, as under
systemd): started, read line by line in a thread, stopped with SIGTERM.

``gate_process(argv)`` waits for the ``gate-start`` event and gives the gate's URL; the
lines written so far are in ``GateProcess.lines`` (:meth:`GateProcess.records` parses
them). :func:`get` fetches one URL: (status, body).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracehook.stores.eventlog import parse_record

EXE = str(Path(sys.executable).with_name("tracehook"))


@dataclass
class GateProcess:
    proc: subprocess.Popen[str]
    url: str = ""
    lines: list[str] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)

    def read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            record = parse_record(line)
            if record is not None and record["event"] == "gate-start":
                self.url = f"http://{record['listen']}"
                self.started.set()
        self.started.set()

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def records(self) -> list[dict[str, Any]]:
        return [r for r in map(parse_record, list(self.lines)) if r is not None]

    def events(self, event: str, outcome: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.records()
                if r["event"] == event and (outcome is None or r["outcome"] == outcome)]


def gate_argv(policy: Path, upstreams: Sequence[str], store: Path | str, log_file: Path,
              *extra: str) -> list[str]:
    argv = [EXE, "gate", "--policy", str(policy), "--store", str(store), "--listen",
            "127.0.0.1:0", "--log-file", str(log_file)]
    for url in upstreams:
        argv += ["--upstream", url]
    return [*argv, *extra]


@contextlib.contextmanager
def gate_process(argv: Sequence[str]) -> Iterator[GateProcess]:
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    gate = GateProcess(proc)
    reader = threading.Thread(target=gate.read, daemon=True)
    reader.start()
    try:
        assert gate.started.wait(30) and gate.url, gate.stderr
        yield gate
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def wait_for(check: Callable[[], bool], timeout: float, step: float = 0.05) -> float:
    """Seconds until ``check()`` held; AssertionError after ``timeout``."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"not within {timeout} s"
        time.sleep(step)
    return time.monotonic() - started
