"""Helpers for the attack table (tests/test_attacks.py): editing a binary cache the way a
lying cache would, altering a signed claim the way a trace-store writer could, signing
traces in laut's shape (no references), asking a gate over HTTP,
a listener that runs as another user, and a subprocess whose peak memory is measured.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gatekit import BUILDER_INFO, built_steps
from nixharness import NixEnv
from tracehook.nix import narinfo
from tracehook.nix.storepath import basename, hash_part
from tracehook.stores.tracestore import FileTraceStore
from tracehook.trace import crypto
from tracehook.trace.claim import sign_trace

EXE = str(Path(sys.executable).with_name("tracehook"))


def narinfo_file(cache: Path, path: str) -> Path:
    return cache / f"{hash_part(path)}.narinfo"


def read_narinfo(cache: Path, path: str) -> narinfo.NarInfo:
    return narinfo.parse(narinfo_file(cache, path).read_text())


def edit_narinfo(cache: Path, path: str, **changes: Any) -> narinfo.NarInfo:
    """Rewrite the cache's narinfo of ``path`` with ``changes`` (NarInfo fields; base names
    in ``references``). Its ``Sig:`` lines are dropped unless ``sigs`` is given: the cache's
    signature no longer matches what it now says."""
    ni = replace(read_narinfo(cache, path), **{"sigs": (), **changes})
    narinfo_file(cache, path).write_text(narinfo.render(ni))
    return ni


def tamper_claimed_hash(trace: Path) -> None:
    """Change one character of every output hash the first signature of ``trace`` claims,
    keeping its header and signature: a forged claim by a trusted key."""
    doc = json.loads(trace.read_text())
    header, payload, sig = doc["signatures"][0].split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    for out in body["out"]["nix"].values():
        out["hash"] = out["hash"][:-1] + ("0" if out["hash"][-1] != "0" else "1")
    raw = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    doc["signatures"][0] = f"{header}.{raw}.{sig}"
    trace.write_text(json.dumps(doc))


def without(refs: Sequence[str], path: str) -> tuple[str, ...]:
    return tuple(r for r in refs if r != basename(path))


def sign_laut_style(env: NixEnv, drv_paths: Sequence[str], sk: crypto.SecretKey,
                    traces: Path) -> None:
    """Sign every built step of the closures as laut does: path and NAR hash of each output,
    no ``references`` (the extension of docs/FORMAT.md 2.2 left out)."""
    store = FileTraceStore(f"file://{traces}", traces)
    for step in built_steps(env, drv_paths):
        outputs = {n: replace(oc, references=None) for n, oc in step.outputs.items()}
        store.append(step.resolution.key.key,
                     [sign_trace(sk, step.resolution.key, outputs, BUILDER_INFO, step.drv.name)])


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


def get(url: str, timeout: float = 60) -> Reply:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return Reply(int(resp.status), resp.read())
    except urllib.error.HTTPError as exc:
        return Reply(int(exc.code), exc.read())


# ------------------------------------------------------------ fake signing agents


@dataclass
class Wedged:
    received: bytes = b""


@contextlib.contextmanager
def wedged_agent(path: Path) -> Iterator[Wedged]:
    """A signing agent at ``path`` that takes the request and never answers (until the
    context ends): what the hook's bounded wait is for."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    release = threading.Event()
    got = Wedged()

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            with conn:
                conn.settimeout(5)
                got.received = conn.recv(65536)
                release.wait()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield got
    finally:
        release.set()
        server.close()
        thread.join(timeout=10)


# ------------------------------------------------------------ a listener of another user

_LISTENER = r"""
import os, socket, sys
path, uid = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
os.chmod(path, 0o666)
os.setgid(uid)
os.setuid(uid)  # SO_PEERCRED reports the credentials the listener had at listen()
s.listen(4)
print("listening", flush=True)
conn, _ = s.accept()
conn.settimeout(3)
data = b""
try:
    data = conn.recv(65536)
    conn.sendall(b"0\ntracehook: signed (a fake agent)\n")
except OSError:
    pass
print("received " + data.hex(), flush=True)
"""


@dataclass
class OtherUser:
    proc: subprocess.Popen[str]

    def received(self) -> bytes:
        """What the hook sent (waits for the listener to end, at most 10 s)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()
        out, _ = self.proc.communicate()
        for line in out.splitlines():
            if line.startswith("received"):
                return bytes.fromhex(line.removeprefix("received").strip())
        return b""  # never connected to


@contextlib.contextmanager
def listener_of_uid(path: Path, uid: int) -> Iterator[OtherUser]:
    """A fake signing agent at ``path`` run by ``uid`` (the test runs as root): it records
    what it is sent, and answers as an agent that signed."""
    proc = subprocess.Popen([sys.executable, "-c", _LISTENER, str(path), str(uid)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "listening"
    other = OtherUser(proc)
    try:
        yield other
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# ------------------------------------------------------- a subprocess's peak memory

# Forks and execs the command from a small process, so that the peak it reports (ru_maxrss,
# which counts the pages a child shares with its parent between fork and exec) is the
# command's own, not the test process's.
_MEASURE = r"""
import os, signal, sys, time
report, timeout, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
pid = os.fork()
if pid == 0:
    os.execv(argv[0], argv)
deadline = time.monotonic() + timeout
while True:
    got, status, usage = os.wait4(pid, os.WNOHANG)
    if got:
        rc = os.waitstatus_to_exitcode(status)
        break
    if time.monotonic() > deadline:
        os.kill(pid, signal.SIGKILL)
        _, _, usage = os.wait4(pid, 0)
        rc = "killed"
        break
    time.sleep(0.01)
with open(report, "w") as f:
    f.write(f"{rc} {usage.ru_maxrss}")
"""


@dataclass(frozen=True)
class Measured:
    rc: int | None  # None: killed at the deadline
    out: str
    err: str
    peak_mib: float  # the command's peak resident set (ru_maxrss)
    seconds: float


def run_measured(argv: Sequence[str], tmp: Path, timeout: float = 60) -> Measured:
    """Run ``argv`` to its end (killed after ``timeout`` s) and measure its peak memory."""
    report = tmp / "measured.report"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(report), str(timeout),
                           *argv], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout + 30, check=True)
    rc, peak = report.read_text().split()
    return Measured(None if rc == "killed" else int(rc), done.stdout, done.stderr,
                    int(peak) / 1024, time.monotonic() - started)
