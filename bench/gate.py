"""Benchmark of ``tracehook gate``: added latency, throughput, memory while streaming a NAR.

    .venv/bin/python bench/gate.py [--paths 200] [--rounds 10] [--seconds 5] [--nar-gib 1]

In one run, against one file binary cache (hand-made derivations with signed traces, as in
tests/gatekit.py):

- latency: narinfo round trips over one keep-alive connection, through the gate (a
  ``tracehook-gate`` subprocess, ``file://`` upstream, decisions warm) and from a plain
  HTTP server (a subprocess serving the same directory); median and p99 of each, and the
  added median and p99;
- throughput: 16 client processes, each with its own keep-alive connection, asking for
  narinfos through the gate for ``--seconds``; requests per second;
- memory: the gate's peak resident set (VmHWM) before and after streaming a 64 MiB and a
  ``--nar-gib`` GiB NAR (sparse files: neither side holds them in memory).

Targets (issue 5): <= 2 ms added median latency, >= 500 requests/s, memory flat in NAR size.
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from cacheserver import sparse_file  # noqa: E402
from gatekit import make_synthetic, write_gate_key  # noqa: E402
from tracehook.nix.storepath import hash_part  # noqa: E402

CLIENTS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(port: int, proc: subprocess.Popen[bytes], within: float = 20.0) -> None:
    """Until the server on ``port`` answers /nix-cache-info (it must, within ``within`` s)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/nix-cache-info")
            if conn.getresponse().status == 200:
                conn.close()
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"server on port {port} did not start")


def round_trips(port: int, paths: list[str], rounds: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times: list[float] = []
    for _ in range(rounds):
        for p in paths:
            start = time.perf_counter()
            conn.request("GET", p)
            resp = conn.getresponse()
            resp.read()
            times.append(time.perf_counter() - start)
            if resp.status != 200:
                raise SystemExit(f"{p}: HTTP {resp.status}")
    conn.close()
    return times


def _client(args: tuple[int, list[str], float]) -> int:
    port, paths, seconds = args
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    done = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        conn.request("GET", paths[done % len(paths)])
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise SystemExit(f"HTTP {resp.status}")
        done += 1
    conn.close()
    return done


def throughput(port: int, paths: list[str], seconds: float) -> float:
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(CLIENTS) as pool:
        start = time.monotonic()
        counts = pool.map(_client, [(port, paths, seconds)] * CLIENTS)
        elapsed = time.monotonic() - start
    return sum(counts) / elapsed


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise SystemExit("no VmHWM")


def stream(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("GET", path)
    resp = conn.getresponse()
    total = 0
    while True:
        block = resp.read(1 << 20)
        if not block:
            break
        total += len(block)
    conn.close()
    if resp.status != 200:
        raise SystemExit(f"{path}: HTTP {resp.status}")
    return total


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paths", type=int, default=200, help="distinct narinfos (default 200)")
    ap.add_argument("--rounds", type=int, default=10, help="latency rounds over all paths")
    ap.add_argument("--seconds", type=float, default=5.0, help="throughput run length")
    ap.add_argument("--nar-gib", type=float, default=1.0, help="size of the big NAR in GiB")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="tracehook-bench-gate-") as tmp:
        base = Path(tmp)
        syn = None
        paths: list[str] = []
        ids: list[str] = []
        for i in range((args.paths + 1) // 2):
            syn = make_synthetic(base / "data", tag=f"-{i}")
            paths += [f"/{hash_part(syn.ia_out)}.narinfo", f"/{hash_part(syn.ca_out)}.narinfo"]
            ids.append(f"/realisations/{syn.ca_id}.doi")
        assert syn is not None
        paths = paths[: args.paths]
        gate_key, _ = write_gate_key(base)
        small = sparse_file(syn.cache / "nar" / ("1" * 52 + ".nar"), 64 << 20)
        big = sparse_file(syn.cache / "nar" / ("2" * 52 + ".nar"), int(args.nar_gib * (1 << 30)))

        direct_port, gate_port = free_port(), free_port()
        direct = subprocess.Popen([sys.executable, str(REPO / "tests" / "cacheserver.py"),
                                   str(syn.cache), str(direct_port)])
        gate_cmd = [
            str(Path(sys.executable).parent / "tracehook-gate"),
            "--policy", str(syn.policy), "--upstream", f"file://{syn.cache}",
            "--listen", f"127.0.0.1:{gate_port}", "--store", str(syn.root),
            "--signing-key", str(gate_key), "--quiet",
        ]
        gate = subprocess.Popen(gate_cmd)
        try:
            wait_ready(direct_port, direct)
            wait_ready(gate_port, gate)
            # CA narinfos are answered once the gate verified their step (Nix asks for the
            # realisation first): warm every decision before measuring.
            warm = round_trips(gate_port, ids + paths, 1)
            round_trips(direct_port, paths, 1)
            d = round_trips(direct_port, paths, args.rounds)
            g = round_trips(gate_port, paths, args.rounds)
            rps_gate = throughput(gate_port, paths, args.seconds)
            rps_direct = throughput(direct_port, paths, args.seconds)
            rss0 = peak_rss_kib(gate.pid)
            n_small = stream(gate_port, f"/nar/{small.name}")
            rss1 = peak_rss_kib(gate.pid)
            t0 = time.monotonic()
            n_big = stream(gate_port, f"/nar/{big.name}")
            big_s = time.monotonic() - t0
            rss2 = peak_rss_kib(gate.pid)
        finally:
            for proc in (gate, direct):
                proc.terminate()
                proc.wait(10)

    ms = 1000.0
    print(f"narinfo round trips: {len(paths)} paths x {args.rounds} rounds, one keep-alive "
          f"connection, decisions warm (first, cold round: median "
          f"{statistics.median(warm) * ms:.2f} ms)")
    print(f"  direct (plain HTTP server): median {statistics.median(d) * ms:.3f} ms, "
          f"p99 {pct(d, 0.99) * ms:.3f} ms")
    print(f"  through the gate:           median {statistics.median(g) * ms:.3f} ms, "
          f"p99 {pct(g, 0.99) * ms:.3f} ms")
    added_med = (statistics.median(g) - statistics.median(d)) * ms
    added_p99 = (pct(g, 0.99) - pct(d, 0.99)) * ms
    print(f"  added by the gate:          median {added_med:.3f} ms, p99 {added_p99:.3f} ms "
          f"(target: median <= 2 ms) {'OK' if added_med <= 2 else 'MISSED'}")
    print(f"throughput, {CLIENTS} concurrent clients, {args.seconds:g} s: gate "
          f"{rps_gate:.0f} req/s (direct {rps_direct:.0f} req/s) (target >= 500) "
          f"{'OK' if rps_gate >= 500 else 'MISSED'}")
    print(f"gate peak RSS: {rss0 / 1024:.1f} MiB before NARs, {rss1 / 1024:.1f} MiB after "
          f"{n_small >> 20} MiB NAR, {rss2 / 1024:.1f} MiB after {n_big / (1 << 30):.2f} GiB NAR "
          f"({n_big / (1 << 20) / big_s:.0f} MiB/s) "
          f"{'flat OK' if rss2 - rss1 < 16 * 1024 else 'NOT FLAT'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
