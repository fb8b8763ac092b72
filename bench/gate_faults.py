"""The gate under a stuck trace store and a flood of trickling connections.

    .venv/bin/python bench/gate_faults.py [--runs 7] [--connections 520]

Each run makes a small synthetic store (tests/gatekit.py: an input-addressed step and a
floating-CA step, signed, a file binary cache) with its traces on a real HTTP trace store
on 127.0.0.1 (tests/traceserver.py), and starts three ``tracehook gate`` subprocesses on it,
each with a fresh ``--cache-dir`` (so the request timed is a cold decision):

- **baseline**: the CA step's realisation is asked for (and answered), then the
  input-addressed step's narinfo is timed;
- **stuck store**: the trace store never answers the CA step's key; its realisation is
  asked for first (that verification waits), then, 0.3 s later, the same narinfo as the
  baseline is timed: the delay is the difference;
- **trickling**: ``--connections`` connections are opened first, each holding a partial
  request (half of them one byte, half a request line without its end), then the same
  narinfo is timed on a new connection.

Prints each run's three times, the delay, and the median and spread over the runs, against
the targets (a stuck key delays another path by at most 100 ms; a new client is answered
within 1 s despite the flood).
"""

from __future__ import annotations

import argparse
import http.client
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from gate import free_port  # noqa: E402
from gate_scale import wait_ready  # noqa: E402

from gatekit import Synthetic, make_synthetic, write_policy  # noqa: E402
from tracehook.nix.storepath import hash_part  # noqa: E402
from tracehook.stores.nixstore import StoreReader  # noqa: E402
from tracehook.trace.stepkey import step_key  # noqa: E402
from traceserver import TraceServer, serve_traces  # noqa: E402

TRACEHOOK = str(Path(sys.executable).parent / "tracehook")


@contextmanager
def gate(policy: Path, syn: Synthetic, state: Path) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        [
            TRACEHOOK,
            "gate",
            "--policy",
            str(policy),
            "--upstream",
            f"file://{syn.cache}",
            "--store",
            str(syn.root),
            "--listen",
            f"127.0.0.1:{port}",
            "--quiet",
            "--cache-dir",
            str(state),
            "--verify-deadline",
            "10",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def timed_get(port: int, path: str, timeout: float = 30.0) -> float:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("GET", path)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    if resp.status != 200:
        raise SystemExit(f"{path}: HTTP {resp.status}")
    return time.perf_counter() - start


def one_run(base: Path, connections: int) -> tuple[float, float, float]:
    syn = make_synthetic(base / "syn")
    narinfo = f"/{hash_part(syn.ia_out)}.narinfo"
    drv = StoreReader(str(syn.root)).read_derivation(syn.ca_drv)
    ca_key = step_key(drv, {}).key.key
    with serve_traces() as server:
        load(server, syn)
        policy = write_policy(base / "policy.toml", Path("/unused"), '"builderA"', ["builderA"])
        lines = policy.read_text().splitlines()
        lines[0] = f'traces = ["{server.url}"]'
        policy.write_text("\n".join(lines) + "\n")

        with gate(policy, syn, base / "state-baseline") as port:
            timed_get(port, f"/realisations/{syn.ca_id}.doi")  # as below, but answered
            baseline = timed_get(port, narinfo)

        stuck = threading.Event()
        server.state.hang[ca_key] = stuck
        try:
            with gate(policy, syn, base / "state-stuck") as port:
                waiting = threading.Thread(
                    target=lambda: _ignore_errors(port, f"/realisations/{syn.ca_id}.doi"),
                    daemon=True,
                )
                waiting.start()
                time.sleep(0.3)  # that verification is now waiting on the stuck key
                with_stuck = timed_get(port, narinfo)
                stuck.set()  # answered while the gate still listens
                waiting.join(timeout=30)
        finally:
            stuck.set()
            del server.state.hang[ca_key]

        with gate(policy, syn, base / "state-flood") as port:
            flood = []
            try:
                for i in range(connections):
                    s = socket.create_connection(("127.0.0.1", port))
                    s.sendall(b"GET /nix-cache-info HTTP/1.1\r\n" if i % 2 else b"G")
                    flood.append(s)
                time.sleep(0.5)
                with_flood = timed_get(port, narinfo)
            finally:
                for s in flood:
                    s.close()
    return baseline, with_stuck, with_flood


def load(server: TraceServer, syn: Synthetic) -> None:
    for f in (syn.traces / "traces").iterdir():
        if not f.name.startswith("."):
            server.state.files[f.name] = f.read_bytes()


def _ignore_errors(port: int, path: str) -> None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", path)
        conn.getresponse().read()
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--connections", type=int, default=520)
    args = ap.parse_args(argv)
    rows = []
    print(f"{'run':>4} {'baseline ms':>12} {'stuck store ms':>15} {'delay ms':>9} {'flood ms':>9}")
    for n in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="tracehook-bench-faults-") as tmp:
            b, s, f = one_run(Path(tmp), args.connections)
        rows.append((b, s, f))
        print(
            f"{n:>4} {b * 1000:>12.1f} {s * 1000:>15.1f} {(s - b) * 1000:>9.1f} {f * 1000:>9.1f}",
            flush=True,
        )
    delays = [(s - b) * 1000 for b, s, _ in rows]
    floods = [f * 1000 for _, _, f in rows]
    print(
        f"delay by a stuck trace-store key: median {statistics.median(delays):.1f} ms "
        f"(min {min(delays):.1f}, max {max(delays):.1f}); target <= 100 ms"
    )
    print(
        f"answer despite {args.connections} trickling connections: median "
        f"{statistics.median(floods):.1f} ms (min {min(floods):.1f}, max {max(floods):.1f}); "
        "target <= 1000 ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
