"""The gate's peak memory when a trace file it needs is huge or a symlink to /dev/zero.

    .venv/bin/python bench/gate_memory.py [--trace-mib 300] [--repeats 3]

For each case a fresh ``tracehook-gate`` subprocess serves a hand-made store (tests/gatekit.py
``make_synthetic``: ``file://`` binary cache and trace store). Its peak resident set
(``VmHWM`` in /proc) is read after it started and answered ``nix-cache-info``, then after it
answered the narinfo of the one path whose trace file the case changes:

- ``as signed``: the trace file as the builder wrote it (the path verifies: 200);
- ``300 MB trace file``: that file replaced by ``--trace-mib`` MiB of real bytes (a JSON
  string, not a sparse file);
- ``symlink to /dev/zero``: that file replaced by a symlink to /dev/zero.

Issue 13 measured the gate before the fix at 645 MB with the 300 MB file, and at its 3 GiB
cap (then a MemoryError) with /dev/zero.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from gate import free_port, peak_rss_kib, wait_ready  # noqa: E402

from gatekit import Synthetic, make_synthetic  # noqa: E402
from tracehook.nix.storepath import hash_part  # noqa: E402
from tracehook.stores.nixstore import StoreReader  # noqa: E402
from tracehook.trace.stepkey import step_key  # noqa: E402

CASES = ("as signed", "300 MB trace file", "symlink to /dev/zero")


def poison(syn: Synthetic, case: str, mib: int) -> None:
    drv = StoreReader(str(syn.root)).read_derivation(syn.ia_drv)
    trace = syn.traces / "traces" / step_key(drv, {}).key.key
    if case == "as signed":
        return
    trace.unlink()
    if case == "symlink to /dev/zero":
        trace.symlink_to("/dev/zero")
        return
    with trace.open("wb") as f:
        f.write(b'{"signatures": ["')
        block = b"A" * (1 << 20)
        for _ in range(mib):
            f.write(block)
        f.write(b'"]}\n')


def get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("GET", path)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status


def measure(base: Path, case: str, mib: int) -> tuple[float, float, int]:
    """(VmHWM MiB after start, VmHWM MiB after the request, the request's HTTP status)."""
    syn = make_synthetic(base)
    poison(syn, case, mib)
    port = free_port()
    gate = subprocess.Popen([
        str(Path(sys.executable).parent / "tracehook-gate"), "--policy", str(syn.policy),
        "--upstream", f"file://{syn.cache}", "--listen", f"127.0.0.1:{port}",
        "--store", str(syn.root), "--quiet"], stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, gate)
        before = peak_rss_kib(gate.pid) / 1024
        status = get(port, f"/{hash_part(syn.ia_out)}.narinfo")
        after = peak_rss_kib(gate.pid) / 1024
    finally:
        gate.terminate()
        gate.wait(10)
    return before, after, status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace-mib", type=int, default=300, help="size of the big trace file")
    ap.add_argument("--repeats", type=int, default=3, help="fresh gates per case")
    args = ap.parse_args(argv)
    print(f"gate peak RSS (VmHWM), MiB, median of {args.repeats} fresh gates (min-max)")
    print(f"{'case':24} {'after start':>20} {'after the request':>20} {'growth':>8}  answer")
    with tempfile.TemporaryDirectory(prefix="tracehook-bench-gatemem-") as tmp:
        for n, case in enumerate(CASES):
            runs = [measure(Path(tmp) / f"case{n}-{i}", case, args.trace_mib)
                    for i in range(args.repeats)]
            before = [r[0] for r in runs]
            after = [r[1] for r in runs]
            growth = statistics.median(a - b for b, a in zip(before, after, strict=True))
            shown = [f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})"
                     for v in (before, after)]
            print(f"{case:24} {shown[0]:>20} {shown[1]:>20} {growth:+8.1f}  "
                  f"HTTP {'/'.join(sorted({str(r[2]) for r in runs}))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
